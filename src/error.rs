//! The one error type of pgtide.

use uuid::Uuid;

/// Everything that can go wrong in pgtide.
///
/// Messages say what to do. [`Error::is_retryable`] tells transient failures (connection lost,
/// pool exhausted, serialization conflicts) from ones that will fail again unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stream, group or consumer name does not follow the naming rule.
    #[error("{kind} name {name:?} is invalid: use 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
    InvalidName {
        /// What was being named: `"stream"`, `"group"` or `"consumer"`.
        kind: &'static str,
        /// The rejected name.
        name: String,
    },
    /// The namespace (schema) name is not a plain lower-case identifier.
    #[error(
        "namespace {0:?} is invalid: use 1-63 of a-z, 0-9, '_', starting with a letter or '_'"
    )]
    InvalidNamespace(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An ordering key does not follow the key rule ([`crate::validate_key`]).
    #[error("key {0:?} is invalid: use 1-256 bytes of text without control characters")]
    InvalidKey(String),
    /// The stream does not exist in this namespace.
    #[error("stream {0:?} does not exist: create it with create_stream/ensure_stream")]
    StreamNotFound(String),
    /// The group does not exist on the stream.
    #[error("group {group:?} does not exist on stream {stream:?}: create it with create_group/ensure_group")]
    GroupNotFound {
        /// The stream.
        stream: String,
        /// The missing group.
        group: String,
    },
    /// `create_stream` found the stream already there (use `ensure_stream` to accept that).
    #[error("stream {0:?} already exists")]
    StreamExists(String),
    /// `create_group` found the group already there (use `ensure_group` to accept that).
    #[error("group {group:?} already exists on stream {stream:?}")]
    GroupExists {
        /// The stream.
        stream: String,
        /// The existing group.
        group: String,
    },
    /// The payload is larger than the stream's `max_payload`. Nothing was published.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes of stream {stream:?}: raise StreamConfig::max_payload or store the body elsewhere")]
    PayloadTooLarge {
        /// The stream.
        stream: String,
        /// Size of the rejected payload in bytes.
        size: usize,
        /// The stream's limit in bytes.
        limit: usize,
    },
    /// The delivery's lease lapsed and another consumer claimed it (or it was already settled):
    /// this settle changed nothing.
    #[error("lease lost on message {id}: it was settled already or claimed again after the lease expired; extend leases (in_progress) for long handlers")]
    LeaseLost {
        /// The message whose settle was refused.
        id: Uuid,
    },
    /// A message read as an event lacks a required envelope header or has a malformed one
    /// (see [`crate::Envelope`]). Retrying does not help.
    #[error("event envelope: header {header:?} {problem}")]
    Envelope {
        /// The header at fault.
        header: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The backend cannot do this (see its [`crate::Capabilities`]).
    #[error("{backend} backend does not support {what}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// The operation or option.
        what: &'static str,
    },
    /// An error from a broker backend (NATS, Redis, RabbitMQ) or its connection.
    #[error("{backend}: {source}")]
    Broker {
        /// The backend.
        backend: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        /// Whether trying again may succeed.
        retryable: bool,
    },
    /// A payload could not be encoded or decoded as JSON.
    #[error("payload is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The namespace is not installed or older than this library: run `migrate()`.
    #[error(
        "namespace {0:?} is not installed or out of date: run migrate() (or `pgtide migrate`)"
    )]
    NotMigrated(String),

    /// The server's lock table is full: a transaction created more streams than it can hold
    /// locks for (SQLSTATE `PT010`). Not retryable as is.
    #[error("{0}: create streams in separate transactions (or fewer per transaction), or raise max_locks_per_transaction")]
    LockTableFull(String),

    /// The connected role may not do this in the namespace (SQLSTATE 42501): an admin operation
    /// (migrate, delete, purge, trim, reset, replay, updating a stream) as a runtime role, or
    /// anything as a role that was never granted. The message is the server's.
    #[error("{0}: run it as the namespace owner, or grant the role with `pgtide grant ROLE` (PgBackend::grant_runtime)")]
    PermissionDenied(String),

    /// An error from PostgreSQL or the connection to it.
    #[error("postgres: {}", describe(.0.as_ref()))]
    Postgres(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No connection could be taken from the pool.
    #[error("connection pool: {0}")]
    Pool(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Installing or upgrading the namespace failed.
    #[error("migration failed: {0}")]
    Migrate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// PostgreSQL could not be reached because of TLS, the server's certificate or the password:
    /// trying again will fail the same way until the configuration changes. The message says
    /// what to change; the password never appears in it.
    #[error("cannot connect to PostgreSQL: {problem} ({})", describe(.source.as_ref()))]
    Connect {
        /// What went wrong.
        problem: ConnectProblem,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why a connection to PostgreSQL could not be set up (see [`Error::Connect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectProblem {
    /// The server accepts only encrypted connections (its `pg_hba.conf` has no entry for a
    /// plaintext one) and `sslmode` is `disable`.
    TlsRequired,
    /// `sslmode` asks for TLS but the server does not offer it.
    TlsUnsupported,
    /// The server's certificate does not lead to a trusted root certificate (wrong or missing
    /// `sslrootcert`), or is otherwise invalid (expired, malformed).
    CertificateUntrusted,
    /// The server's certificate is valid but not for the host name connected to
    /// (`sslmode=verify-full`).
    HostNameMismatch,
    /// The server refused the password (or the user does not exist).
    PasswordRejected,
    /// The server asks for a password and none was configured.
    PasswordMissing,
}

impl std::fmt::Display for ConnectProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectProblem::TlsRequired => "the server accepts only encrypted connections: use sslmode=require or stronger (in the URL or PGSSLMODE) instead of sslmode=disable",
            ConnectProblem::TlsUnsupported => "the server does not offer TLS: turn `ssl = on` in postgresql.conf, or use sslmode=prefer (or disable) on a network you trust",
            ConnectProblem::CertificateUntrusted => "the server's certificate is not signed by a trusted CA: set sslrootcert (or PGSSLROOTCERT) to the PEM file of the CA that signed it, or use sslmode=require to encrypt without checking",
            ConnectProblem::HostNameMismatch => "the server's certificate is not valid for the host name connected to: connect by a name (or IP address) the certificate lists, or use sslmode=verify-ca to check the CA only",
            ConnectProblem::PasswordRejected => "password authentication failed: check the user and the password (in the URL, PGPASSWORD, or the password file ~/.pgpass / PGPASSFILE)",
            ConnectProblem::PasswordMissing => "the server asks for a password and none was given: put it in the URL, PGPASSWORD, or the password file ~/.pgpass (or PGPASSFILE, mode 0600)",
        })
    }
}

impl Error {
    /// True when trying again later may succeed unchanged; false for bad input, missing objects
    /// and every failure not known to be transient.
    ///
    /// Retryable: a lost or failed connection (I/O error, connection closed, SQLSTATE class 08),
    /// a pool that timed out, and these SQLSTATEs: 40001 serialization failure, 40P01 deadlock
    /// detected, 55P03 lock not available, 53300 too many connections, 57P01 admin shutdown,
    /// 57P02 crash shutdown, 57P03 cannot connect now (starting up or recovering).
    /// Not retryable: every other SQLSTATE (a canceled query, 57014, included: a statement
    /// timeout would time out again), protocol, decoding and configuration errors, and a closed
    /// pool. Broker backends decide per error.
    pub fn is_retryable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Error::Pool(source) => !matches!(
                source.downcast_ref::<deadpool_postgres::PoolError>(),
                Some(deadpool_postgres::PoolError::Closed)
                    | Some(deadpool_postgres::PoolError::NoRuntimeSpecified)
            ),
            #[cfg(not(feature = "postgres"))]
            Error::Pool(_) => true,
            Error::Broker { retryable, .. } => *retryable,
            #[cfg(feature = "postgres")]
            Error::Postgres(source) => postgres_retryable(source.as_ref()),
            _ => false,
        }
    }
}

/// SQLSTATEs after which the same statement may succeed when tried again: serialization failure,
/// deadlock detected, lock not available, too many connections, admin shutdown, crash shutdown,
/// cannot connect now (starting up or recovering). Class 08 (connection exception) is retryable
/// too. See [`Error::is_retryable`].
#[cfg(feature = "postgres")]
pub(crate) const RETRYABLE_SQLSTATES: &[&str] = &[
    "40001", "40P01", "55P03", "53300", "57P01", "57P02", "57P03",
];

/// Whether a SQLSTATE is transient (see [`RETRYABLE_SQLSTATES`]).
#[cfg(feature = "postgres")]
pub(crate) fn is_retryable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || RETRYABLE_SQLSTATES.contains(&code)
}

/// A tokio-postgres or sqlx error: transient when it carries a transient SQLSTATE, or when it
/// is a lost connection (closed, or an I/O error anywhere in its source chain).
#[cfg(feature = "postgres")]
fn postgres_retryable(source: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(e) = source.downcast_ref::<tokio_postgres::Error>() {
        if e.is_closed() {
            return true;
        }
        if let Some(code) = e.code() {
            return is_retryable_sqlstate(code.code());
        }
    } else if let Some(e) = source.downcast_ref::<sqlx::Error>() {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => {
                return true
            }
            sqlx::Error::Database(db) => {
                return db.code().as_deref().is_some_and(is_retryable_sqlstate)
            }
            _ => {}
        }
    }
    // Connection loss shows as an I/O error in the chain (tokio-postgres wraps it).
    let mut next = Some(source);
    while let Some(e) = next {
        if e.is::<std::io::Error>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The error and its causes on one line: drivers often display only "db error" and keep the
/// server's message in the source.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// A `Result` with pgtide's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Context used to turn database errors raised by pgtide's SQL into typed errors.
#[cfg(feature = "postgres")]
#[derive(Default)]
pub(crate) struct Ctx<'a> {
    pub stream: Option<&'a str>,
    pub group: Option<&'a str>,
}

#[cfg(feature = "postgres")]
impl<'a> Ctx<'a> {
    /// Errors about one stream.
    pub(crate) fn stream(stream: &'a str) -> Self {
        Ctx {
            stream: Some(stream),
            group: None,
        }
    }

    /// Errors about one group of a stream.
    pub(crate) fn group(stream: &'a str, group: &'a str) -> Self {
        Ctx {
            stream: Some(stream),
            group: Some(group),
        }
    }
}

#[cfg(feature = "postgres")]
/// Size and limit from the DETAIL (`size=<bytes> limit=<bytes>`) of pgtide's PT004 error.
fn payload_sizes(detail: Option<&str>) -> (usize, usize) {
    let value = |key: &str| {
        detail
            .unwrap_or_default()
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (value("size="), value("limit="))
}

#[cfg(feature = "postgres")]
impl Error {
    pub(crate) fn from_pg(e: tokio_postgres::Error, ctx: Ctx<'_>) -> Error {
        if let Some(problem) = crate::postgres::connect_problem(&e) {
            return Error::Connect {
                problem,
                source: Box::new(e),
            };
        }
        if let Some(db) = e.as_db_error() {
            let stream = ctx.stream.unwrap_or_default().to_owned();
            let group = ctx.group.unwrap_or_default().to_owned();
            match db.code().code() {
                "PT001" => return Error::InvalidConfig(db.message().to_owned()),
                "PT002" => return Error::StreamNotFound(stream),
                "PT003" => return Error::GroupNotFound { stream, group },
                "PT004" => {
                    let (size, limit) = payload_sizes(db.detail());
                    return Error::PayloadTooLarge {
                        stream,
                        size,
                        limit,
                    };
                }
                "PT005" => return Error::StreamExists(stream),
                "PT006" => return Error::GroupExists { stream, group },
                "PT010" => return Error::LockTableFull(db.message().to_owned()),
                "42P01" | "42883" | "3F000" => {
                    let namespace = match db.schema() {
                        Some(schema) if !schema.is_empty() => schema.to_owned(),
                        _ => missing_namespace(db.message()),
                    };
                    return Error::NotMigrated(namespace);
                }
                "42501" => return permission_denied(db.message()),
                _ => {}
            }
        }
        Error::Postgres(Box::new(e))
    }

    pub(crate) fn from_sqlx(e: sqlx::Error, ctx: Ctx<'_>) -> Error {
        if let Some(problem) = crate::postgres::connect_problem(&e) {
            return Error::Connect {
                problem,
                source: Box::new(e),
            };
        }
        if let sqlx::Error::Database(db) = &e {
            let stream = ctx.stream.unwrap_or_default().to_owned();
            let group = ctx.group.unwrap_or_default().to_owned();
            match db.code().as_deref() {
                Some("PT001") => return Error::InvalidConfig(db.message().to_owned()),
                Some("PT002") => return Error::StreamNotFound(stream),
                Some("PT003") => return Error::GroupNotFound { stream, group },
                Some("PT004") => {
                    let detail = db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|pg| pg.detail());
                    let (size, limit) = payload_sizes(detail);
                    return Error::PayloadTooLarge {
                        stream,
                        size,
                        limit,
                    };
                }
                Some("PT005") => return Error::StreamExists(stream),
                Some("PT006") => return Error::GroupExists { stream, group },
                Some("PT010") => return Error::LockTableFull(db.message().to_owned()),
                Some("42501") => return permission_denied(db.message()),
                _ => {}
            }
        }
        Error::Postgres(Box::new(e))
    }
}

/// [`Error::PermissionDenied`] with the server's message (`permission denied for function
/// delete_stream`, `permission denied for schema ns`, or pgtide's own 42501 errors).
#[cfg(feature = "postgres")]
fn permission_denied(message: &str) -> Error {
    Error::PermissionDenied(message.to_owned())
}

/// The namespace a "does not exist" error names. The server rarely fills the error's schema
/// field, but every statement pgtide sends is schema-qualified, so the message names it:
/// `schema "ns" does not exist`, `relation "ns.streams" does not exist`,
/// `function ns.group_id(unknown, unknown) does not exist`. Namespace names never contain `.`
/// or `"`. Empty if the message has another shape.
#[cfg(feature = "postgres")]
fn missing_namespace(message: &str) -> String {
    let object = match message.split_once('"') {
        Some((_, rest)) => rest.split('"').next().unwrap_or_default(),
        None => message
            .strip_prefix("function ")
            .and_then(|rest| rest.split('(').next())
            .unwrap_or_default(),
    };
    match object.split_once('.') {
        Some((namespace, _)) => namespace.to_owned(),
        None if message.starts_with("schema ") => object.to_owned(),
        None => String::new(),
    }
}

#[cfg(feature = "postgres")]
impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::from_pg(e, Ctx::default())
    }
}

#[cfg(feature = "postgres")]
impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Error::from(e),
            other => Error::Pool(Box::new(other)),
        }
    }
}

#[cfg(all(test, feature = "postgres"))]
mod tests {
    use super::{is_retryable_sqlstate, missing_namespace, Error};

    #[test]
    fn only_transient_failures_are_retryable() {
        for code in [
            "40001", "40P01", "55P03", "53300", "57P01", "57P02", "57P03", "08006", "08001",
        ] {
            assert!(is_retryable_sqlstate(code), "{code}");
        }
        for code in [
            "23505", "42P01", "42883", "PT001", "PT003", "57014", "22P02", "53100",
        ] {
            assert!(!is_retryable_sqlstate(code), "{code}");
        }
        let pg = |e: Box<dyn std::error::Error + Send + Sync>| Error::Postgres(e);
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(pg(Box::new(io())).is_retryable());
        assert!(pg(Box::new(sqlx::Error::Io(io()))).is_retryable());
        assert!(pg(Box::new(sqlx::Error::PoolTimedOut)).is_retryable());
        assert!(!pg(Box::new(sqlx::Error::Protocol("bad".into()))).is_retryable());
        assert!(!pg(Box::new(sqlx::Error::RowNotFound)).is_retryable());
        assert!(!pg("something else".into()).is_retryable());
        assert!(Error::Pool(Box::new(deadpool_postgres::PoolError::Timeout(
            deadpool_postgres::TimeoutType::Wait
        )))
        .is_retryable());
        assert!(!Error::Pool(Box::new(deadpool_postgres::PoolError::Closed)).is_retryable());
        assert!(!Error::InvalidConfig("x".into()).is_retryable());
    }

    #[test]
    fn the_missing_namespace_is_read_from_the_message() {
        for (message, namespace) in [
            (r#"schema "shop" does not exist"#, "shop"),
            (r#"relation "shop.streams" does not exist"#, "shop"),
            (
                "function shop.group_id(unknown, unknown) does not exist",
                "shop",
            ),
            (r#"relation "streams" does not exist"#, ""),
            ("something else", ""),
        ] {
            assert_eq!(missing_namespace(message), namespace, "{message}");
        }
    }
}
