//! Exit codes and the one-line error messages the CLI prints.

use std::fmt;
use std::sync::OnceLock;

/// Success.
pub const OK: u8 = 0;
/// Runtime or database error.
pub const RUNTIME: u8 = 1;
/// Usage error or bad input.
pub const USAGE: u8 = 2;
/// Stream, group, dead letter or namespace not found.
pub const NOT_FOUND: u8 = 3;
/// Health check failed.
pub const UNHEALTHY: u8 = 4;
/// Already exists.
pub const EXISTS: u8 = 5;
/// Interrupted by SIGINT/SIGTERM before the work was done (one-shot commands).
pub const INTERRUPTED: u8 = 130;

/// The namespace the command runs in, for messages about a missing installation.
pub static NAMESPACE: OnceLock<String> = OnceLock::new();
/// The (redacted) database URL, for connection errors.
pub static URL: OnceLock<String> = OnceLock::new();
/// The (redacted) `--listen-url`, when given, for connection errors.
pub static LISTEN_URL: OnceLock<String> = OnceLock::new();

/// The options a connection error points at: the direct `--listen-url` too when one is set,
/// since LISTEN and `migrate` connect there.
fn url_options() -> String {
    match LISTEN_URL.get() {
        Some(listen) => {
            format!("--database-url/DATABASE_URL and --listen-url/PGTIDE_LISTEN_URL ({listen})")
        }
        None => "--database-url/DATABASE_URL".to_owned(),
    }
}

/// A failure: one line for stderr and an exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// What went wrong, which name, what to do.
    pub message: String,
}

impl CliError {
    /// A failure with an explicit code.
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }

    /// Bad input (exit 2).
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::new(USAGE, message)
    }

    /// Not found (exit 3).
    pub fn not_found(message: impl Into<String>) -> CliError {
        CliError::new(NOT_FOUND, message)
    }

    /// Runtime failure (exit 1).
    pub fn runtime(message: impl Into<String>) -> CliError {
        CliError::new(RUNTIME, message)
    }

    /// The same failure with `what` in front of its message.
    pub fn prefixed(self, what: &str) -> CliError {
        CliError::new(self.code, format!("{what}: {}", self.message))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

fn namespace() -> &'static str {
    NAMESPACE.get().map(String::as_str).unwrap_or("pgtide")
}

/// The SQLSTATE of a database error inside a pgtide error, if any.
fn sqlstate(source: &(dyn std::error::Error + 'static)) -> Option<String> {
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .map(|c| c.code().to_owned())
}

/// An error with its causes: tokio-postgres keeps the OS error in `source()`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let s = cause.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        next = cause.source();
    }
    text
}

fn database_message(source: &(dyn std::error::Error + Send + Sync + 'static)) -> CliError {
    let text = chain(source);
    let url = URL.get().map(String::as_str).unwrap_or("the database");
    if text.starts_with("error connecting") || text.contains("Connection refused") {
        return CliError::runtime(format!(
            "cannot connect to {url}: {text}; check {} and that the server is running",
            url_options()
        ));
    }
    match sqlstate(source).as_deref() {
        Some("42501") => CliError::runtime(format!(
            "permission denied in namespace {:?}: {}; run `pgtide grant ROLE` as the namespace owner, or use the owner's URL for admin commands",
            namespace(),
            db_detail(source)
        )),
        Some("28000" | "28P01") => CliError::runtime(format!(
            "authentication failed at {url}: {}; check the user and password in {}",
            db_detail(source),
            url_options()
        )),
        Some("3D000") => CliError::runtime(format!(
            "{}; check the database name in --database-url/DATABASE_URL",
            db_detail(source)
        )),
        _ => CliError::runtime(format!("database error: {}", db_detail(source))),
    }
}

/// The server's message (with its detail/hint) rather than tokio-postgres's "db error" prefix.
fn db_detail(source: &(dyn std::error::Error + 'static)) -> String {
    if let Some(db) = source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.as_db_error())
    {
        let mut s = db.message().to_owned();
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    source.to_string()
}

impl From<pgtide::Error> for CliError {
    fn from(e: pgtide::Error) -> CliError {
        use pgtide::Error as E;
        match e {
            E::StreamNotFound(s) => CliError::not_found(format!(
                "stream {s:?} does not exist in namespace {:?}: create it with `pgtide stream create {s}` (or check --namespace)",
                namespace()
            )),
            E::GroupNotFound { stream, group } => CliError::not_found(format!(
                "group {group:?} does not exist on stream {stream:?}: create it with `pgtide group create {stream} {group}`"
            )),
            E::NotMigrated(_) => CliError::not_found(format!(
                "namespace {:?} is not installed or out of date: run `pgtide migrate` (or check --namespace/PGTIDE_NAMESPACE)",
                namespace()
            )),
            E::StreamExists(s) => CliError::new(
                EXISTS,
                format!("stream {s:?} already exists: use --if-not-exists to accept that, or `pgtide stream update {s}` to change it"),
            ),
            E::GroupExists { stream, group } => CliError::new(
                EXISTS,
                format!("group {group:?} already exists on stream {stream:?}: use --if-not-exists to accept that"),
            ),
            E::PermissionDenied(message) => CliError::runtime(format!(
                "permission denied in namespace {:?}: {message}; run `pgtide grant ROLE` as the namespace owner, or use the owner's URL for admin commands",
                namespace()
            )),
            E::Postgres(source) => database_message(source.as_ref()),
            E::Pool(source) => {
                let url = URL.get().map(String::as_str).unwrap_or("the database");
                CliError::runtime(format!(
                    "no database connection to {url}: {}; check {} and that the server is running",
                    chain(source.as_ref()),
                    url_options()
                ))
            }
            E::Migrate(source) => {
                let text = chain(source.as_ref());
                match LISTEN_URL.get() {
                    // Migrations connect to the direct URL: say which one failed.
                    Some(listen) if text.contains("error communicating") || text.contains("connect") => {
                        CliError::runtime(format!(
                            "migrating namespace {:?} failed: {text}; migrate connects to --listen-url/PGTIDE_LISTEN_URL ({listen}): check it and that the server is running",
                            namespace()
                        ))
                    }
                    _ => CliError::runtime(format!(
                        "migrating namespace {:?} failed: {text}",
                        namespace()
                    )),
                }
            }
            e @ (E::InvalidName { .. }
            | E::InvalidNamespace(_)
            | E::InvalidConfig(_)
            | E::Json(_)
            | E::PayloadTooLarge { .. }
            | E::Unsupported { .. }) => CliError::usage(e.to_string()),
            other => CliError::runtime(other.to_string()),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> CliError {
        CliError::runtime(format!("i/o error: {e}"))
    }
}
