//! The PostgreSQL engine: a cheap `Clone` handle over a connection pool, with the namespace's SQL
//! rendered once at build time.
//!
//! All SQL lives in files: `migrations/` (tables, indexes, data changes: versioned),
//! `sql/functions/` (functions and views, re-applied by `migrate()`) and `sql/` (the statements
//! the engine runs, see `statements.rs`). `@ns@` in them is replaced by the quoted namespace;
//! namespace names are validated first, so no user input is ever spliced into SQL.

mod admin;
mod background;
mod connect;
mod consumer;
mod exec;
mod floor;
mod inbox;
mod migrate;
mod ops;
mod publish;
mod registry;
mod statements;
mod vacuum;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{broadcast, watch};

pub use connect::{connect_raw, redact_url, RawConnection};
pub use consumer::PgConsumer;
pub use exec::StatementMode;
pub use inbox::Inbox;

pub use admin::MaintenanceReport;
pub use background::{ListenerStatus, ScoutStatus};
pub use migrate::{migration_sql, MigrateReport};
pub use ops::ScoutLease;
pub use registry::{GroupInfo, KeyInfo, StreamInfo};
pub use vacuum::{HotTable, VacuumStatus};

// The wake bus vocabulary, under the path the engine's modules use.
use background::services;
pub(crate) use background::wake;

pub(crate) use statements::render;

/// The set-up failure a driver error stands for, if any (see [`crate::ConnectProblem`]).
pub(crate) fn connect_problem(
    e: &(dyn std::error::Error + 'static),
) -> Option<crate::ConnectProblem> {
    connect::problem(e)
}
use statements::Statements;

use crate::config::{GroupConfig, GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_namespace;
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

/// Default namespace (Postgres schema).
pub const DEFAULT_NAMESPACE: &str = "pgtide";

/// Handle to one pgtide namespace in one PostgreSQL database. Cheap to clone; clones share the
/// connection pool and caches.
///
/// The handle owns its background services: a coalescing notifier, one LISTEN connection, and
/// the scout (lease elector, due-waker, maintainer). Each starts the first time it is needed (the
/// first publish that must wake someone, a consumer's first wait, [`PgBackend::start_scout`]),
/// runs supervised (a failed task is logged, shown in [`PgBackend::listener_status`] or
/// [`PgBackend::scout_status`], and restarted), and stops with [`PgBackend::shutdown`] or when
/// the last clone is dropped.
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
    /// Server, credentials and TLS of the pool, resolved once.
    pub(crate) connect: connect::ConnectConfig,
    /// The direct connection for session work (LISTEN, migrations), when the pool goes through
    /// a pooler; `None` uses `connect`.
    pub(crate) listen: Option<connect::ConnectConfig>,
    pub(crate) namespace: String,
    pub(crate) sql: Arc<Statements>,
    pub(crate) streams: Mutex<HashMap<String, (StreamInfo, Instant)>>,
    /// Where each group's claims start (`floor.rs`), shared by the group's consumers.
    pub(crate) floors: floor::Floors,
    pub(crate) options: Options,
    /// The notifier, listener and scout: started on first use, stopped by `shutdown()` or when
    /// the last clone is dropped.
    pub(crate) background: background::Background,
}

/// Wake-up settings chosen on the builder.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub notifications: bool,
    pub poll_interval: Duration,
    /// Whether a publish alone in flight may notify inside its transaction (see
    /// `background/notifier.rs`); when off, every publish coalesces.
    pub notify_in_transaction: bool,
    /// Whether a claim that settles nothing waits for its commit's WAL flush
    /// (`PgBackendBuilder::synchronous_claims`).
    pub synchronous_claims: bool,
}

/// How long stream metadata (payload limit) is cached before it is read again.
const STREAM_CACHE_TTL: Duration = Duration::from_secs(5);

/// Startup options of every pgtide session (pool and listener). A DBA's database- or role-wide
/// `statement_timeout` or `idle_in_transaction_session_timeout` is meant for applications'
/// queries; in pgtide's sessions it would cancel migrations and maintenance midway and kill the
/// pooled sessions between a claim and its settle. pgtide's statements are short and bounded by
/// their batch sizes, and it waits for messages on the client side, so it needs neither.
/// A database- or role-wide `default_transaction_isolation` above READ COMMITTED would make
/// claims fail with serialization errors and ordered groups refuse every settle and keyed
/// publish: pgtide's statements are written for READ COMMITTED, so its sessions pin it.
/// See docs/production.md, "Lost connections and server settings".
pub(crate) const SESSION_SETTINGS: &str = "-c statement_timeout=0 \
     -c idle_in_transaction_session_timeout=0 -c default_transaction_isolation=read\\ committed";

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
    fenced_after_release: true,
    ordering_keys: true,
    concurrency_limits: true,
    rate_limits: true,
    fair_share: true,
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
        PgBackend::migrate(self).await.map(|_| ())
    }

    async fn close(&self) -> Result<()> {
        // Settles commit before they return: what is left is the background (wake-ups, scout).
        self.shutdown().await;
        Ok(())
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

    async fn ensure_group_with(
        &self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
    ) -> Result<bool> {
        PgBackend::ensure_group_with(self, stream, group, config).await
    }

    async fn set_key_weight(
        &self,
        stream: &str,
        group: &str,
        key: Option<&str>,
        weight: Option<f64>,
    ) -> Result<()> {
        PgBackend::set_key_weight(self, stream, group, key, weight).await
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
#[derive(Clone)]
pub struct PgBackendBuilder {
    url: String,
    namespace: String,
    pool_size: usize,
    connect_timeout: Duration,
    notifications: Option<bool>,
    poll_interval: Option<Duration>,
    statement_mode: Option<StatementMode>,
    listen_url: Option<String>,
    scout: background::ScoutConfig,
    claim_floor: bool,
    claim_sweep_interval: Duration,
    notify_in_transaction: bool,
    synchronous_claims: bool,
}

impl std::fmt::Debug for PgBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("PgBackendBuilder")
            .field("url", &connect::redact_url(&self.url))
            .field("namespace", &self.namespace)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("notifications", &self.notifications)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
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

    /// Whether consumers are woken by LISTEN/NOTIFY. Without it (poll-only mode) consumers
    /// poll every [`PgBackendBuilder::poll_interval`]. LISTEN needs a session: behind a pooler
    /// in transaction mode either set [`PgBackendBuilder::listen_url`] to a direct URL or turn
    /// notifications off. Defaults to true, except in [`StatementMode::Unnamed`] without a
    /// `listen_url` (a pooler is assumed), where it defaults to false.
    pub fn notifications(mut self, enabled: bool) -> Self {
        self.notifications = Some(enabled);
        self
    }

    /// Whether every publish that is the only one of this handle in flight sends its NOTIFY
    /// inside its own transaction (when no other in-transaction notifier is committing), rather
    /// than through the coalescing notifier after the commit. Defaults to false: then only a
    /// quiet publish (alone, and at least 1 ms after the handle's previous publish ended) does;
    /// back-to-back publishes measured slower that way (docs/performance.md, "Wake-ups on
    /// publish"), since every such publish wakes every listener where the notifier coalesces.
    /// For benchmarks and tests that compare the two ways; not a stable interface.
    #[doc(hidden)]
    pub fn notify_in_transaction(mut self, enabled: bool) -> Self {
        self.notify_in_transaction = enabled;
        self
    }

    /// How often a waiting consumer fetches without having been woken: the fallback poller
    /// that catches missed notifications. Defaults to 30 s with notifications, 1 s without.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval.max(Duration::from_millis(1)));
        self
    }

    /// How the engine sends its statements: [`StatementMode::Prepared`] (the default) or
    /// [`StatementMode::Unnamed`] behind a pooler in transaction mode. Overrides the URL
    /// parameter `pgtide_statements=prepared|unnamed`; without either, statements are prepared.
    pub fn statement_mode(mut self, mode: StatementMode) -> Self {
        self.statement_mode = Some(mode);
        self
    }

    /// A direct URL (no pooler in between) for the work that needs a session of its own: the
    /// LISTEN connection, and [`PgBackend::migrate`] (a session-level advisory lock). Set it
    /// when the main URL goes through a pooler in transaction mode, so consumers stay woken by
    /// NOTIFY while the pool is shared. Defaults to the main URL.
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self
    }

    /// Whether claims start at the group's claim floor: a second below where this process's
    /// latest claim of the group found its first delivery, rather than at the group's first
    /// ready delivery. With it, claims stay fast while another session holds an old snapshot
    /// (the dead index entries of consumed messages are not walked), and a delivery that becomes
    /// ready below the floor (a publish committed more than a second after its transaction
    /// began, a rolled-back claim) waits for the next claim without the floor, at most about a
    /// second (docs/semantics.md, "Below the claim floor"); a fetch woken by a publish whose
    /// claim from the floor finds nothing sweeps at once. Without it every claim walks from the
    /// group's first ready delivery, and under an old snapshot held for minutes claims slow
    /// down in proportion to what was consumed meanwhile (docs/performance.md, held xmin).
    /// Defaults to true: it keeps throughput under a snapshot held for minutes (0.61–0.69× of
    /// the level before over a 2-minute hold, against 0.14× off). Turn it off where every
    /// claim must see every ready delivery at once, whatever its due time, and no long
    /// transactions run beside the queue.
    pub fn claim_floor(mut self, enabled: bool) -> Self {
        self.claim_floor = enabled;
        self
    }

    /// With the claim floor on, the longest a group's claims in one process go without a claim
    /// that ignores the floor (a sweep), and so the longest a delivery that became ready below
    /// the floor waits while the group's consumers claim. Each sweep walks the group from its
    /// first ready delivery, which under a held snapshot costs what a claim without the floor
    /// costs; a sweep that took longer than 20 ms makes the next one wait at least ten times as
    /// long as it took, whatever this says. Defaults to 1 s; clamped to 10 ms – 1 hour.
    pub fn claim_sweep_interval(mut self, interval: Duration) -> Self {
        self.claim_sweep_interval =
            interval.clamp(Duration::from_millis(10), Duration::from_secs(3600));
        self
    }

    /// Whether a claim that settles nothing (`fetch`, `try_fetch`, an `ack_and_fetch` with no
    /// acks) waits for its commit to reach the disk (the WAL flush) before it returns.
    ///
    /// Defaults to false: such a claim commits with `synchronous_commit = off`, which takes the
    /// flush (about 0.8 ms on the disks measured, more under load) off the path from a publish
    /// to its handler. Nothing is lost by it: a claim that a crash of PostgreSQL loses only makes
    /// its deliveries ready again (delivered again, as after an expired lease), and its lease
    /// tokens are random, never drawn again, so the consumer that still holds the lost claim is
    /// fenced: its settles and lease extensions change nothing. Settles (acks, nacks, terms,
    /// releases), publishes, and an `ack_and_fetch` that acks always wait for the flush
    /// (docs/semantics.md, "Claims and crashes"). Turn it on where a claim's attempt must count
    /// even when the server crashes right after it (a crash can give a delivery one more
    /// attempt than `max_deliver` when claims do not wait).
    pub fn synchronous_claims(mut self, enabled: bool) -> Self {
        self.synchronous_claims = enabled;
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

    /// Whether the scout vacuums the namespace's hot tables (delivery state, counters, dead
    /// letters, dedupe keys, flow-control and fair-share state) when they need it and autovacuum
    /// does not get to them: where autovacuum is off for a table, as soon as it holds
    /// [`PgBackendBuilder::vacuum_min_dead_rows`] dead row versions and a tenth of its live rows;
    /// where autovacuum is on, only once it has needed a vacuum for three autovacuum naptimes
    /// without one (so a cluster whose autovacuum keeps up sees no VACUUM from pgtide). Needs the
    /// scout's role to own the tables; a table it may not vacuum is skipped, logged once and
    /// listed in [`ScoutStatus::vacuum_denied`]. Defaults to true.
    pub fn scout_vacuum(mut self, enabled: bool) -> Self {
        self.scout.vacuum.enabled = enabled;
        self
    }

    /// How often the scout reads the hot tables' statistics to decide on a vacuum, and so the
    /// shortest time between two of its vacuums of a table. Defaults to 10 s.
    pub fn vacuum_interval(mut self, interval: Duration) -> Self {
        self.scout.vacuum.interval = interval.max(Duration::from_millis(100));
        self
    }

    /// Dead row versions a hot table must hold (besides a tenth of its live rows) before the
    /// scout vacuums it. Defaults to 10 000 (two seconds of claims and acks at 2 500 msgs/s).
    pub fn vacuum_min_dead_rows(mut self, rows: u64) -> Self {
        self.scout.vacuum.min_dead_rows = rows.max(1);
        self
    }

    /// Builds the handle. Connects lazily: the first operation opens the first connection.
    ///
    /// Resolves the URL as libpq does (see [`PgBackend::builder`]) and reads the root
    /// certificates now: a bad `sslmode` or an unreadable `sslrootcert` fails here with
    /// [`Error::InvalidConfig`].
    pub fn build(self) -> Result<PgBackend> {
        validate_namespace(&self.namespace)?;
        let (url, url_mode) = exec::strip_url_params(&self.url)?;
        let mode = self.statement_mode.or(url_mode).unwrap_or_default();
        let connect = connect::ConnectConfig::from_url(&url)?;
        let listen = match &self.listen_url {
            Some(direct) => Some(connect::ConnectConfig::from_url(
                &exec::strip_url_params(direct)?.0,
            )?),
            None => None,
        };
        let session = listen.as_ref().unwrap_or(&connect);
        let mut pg_config = connect.pg.clone();
        let mut listen_config = session.pg.clone();
        // pgtide's sessions ignore a database's or role's statement and idle-in-transaction
        // timeouts (SESSION_SETTINGS); the URL's own `options` come after and win.
        let listen_options = listen_config.get_options().unwrap_or_default().to_owned();
        listen_config.options(format!("{SESSION_SETTINGS} {listen_options}").trim_end());
        // Publishes from the pool poke the coalescing notifier instead of firing the trigger.
        // Transaction-mode poolers refuse startup `options` (PgBouncer: "unsupported startup
        // parameter"), so unnamed mode sends none and its publishes say it per transaction; the
        // session settings are then the pooler's and the database's.
        if mode == StatementMode::Prepared {
            let url_options = pg_config.get_options().unwrap_or_default().to_owned();
            pg_config.options(format!(
                "{SESSION_SETTINGS} {url_options} -c pgtide.notify=off"
            ));
        }
        let manager = Manager::from_config(
            pg_config,
            connect.tls.clone(),
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
        let notifications = self
            .notifications
            .unwrap_or(mode == StatementMode::Prepared || listen.is_some());
        let poll_interval = self.poll_interval.unwrap_or(if notifications {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(1)
        });
        let sql = Arc::new(Statements::render(&self.namespace, mode));
        let background = background::Background::new(background::Settings {
            pool: pool.clone(),
            sql: sql.clone(),
            namespace: self.namespace.clone(),
            listen_config,
            tls: session.tls.clone(),
            scout: self.scout,
        });
        Ok(PgBackend {
            inner: Arc::new(Inner {
                pool,
                connect,
                listen,
                sql,
                namespace: self.namespace,
                streams: Mutex::new(HashMap::new()),
                floors: floor::Floors::new(self.claim_floor, self.claim_sweep_interval),
                options: Options {
                    notifications,
                    poll_interval,
                    notify_in_transaction: self.notify_in_transaction,
                    synchronous_claims: self.synchronous_claims,
                },
                background,
            }),
        })
    }
}

impl PgBackend {
    /// Starts building a handle for the database at `url`: a `postgres://user@host:port/db`
    /// URL or a `host=… dbname=…` connection string, read as libpq reads them.
    ///
    /// - TLS follows `sslmode` (`disable`, `allow`/`prefer` (the default), `require`,
    ///   `verify-ca`, `verify-full`) and `sslrootcert` (a PEM file, or `system`), from the URL
    ///   or `PGSSLMODE`/`PGSSLROOTCERT`. `require` with a root certificate checks the chain;
    ///   `verify-full` without one uses the system's roots.
    /// - What the URL leaves out comes from `PGHOST` (else `localhost`), `PGPORT`, `PGUSER`,
    ///   `PGDATABASE`, `PGPASSWORD`, then the password file (`PGPASSFILE`, else `~/.pgpass`;
    ///   ignored when group or others can read it). `postgres://` alone is the libpq
    ///   environment.
    ///
    /// The password never appears in [`PgBackend::url`], `Debug` output, logs or errors.
    pub fn builder(url: impl Into<String>) -> PgBackendBuilder {
        PgBackendBuilder {
            url: url.into(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(30),
            notifications: None,
            poll_interval: None,
            statement_mode: None,
            listen_url: None,
            scout: background::ScoutConfig {
                ttl: Duration::from_secs(10),
                max_interval: Duration::from_secs(1),
                maintenance_interval: Duration::from_secs(60),
                vacuum: vacuum::VacuumConfig::default(),
            },
            claim_floor: true,
            claim_sweep_interval: floor::SWEEP_EVERY,
            notify_in_transaction: false,
            synchronous_claims: false,
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

    /// The database URL this handle's pool connects to, as given but without pgtide's own URL
    /// parameters and with the password replaced by `***`: safe to log or show.
    pub fn url(&self) -> &str {
        &self.inner.connect.redacted
    }

    /// The URL of the session work (LISTEN, migrations): [`PgBackendBuilder::listen_url`] when
    /// set, else [`PgBackend::url`]; the password replaced by `***`.
    pub fn listen_url(&self) -> &str {
        &self.session_connect().redacted
    }

    /// Where session work (LISTEN, migrations) connects: the direct URL when set.
    pub(crate) fn session_connect(&self) -> &connect::ConnectConfig {
        self.inner.listen.as_ref().unwrap_or(&self.inner.connect)
    }

    /// How this handle sends its statements (see [`PgBackendBuilder::statement_mode`]).
    pub fn statement_mode(&self) -> StatementMode {
        self.inner.sql.mode()
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.inner.pool.get().await?)
    }

    /// Tells local waiters and other processes about new work (coalesced NOTIFY).
    pub(crate) fn poke(&self, wake: wake::Wake) {
        let background = &self.inner.background;
        if !self.inner.options.notifications || background.is_stopped() {
            return;
        }
        background.ensure(services::NOTIFIER);
        background.poke(wake);
    }

    /// Whether this handle sends and hears wake-ups (see [`PgBackendBuilder::notifications`]).
    pub(crate) fn notifications_enabled(&self) -> bool {
        self.inner.options.notifications
    }

    /// Subscribes to wake-ups, starting the listener (and the scout candidate) on first use.
    pub(crate) fn subscribe(&self) -> Option<broadcast::Receiver<wake::Wake>> {
        self.start_scout();
        if !self.inner.options.notifications {
            return None;
        }
        Some(self.inner.background.subscribe())
    }

    /// A fetch of `stream` found nothing and is about to wait (see the registrar).
    pub(crate) fn before_wait(&self, stream: &str) {
        self.inner.background.before_wait(stream);
    }

    /// Counts a fetch as blocked waiting for a wake-up until the guard is dropped (see
    /// [`PgBackend::watch_waiting_fetches`]).
    pub(crate) fn waiting(&self) -> background::Waiting {
        self.inner.background.waiting()
    }

    /// Makes this process a scout candidate (idempotent). Consumers and workers do this on
    /// their own when they first wait; call it in processes that only publish or only run
    /// maintenance. Needs a tokio runtime.
    pub fn start_scout(&self) {
        // The scout wakes streams through the notifier; a scout that is not listening would
        // miss `!scout` and `@due` hints.
        let mut wanted = services::SCOUT | services::NOTIFIER;
        if self.inner.options.notifications {
            wanted |= services::LISTENER;
        }
        self.inner.background.ensure(wanted);
    }

    /// Starts this handle's LISTEN connection now, rather than when a fetch first waits: for
    /// processes that only watch (a dashboard showing [`PgBackend::listener_status`]). Does
    /// nothing in poll-only mode. Needs a tokio runtime.
    pub fn start_listening(&self) {
        if self.inner.options.notifications {
            self.inner.background.ensure(services::LISTENER);
        }
    }

    /// State of this handle's LISTEN connection.
    pub fn listener_status(&self) -> ListenerStatus {
        self.inner.background.listener().borrow().clone()
    }

    /// Watches this handle's LISTEN connection: a receiver that sees every change of
    /// [`PgBackend::listener_status`]. Wait for "connected" (again, after a reconnect) with
    /// `rx.wait_for(|s| s.connected && s.reconnects > seen)`.
    pub fn watch_listener(&self) -> watch::Receiver<ListenerStatus> {
        self.inner.background.listener()
    }

    /// What this process knows of the scout role (who leads is in SQL: `<ns>.scout`).
    pub fn scout_status(&self) -> ScoutStatus {
        self.inner.background.scout().borrow().clone()
    }

    /// Watches the scout role: a receiver that sees every change of
    /// [`PgBackend::scout_status`] (elected, term, step-down, due checks, maintenance passes).
    pub fn watch_scout(&self) -> watch::Receiver<ScoutStatus> {
        self.inner.background.scout()
    }

    /// How many fetches of this handle are blocked waiting for a wake-up (they found nothing
    /// and sleep until a notification or the poll interval). For tests that must publish only
    /// once a consumer really waits; not a stable interface.
    #[doc(hidden)]
    pub fn watch_waiting_fetches(&self) -> watch::Receiver<usize> {
        self.inner.background.watch_waiting()
    }

    /// How many background tasks of this handle are running (none after [`PgBackend::shutdown`]
    /// returns). For tests; not a stable interface.
    #[doc(hidden)]
    pub fn background_tasks(&self) -> usize {
        self.inner.background.running()
    }

    /// Stops the background tasks gracefully: the scout resigns (another process takes over at
    /// once), pending notifications are flushed, the listener disconnects. Waits for them. The
    /// handle keeps working for everything else; waiting consumers fall back to polling.
    pub async fn shutdown(&self) {
        self.inner.background.shutdown().await;
    }

    /// Stops the background tasks abruptly, as a crash would: no resign, no flush. For failover
    /// drills and tests.
    pub fn abort_background(&self) {
        self.inner.background.abort();
    }

    /// The fallback poll interval (see [`PgBackendBuilder::poll_interval`]).
    pub(crate) fn poll_interval(&self) -> Duration {
        self.inner.options.poll_interval
    }
}

/// A duration as whole microseconds for SQL (`$n::int8 * interval '1 microsecond'`).
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
