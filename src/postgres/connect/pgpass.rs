//! The password file (`PGPASSFILE`, else `~/.pgpass`), read as libpq reads it.

use std::path::{Path, PathBuf};

use tokio_postgres::config::Host;

use super::Env;

/// The password of the first matching line of the password file, as libpq finds it.
pub(super) fn password_from_file(pg: &tokio_postgres::Config, env: Env<'_>) -> Option<String> {
    let path = match env("PGPASSFILE") {
        Some(p) => PathBuf::from(p),
        None => Path::new(&env("HOME")?).join(".pgpass"),
    };
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "password file has group or world access and is ignored: chmod 0600 it"
            );
            return None;
        }
    }
    let text = std::fs::read_to_string(&path).ok()?;
    // A socket directory matches `localhost`, as in libpq.
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(_)) | None => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = pg
        .get_user()
        .map(str::to_owned)
        .or_else(|| env("USER"))
        .unwrap_or_default();
    let db = pg
        .get_dbname()
        .map(str::to_owned)
        .unwrap_or_else(|| user.clone());
    pgpass_lookup(&text, [&host, &port, &db, &user])
}

/// The first line of a `.pgpass` file whose `host:port:database:user` matches (`*` matches
/// anything; `\` escapes `:` and `\`); its password.
pub(crate) fn pgpass_lookup(text: &str, wanted: [&str; 4]) -> Option<String> {
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        // (text, was exactly an unescaped `*`)
        let mut field = String::new();
        let mut raw_star = true;
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                ':' if fields.len() < 4 => {
                    fields.push((std::mem::take(&mut field), raw_star));
                    raw_star = true;
                }
                '\\' => {
                    raw_star = false;
                    if let Some(next) = chars.next() {
                        field.push(next);
                    }
                }
                c => {
                    raw_star &= c == '*' && field.is_empty();
                    field.push(c);
                }
            }
        }
        if fields.len() < 4 {
            continue;
        }
        let matches = fields
            .iter()
            .zip(wanted)
            .all(|((f, star), want)| (*star && f == "*") || f == want);
        if matches {
            return Some(field);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_lines_match_as_in_libpq() {
        let text = "# comment\n\
                    other:5432:*:app:nope\n\
                    db\\:1:*:shop:app:first\\:pw\n\
                    *:*:*:app:fallback\n";
        assert_eq!(
            pgpass_lookup(text, ["db:1", "5432", "shop", "app"]).as_deref(),
            Some("first:pw")
        );
        assert_eq!(
            pgpass_lookup(text, ["db:1", "5432", "other", "app"]).as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup(text, ["x", "1", "d", "bob"]), None);
        // An escaped star is a literal star.
        assert_eq!(pgpass_lookup("\\*:*:*:*:pw", ["h", "1", "d", "u"]), None);
        assert_eq!(
            pgpass_lookup("\\*:*:*:*:pw", ["*", "1", "d", "u"]).as_deref(),
            Some("pw")
        );
        assert_eq!(pgpass_lookup("h:1:d", ["h", "1", "d", "u"]), None);
    }
}
