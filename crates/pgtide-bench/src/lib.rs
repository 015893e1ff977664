//! Throughput and latency harness (the `pgtide-bench` crate), used by `benches/throughput.rs` and
//! `pgtide bench`.
//!
//! One [`run`] measures raw PostgreSQL baselines and pgtide against them in the same process, on
//! the same database, so that the ratios say what the engine costs on this machine whatever the
//! hardware. Every message is a 200-byte JSON payload; every stream has one group.
//!
//! Each comparison runs its sides in alternating rounds (raw, pgtide, pgtide, raw, …; see
//! [`BenchConfig::rounds`]) adding up to a fixed measured window per side, after one warm-up per
//! side: a machine whose load changes during the run (a build, a checkpoint, autovacuum) skews
//! every side alike instead of one.
//!
//! | case | what runs |
//! |---|---|
//! | raw INSERT 1/txn | `INSERT (uuid, jsonb)` per autocommit transaction, 1 / 4 / 16 clients |
//! | raw INSERT 100/stmt | 100 rows per `INSERT … SELECT unnest(…)`, 1 client |
//! | raw DELETE SKIP LOCKED | 4 clients looping `DELETE … WHERE id IN (SELECT … ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED) RETURNING *`, once against each consume case |
//! | publish | [`PgBackend::publish`], 1 / 4 / 16 publishers, against raw INSERT 1/txn |
//! | publish_batch | 100 messages per call, 1 client, against raw INSERT 100/stmt |
//! | trigger cost | 1 and 16 publishers, three sides: the engine's publish statement on raw connections with `SET pgtide.notify = off` (the floor: no wake-up at all), [`PgBackend::publish`] (trigger off, coalescing notifier on), and the same statement with the NOTIFY trigger on (what SQL publishers get); a raw LISTEN on the namespace channel counts the notifications |
//! | statement modes | publish at 1 / 16 publishers with prepared statements and with [`pgtide::StatementMode::Unnamed`] (the mode for transaction-mode poolers) against raw INSERT 1/txn, alternating; consume B = 10 (4 consumers) prepared against unnamed |
//! | consume | 4 consumers looping `ack_and_fetch(previous batch, B)` (acks ride with the next claim, as in the worker), B = 10 and 100, against raw DELETE |
//! | worker | a [`pgtide::Worker`] (no-op handler, concurrency 16) in each of 2 processes (or, without [`BenchConfig::worker_args`], 2 independent handles in this one) draining a backlog, against the consume figures |
//! | claim latency | `try_fetch(10)` + `ack_batch` round trips, 1 consumer, on a group with a backlog of 10 000 against one with 1 000 000 (100 000 when quick), both kept constant by re-publishing what was acked (untimed) |
//! | peak RSS | `VmHWM` of `/proc/self/status` around draining the large backlog with 4 consumers, batch 100 (at most [`BenchConfig::drain_cap`]) |
//! | publish → handler start | 500 msg/s published from one handle, a worker (no-op handler, concurrency 16) on another handle of this process woken through NOTIFY → listener; alternating with the raw NOTIFY round trip at the same rate (the floor) |
//! | delayed lateness | 50 msg/s due 1 s after publish; handler start − due time |
//! | scale | [`BenchConfig::scale_streams`] streams × 2 groups in a database of their own: creating a stream with its partitions (p50), `maintain()` over all of them, publishing spread over all against one stream (4 publishers, alternating), the statements/s 200 idle consumers on 4 handles cost beyond the fallback poll, and publish → idle consumer wake-up |
//! | collapse condition | claim + ack round trips at the large vs a 10 000 backlog after a fresh `ANALYZE`, on connections with `plan_cache_mode = force_generic_plan` |
//! | held xmin | a steady load at half the measured drain maximum (claims, acks, 1 in 20 nacked once) before, during and after another session holds `BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1` for [`BenchConfig::held_xmin`]; acked/s, claim p50/p99 and backlog per interval |
//! | soak | only with [`BenchConfig::soak`], instead of every other case: the same steady load with 2-minute retention and `maintain()` every 30 s, a row a minute with table and index sizes |
//! | ordered group | 4 consumers looping `ack_and_fetch` (B = 10 and 100) on an ordered group whose backlog spreads over 1 000 ordering keys, against an unordered group with the same keyed messages; `publish_batch` of 100 keyed messages into a stream with an ordered group against 100 unkeyed (a group created after them keeps both sides off the right end of `delivery_state`'s indexes) |
//! | backends | with [`BenchConfig::backends`]: publish (1 per call; 100 per call), consume (4 consumers, `ack_and_fetch` of 100) and publish → fetch latency through [`pgtide::AnyBackend`] on Postgres, memory, and NATS / Redis / RabbitMQ when built with their feature and their server answers |
//!
//! Raw baselines use tokio-postgres directly with prepared statements, one connection per
//! client; pgtide goes through its pool. Backlogs are filled with `publish_batch` of 1000 from 4
//! concurrent tasks. Consume backlogs and the raw queue leave room for 100 000 messages/s; a side
//! that runs out reports the rate up to its last batch, with a note.
//!
//! Isolation: a run creates its own namespace (`bench_<random>`; an existing one is refused),
//! keeps the raw tables in that schema too, uses it as the prefix of every broker-side name, and
//! drops it with `DROP SCHEMA … CASCADE` at the end, also when a phase fails (broker streams
//! are deleted with [`pgtide::Queue::delete_stream`]).
//!
//! Caveats: the bench client shares the CPUs with the server when both run on one machine (as it
//! does for the baselines). The peak RSS is that of the whole bench process (runtime, pool,
//! buffers), not of the consumers alone; its high-water mark is reset through
//! `/proc/self/clear_refs` before the drain when the kernel allows it, so earlier phases do not
//! count. The worker and backend cases run once each, not alternated with a baseline.

mod backends;
mod collapse;
mod harness;
mod latency;
mod ordering;
mod postgres;
mod raw;
mod render;
mod report;
mod scale;
mod statements;
mod steady;
mod trigger;
mod workers;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_postgres::Client;

use self::harness::{joined, Failure, Step, Throughput};
use pgtide::{
    validate_namespace, Error, GroupStart, OutgoingMessage, PgBackend, Result, StreamConfig,
};

pub use self::report::{
    BackendRow, BenchReport, Case, Interval, Latency, Machine, Rss, Target, Timing, Unit,
};
pub use self::workers::{run_worker_process, worker_process_requested, WORKER_PROCESS_ENV};

/// Size of every payload, in bytes of JSON text.
pub const PAYLOAD_BYTES: usize = 200;

/// Messages per `publish_batch` when filling a backlog.
const FILL_BATCH: usize = 1000;
/// Concurrent tasks filling a backlog.
const FILL_TASKS: usize = 4;
/// Consumers of the consume and drain cases, and clients of the raw DELETE loop.
const CONSUMERS: usize = 4;

const GROUP: &str = "g";

/// What [`run`] measures and where.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BenchConfig {
    /// Database URL (`postgres://user@host:port/db`).
    pub url: String,
    /// Namespace (schema) to create, bench in and drop. It must not exist yet. Defaults to
    /// `bench_<random>`.
    pub namespace: Option<String>,
    /// Short run (smaller phases and large backlog). Defaults to false.
    pub quick: bool,
    /// Measured window of each throughput and latency case. Defaults to 5 s (2 s when quick).
    pub phase: Duration,
    /// Rounds each comparison alternates its sides in (raw, pgtide, pgtide, raw, …), each
    /// side running `phase / rounds` per round. Defaults to 10 (4 when quick): half-second
    /// rounds, because commit latency on shared or virtual disks swings within seconds.
    pub rounds: u32,
    /// Warm-up before each measured window, not counted. Defaults to 0.5 s (0.25 s when quick).
    pub warmup: Duration,
    /// Backlog of the large claim-latency case and of the peak-RSS drain. Defaults to 1 000 000
    /// (100 000 when quick).
    pub large_backlog: u64,
    /// Longest the peak-RSS drain (and the worker drain) may run; a drain cut short is noted in
    /// the report. Defaults to 120 s (60 s when quick).
    pub drain_cap: Duration,
    /// Connections in the pgtide pool; at least 16 for the 16-publisher case. Defaults to 20.
    pub pool_size: usize,
    /// Measure the backends comparison (Postgres, memory, and the brokers built in whose server
    /// answers at `NATS_URL`, `REDIS_URL`, `AMQP_URL`). Defaults to true, false when quick.
    pub backends: bool,
    /// Measure only the backends comparison, for Postgres (the reference) and this backend URL
    /// (`pgtide bench --backend nats://…`): no raw baselines or engine cases. Defaults to `None`.
    pub backend: Option<String>,
    /// Arguments that make the current executable ([`std::env::current_exe`]) run one bench
    /// worker process, i.e. call [`run_worker_process`] when [`worker_process_requested`]; the
    /// worker case then runs its two workers as two OS processes. `None` runs them as two
    /// independent handles in this process. Defaults to `None`.
    pub worker_args: Option<Vec<String>>,
    /// Print one line per phase to stderr while running. Defaults to false.
    pub progress: bool,
    /// Measure only the statement-mode comparison (prepared against unnamed statements, with
    /// its raw INSERT baseline). Defaults to false.
    pub only_statement_modes: bool,
    /// Measure only this case (and what it needs). Defaults to `None`: every case.
    pub only: Option<Only>,
    /// Streams of the scale case (2 groups each; at least 200). Defaults to 1000 (250 when quick).
    pub scale_streams: usize,
    /// How long the held-xmin case holds its snapshot. Defaults to 2 min (30 s when quick).
    pub held_xmin: Duration,
    /// Run only the soak, a steady load for this long. Defaults to `None`.
    pub soak: Option<Duration>,
    /// Measure only the publish and consume cases of the unordered path and the ordered-group
    /// comparison. Defaults to false.
    pub only_ordering: bool,
    /// Whether the engine's claims start at the claim floor ([`pgtide::PgBackendBuilder::claim_floor`]);
    /// false measures claims that always walk from the group's first entry. Every case's handles
    /// use it. Defaults to true, as the engine does (`PGTIDE_BENCH_CLAIM_FLOOR=0` turns it off).
    pub claim_floor: bool,
    /// Whether the engine's claims wait for their WAL flush
    /// ([`pgtide::PgBackendBuilder::synchronous_claims`]). Every case's handles use it. Defaults
    /// to false, as the engine does (`PGTIDE_BENCH_SYNC_CLAIMS=1` turns it on).
    pub synchronous_claims: bool,
}

impl BenchConfig {
    /// A handle builder for `url` with the engine settings under measure (the claim floor,
    /// synchronous claims).
    pub(crate) fn engine(&self, url: impl Into<String>) -> pgtide::PgBackendBuilder {
        PgBackend::builder(url)
            .claim_floor(self.claim_floor)
            .synchronous_claims(self.synchronous_claims)
    }
}

/// A case [`BenchConfig::only`] can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Only {
    /// Many streams: create, maintain, spread publish, idle consumers (`scale.rs`).
    Scale,
    /// Steady load while another session holds a snapshot (`steady.rs`).
    HeldXmin,
    /// Claims at a large and a small backlog after ANALYZE with generic plans (`collapse.rs`).
    Collapse,
    /// Consume at batch 10 and 100 against the raw DELETE loop, then the worker drain
    /// (`postgres.rs`, `workers.rs`).
    Consume,
    /// The publish rows against raw INSERTs, the wake-up cost, then commit → handler latency
    /// (`postgres.rs`, `trigger.rs`, `latency.rs`).
    Trigger,
    /// Commit → handler latency and the delayed messages' lateness alone (`latency.rs`).
    Latency,
}

impl BenchConfig {
    /// The defaults of a full run, or of a short one when `quick`.
    pub fn new(url: impl Into<String>, quick: bool) -> Self {
        BenchConfig {
            url: url.into(),
            namespace: None,
            quick,
            phase: Duration::from_millis(if quick { 2000 } else { 5000 }),
            warmup: Duration::from_millis(if quick { 250 } else { 500 }),
            rounds: if quick { 4 } else { 10 },
            large_backlog: if quick { 100_000 } else { 1_000_000 },
            drain_cap: Duration::from_secs(if quick { 60 } else { 120 }),
            pool_size: 20,
            backends: !quick,
            backend: None,
            worker_args: None,
            progress: false,
            only_statement_modes: false,
            only: None,
            scale_streams: if quick { 250 } else { 1000 },
            held_xmin: Duration::from_secs(if quick { 30 } else { 120 }),
            soak: None,
            only_ordering: false,
            claim_floor: true,
            synchronous_claims: false,
        }
    }
}

/// Runs every case in a fresh namespace and drops the namespace afterwards (also on failure).
///
/// Takes about twelve minutes for a full run (about eight with `quick`; the held-xmin case alone
/// is 3.5 minutes of it, 1.7 when quick). Needs the right to create and drop a schema, and for
/// the scale case a database (it reports itself unmeasured without). Fails if the configured namespace already exists, so that it can
/// never drop data it did not create. A panic in a bench task is resumed here after the
/// namespace is dropped.
///
/// Cancel safety: if this future is dropped, the namespace (and broker streams named after it)
/// are left behind; drop it by hand (`DROP SCHEMA bench_… CASCADE`). Worker processes started by
/// the run are killed when it is dropped.
pub async fn run(config: BenchConfig) -> Result<BenchReport> {
    let ns = match &config.namespace {
        Some(ns) => ns.clone(),
        None => format!("bench_{:08x}", rand::random::<u32>()),
    };
    validate_namespace(&ns)?;
    let admin = raw::connect(&config.url).await?;
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&ns],
        )
        .await?
        .try_get(0)?;
    if exists {
        return Err(Error::InvalidConfig(format!(
            "bench namespace {ns:?} already exists: the bench drops its namespace at the end, so give it a new one"
        )));
    }
    let outcome = Bench::measure(&config, &ns, &admin).await;
    let dropped = admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{ns}\" CASCADE"))
        .await;
    match outcome {
        Ok(report) => {
            dropped?;
            Ok(report)
        }
        Err(Failure::Error(e)) => Err(e),
        Err(Failure::Panic(panic)) => std::panic::resume_unwind(panic),
    }
}

/// What the cases of a run measured.
#[derive(Default)]
struct Outcome {
    baselines: Vec<Case>,
    cases: Vec<Case>,
    latencies: Vec<Latency>,
    wakeups: Vec<Timing>,
    rss: Rss,
    backends: Vec<BackendRow>,
    held_xmin: Vec<Interval>,
    soak: Vec<Interval>,
}

/// One run: its settings, namespace, engine handle and payload.
struct Bench<'a> {
    config: &'a BenchConfig,
    ns: &'a str,
    pg: PgBackend,
    value: Arc<serde_json::Value>,
    msg: OutgoingMessage,
    started: Instant,
}

/// Streams every run creates (one group each); the backends case makes its own.
const STREAMS: [&str; 13] = [
    postgres::PUBLISH,
    postgres::BATCH,
    postgres::CONSUME_10,
    postgres::CONSUME_100,
    postgres::CLAIM_SMALL,
    postgres::CLAIM_LARGE,
    trigger::TRIGGER,
    workers::WORKERS,
    latency::E2E,
    latency::DELAYED,
    statements::STATEMENTS,
    statements::CONSUME_PREPARED,
    statements::CONSUME_UNNAMED,
];

impl<'a> Bench<'a> {
    async fn measure(config: &BenchConfig, ns: &str, admin: &Client) -> Step<BenchReport> {
        let started_at = chrono::Utc::now();
        let started = Instant::now();
        let machine = machine(admin).await?;
        let pg = config
            .engine(config.url.clone())
            .namespace(ns)
            .pool_size(config.pool_size)
            .build()?;
        pg.migrate().await?;
        for stream in STREAMS {
            pg.ensure_stream(stream, &StreamConfig::default()).await?;
            pg.ensure_group(stream, GROUP, GroupStart::New).await?;
        }
        admin
            .batch_execute(&format!(
                "CREATE TABLE \"{ns}\".raw_insert (id uuid PRIMARY KEY, payload jsonb NOT NULL);
                 CREATE TABLE \"{ns}\".raw_batch (id uuid PRIMARY KEY, payload jsonb NOT NULL);
                 CREATE TABLE \"{ns}\".raw_queue (id bigserial PRIMARY KEY, payload jsonb NOT NULL);"
            ))
            .await?;
        let value = raw::payload();
        let msg = OutgoingMessage::json(&value)?;
        let bench = Bench {
            config,
            ns,
            pg,
            value: Arc::new(value),
            msg,
            started,
        };
        let outcome = bench.cases().await;
        // Background tasks hold pooled connections and locks: stop them before the schema goes.
        bench.pg.shutdown().await;
        let Outcome {
            baselines,
            cases,
            latencies,
            wakeups,
            rss,
            backends,
            held_xmin,
            soak,
        } = outcome?;
        let mut all = baselines;
        all.extend(cases);
        Ok(BenchReport {
            machine,
            namespace: ns.to_owned(),
            quick: config.quick,
            phase_secs: config.phase.as_secs_f64(),
            warmup_secs: config.warmup.as_secs_f64(),
            rounds: config.rounds.max(1),
            payload_bytes: bench.msg.payload().len(),
            started_at,
            elapsed_secs: started.elapsed().as_secs_f64(),
            cases: all,
            latencies,
            wakeups,
            rss,
            backends,
            held_xmin,
            soak,
        })
    }

    /// Every case in order: baselines and pgtide rows, claim latencies, wake-ups, RSS, backends,
    /// then scale, the collapse condition and held xmin; or only the soak, or only one case.
    async fn cases(&self) -> Step<Outcome> {
        let mut out = Outcome::default();
        if let Some(url) = &self.config.backend {
            out.backends = self.backend_rows_for(url).await?;
            return Ok(out);
        }
        if let Some(duration) = self.config.soak {
            self.soak_case(duration, &mut out.cases, &mut out.soak)
                .await?;
            return Ok(out);
        }
        if self.config.only_statement_modes {
            self.statement_cases(&mut out.baselines, &mut out.cases)
                .await?;
            return Ok(out);
        }
        if self.config.only_ordering {
            self.publish_cases(&mut out.baselines, &mut out.cases)
                .await?;
            self.consume_cases(&mut out.baselines, &mut out.cases)
                .await?;
            self.ordering_cases(&mut out.cases).await?;
            return Ok(out);
        }
        let only = self.config.only;
        if only.is_none() {
            self.publish_cases(&mut out.baselines, &mut out.cases)
                .await?;
            self.trigger_cases(&mut out.baselines, &mut out.cases)
                .await?;
            self.ordering_cases(&mut out.cases).await?;
            self.statement_cases(&mut out.baselines, &mut out.cases)
                .await?;
            let consume = self
                .consume_cases(&mut out.baselines, &mut out.cases)
                .await?;
            self.worker_cases(consume, &mut out.cases).await?;
            out.latencies = self.claim_latency(&mut out.cases).await?;
            out.rss = self.peak_rss(&mut out.cases).await?;
            out.wakeups = self.wakeup_cases(&mut out.cases).await?;
            if self.config.backends {
                out.backends = self.backend_rows().await?;
            }
        }
        if only == Some(Only::Trigger) {
            self.publish_cases(&mut out.baselines, &mut out.cases)
                .await?;
            self.trigger_cases(&mut out.baselines, &mut out.cases)
                .await?;
            out.wakeups = self.wakeup_cases(&mut out.cases).await?;
        }
        if only == Some(Only::Latency) {
            out.wakeups = self.wakeup_cases(&mut out.cases).await?;
        }
        if only == Some(Only::Consume) {
            let consume = self
                .consume_cases(&mut out.baselines, &mut out.cases)
                .await?;
            self.worker_cases(consume, &mut out.cases).await?;
        }
        if matches!(only, None | Some(Only::Scale)) {
            self.scale_case(&mut out.cases, &mut out.wakeups).await?;
        }
        if matches!(only, None | Some(Only::Collapse)) {
            self.collapse_case(&mut out.cases, &mut out.latencies)
                .await?;
        }
        if matches!(only, None | Some(Only::HeldXmin)) {
            self.held_xmin_case(&mut out.cases, &mut out.held_xmin)
                .await?;
        }
        Ok(out)
    }

    fn progress(&self, what: fmt::Arguments<'_>) {
        if self.config.progress {
            eprintln!("[{:6.1} s] {what}", self.started.elapsed().as_secs_f64());
        }
    }

    /// Publishes `count` messages to `stream` with `publish_batch` of [`FILL_BATCH`] from
    /// [`FILL_TASKS`] tasks.
    async fn fill(&self, stream: &'static str, count: u64) -> Step<Throughput> {
        self.progress(format_args!("filling {stream} with {count} messages"));
        let chunks = count.div_ceil(FILL_BATCH as u64);
        let next = Arc::new(AtomicU64::new(0));
        let batch = Arc::new(vec![self.msg.clone(); FILL_BATCH]);
        let started = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..FILL_TASKS {
            let (pg, next, batch) = (self.pg.clone(), next.clone(), batch.clone());
            set.spawn(async move {
                let mut published = 0u64;
                loop {
                    let chunk = next.fetch_add(1, Ordering::Relaxed);
                    if chunk >= chunks {
                        break;
                    }
                    let n = (count - chunk * FILL_BATCH as u64).min(FILL_BATCH as u64) as usize;
                    pg.publish_batch(stream, &batch[..n]).await?;
                    published += n as u64;
                }
                Ok::<_, Error>(published)
            });
        }
        let mut items = 0;
        while let Some(result) = set.join_next().await {
            items += joined(result)?;
        }
        let secs = started.elapsed().as_secs_f64();
        self.progress(format_args!("filled {items} in {secs:.1} s"));
        Ok(Throughput {
            items,
            secs,
            exhausted: false,
        })
    }
}

async fn machine(admin: &Client) -> Result<Machine> {
    let mut settings = vec![];
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "shared_buffers",
    ] {
        settings.push(
            admin
                .query_one("SELECT current_setting($1)", &[&name])
                .await?
                .try_get::<_, String>(0)?,
        );
    }
    let mut settings = settings.into_iter();
    let mut next = || settings.next().unwrap_or_default();
    Ok(Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        server_version: next(),
        fsync: next(),
        synchronous_commit: next(),
        shared_buffers: next(),
    })
}
