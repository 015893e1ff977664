//! The PostgreSQL engine: a cheap `Clone` handle over a connection pool, with the namespace's SQL
//! rendered once at build time.
//!
//! All SQL lives in `migrations/` (schema and functions) and `sql/` (statements the engine
//! prepares). `@ns@` in them is replaced by the quoted namespace; namespace names are validated
//! first, so no user input is ever spliced into SQL.

mod consumer;
mod migrate;
mod publish;
mod registry;
mod stats;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

pub use consumer::{Consumer, Delivery, SettleReport};
pub use migrate::migration_sql;
pub use registry::{GroupInfo, StreamInfo};
pub use stats::{DeadLetter, GroupStats, MaintenanceReport};

use crate::names::validate_namespace;
use crate::{Error, Result};

/// Default namespace (Postgres schema).
pub const DEFAULT_NAMESPACE: &str = "pgtide";

/// Handle to one pgtide namespace in one PostgreSQL database. Cheap to clone; clones share the
/// connection pool and caches.
///
/// ```no_run
/// # async fn demo() -> pgtide::Result<()> {
/// let pg = pgtide::PgBackend::builder("postgres://postgres@127.0.0.1/postgres")
///     .namespace("shop")
///     .pool_size(8)
///     .build()?;
/// pg.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgBackend {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) url: String,
    pub(crate) namespace: String,
    pub(crate) sql: Statements,
    pub(crate) streams: Mutex<HashMap<String, (StreamInfo, Instant)>>,
}

/// How long stream metadata (payload limit) is cached before it is read again.
const STREAM_CACHE_TTL: Duration = Duration::from_secs(5);

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

/// Builder for [`PgBackend`].
#[derive(Debug, Clone)]
pub struct PgBackendBuilder {
    url: String,
    namespace: String,
    pool_size: usize,
    connect_timeout: Duration,
}

impl PgBackendBuilder {
    /// The namespace (Postgres schema) to use. Defaults to `pgtide`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Largest number of pooled connections. Defaults to 16.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long to wait for a pooled connection. Defaults to 30 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builds the handle. Connects lazily: the first operation opens the first connection.
    pub fn build(self) -> Result<PgBackend> {
        validate_namespace(&self.namespace)?;
        let pg_config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| Error::InvalidConfig(format!("database URL: {e}")))?;
        let manager = Manager::from_config(
            pg_config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| Error::InvalidConfig(format!("pool: {e}")))?;
        Ok(PgBackend {
            inner: Arc::new(Inner {
                pool,
                url: self.url,
                sql: Statements::render(&self.namespace),
                namespace: self.namespace,
                streams: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl PgBackend {
    /// Starts building a handle for the database at `url` (`postgres://user@host:port/db`).
    pub fn builder(url: impl Into<String>) -> PgBackendBuilder {
        PgBackendBuilder {
            url: url.into(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(30),
        }
    }

    /// Connects to `url` with the default namespace and checks that the database answers.
    pub async fn connect(url: impl Into<String>) -> Result<PgBackend> {
        let pg = PgBackend::builder(url).build()?;
        drop(pg.client().await?);
        Ok(pg)
    }

    /// The namespace (schema) this handle works in.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The database URL this handle connects to.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.inner.pool.get().await?)
    }
}

/// Replaces the namespace placeholders of a SQL text. The namespace is validated beforehand.
pub(crate) fn render(sql: &str, namespace: &str) -> String {
    sql.replace("@ns_lit@", &format!("'{namespace}'"))
        .replace("@ns@", &format!("\"{namespace}\""))
}

/// The engine's statements, rendered for one namespace.
pub(crate) struct Statements {
    pub publish: String,
    pub publish_one: String,
    pub claim: String,
    pub ack: String,
    pub nack: String,
    pub term: String,
    pub extend: String,
    pub release: String,
    pub stats: String,
}

impl Statements {
    fn render(ns: &str) -> Statements {
        Statements {
            publish: render(include_str!("../../sql/publish.sql"), ns),
            publish_one: render(include_str!("../../sql/publish_one.sql"), ns),
            claim: render(include_str!("../../sql/claim.sql"), ns),
            ack: render(include_str!("../../sql/ack.sql"), ns),
            nack: render(include_str!("../../sql/nack.sql"), ns),
            term: render(include_str!("../../sql/term.sql"), ns),
            extend: render(include_str!("../../sql/extend.sql"), ns),
            release: render(include_str!("../../sql/release.sql"), ns),
            stats: render(include_str!("../../sql/stats.sql"), ns),
        }
    }
}

/// A duration as whole microseconds for SQL (`$n::int8 * interval '1 microsecond'`).
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
