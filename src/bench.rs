//! Throughput and latency harness (feature `bench`), used by `benches/throughput.rs` and meant
//! for a later `pgtide bench` command.
//!
//! One [`run`] measures raw PostgreSQL baselines and pgtide against them in the same process, on
//! the same database, so that the ratios say what the engine costs on this machine whatever the
//! hardware. Every message is a 200-byte JSON payload; every stream has one group.
//!
//! Each comparison runs its two sides in alternating rounds (raw, pgtide, pgtide, raw, …; see
//! [`BenchConfig::rounds`]) adding up to a fixed measured window per side, after one warm-up per
//! side: a machine whose load changes during the run (a build, a checkpoint, autovacuum) skews
//! both sides alike instead of one.
//!
//! | case | what runs |
//! |---|---|
//! | raw INSERT 1/txn | `INSERT (uuid, jsonb)` per autocommit transaction, 1 / 4 / 16 clients |
//! | raw INSERT 100/stmt | 100 rows per `INSERT … SELECT unnest(…)`, 1 client |
//! | raw DELETE SKIP LOCKED | 4 clients looping `DELETE … WHERE id IN (SELECT … ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED) RETURNING *`, once against each consume case |
//! | publish | [`PgBackend::publish`], 1 / 4 / 16 publishers, against raw INSERT 1/txn |
//! | publish_batch | 100 messages per call, 1 client, against raw INSERT 100/stmt |
//! | consume | 4 consumers looping `ack_and_fetch(previous batch, B)` (acks ride with the next claim, as in the worker), B = 10 and 100, against raw DELETE |
//! | claim latency | `try_fetch(10)` + `ack_batch` round trips, 1 consumer, on a group with a backlog of 10 000 against one with 1 000 000 (100 000 when quick), both kept constant by re-publishing what was acked (untimed) |
//! | peak RSS | `VmHWM` of `/proc/self/status` around draining the large backlog with 4 consumers, batch 100 (at most [`BenchConfig::drain_cap`]) |
//!
//! Raw baselines use tokio-postgres directly with prepared statements, one connection per
//! client; pgtide goes through its pool. Backlogs are filled with `publish_batch` of 1000 from 4
//! concurrent tasks. Consume backlogs and the raw queue leave room for 100 000 messages/s; a side
//! that runs out reports the rate up to its last batch, with a note.
//!
//! Isolation: a run creates its own namespace (`bench_<random>`; an existing one is refused),
//! keeps the raw tables in that schema too, and drops it with `DROP SCHEMA … CASCADE` at the end,
//! also when a phase fails.
//!
//! Caveats: the bench client shares the CPUs with the server when both run on one machine (as it
//! does for the baselines). The peak RSS is that of the whole bench process (runtime, pool,
//! buffers), not of the consumers alone; its high-water mark is reset through
//! `/proc/self/clear_refs` before the drain when the kernel allows it, so earlier phases do not
//! count.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::{JoinError, JoinSet};
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::{
    validate_namespace, Consumer, Delivery, Error, GroupStart, OutgoingMessage, PgBackend, Result,
    StreamConfig,
};

/// Size of every payload, in bytes of JSON text.
pub const PAYLOAD_BYTES: usize = 200;

/// Backlog of the small claim-latency case.
const SMALL_BACKLOG: u64 = 10_000;
/// Messages per `publish_batch` when filling a backlog.
const FILL_BATCH: usize = 1000;
/// Concurrent tasks filling a backlog.
const FILL_TASKS: usize = 4;
/// Consumers of the consume and drain cases, and clients of the raw DELETE loop.
const CONSUMERS: usize = 4;
/// Publisher counts of the single-publish cases.
const CLIENT_COUNTS: [usize; 3] = [1, 4, 16];
/// Peak RSS target of the drain, in MiB.
const RSS_TARGET_MIB: f64 = 64.0;

const GROUP: &str = "g";
const PUBLISH: &str = "publish";
const BATCH: &str = "batch";
const CONSUME_10: &str = "consume-10";
const CONSUME_100: &str = "consume-100";
const CLAIM_SMALL: &str = "claim-small";
const CLAIM_LARGE: &str = "claim-large";
/// Drain rate (messages/s) each consume backlog and raw queue leaves room for.
const RAW_DRAIN_ROOM: f64 = 100_000.0;

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
    /// Rounds each comparison alternates its two sides in (raw, pgtide, pgtide, raw, …), each
    /// side running `phase / rounds` per round. Defaults to 10 (4 when quick): half-second
    /// rounds, because commit latency on shared or virtual disks swings within seconds.
    pub rounds: u32,
    /// Warm-up before each measured window, not counted. Defaults to 0.5 s (0.25 s when quick).
    pub warmup: Duration,
    /// Backlog of the large claim-latency case and of the peak-RSS drain. Defaults to 1 000 000
    /// (100 000 when quick).
    pub large_backlog: u64,
    /// Longest the peak-RSS drain may run; a drain cut short is noted in the report. Defaults
    /// to 120 s (60 s when quick).
    pub drain_cap: Duration,
    /// Connections in the pgtide pool; at least 16 for the 16-publisher case. Defaults to 20.
    pub pool_size: usize,
    /// Print one line per phase to stderr while running. Defaults to false.
    pub progress: bool,
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
            progress: false,
        }
    }
}

/// Everything one run measured. Serializes to JSON with [`BenchReport::to_json`].
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct BenchReport {
    /// The machine and server the figures come from.
    pub machine: Machine,
    /// The namespace the run used (dropped at its end).
    pub namespace: String,
    /// True for a short run.
    pub quick: bool,
    /// Measured window of each case, in seconds.
    pub phase_secs: f64,
    /// Warm-up before each window, in seconds.
    pub warmup_secs: f64,
    /// Rounds each comparison alternated its two sides in.
    pub rounds: u32,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// When the run started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Wall time of the whole run, in seconds.
    pub elapsed_secs: f64,
    /// Throughput cases, ratios and targets, in table order.
    pub cases: Vec<Case>,
    /// Claim round-trip latencies.
    pub latencies: Vec<Latency>,
    /// Peak memory around the large drain.
    pub rss: Rss,
}

/// The machine and server a report comes from.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Machine {
    /// CPUs available to the bench process (`nproc`).
    pub cpus: usize,
    /// `SHOW server_version`.
    pub server_version: String,
    /// `SHOW fsync`.
    pub fsync: String,
    /// `SHOW synchronous_commit`.
    pub synchronous_commit: String,
    /// `SHOW shared_buffers`.
    pub shared_buffers: String,
}

/// One row of the table: a measured value, optionally against a baseline and a target.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Case {
    /// What was measured.
    pub name: String,
    /// The measured value, in `unit`.
    pub value: f64,
    /// Unit of `value` and `baseline`.
    pub unit: Unit,
    /// The raw-PostgreSQL (or reference) value it is compared to.
    pub baseline: Option<f64>,
    /// `value / baseline`.
    pub ratio: Option<f64>,
    /// What counts as good.
    pub target: Option<Target>,
    /// Whether the target is met.
    pub ok: Option<bool>,
    /// Anything that qualifies the figure.
    pub note: Option<String>,
}

/// Unit of a [`Case`] value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    /// Messages (or rows) per second.
    #[serde(rename = "per_second")]
    PerSecond,
    /// Milliseconds.
    #[serde(rename = "ms")]
    Millis,
    /// Mebibytes.
    #[serde(rename = "MiB")]
    Mebibytes,
}

impl Unit {
    fn format(self, v: f64) -> String {
        match self {
            Unit::PerSecond => format!("{v:.0}"),
            Unit::Millis => format!("{v:.3} ms"),
            Unit::Mebibytes => format!("{v:.1} MiB"),
        }
    }
}

/// A target for a [`Case`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "limit", rename_all = "snake_case")]
pub enum Target {
    /// `ratio >= limit`.
    RatioAtLeast(f64),
    /// `ratio <= limit`.
    RatioAtMost(f64),
    /// `value <= limit`, in the case's unit.
    ValueAtMost(f64),
}

impl Target {
    fn met(self, value: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Target::RatioAtLeast(limit) => ratio.map(|r| r >= limit),
            Target::RatioAtMost(limit) => ratio.map(|r| r <= limit),
            Target::ValueAtMost(limit) => Some(value <= limit),
        }
    }

    fn describe(self, unit: Unit) -> String {
        match self {
            Target::RatioAtLeast(limit) => format!(">= {limit:.2}x"),
            Target::RatioAtMost(limit) => format!("<= {limit:.2}x"),
            Target::ValueAtMost(limit) => format!("<= {}", unit.format(limit)),
        }
    }
}

impl Case {
    fn info(name: impl Into<String>, value: f64, unit: Unit) -> Case {
        Case {
            name: name.into(),
            value,
            unit,
            baseline: None,
            ratio: None,
            target: None,
            ok: None,
            note: None,
        }
    }

    fn compared(
        name: impl Into<String>,
        value: f64,
        unit: Unit,
        baseline: f64,
        target: Target,
    ) -> Case {
        let ratio = (baseline > 0.0).then(|| value / baseline);
        Case {
            baseline: Some(baseline),
            ratio,
            target: Some(target),
            ok: target.met(value, ratio),
            ..Case::info(name, value, unit)
        }
    }

    fn target(mut self, target: Target) -> Case {
        self.target = Some(target);
        self.ok = target.met(self.value, self.ratio);
        self
    }

    fn note(mut self, note: Option<String>) -> Case {
        self.note = note;
        self
    }
}

/// Round-trip latency of `try_fetch(10)` + `ack_batch` at one backlog.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Latency {
    /// What was measured.
    pub name: String,
    /// Messages ready in the group while measuring (held constant).
    pub backlog: u64,
    /// Round trips measured.
    pub samples: usize,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// Mean, in milliseconds.
    pub mean_ms: f64,
    /// Slowest, in milliseconds.
    pub max_ms: f64,
}

/// Peak resident memory of the bench process around draining the large backlog.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Rss {
    /// Messages in the backlog.
    pub backlog: u64,
    /// Messages acked by the drain.
    pub drained: u64,
    /// How long the drain took, in seconds.
    pub drain_secs: f64,
    /// Whether the high-water mark was reset (`/proc/self/clear_refs`) before the drain.
    pub hwm_reset: bool,
    /// `VmHWM` before the drain, in MiB (`None` where `/proc` is missing).
    pub hwm_before_mib: Option<f64>,
    /// `VmHWM` after the drain, in MiB (`None` where `/proc` is missing).
    pub hwm_after_mib: Option<f64>,
}

impl BenchReport {
    /// True when every case with a target met it.
    pub fn all_targets_met(&self) -> bool {
        self.cases.iter().all(|c| c.ok != Some(false))
    }

    /// Prints the table (see the `Display` impl) to stdout.
    pub fn print_table(&self) {
        println!("{self}");
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// Writes the report as JSON to `path`, creating missing parent directories.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.to_json()? + "\n")
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "machine: {} CPUs (nproc), PostgreSQL {}, fsync={}, synchronous_commit={}, shared_buffers={}",
            m.cpus, m.server_version, m.fsync, m.synchronous_commit, m.shared_buffers
        )?;
        writeln!(
            f,
            "run: {}, {:.2} s per side of each comparison in {} alternating rounds after {:.2} s warm-up, \
             {}-byte JSON payloads, one group per stream, {:.0} s in all",
            if self.quick { "quick" } else { "full" },
            self.phase_secs,
            self.rounds,
            self.warmup_secs,
            self.payload_bytes,
            self.elapsed_secs
        )?;
        writeln!(f)?;
        let rows: Vec<Vec<String>> = self
            .cases
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.unit.format(c.value),
                    c.baseline.map(|b| c.unit.format(b)).unwrap_or_default(),
                    c.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
                    c.target.map(|t| t.describe(c.unit)).unwrap_or_default(),
                    c.ok.map(|ok| if ok { "yes" } else { "NO" }.to_owned())
                        .unwrap_or_default(),
                ]
            })
            .collect();
        table(
            f,
            &["case", "msgs/s", "baseline", "ratio", "target", "ok?"],
            &[false, true, true, true, false, false],
            &rows,
        )?;
        writeln!(f)?;
        let rows: Vec<Vec<String>> = self
            .latencies
            .iter()
            .map(|l| {
                vec![
                    l.name.clone(),
                    l.backlog.to_string(),
                    format!("{:.3}", l.p50_ms),
                    format!("{:.3}", l.p99_ms),
                    format!("{:.3}", l.mean_ms),
                    format!("{:.3}", l.max_ms),
                    l.samples.to_string(),
                ]
            })
            .collect();
        table(
            f,
            &[
                "latency", "backlog", "p50 ms", "p99 ms", "mean ms", "max ms", "samples",
            ],
            &[false, true, true, true, true, true, true],
            &rows,
        )?;
        writeln!(f)?;
        for c in self.cases.iter().filter(|c| c.note.is_some()) {
            writeln!(
                f,
                "note: {}: {}",
                c.name,
                c.note.as_deref().unwrap_or_default()
            )?;
        }
        let with_target = self.cases.iter().filter(|c| c.ok.is_some()).count();
        let met = self.cases.iter().filter(|c| c.ok == Some(true)).count();
        write!(f, "targets met: {met}/{with_target}")
    }
}

/// Writes an aligned ` | `-separated table.
fn table(
    f: &mut fmt::Formatter<'_>,
    header: &[&str],
    right: &[bool],
    rows: &[Vec<String>],
) -> fmt::Result {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((cell, &w), &r)| {
                if r {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        writeln!(f, "{}", parts.join(" | ").trim_end())
    };
    line(
        f,
        &header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
    )?;
    writeln!(
        f,
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    )?;
    for row in rows {
        line(f, row)?;
    }
    Ok(())
}

/// Runs every case in a fresh namespace and drops the namespace afterwards (also on failure).
///
/// Takes several minutes for a full run (about one with `quick`). Needs the right to create and
/// drop a schema. Fails if the configured namespace already exists, so that it can never drop
/// data it did not create. A panic in a bench task is resumed here after the namespace is
/// dropped.
///
/// Cancel safety: if this future is dropped, the namespace is left behind; drop it by hand
/// (`DROP SCHEMA bench_… CASCADE`).
pub async fn run(config: BenchConfig) -> Result<BenchReport> {
    let ns = match &config.namespace {
        Some(ns) => ns.clone(),
        None => format!("bench_{:08x}", rand::random::<u32>()),
    };
    validate_namespace(&ns)?;
    let admin = connect(&config.url).await?;
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&ns],
        )
        .await?
        .get(0);
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

/// Why a phase stopped: an error to report, or a panic to resume once the namespace is dropped.
enum Failure {
    Error(Error),
    Panic(Box<dyn Any + Send>),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Error(e.into())
    }
}

type Step<T> = std::result::Result<T, Failure>;

fn joined<T>(result: std::result::Result<Result<T>, JoinError>) -> Step<T> {
    match result {
        Ok(r) => Ok(r?),
        Err(e) if e.is_panic() => Err(Failure::Panic(e.into_panic())),
        Err(e) => Err(Failure::Panic(Box::new(format!(
            "bench task ended early: {e}"
        )))),
    }
}

/// Items done in a measured window (or the sum of several).
#[derive(Debug, Clone, Copy, Default)]
struct Throughput {
    items: u64,
    secs: f64,
    /// A worker found nothing left to do before the window ended.
    exhausted: bool,
}

impl Throughput {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.items as f64 / self.secs
        } else {
            0.0
        }
    }

    fn exhausted_note(&self, what: &str) -> Option<String> {
        self.exhausted.then(|| {
            format!(
                "{what} ran out after {:.2} s measured: rate up to the last batch ({} items)",
                self.secs, self.items
            )
        })
    }
}

/// What the rounds of one side of a comparison add up to.
trait Accumulate: Default {
    fn add(&mut self, round: Self);
}

impl Accumulate for Throughput {
    fn add(&mut self, round: Self) {
        self.items += round.items;
        self.secs += round.secs;
        self.exhausted |= round.exhausted;
    }
}

impl Accumulate for Vec<Duration> {
    fn add(&mut self, round: Self) {
        self.extend(round);
    }
}

/// Runs one worker per state, each looping `op` until the window ends or `op` returns `None`
/// (nothing left). Counts the items of operations that complete inside the window.
async fn run_workers<S, F, Fut>(
    states: Vec<S>,
    warmup: Duration,
    window: Duration,
    op: F,
) -> Step<Throughput>
where
    S: Clone + Send + 'static,
    F: Fn(S) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<Option<u64>>> + Send + 'static,
{
    let from = Instant::now() + warmup;
    let until = from + window;
    let mut set = JoinSet::new();
    for state in states {
        set.spawn(async move {
            let (mut items, mut last, mut exhausted) = (0u64, None, false);
            while Instant::now() < until {
                let Some(n) = op(state.clone()).await? else {
                    exhausted = true;
                    break;
                };
                let now = Instant::now();
                if now >= from {
                    items += n;
                    last = Some(now);
                }
            }
            Ok::<_, Error>((items, last, exhausted))
        });
    }
    let mut total = Throughput::default();
    let mut end: Option<Instant> = None;
    while let Some(result) = set.join_next().await {
        let (items, last, exhausted) = joined(result)?;
        total.items += items;
        total.exhausted |= exhausted;
        end = end.max(last);
    }
    total.secs = end.map_or(0.0, |end| end.duration_since(from).as_secs_f64());
    Ok(total)
}

async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "bench: raw connection ended with an error");
        }
    });
    Ok(client)
}

/// One raw-PostgreSQL client: a connection, its prepared statement and the statement's input.
#[derive(Clone)]
struct Raw<P> {
    client: Arc<Client>,
    stmt: Statement,
    input: Arc<P>,
}

/// `n` raw connections, each with `sql` prepared.
async fn raw_clients<P>(url: &str, n: usize, sql: &str, input: Arc<P>) -> Result<Vec<Raw<P>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let client = connect(url).await?;
        let stmt = client.prepare(sql).await?;
        clients.push(Raw {
            client: Arc::new(client),
            stmt,
            input: input.clone(),
        });
    }
    Ok(clients)
}

async fn raw_insert_one(raw: Raw<serde_json::Value>) -> Result<Option<u64>> {
    let id = Uuid::now_v7();
    raw.client.execute(&raw.stmt, &[&id, &*raw.input]).await?;
    Ok(Some(1))
}

async fn raw_insert_batch(raw: Raw<Vec<serde_json::Value>>) -> Result<Option<u64>> {
    let ids: Vec<Uuid> = (0..raw.input.len()).map(|_| Uuid::now_v7()).collect();
    raw.client.execute(&raw.stmt, &[&ids, &*raw.input]).await?;
    Ok(Some(ids.len() as u64))
}

async fn raw_delete(raw: Raw<()>) -> Result<Option<u64>> {
    let n = raw.client.query(&raw.stmt, &[]).await?.len() as u64;
    Ok((n > 0).then_some(n))
}

async fn publish_one((pg, msg): (PgBackend, OutgoingMessage)) -> Result<Option<u64>> {
    pg.publish(PUBLISH, msg).await?;
    Ok(Some(1))
}

async fn publish_many((pg, msgs): (PgBackend, Arc<Vec<OutgoingMessage>>)) -> Result<Option<u64>> {
    pg.publish_batch(BATCH, &msgs).await?;
    Ok(Some(msgs.len() as u64))
}

/// One consumer's state between steps: the deliveries it holds, acked with its next claim.
#[derive(Clone)]
struct ConsumeState {
    consumer: Arc<Consumer>,
    batch: usize,
    held: Arc<tokio::sync::Mutex<Vec<Delivery>>>,
}

/// One consumer step as the worker runtime does it: ack what the previous step fetched and
/// claim the next batch in one round trip (`ack_and_fetch`). Counts acked messages; `None` when
/// the group is empty and nothing is held.
async fn fetch_ack(state: ConsumeState) -> Result<Option<u64>> {
    let mut held = state.held.lock().await;
    let refs: Vec<&Delivery> = held.iter().collect();
    let (report, next) = state.consumer.ack_and_fetch(&refs, state.batch).await?;
    let acked = report.settled.len() as u64;
    let empty = next.is_empty() && held.is_empty();
    *held = next;
    if empty {
        return Ok(None);
    }
    Ok(Some(acked))
}

/// A JSON object whose text is exactly [`PAYLOAD_BYTES`] long.
fn payload() -> serde_json::Value {
    let with_pad = |pad: String| serde_json::json!({"kind": "bench", "order": 1234567, "pad": pad});
    let bare = serde_json::to_vec(&with_pad(String::new()))
        .map(|v| v.len())
        .unwrap_or(0);
    with_pad("x".repeat(PAYLOAD_BYTES.saturating_sub(bare)))
}

/// `1000000` → `1M`, `100000` → `100k`.
fn short(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn vm_hwm_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0).
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn latency(mut samples: Vec<Duration>, backlog: u64) -> Latency {
    samples.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).max(1);
        samples.get(rank - 1).copied().map_or(f64::NAN, millis)
    };
    let mean = if samples.is_empty() {
        f64::NAN
    } else {
        millis(samples.iter().sum::<Duration>()) / samples.len() as f64
    };
    Latency {
        name: "claim: try_fetch(10) + ack_batch".to_owned(),
        backlog,
        samples: samples.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        mean_ms: mean,
        max_ms: samples.last().copied().map_or(f64::NAN, millis),
    }
}

struct Bench<'a> {
    config: &'a BenchConfig,
    ns: &'a str,
    pg: PgBackend,
    value: Arc<serde_json::Value>,
    msg: OutgoingMessage,
    started: Instant,
}

impl<'a> Bench<'a> {
    async fn measure(config: &BenchConfig, ns: &str, admin: &Client) -> Step<BenchReport> {
        let started_at = chrono::Utc::now();
        let started = Instant::now();
        let machine = machine(admin).await?;
        let pg = PgBackend::builder(config.url.clone())
            .namespace(ns)
            .pool_size(config.pool_size)
            .build()?;
        pg.migrate().await?;
        for stream in [
            PUBLISH,
            BATCH,
            CONSUME_10,
            CONSUME_100,
            CLAIM_SMALL,
            CLAIM_LARGE,
        ] {
            pg.ensure_stream(stream, StreamConfig::default()).await?;
            pg.ensure_group(stream, GROUP, GroupStart::New).await?;
        }
        admin
            .batch_execute(&format!(
                "CREATE TABLE \"{ns}\".raw_insert (id uuid PRIMARY KEY, payload jsonb NOT NULL);
                 CREATE TABLE \"{ns}\".raw_batch (id uuid PRIMARY KEY, payload jsonb NOT NULL);
                 CREATE TABLE \"{ns}\".raw_queue (id bigserial PRIMARY KEY, payload jsonb NOT NULL);"
            ))
            .await?;
        let value = payload();
        let msg = OutgoingMessage::json(&value)?;
        let bench = Bench {
            config,
            ns,
            pg,
            value: Arc::new(value),
            msg,
            started,
        };
        let url = config.url.as_str();

        let mut raw_cases = vec![];
        let mut cases = vec![];
        let sql = format!("INSERT INTO \"{ns}\".raw_insert (id, payload) VALUES ($1, $2)");
        for clients in CLIENT_COUNTS {
            bench.progress(format_args!(
                "raw INSERT 1/txn vs publish, {}",
                plural(clients, "client")
            ));
            let raw = raw_clients(url, clients, &sql, bench.value.clone()).await?;
            let tide = vec![(bench.pg.clone(), bench.msg.clone()); clients];
            let (raw, tide) = bench
                .alternate(
                    |w, d| run_workers(raw.clone(), w, d, raw_insert_one),
                    |w, d| run_workers(tide.clone(), w, d, publish_one),
                )
                .await?;
            raw_cases.push(Case::info(
                format!("raw INSERT 1/txn, {}", plural(clients, "client")),
                raw.rate(),
                Unit::PerSecond,
            ));
            cases.push(Case::compared(
                format!("publish, {}", plural(clients, "publisher")),
                tide.rate(),
                Unit::PerSecond,
                raw.rate(),
                Target::RatioAtLeast(0.8),
            ));
        }

        bench.progress(format_args!("raw INSERT 100/stmt vs publish_batch 100"));
        let sql = format!(
            "INSERT INTO \"{ns}\".raw_batch (id, payload) SELECT * FROM unnest($1::uuid[], $2::jsonb[])"
        );
        let raw = raw_clients(url, 1, &sql, Arc::new(vec![(*bench.value).clone(); 100])).await?;
        let tide = vec![(bench.pg.clone(), Arc::new(vec![bench.msg.clone(); 100]))];
        let (raw, tide) = bench
            .alternate(
                |w, d| run_workers(raw.clone(), w, d, raw_insert_batch),
                |w, d| run_workers(tide.clone(), w, d, publish_many),
            )
            .await?;
        raw_cases.push(Case::info(
            "raw INSERT 100/stmt (unnest), 1 client",
            raw.rate(),
            Unit::PerSecond,
        ));
        cases.push(Case::compared(
            "publish_batch 100, 1 client",
            tide.rate(),
            Unit::PerSecond,
            raw.rate(),
            Target::RatioAtLeast(0.8),
        ));

        let sql = format!(
            "DELETE FROM \"{ns}\".raw_queue WHERE id IN \
             (SELECT id FROM \"{ns}\".raw_queue ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED) RETURNING *"
        );
        let window = (config.phase + config.warmup).as_secs_f64();
        for (stream, batch, target) in [(CONSUME_10, 10, 0.7), (CONSUME_100, 100, 1.0)] {
            // Room for RAW_DRAIN_ROOM rows/s over the window on each side; running out is noted.
            let backlog = ((window * RAW_DRAIN_ROOM) as u64).next_multiple_of(FILL_BATCH as u64);
            bench.fill_raw_queue(backlog).await?;
            bench.fill(stream, backlog).await?;
            bench.progress(format_args!(
                "raw DELETE SKIP LOCKED 10 vs consume B={batch}, {CONSUMERS} clients"
            ));
            let raw = raw_clients(url, CONSUMERS, &sql, Arc::new(())).await?;
            let tide = bench.consumers(stream, batch).await?;
            let (raw, tide) = bench
                .alternate(
                    |w, d| run_workers(raw.clone(), w, d, raw_delete),
                    |w, d| run_workers(tide.clone(), w, d, fetch_ack),
                )
                .await?;
            raw_cases.push(
                Case::info(
                    format!(
                        "raw DELETE SKIP LOCKED 10, {} (vs B={batch})",
                        plural(CONSUMERS, "client")
                    ),
                    raw.rate(),
                    Unit::PerSecond,
                )
                .note(raw.exhausted_note(&format!("the raw queue of {backlog}"))),
            );
            cases.push(
                Case::compared(
                    format!("consume B={batch}, {}", plural(CONSUMERS, "consumer")),
                    tide.rate(),
                    Unit::PerSecond,
                    raw.rate(),
                    Target::RatioAtLeast(target),
                )
                .note(tide.exhausted_note(&format!("the backlog of {backlog}"))),
            );
        }

        let large = config.large_backlog.max(SMALL_BACKLOG);
        bench.fill(CLAIM_SMALL, SMALL_BACKLOG).await?;
        let fill = bench.fill(CLAIM_LARGE, large).await?;
        bench.progress(format_args!(
            "claim latency, backlog {} vs {}",
            short(SMALL_BACKLOG),
            short(large)
        ));
        let (small_samples, large_samples) = bench
            .alternate(
                |w, d| bench.claim_samples(CLAIM_SMALL, w, d),
                |w, d| bench.claim_samples(CLAIM_LARGE, w, d),
            )
            .await?;
        let latencies = vec![
            latency(small_samples, SMALL_BACKLOG),
            latency(large_samples, large),
        ];
        cases.push(Case::compared(
            format!(
                "claim p50, {} vs {} backlog",
                short(large),
                short(SMALL_BACKLOG)
            ),
            latencies[1].p50_ms,
            Unit::Millis,
            latencies[0].p50_ms,
            Target::RatioAtMost(1.2),
        ));

        bench.progress(format_args!(
            "peak RSS: draining {large} with {CONSUMERS} consumers, batch 100"
        ));
        let hwm_reset = reset_hwm();
        let hwm_before_mib = vm_hwm_mib();
        let consumers = bench.consumers(CLAIM_LARGE, 100).await?;
        let drain = run_workers(consumers, Duration::ZERO, config.drain_cap, fetch_ack).await?;
        let hwm_after_mib = vm_hwm_mib();
        bench.progress(format_args!(
            "drained {} in {:.1} s",
            drain.items, drain.secs
        ));
        let rss = Rss {
            backlog: large,
            drained: drain.items,
            drain_secs: drain.secs,
            hwm_reset,
            hwm_before_mib,
            hwm_after_mib,
        };
        if let Some(after) = hwm_after_mib {
            let reset = if hwm_reset {
                "reset before the drain"
            } else {
                "NOT reset: includes earlier phases"
            };
            let before =
                hwm_before_mib.map_or_else(|| "unknown".to_owned(), |b| format!("{b:.1} MiB"));
            cases.push(
                Case::info(
                    format!("peak RSS draining {} (whole process)", short(large)),
                    after,
                    Unit::Mebibytes,
                )
                .target(Target::ValueAtMost(RSS_TARGET_MIB))
                .note(Some(format!(
                    "VmHWM of the whole bench process (runtime, pool of {} connections, buffers), \
                         {reset}; {before} before the drain",
                    config.pool_size
                ))),
            );
        }
        cases.push(Case::info(
            format!(
                "fill {}: publish_batch {FILL_BATCH} x {FILL_TASKS} tasks",
                short(large)
            ),
            fill.rate(),
            Unit::PerSecond,
        ));
        cases.push(
            Case::info(
                format!("drain {}: {CONSUMERS} consumers, B=100", short(large)),
                drain.rate(),
                Unit::PerSecond,
            )
            .note((drain.items < large).then(|| {
                format!(
                    "drained {} of {large} before the {:.0} s cap",
                    drain.items,
                    config.drain_cap.as_secs_f64()
                )
            })),
        );

        raw_cases.extend(cases);
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
            cases: raw_cases,
            latencies,
            rss,
        })
    }

    fn progress(&self, what: fmt::Arguments<'_>) {
        if self.config.progress {
            eprintln!("[{:6.1} s] {what}", self.started.elapsed().as_secs_f64());
        }
    }

    /// Measures two sides of a comparison in alternating rounds of `phase / rounds` each (the
    /// warm-up before the first round of each side), so that a change of load on the machine
    /// during the case hits both sides alike. Rounds alternate the order too (A B, B A, …).
    async fn alternate<T, FA, A, FB, B>(&self, mut a: FA, mut b: FB) -> Step<(T, T)>
    where
        T: Accumulate,
        FA: FnMut(Duration, Duration) -> A,
        A: Future<Output = Step<T>>,
        FB: FnMut(Duration, Duration) -> B,
        B: Future<Output = Step<T>>,
    {
        let rounds = self.config.rounds.max(1);
        let slice = self.config.phase / rounds;
        let (mut sum_a, mut sum_b) = (T::default(), T::default());
        for round in 0..rounds {
            let warmup = if round == 0 {
                self.config.warmup
            } else {
                Duration::ZERO
            };
            // A B, B A, A B, …: a drift in load during the case cancels out.
            if round % 2 == 0 {
                sum_a.add(a(warmup, slice).await?);
                sum_b.add(b(warmup, slice).await?);
            } else {
                sum_b.add(b(warmup, slice).await?);
                sum_a.add(a(warmup, slice).await?);
            }
        }
        Ok((sum_a, sum_b))
    }

    /// Fills the raw queue server-side: the baseline is its drain, not its fill. Like pgtide's
    /// tables it is not analyzed: both run on the statistics autovacuum left.
    async fn fill_raw_queue(&self, rows: u64) -> Result<()> {
        self.progress(format_args!("filling the raw queue with {rows} rows"));
        let admin = connect(&self.config.url).await?;
        let sql = format!(
            "INSERT INTO \"{}\".raw_queue (payload) SELECT $1::jsonb FROM generate_series(1, $2::int8)",
            self.ns
        );
        admin.execute(&sql, &[&*self.value, &(rows as i64)]).await?;
        Ok(())
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

    /// [`CONSUMERS`] consumers of `stream`, each paired with the batch size to fetch.
    async fn consumers(&self, stream: &str, batch: usize) -> Result<Vec<ConsumeState>> {
        let mut consumers = vec![];
        for i in 0..CONSUMERS {
            let consumer = self
                .pg
                .consumer(stream, GROUP, &format!("bench-{i}"))
                .await?;
            consumers.push(ConsumeState {
                consumer: Arc::new(consumer),
                batch,
                held: Arc::default(),
            });
        }
        Ok(consumers)
    }

    /// Round trips of `try_fetch(10)` + `ack_batch` on `stream`; what was acked is published
    /// again (untimed) so that the backlog stays the same.
    async fn claim_samples(
        &self,
        stream: &'static str,
        warmup: Duration,
        window: Duration,
    ) -> Step<Vec<Duration>> {
        let consumer = self.pg.consumer(stream, GROUP, "latency").await?;
        let refill = vec![self.msg.clone(); 10];
        let from = Instant::now() + warmup;
        let until = from + window;
        let mut samples = vec![];
        while Instant::now() < until {
            let started = Instant::now();
            let deliveries = consumer.try_fetch(10).await?;
            let refs: Vec<&Delivery> = deliveries.iter().collect();
            consumer.ack_batch(&refs).await?;
            let took = started.elapsed();
            if deliveries.is_empty() {
                break; // nobody else consumes this namespace: only if a fill failed silently
            }
            if started >= from {
                samples.push(took);
            }
            self.pg
                .publish_batch(stream, &refill[..deliveries.len()])
                .await?;
        }
        Ok(samples)
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
                .get::<_, String>(0),
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
