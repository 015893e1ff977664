//! Reading the connection string: the two TLS parameters tokio-postgres does not know are taken
//! out, and a copy with the password hidden is kept for display. Both libpq forms: a
//! `postgres://` URL (parameters in the query string, percent-encoded) and `key=value` pairs.

use crate::error::{Error, Result};

/// The URL with `sslmode`/`sslrootcert` taken out, and those two values.
pub(super) struct Split {
    pub rest: String,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub redacted: String,
}

const REDACTED: &str = "***";

/// `url` (a Postgres URL or `key=value` string) with its password, in the user info or a
/// `password` parameter, replaced by `***`. For tools that show URLs; not a stable interface.
pub fn redact_url(url: &str) -> String {
    match split_params(url) {
        Ok(split) => split.redacted,
        Err(_) => "(unreadable connection string)".to_owned(),
    }
}

pub(super) fn split_params(url: &str) -> Result<Split> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url(url)
    } else {
        split_keywords(url)
    }
}

/// URL form: the two parameters are in the query string, percent-encoded.
fn split_url(url: &str) -> Result<Split> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let redacted_base = redact_userinfo(base);
    let mut split = Split {
        rest: base.to_owned(),
        sslmode: None,
        sslrootcert: None,
        redacted: redacted_base,
    };
    let Some(query) = query else {
        return Ok(split);
    };
    let mut kept = Vec::new();
    let mut shown = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| {
                Error::InvalidConfig(format!(
                    "database URL parameter {key:?} is not valid UTF-8 once percent-decoded"
                ))
            })?
            .into_owned();
        match key {
            "sslmode" => split.sslmode = Some(decoded),
            "sslrootcert" => split.sslrootcert = Some(decoded),
            _ => kept.push(pair),
        }
        shown.push(if key == "password" {
            format!("password={REDACTED}")
        } else {
            pair.to_owned()
        });
    }
    if !kept.is_empty() {
        split.rest = format!("{base}?{}", kept.join("&"));
    }
    if !shown.is_empty() {
        split.redacted = format!("{}?{}", split.redacted, shown.join("&"));
    }
    Ok(split)
}

/// `scheme://user:password@host` → `scheme://user:***@host`. Up to the last `@`: a password
/// with an unescaped `@` is hidden whole.
fn redact_userinfo(base: &str) -> String {
    let Some((scheme, rest)) = base.split_once("://") else {
        return base.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((creds, host)) => match creds.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:{REDACTED}@{host}"),
            None => base.to_owned(),
        },
        None => base.to_owned(),
    }
}

/// `key=value` form: values may be single-quoted, with `\` escaping the next character.
fn split_keywords(conninfo: &str) -> Result<Split> {
    let pairs = keywords(conninfo)?;
    let mut split = Split {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
        redacted: String::new(),
    };
    let mut kept = Vec::new();
    let mut shown = Vec::new();
    for (key, value) in pairs {
        let quoted = quote(&value);
        shown.push(if key == "password" {
            format!("password={REDACTED}")
        } else {
            format!("{key}={quoted}")
        });
        match key.as_str() {
            "sslmode" => split.sslmode = Some(value),
            "sslrootcert" => split.sslrootcert = Some(value),
            _ => kept.push(format!("{key}={quoted}")),
        }
    }
    split.rest = kept.join(" ");
    split.redacted = shown.join(" ");
    Ok(split)
}

fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn keywords(conninfo: &str) -> Result<Vec<(String, String)>> {
    let bad = || {
        Error::InvalidConfig(
            "database connection string is invalid: use postgres://user@host:port/db or key=value pairs (host=… dbname=…)".into(),
        )
    };
    let mut pairs = Vec::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return Err(bad());
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or_else(bad)?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(bad()),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().ok_or_else(bad)?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}
