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
//!   `PGDATABASE` and `PGPASSWORD`; a password still missing is looked up in `PGPASSFILE` (else
//!   `~/.pgpass`), which is ignored, as libpq does, when group or others can read it.
//!
//! tokio-postgres knows only `disable`/`prefer`/`require` and rejects `sslrootcert`, so both are
//! taken out of the URL here before it is parsed; certificate checks are the connector's.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{ConnectProblem, Error, Result};

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
        let tls = MakeRustlsConnect::new(client_config(mode, roots.as_ref())?);
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
            o = o.options(server_settings(options)?);
        }
        o = o.ssl_mode(match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
        if let Some(Roots::File(path)) = &self.roots {
            o = o.ssl_root_cert(path);
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
    let c = ConnectConfig::from_url(url)?;
    Ok(c.pg.connect(c.tls).await?)
}

/// The URL with `sslmode`/`sslrootcert` taken out, and those two values.
struct Split {
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    redacted: String,
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

fn split_params(url: &str) -> Result<Split> {
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
    if pg.get_password().is_none() {
        let password = env("PGPASSWORD").or_else(|| password_from_file(pg, env));
        if let Some(password) = password {
            pg.password(password);
        }
    }
}

/// The password of the first matching line of the password file, as libpq finds it.
fn password_from_file(pg: &tokio_postgres::Config, env: Env<'_>) -> Option<String> {
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(mode: SslMode, roots: Option<&Roots>) -> Result<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidConfig(format!("TLS: {e}")))?;
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyCa | SslMode::VerifyFull, Some(roots)) => {
            let store = Arc::new(root_store(roots)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(store, provider)
                .build()
                .map_err(|e| Error::InvalidConfig(format!("TLS root certificates: {e}")))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
        _ => Arc::new(Unverified(algorithms)),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn root_store(roots: &Roots) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let bad = |e: &dyn fmt::Display| {
                Error::InvalidConfig(format!(
                    "sslrootcert {}: {e}; point sslrootcert (or PGSSLROOTCERT) at the PEM file of the CA that signed the server's certificate",
                    path.display()
                ))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(&e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad(&e))?;
            if certs.is_empty() {
                return Err(bad(&"no certificate in the file"));
            }
            for cert in certs {
                store.add(cert).map_err(|e| bad(&e))?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(Error::InvalidConfig(
                    "no system root certificates found for sslmode verify-ca/verify-full: install ca-certificates or set sslrootcert (or PGSSLROOTCERT)".into(),
                ));
            }
        }
    }
    Ok(store)
}

/// `prefer`/`require` without a root certificate: encrypt, accept any certificate (libpq does
/// the same). The handshake signatures are still checked, so the key exchange is with the holder
/// of the certificate's key.
#[derive(Debug)]
struct Unverified(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked. webpki
/// checks the chain before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
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
        ]);
        let c = ConnectConfig::resolve("postgres://", &env).unwrap();
        assert_eq!(c.pg.get_hosts(), &[Host::Tcp("db1".into())]);
        assert_eq!(c.pg.get_ports(), &[6543]);
        assert_eq!(c.pg.get_user(), Some("app"));
        assert_eq!(c.pg.get_dbname(), Some("shop"));
        assert_eq!(c.pg.get_password(), Some(&b"pw"[..]));
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
    }
}
