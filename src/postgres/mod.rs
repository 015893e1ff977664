//! The PostgreSQL engine: a cheap `Clone` handle over a connection pool, with the namespace's SQL
//! rendered once at build time.
//!
//! All SQL lives in `migrations/` (schema and functions) and `sql/` (statements the engine
//! prepares). `@ns@` in them is replaced by the quoted namespace; namespace names are validated
//! first, so no user input is ever spliced into SQL.

mod admin;
mod consumer;
mod migrate;
mod ops;
mod publish;
mod registry;
mod scout;
mod wake;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use consumer::PgConsumer;

pub use admin::MaintenanceReport;
pub use migrate::migration_sql;
pub use registry::{GroupInfo, StreamInfo};
pub use scout::ScoutStatus;
pub use wake::ListenerStatus;

use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_namespace;
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

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
    pub(crate) options: Options,
    /// Connection settings for the listener (without the pool's `pgtide.notify = off`).
    pub(crate) listen_config: tokio_postgres::Config,
    pub(crate) bus: broadcast::Sender<wake::Wake>,
    pub(crate) notifier: Arc<wake::Notifier>,
    pub(crate) listener_status: Arc<Mutex<ListenerStatus>>,
    pub(crate) scout_status: Arc<Mutex<ScoutStatus>>,
    pub(crate) token: CancellationToken,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    notifier_started: OnceLock<()>,
    listener_started: OnceLock<()>,
    scout_started: OnceLock<()>,
}

/// Wake-up settings chosen on the builder.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub notifications: bool,
    pub poll_interval: Duration,
    pub scout: scout::ScoutConfig,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.token.cancel();
    }
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

/// What the Postgres engine supports: everything.
const POSTGRES_CAPABILITIES: Capabilities = Capabilities {
    delay: true,
    native_delay: true,
    dedupe: true,
    nack_delay: true,
    lease_timeout: true,
    lease_extension: true,
    transactional_publish: true,
    priority: true,
    exact_stats: true,
    group_start_oldest: true,
    fenced_settle: true,
};

// The trait's methods are the inherent ones of the same name and signature (registry.rs,
// publish.rs, admin.rs, consumer.rs, migrate.rs; the inherent `purge` also returns a count):
// this impl only forwards, so `pg.stats(s, g)` and `Queue::stats(&pg, s, g)` are one thing.
impl Queue for PgBackend {
    type Consumer = PgConsumer;

    fn capabilities(&self) -> Capabilities {
        POSTGRES_CAPABILITIES
    }

    async fn migrate(&self) -> Result<()> {
        PgBackend::migrate(self).await
    }

    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        PgBackend::ensure_stream(self, stream, config).await
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        PgBackend::delete_stream(self, stream).await
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        PgBackend::ensure_group(self, stream, group, start).await
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        PgBackend::delete_group(self, stream, group).await
    }

    async fn purge(&self, stream: &str) -> Result<()> {
        PgBackend::purge(self, stream).await.map(|_| ())
    }

    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        PgBackend::stats(self, stream, group).await
    }

    async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        PgBackend::dead_letters(self, stream, group, limit).await
    }

    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        PgBackend::publish(self, stream, msg).await
    }

    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        PgBackend::publish_batch(self, stream, msgs).await
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<PgConsumer> {
        PgBackend::consumer(self, stream, group, name).await
    }
}

/// Builder for [`PgBackend`].
#[derive(Debug, Clone)]
pub struct PgBackendBuilder {
    url: String,
    namespace: String,
    pool_size: usize,
    connect_timeout: Duration,
    notifications: bool,
    poll_interval: Option<Duration>,
    scout: scout::ScoutConfig,
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

    /// Whether consumers are woken by LISTEN/NOTIFY. Defaults to true. Turn it off behind a
    /// pooler in transaction mode (poll-only mode): consumers then poll every
    /// [`PgBackendBuilder::poll_interval`].
    pub fn notifications(mut self, enabled: bool) -> Self {
        self.notifications = enabled;
        self
    }

    /// How often a waiting consumer fetches without having been woken: the fallback poller
    /// that catches missed notifications. Defaults to 30 s with notifications, 1 s without.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval.max(Duration::from_millis(1)));
        self
    }

    /// TTL of the scout lease; the scout renews it every third of it, and another process takes
    /// over at most this long after the scout dies. Defaults to 10 s.
    pub fn scout_ttl(mut self, ttl: Duration) -> Self {
        self.scout.ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// Longest time the scout sleeps between due checks. Defaults to 1 s.
    pub fn scout_max_interval(mut self, interval: Duration) -> Self {
        self.scout.max_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How often the scout runs maintenance (partitions, retention, dedupe window, counters).
    /// Defaults to 60 s.
    pub fn maintenance_interval(mut self, interval: Duration) -> Self {
        self.scout.maintenance_interval = interval.max(Duration::from_millis(100));
        self
    }

    /// Builds the handle. Connects lazily: the first operation opens the first connection.
    pub fn build(self) -> Result<PgBackend> {
        validate_namespace(&self.namespace)?;
        let listen_config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| Error::InvalidConfig(format!("database URL: {e}")))?;
        // Publishes from the pool poke the coalescing notifier instead of firing the trigger.
        let mut pg_config = listen_config.clone();
        let options = match listen_config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c pgtide.notify=off"),
            _ => "-c pgtide.notify=off".to_owned(),
        };
        pg_config.options(&options);
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
        let poll_interval = self.poll_interval.unwrap_or(if self.notifications {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(1)
        });
        Ok(PgBackend {
            inner: Arc::new(Inner {
                pool,
                url: self.url,
                sql: Statements::render(&self.namespace),
                namespace: self.namespace,
                streams: Mutex::new(HashMap::new()),
                options: Options {
                    notifications: self.notifications,
                    poll_interval,
                    scout: self.scout,
                },
                listen_config,
                bus: broadcast::channel(1024).0,
                notifier: Arc::default(),
                listener_status: Arc::default(),
                scout_status: Arc::default(),
                token: CancellationToken::new(),
                tasks: Mutex::new(vec![]),
                notifier_started: OnceLock::new(),
                listener_started: OnceLock::new(),
                scout_started: OnceLock::new(),
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
            notifications: true,
            poll_interval: None,
            scout: scout::ScoutConfig {
                ttl: Duration::from_secs(10),
                max_interval: Duration::from_secs(1),
                maintenance_interval: Duration::from_secs(60),
            },
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

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(handle);
        }
    }

    /// Tells local waiters and other processes about new work (coalesced NOTIFY).
    pub(crate) fn poke(&self, wake: wake::Wake) {
        if !self.inner.options.notifications || self.inner.token.is_cancelled() {
            return;
        }
        self.inner.notifier_started.get_or_init(|| {
            let channel = wake::channel(self.namespace());
            let notifier = self.inner.notifier.clone();
            self.spawn(notifier.run(
                self.inner.pool.clone(),
                channel,
                self.inner.token.child_token(),
            ));
        });
        self.inner.notifier.poke(wake);
    }

    /// Subscribes to wake-ups, starting the listener (and the scout candidate) on first use.
    pub(crate) fn subscribe(&self) -> Option<broadcast::Receiver<wake::Wake>> {
        self.start_scout();
        if !self.inner.options.notifications {
            return None;
        }
        let rx = self.inner.bus.subscribe();
        self.inner.listener_started.get_or_init(|| {
            self.spawn(wake::run_listener(
                self.inner.listen_config.clone(),
                wake::channel(self.namespace()),
                self.inner.bus.clone(),
                self.inner.listener_status.clone(),
                self.inner.token.child_token(),
            ));
        });
        Some(rx)
    }

    /// Makes this process a scout candidate (idempotent). Consumers and workers do this on
    /// their own when they first wait; call it in processes that only publish or only run
    /// maintenance. Needs a tokio runtime.
    pub fn start_scout(&self) {
        self.inner.scout_started.get_or_init(|| {
            let holder = format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "pgtide".to_owned()),
                uuid::Uuid::now_v7().simple()
            );
            if let Ok(mut s) = self.inner.scout_status.lock() {
                s.holder_id = holder.clone();
            }
            let scout = scout::Scout {
                pool: self.inner.pool.clone(),
                ns: self.namespace().to_owned(),
                config: self.inner.options.scout.clone(),
                bus: self.inner.bus.clone(),
                notifier: self.inner.notifier.clone(),
                status: self.inner.scout_status.clone(),
                holder,
            };
            // The scout notifies through the notifier, so make sure it runs.
            self.inner.notifier_started.get_or_init(|| {
                let notifier = self.inner.notifier.clone();
                self.spawn(notifier.run(
                    self.inner.pool.clone(),
                    wake::channel(self.namespace()),
                    self.inner.token.child_token(),
                ));
            });
            self.spawn(scout.run(self.inner.token.child_token()));
        });
        if !self.inner.options.notifications {
            return;
        }
        // A scout that is not listening would miss `!scout` and `@due` hints: start the listener.
        self.inner.listener_started.get_or_init(|| {
            self.spawn(wake::run_listener(
                self.inner.listen_config.clone(),
                wake::channel(self.namespace()),
                self.inner.bus.clone(),
                self.inner.listener_status.clone(),
                self.inner.token.child_token(),
            ));
        });
    }

    /// State of this handle's LISTEN connection.
    pub fn listener_status(&self) -> ListenerStatus {
        self.inner
            .listener_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// What this process knows of the scout role (who leads is in SQL: `<ns>.scout`).
    pub fn scout_status(&self) -> ScoutStatus {
        self.inner
            .scout_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Stops the background tasks gracefully: the scout resigns (another process takes over at
    /// once), pending notifications are flushed, the listener disconnects. Waits for them.
    pub async fn shutdown(&self) {
        self.inner.token.cancel();
        let tasks: Vec<JoinHandle<()>> = match self.inner.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => vec![],
        };
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stops the background tasks abruptly, as a crash would: no resign, no flush. For failover
    /// drills and tests.
    pub fn abort_background(&self) {
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        self.inner.token.cancel();
    }

    /// The fallback poll interval (see [`PgBackendBuilder::poll_interval`]).
    pub(crate) fn poll_interval(&self) -> Duration {
        self.inner.options.poll_interval
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
    pub ack_claim: String,
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
            ack_claim: render(include_str!("../../sql/ack_claim.sql"), ns),
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
