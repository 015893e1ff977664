//! From a database URL (and the libpq environment) to what the drivers connect with: one
//! `tokio_postgres::Config`, one rustls connector, and the sqlx options for migrations.
//!
//! Everything about connection set-up is decided here, once, when the handle is built: the pool,
//! the listener and `migrate()` all connect with the same settings, so they cannot disagree on
//! TLS. Nothing here runs per statement.
//!
//! libpq conventions:
//! - `sslmode`: `disable`, `allow` (treated as `prefer`), `prefer` (the default), `require`,
//!   `verify-ca`, `verify-full`, from the URL or `PGSSLMODE`. `require` encrypts without
//!   checking the certificate, unless a root certificate is available, in which case it checks
//!   the chain as `verify-ca` does. `verify-ca` checks the chain only, `verify-full` the chain
//!   and the host name.
//! - `sslrootcert` (or `PGSSLROOTCERT`): a PEM file of trusted CAs, or `system` for the system's
//!   roots (which implies `verify-full`). Without it, `~/.postgresql/root.crt` when it exists,
//!   else the system roots for `verify-ca`/`verify-full`.
//! - Parts missing from the URL come from `PGHOST` (else `localhost`), `PGPORT`, `PGUSER`,
//!   `PGDATABASE`, `PGPASSWORD`, `PGOPTIONS`, `PGAPPNAME` and `PGCONNECT_TIMEOUT`; a password
//!   still missing is looked up in `PGPASSFILE` (else `~/.pgpass`), which is ignored, as libpq
//!   does, when group or others can read it.
//!
//! tokio-postgres knows only `disable`/`prefer`/`require` and rejects `sslrootcert`, so both are
//! taken out of the URL here before it is parsed (`url.rs`); certificate checks are the
//! connector's (`tls.rs`); the password file is `pgpass.rs`.

mod pgpass;
mod tls;
mod url;

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::CertificateError;
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{ConnectProblem, Error, Result};
pub use url::redact_url;
use url::split_params;

/// The TLS connector every pgtide connection to PostgreSQL uses.
pub(crate) type Tls = MakeRustlsConnect;

/// `sslmode`, as libpq spells it (`allow` is read as `prefer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::InvalidConfig(format!(
                    "sslmode {other:?} is invalid: use disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Roots {
    /// A PEM file.
    File(PathBuf),
    /// The operating system's store.
    System,
}

/// Everything needed to open a connection, resolved from the URL and the environment.
#[derive(Clone)]
pub(crate) struct ConnectConfig {
    /// Host, port, user, password, dbname, options; `ssl_mode` is what tokio-postgres negotiates
    /// (the certificate checks are in `tls`).
    pub pg: tokio_postgres::Config,
    /// The rustls connector, with the verifier `mode` calls for.
    pub tls: Tls,
    /// The effective mode (after `require` + root certificate became `verify-ca`).
    pub mode: SslMode,
    /// The CAs checked against, for `verify-ca`/`verify-full`.
    pub roots: Option<Roots>,
    /// The URL as given, password replaced by `***`: safe to show.
    pub redacted: String,
}

impl fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("url", &self.redacted)
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

/// The process environment as the resolver sees it (tests pass their own).
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads the real process environment; empty values count as unset, as in libpq.
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl ConnectConfig {
    /// Resolves `url` (a `postgres://` URL or a `key=value` connection string) with the process
    /// environment.
    pub(crate) fn from_url(url: &str) -> Result<ConnectConfig> {
        ConnectConfig::resolve(url, &process_env)
    }

    /// Resolves `url` with the environment `env`.
    pub(crate) fn resolve(url: &str, env: Env<'_>) -> Result<ConnectConfig> {
        let split = split_params(url)?;
        let mut pg: tokio_postgres::Config = split
            .rest
            .parse()
            .map_err(|e| Error::InvalidConfig(format!("database URL {}: {e}", split.redacted)))?;
        fill_from_env(&mut pg, env);

        let explicit_mode = match split.sslmode.or_else(|| env("PGSSLMODE")) {
            Some(m) => Some(SslMode::parse(&m)?),
            None => None,
        };
        let given_root = split.sslrootcert.or_else(|| env("PGSSLROOTCERT"));
        let (mode, roots) = match given_root.as_deref() {
            Some("system") => match explicit_mode {
                None | Some(SslMode::VerifyFull) => (SslMode::VerifyFull, Some(Roots::System)),
                Some(_) => {
                    return Err(Error::InvalidConfig(
                        "sslrootcert=system needs sslmode=verify-full (or no sslmode): a weaker mode would not check the host name".into(),
                    ))
                }
            },
            Some(path) => {
                let mode = explicit_mode.unwrap_or(SslMode::Prefer);
                (mode, Some(Roots::File(PathBuf::from(path))))
            }
            None => {
                let mode = explicit_mode.unwrap_or(SslMode::Prefer);
                let default = env("HOME")
                    .map(|home| Path::new(&home).join(".postgresql").join("root.crt"))
                    .filter(|p| p.is_file());
                (mode, default.map(Roots::File))
            }
        };
        // libpq: `require` with a root certificate at hand checks the chain as `verify-ca` does.
        let mode = match (mode, &roots) {
            (SslMode::Require, Some(Roots::File(_))) => SslMode::VerifyCa,
            (mode, _) => mode,
        };
        let roots = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => Some(roots.unwrap_or(Roots::System)),
            _ => None,
        };
        pg.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let tls = MakeRustlsConnect::new(tls::client_config(mode, roots.as_ref())?);
        Ok(ConnectConfig {
            pg,
            tls,
            mode,
            roots,
            redacted: split.redacted,
        })
    }

    /// The options sqlx connects with for migrations: the same server, credentials and TLS.
    pub(crate) fn sqlx_options(&self) -> Result<sqlx::postgres::PgConnectOptions> {
        use sqlx::postgres::{PgConnectOptions, PgSslMode};
        let mut o = PgConnectOptions::new_without_pgpass();
        o = match self.pg.get_hosts().first() {
            Some(Host::Tcp(host)) => o.host(host),
            Some(Host::Unix(path)) => o.socket(path),
            None => match self.pg.get_hostaddrs().first() {
                Some(addr) => o.host(&addr.to_string()),
                None => o.host("localhost"),
            },
        };
        o = o.port(self.pg.get_ports().first().copied().unwrap_or(5432));
        if let Some(user) = self.pg.get_user() {
            o = o.username(user);
        }
        if let Some(password) = self.pg.get_password() {
            let password = std::str::from_utf8(password).map_err(|_| {
                Error::InvalidConfig("the database password is not valid UTF-8".into())
            })?;
            o = o.password(password);
        }
        if let Some(db) = self.pg.get_dbname() {
            o = o.database(db);
        }
        if let Some(name) = self.pg.get_application_name() {
            o = o.application_name(name);
        }
        if let Some(options) = self.pg.get_options() {
            o = o.options(
                server_settings(options)?
                    .into_iter()
                    .map(|(k, v)| (k, option_value(&v))),
            );
        }
        o = o.ssl_mode(match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
        match &self.roots {
            Some(Roots::File(path)) => o = o.ssl_root_cert(path),
            // sqlx read `PGSSLROOTCERT=system` as a file name; no extra PEM leaves it with
            // the system's roots alone.
            Some(Roots::System) => o = o.ssl_root_cert_from_pem(Vec::new()),
            None => {}
        }
        Ok(o)
    }
}

/// The connection half of [`connect_raw`]: poll it (or spawn it) for the client to work.
pub type RawConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <Tls as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// Opens one plain tokio-postgres connection to `url`, resolved and secured exactly as
/// [`PgBackend`](crate::PgBackend) connects (libpq environment, password file, `sslmode`).
/// For tools that speak SQL beside pgtide (the CLI, the benchmark's raw baselines); not a
/// stable interface.
pub async fn connect_raw(url: &str) -> Result<(tokio_postgres::Client, RawConnection)> {
    // pgtide's own URL parameters (the statement mode) mean nothing to a plain connection.
    let c = ConnectConfig::from_url(&super::exec::strip_url_params(url)?.0)?;
    Ok(c.pg.connect(c.tls).await?)
}

/// libpq's defaults for what the URL leaves out.
fn fill_from_env(pg: &mut tokio_postgres::Config, env: Env<'_>) {
    if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
        let hosts = env("PGHOST").unwrap_or_else(|| "localhost".to_owned());
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            pg.host(host);
        }
    }
    if pg.get_ports().is_empty() {
        if let Some(ports) = env("PGPORT") {
            for port in ports.split(',').filter_map(|p| p.trim().parse().ok()) {
                pg.port(port);
            }
        }
    }
    if pg.get_user().is_none() {
        if let Some(user) = env("PGUSER") {
            pg.user(user);
        }
    }
    if pg.get_dbname().is_none() {
        if let Some(db) = env("PGDATABASE") {
            pg.dbname(db);
        }
    }
    if pg.get_options().is_none() {
        if let Some(options) = env("PGOPTIONS") {
            pg.options(options);
        }
    }
    if pg.get_application_name().is_none() {
        if let Some(name) = env("PGAPPNAME") {
            pg.application_name(name);
        }
    }
    if pg.get_connect_timeout().is_none() {
        // libpq: whole seconds, 0 or less means wait forever.
        if let Some(secs) = env("PGCONNECT_TIMEOUT").and_then(|s| s.trim().parse::<u64>().ok()) {
            if secs > 0 {
                pg.connect_timeout(std::time::Duration::from_secs(secs));
            }
        }
    }
    if pg.get_password().is_none() {
        let password = env("PGPASSWORD").or_else(|| pgpass::password_from_file(pg, env));
        if let Some(password) = password {
            pg.password(password);
        }
    }
}

/// A setting's value as sqlx writes it into the startup `options` (`-c key=value`, which it does
/// not escape): backslashes and whitespace escaped, as the server splits the string on them
/// (`search_path=a\ b`, `default_transaction_isolation=read\ committed`).
pub(crate) fn option_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '\\' || c.is_whitespace() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `-c key=value` and `--key=value` settings of a libpq `options` string, for sqlx (which
/// takes them as pairs).
fn server_settings(options: &str) -> Result<Vec<(String, String)>> {
    let mut tokens = Vec::new();
    let mut token = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => token.extend(chars.next()),
            c if c.is_whitespace() => {
                if !token.is_empty() {
                    tokens.push(std::mem::take(&mut token));
                }
            }
            c => token.push(c),
        }
    }
    if !token.is_empty() {
        tokens.push(token);
    }
    let mut settings = Vec::new();
    let mut tokens = tokens.into_iter();
    while let Some(t) = tokens.next() {
        let setting = if t == "-c" {
            tokens.next().unwrap_or_default()
        } else if let Some(s) = t.strip_prefix("--").or_else(|| t.strip_prefix("-c")) {
            s.to_owned()
        } else {
            String::new()
        };
        match setting.split_once('=') {
            Some((k, v)) if !k.is_empty() => settings.push((k.to_owned(), v.to_owned())),
            _ => {
                return Err(Error::InvalidConfig(format!(
                    "database URL options {options:?}: use -c name=value settings only"
                )))
            }
        }
    }
    Ok(settings)
}

/// What a failed connection attempt means for the user, when it is one of the set-up failures
/// that need a configuration change (see [`ConnectProblem`]). Looks through the error's causes:
/// tokio-postgres and sqlx wrap the server's and rustls's errors.
pub(crate) fn problem(e: &(dyn std::error::Error + 'static)) -> Option<ConnectProblem> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(found) = problem_of(e) {
            return Some(found);
        }
        // `io::Error::source()` skips the error it wraps: look at that one too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = problem(inner) {
                return Some(found);
            }
        }
        next = e.source();
    }
    None
}

fn problem_of(e: &(dyn std::error::Error + 'static)) -> Option<ConnectProblem> {
    if let Some(rustls::Error::InvalidCertificate(c)) = e.downcast_ref::<rustls::Error>() {
        return Some(match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                ConnectProblem::HostNameMismatch
            }
            _ => ConnectProblem::CertificateUntrusted,
        });
    }
    let (code, message) = if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
        match pg.as_db_error() {
            Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
            None => (String::new(), pg.to_string()),
        }
    } else if let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>() {
        (
            db.code().map(|c| c.into_owned()).unwrap_or_default(),
            db.message().to_owned(),
        )
    } else {
        (String::new(), e.to_string())
    };
    match code.as_str() {
        "28P01" => Some(ConnectProblem::PasswordRejected),
        "28000" if message.contains("no encryption") => Some(ConnectProblem::TlsRequired),
        "" if message.contains("password missing") => Some(ConnectProblem::PasswordMissing),
        "" if message.contains("does not support TLS")
            || message.contains("does not support SSL") =>
        {
            Some(ConnectProblem::TlsUnsupported)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn extra_libpq_parameters_are_taken_out_of_url_and_keywords() {
        let c = ConnectConfig::resolve(
            "postgres://app:s3cret@db.example:6432/shop?sslmode=verify-ca&application_name=x&sslrootcert=%2Ftmp%2Fnone.pem",
            &env_of(&[]),
        );
        // The root file does not exist: the error names it, not the password.
        let e = c.unwrap_err().to_string();
        assert!(e.contains("/tmp/none.pem"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");

        let c = ConnectConfig::resolve(
            "host=db.example port=6432 user=app password='it''s' sslmode=require dbname=shop",
            &env_of(&[]),
        );
        assert!(c.is_err(), "unbalanced quote is refused");
        let c = ConnectConfig::resolve(
            r"host=db.example port=6432 user=app password='it\'s s3cret' sslmode=require dbname=shop",
            &env_of(&[]),
        )
        .unwrap();
        assert_eq!(c.mode, SslMode::Require);
        assert_eq!(c.pg.get_password(), Some(&b"it's s3cret"[..]));
        assert_eq!(c.pg.get_dbname(), Some("shop"));
        assert!(!c.redacted.contains("s3cret"), "{}", c.redacted);
        assert_eq!(
            redact_url("postgres://u:p@ss@h/d?password=x&sslmode=require"),
            "postgres://u:***@h/d?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("host=h password='a b' user=u"),
            "host='h' password=*** user='u'"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn modes_follow_libpq() {
        let none = env_of(&[]);
        let mode = |url: &str| ConnectConfig::resolve(url, &none).map(|c| (c.mode, c.roots));
        assert_eq!(mode("postgres://u@h/d").unwrap(), (SslMode::Prefer, None));
        assert_eq!(
            mode("postgres://u@h/d?sslmode=allow").unwrap(),
            (SslMode::Prefer, None)
        );
        assert_eq!(
            mode("postgres://u@h/d?sslmode=require").unwrap(),
            (SslMode::Require, None)
        );
        assert_eq!(
            mode("postgres://u@h/d?sslmode=disable").unwrap(),
            (SslMode::Disable, None)
        );
        assert!(mode("postgres://u@h/d?sslmode=bogus").is_err());
        assert!(mode("postgres://u@h/d?sslrootcert=system&sslmode=require").is_err());
        let env = env_of(&[("PGSSLMODE", "require")]);
        let c = ConnectConfig::resolve("postgres://u@h/d", &env).unwrap();
        assert_eq!(c.mode, SslMode::Require);
        // The URL wins over the environment.
        let c = ConnectConfig::resolve("postgres://u@h/d?sslmode=disable", &env).unwrap();
        assert_eq!(c.mode, SslMode::Disable);
    }

    #[test]
    fn missing_parts_come_from_the_environment() {
        let env = env_of(&[
            ("PGHOST", "db1"),
            ("PGPORT", "6543"),
            ("PGUSER", "app"),
            ("PGDATABASE", "shop"),
            ("PGPASSWORD", "pw"),
            ("PGAPPNAME", "billing"),
            ("PGOPTIONS", "-c statement_timeout=0"),
            ("PGCONNECT_TIMEOUT", "7"),
        ]);
        let c = ConnectConfig::resolve("postgres://", &env).unwrap();
        assert_eq!(c.pg.get_hosts(), &[Host::Tcp("db1".into())]);
        assert_eq!(c.pg.get_ports(), &[6543]);
        assert_eq!(c.pg.get_user(), Some("app"));
        assert_eq!(c.pg.get_dbname(), Some("shop"));
        assert_eq!(c.pg.get_password(), Some(&b"pw"[..]));
        assert_eq!(c.pg.get_application_name(), Some("billing"));
        assert_eq!(c.pg.get_options(), Some("-c statement_timeout=0"));
        assert_eq!(
            c.pg.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        // What the URL has stays.
        let c = ConnectConfig::resolve("postgres://other:x@h2:1/db", &env).unwrap();
        assert_eq!(c.pg.get_hosts(), &[Host::Tcp("h2".into())]);
        assert_eq!(c.pg.get_user(), Some("other"));
        assert_eq!(c.pg.get_password(), Some(&b"x"[..]));
        assert_eq!(c.redacted, "postgres://other:***@h2:1/db");
        let c = ConnectConfig::resolve("postgres://", &env_of(&[])).unwrap();
        assert_eq!(c.pg.get_hosts(), &[Host::Tcp("localhost".into())]);
    }

    #[test]
    fn options_become_sqlx_settings() {
        assert_eq!(
            server_settings("-c statement_timeout=0 --lock_timeout=5s -csearch_path=a\\ b")
                .unwrap(),
            vec![
                ("statement_timeout".into(), "0".into()),
                ("lock_timeout".into(), "5s".into()),
                ("search_path".into(), "a b".into()),
            ]
        );
        assert!(server_settings("-x").is_err());
        assert_eq!(option_value("read committed"), "read\\ committed");
        assert_eq!(option_value("a\\b"), "a\\\\b");
        assert_eq!(option_value("0"), "0");
    }
}
