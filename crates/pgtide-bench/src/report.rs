//! What a run reports: the types of [`BenchReport`] (printed by `render.rs`). Everything here
//! serializes to JSON as is; ratios against Postgres in the backends table are computed when
//! printing.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

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
    /// Wake-up latencies: publish → handler start, the raw NOTIFY floor, delayed lateness.
    pub wakeups: Vec<Timing>,
    /// Peak memory around the large drain.
    pub rss: Rss,
    /// The same publish and consume cases on every backend; empty when
    /// [`crate::BenchConfig::backends`] is off.
    pub backends: Vec<BackendRow>,
    /// The held-xmin case, interval by interval (empty when it did not run).
    pub held_xmin: Vec<Interval>,
    /// The soak, minute by minute (empty without [`crate::BenchConfig::soak`]).
    pub soak: Vec<Interval>,
}

/// One interval of a steady load (held xmin, soak).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Interval {
    /// Seconds since the run started, at the end of the interval.
    pub at_secs: f64,
    /// `warm-up`, `before`, `held`, `after` (held xmin) or `soak`.
    pub phase: String,
    /// Messages published per second.
    pub published_per_s: f64,
    /// Deliveries acked per second.
    pub acked_per_s: f64,
    /// Deliveries nacked (retried later) in the interval.
    pub nacked: u64,
    /// Retryable errors (deadlocks, serialization failures) the load met in the interval.
    pub errors: u64,
    /// Claim (`try_fetch(10)`) median, in milliseconds.
    pub claim_p50_ms: f64,
    /// Claim 99th percentile, in milliseconds.
    pub claim_p99_ms: f64,
    /// Ready, delayed and in-flight deliveries of the group at the end.
    pub backlog: i64,
    /// Size of the namespace's tables with TOAST, in MiB (soak only).
    pub table_mib: Option<f64>,
    /// Size of their indexes, in MiB (soak only).
    pub index_mib: Option<f64>,
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
    /// A count of things.
    #[serde(rename = "count")]
    Count,
}

impl Unit {
    pub(super) fn format(self, v: f64) -> String {
        match self {
            // Small rates (idle statements per second) need their decimals.
            Unit::PerSecond if v.abs() < 10.0 => format!("{v:.2}"),
            Unit::PerSecond | Unit::Count => format!("{v:.0}"),
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
            // NaN (no samples) fails.
            Target::ValueAtMost(limit) => Some(value <= limit),
        }
    }

    pub(super) fn describe(self, unit: Unit) -> String {
        match self {
            Target::RatioAtLeast(limit) => format!(">= {limit:.2}x"),
            Target::RatioAtMost(limit) => format!("<= {limit:.2}x"),
            Target::ValueAtMost(limit) => format!("<= {}", unit.format(limit)),
        }
    }
}

impl Case {
    pub(super) fn info(name: impl Into<String>, value: f64, unit: Unit) -> Case {
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

    pub(super) fn compared(
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

    /// A value against a baseline, with its ratio but no target.
    pub(super) fn against(name: impl Into<String>, value: f64, unit: Unit, baseline: f64) -> Case {
        Case {
            baseline: Some(baseline),
            ratio: (baseline > 0.0).then(|| value / baseline),
            ..Case::info(name, value, unit)
        }
    }

    pub(super) fn target(mut self, target: Target) -> Case {
        self.target = Some(target);
        self.ok = target.met(self.value, self.ratio);
        self
    }

    pub(super) fn note(mut self, note: Option<String>) -> Case {
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

/// A latency distribution at a steady publish rate (wake-ups, delayed messages).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Timing {
    /// What was measured, from which event to which.
    pub name: String,
    /// Messages per second actually sent while measuring.
    pub rate_per_s: f64,
    /// Samples measured.
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

/// Peak resident memory of the bench process around draining the large backlog (`Default`:
/// not measured, for runs that skip the drain).
#[derive(Debug, Clone, Default, Serialize)]
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

/// One backend of the comparison table, measured through [`pgtide::AnyBackend`].
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct BackendRow {
    /// `postgres`, `memory`, `nats`, `redis`, `amqp` or `sqs`.
    pub backend: String,
    /// The server, without credentials.
    pub endpoint: String,
    /// Why the backend was not measured (not built, server not answering), or why it stopped.
    pub skipped: Option<String>,
    /// One `publish` per call, 1 client, messages/s.
    pub publish_per_s: Option<f64>,
    /// `publish_batch` of 100 per call, 1 client, messages/s.
    pub publish_batch_per_s: Option<f64>,
    /// 4 consumers looping `ack_and_fetch(previous, 100)` over a backlog, messages/s.
    pub consume_per_s: Option<f64>,
    /// Publish call → `fetch` returns it, median, in milliseconds.
    pub latency_p50_ms: Option<f64>,
    /// Publish call → `fetch` returns it, 99th percentile, in milliseconds.
    pub latency_p99_ms: Option<f64>,
    /// Anything that qualifies the figures.
    pub note: Option<String>,
}

/// Summary statistics of latency samples.
#[derive(Debug, Clone, Copy)]
pub(super) struct Summary {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    /// Nearest-rank percentiles; NaN when there are no samples.
    pub(super) fn of(mut samples: Vec<Duration>) -> Summary {
        samples.sort_unstable();
        let millis = |d: Duration| d.as_secs_f64() * 1000.0;
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).max(1);
            samples.get(rank - 1).copied().map_or(f64::NAN, millis)
        };
        let mean = if samples.is_empty() {
            f64::NAN
        } else {
            millis(samples.iter().sum::<Duration>()) / samples.len() as f64
        };
        Summary {
            samples: samples.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            mean_ms: mean,
            max_ms: samples.last().copied().map_or(f64::NAN, millis),
        }
    }

    pub(super) fn latency(self, name: impl Into<String>, backlog: u64) -> Latency {
        Latency {
            name: name.into(),
            backlog,
            samples: self.samples,
            p50_ms: self.p50_ms,
            p99_ms: self.p99_ms,
            mean_ms: self.mean_ms,
            max_ms: self.max_ms,
        }
    }

    pub(super) fn timing(self, name: impl Into<String>, rate_per_s: f64) -> Timing {
        Timing {
            name: name.into(),
            rate_per_s,
            samples: self.samples,
            p50_ms: self.p50_ms,
            p99_ms: self.p99_ms,
            mean_ms: self.mean_ms,
            max_ms: self.max_ms,
        }
    }
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
