//! Worker throughput (issue 3, item 6): a [`Worker`] with a no-op handler and concurrency 16 in
//! each of two worker processes, draining a backlog published beforehand; compared with the
//! consume figures of the same run.
//!
//! With [`super::BenchConfig::worker_args`], the two workers are two OS processes: the current
//! executable started again with [`WORKER_PROCESS_ENV`] set, which calls
//! [`run_worker_process`]. They talk over pipes, one line each: the child says `ready`, waits for
//! `go`, reports `n <handled>` every 25 ms, and after `stop` says
//! `done <handled> <acked> <unix ns of the last handler start>`. The drain time runs from `go` to
//! the last handler start over both processes. Without it (or when the processes cannot start),
//! the two workers run in this process on two independent handles (pools, listeners).

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::harness::{joined, Failure, Step};
use super::postgres::ConsumeRates;
use super::{Bench, Case, Target, Unit, CONSUMERS, FILL_BATCH, GROUP};
use pgtide::{Error, Outcome, PgBackend, PgConsumer, Result, Worker};

pub(super) const WORKERS: &str = "workers";

/// Environment variable that makes a bench executable run one worker process (see
/// [`run_worker_process`]); its value describes the worker, as JSON.
pub const WORKER_PROCESS_ENV: &str = "PGTIDE_BENCH_WORKER";

/// Worker processes (or handles) draining the backlog.
const PROCESSES: usize = 2;
/// Handlers of each worker.
const CONCURRENCY: usize = 16;
/// Backlog per second of [`super::BenchConfig::phase`]: a few seconds of draining.
const BACKLOG_PER_PHASE_SEC: f64 = 20_000.0;
/// How long the processes may take to start, and to finish after `stop`.
const PROCESS_WAIT: Duration = Duration::from_secs(30);

/// What a worker process runs, passed in [`WORKER_PROCESS_ENV`].
#[derive(Debug, Serialize, Deserialize)]
struct WorkerSpec {
    url: String,
    namespace: String,
    stream: String,
    group: String,
    name: String,
    concurrency: usize,
    /// The worker's prefetch; `None`: its default (adaptive claims).
    #[serde(default)]
    prefetch: Option<usize>,
    /// [`crate::BenchConfig::claim_floor`].
    claim_floor: bool,
    /// [`crate::BenchConfig::synchronous_claims`].
    #[serde(default)]
    synchronous_claims: bool,
}

/// Handler starts of one drain: how many, the last one, and a signal at `target`.
struct DrainCounter {
    handled: AtomicU64,
    last_unix_ns: AtomicU64,
    target: u64,
    reached: Notify,
}

impl DrainCounter {
    fn new(target: u64) -> Arc<Self> {
        Arc::new(DrainCounter {
            handled: AtomicU64::new(0),
            last_unix_ns: AtomicU64::new(0),
            target,
            reached: Notify::new(),
        })
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn drain_worker(
    consumer: PgConsumer,
    counter: Arc<DrainCounter>,
    prefetch: Option<usize>,
) -> Worker<PgConsumer> {
    let worker = Worker::new(consumer, move |_| {
        let counter = counter.clone();
        async move {
            counter.last_unix_ns.fetch_max(unix_ns(), Ordering::Relaxed);
            if counter.handled.fetch_add(1, Ordering::Relaxed) + 1 == counter.target {
                counter.reached.notify_one();
            }
            Ok::<_, Infallible>(Outcome::Ack)
        }
    })
    .concurrency(CONCURRENCY);
    match prefetch {
        Some(n) => worker.prefetch(n),
        None => worker,
    }
}

fn process_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidConfig(format!("bench worker process: {what}: {e}"))
}

/// True when this process was started as a bench worker process (see [`run_worker_process`]).
pub fn worker_process_requested() -> bool {
    std::env::var_os(WORKER_PROCESS_ENV).is_some()
}

/// Runs the bench worker process described by [`WORKER_PROCESS_ENV`], talking to the bench
/// over stdin and stdout; returns when told to stop or when stdin closes. A bench executable
/// that sets [`super::BenchConfig::worker_args`] calls this first thing when
/// [`worker_process_requested`], and prints nothing else to stdout.
pub async fn run_worker_process() -> Result<()> {
    let spec =
        std::env::var(WORKER_PROCESS_ENV).map_err(|e| process_error(WORKER_PROCESS_ENV, e))?;
    let spec: WorkerSpec = serde_json::from_str(&spec)?;
    let pg = PgBackend::builder(&spec.url)
        .claim_floor(spec.claim_floor)
        .synchronous_claims(spec.synchronous_claims)
        .namespace(&spec.namespace)
        .pool_size(4)
        .build()?;
    let consumer = pg.consumer(&spec.stream, &spec.group, &spec.name).await?;
    let (tx, mut commands) = mpsc::unbounded_channel::<String>();
    // Reading stdin blocks: a thread of its own, ending with the process (or at EOF).
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    say("ready")?;
    if commands.recv().await.as_deref() != Some("go") {
        pg.shutdown().await;
        return Ok(());
    }
    let counter = DrainCounter::new(u64::MAX);
    let token = CancellationToken::new();
    let worker =
        tokio::spawn(drain_worker(consumer, counter.clone(), spec.prefetch).run(token.clone()));
    let mut ticks = tokio::time::interval(Duration::from_millis(25));
    loop {
        tokio::select! {
            command = commands.recv() => match command.as_deref() {
                Some("stop") | None => break,
                Some(_) => {}
            },
            _ = ticks.tick() => say(&format!("n {}", counter.handled.load(Ordering::Relaxed)))?,
        }
    }
    token.cancel();
    let report = worker
        .await
        .map_err(|e| process_error("the worker task failed", e))??;
    say(&format!(
        "done {} {} {}",
        counter.handled.load(Ordering::Relaxed),
        report.acked,
        counter.last_unix_ns.load(Ordering::Relaxed)
    ))?;
    pg.shutdown().await;
    Ok(())
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| process_error("stdout", e))
}

/// One drain: handler starts and the time from go to the last one.
struct Drain {
    handled: u64,
    secs: f64,
    how: String,
}

impl Drain {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.handled as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// The worker processes; killed (by their own handles) if still running when dropped.
struct Children {
    procs: Vec<(std::process::Child, std::process::ChildStdin)>,
    lines: mpsc::UnboundedReceiver<(usize, String)>,
}

impl Children {
    fn tell(&mut self, command: &str) -> Result<()> {
        for (_, stdin) in &mut self.procs {
            writeln!(stdin, "{command}")
                .and_then(|()| stdin.flush())
                .map_err(|e| process_error("stdin", e))?;
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (child, _) in &mut self.procs {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Bench<'_> {
    pub(super) async fn worker_cases(
        &self,
        consume: ConsumeRates,
        cases: &mut Vec<Case>,
    ) -> Step<()> {
        let backlog = ((self.config.phase.as_secs_f64() * BACKLOG_PER_PHASE_SEC) as u64)
            .next_multiple_of(FILL_BATCH as u64);
        let drain = self.worker_drain(backlog, None).await?;
        // Claims fixed at the concurrency, the default before claims adapted: the same drain,
        // to show what adaptive claims change in this run.
        let fixed = self.worker_drain(backlog, Some(CONCURRENCY)).await?;
        let mut note = drain.how.clone();
        if drain.handled < backlog {
            note.push_str(&format!(
                "; handled {} of {backlog} before the {:.0} s cap",
                drain.handled,
                self.config.drain_cap.as_secs_f64()
            ));
        }
        let name = format!("worker {PROCESSES} x concurrency {CONCURRENCY} (no-op)");
        cases.push(
            Case::compared(
                format!("{name} vs raw DELETE SKIP LOCKED 10, {CONSUMERS} clients"),
                drain.rate(),
                Unit::PerSecond,
                consume.raw10,
                Target::RatioAtLeast(1.4),
            )
            .note(Some(note)),
        );
        for (batch, baseline) in [(10, consume.b10), (100, consume.b100)] {
            cases.push(Case::compared(
                format!("{name} vs consume B={batch}"),
                drain.rate(),
                Unit::PerSecond,
                baseline,
                Target::RatioAtLeast(1.0),
            ));
        }
        cases.push(Case::compared(
            format!("{name}: adaptive claims vs prefetch {CONCURRENCY}"),
            drain.rate(),
            Unit::PerSecond,
            fixed.rate(),
            Target::RatioAtLeast(1.0),
        ));
        Ok(())
    }

    /// Fills the workers' stream with `backlog` and drains it with [`PROCESSES`] workers of
    /// `prefetch` (`None`: the default).
    async fn worker_drain(&self, backlog: u64, prefetch: Option<usize>) -> Step<Drain> {
        self.fill(WORKERS, backlog).await?;
        let claims =
            prefetch.map_or_else(|| "adaptive claims".to_owned(), |n| format!("prefetch {n}"));
        self.progress(format_args!(
            "worker drain: {PROCESSES} workers x concurrency {CONCURRENCY}, {claims}, backlog {backlog}"
        ));
        let drain = match &self.config.worker_args {
            Some(args) => match self.spawn_children(args, prefetch).await {
                Ok(mut children) => self.drain_children(&mut children, backlog).await?,
                Err(e) => {
                    let mut drain = self.drain_in_process(backlog, prefetch).await?;
                    drain.how = format!("{}; worker processes did not start: {e}", drain.how);
                    drain
                }
            },
            None => self.drain_in_process(backlog, prefetch).await?,
        };
        self.progress(format_args!(
            "drained {} in {:.1} s ({})",
            drain.handled, drain.secs, drain.how
        ));
        Ok(drain)
    }

    /// Two workers on two independent handles of this process.
    async fn drain_in_process(&self, backlog: u64, prefetch: Option<usize>) -> Step<Drain> {
        let counter = DrainCounter::new(backlog);
        let token = CancellationToken::new();
        let _stop = token.clone().drop_guard();
        let mut handles = vec![];
        let mut workers = JoinSet::new();
        for i in 0..PROCESSES {
            let pg = self
                .config
                .engine(self.config.url.as_str())
                .namespace(self.ns)
                .pool_size(4)
                .build()?;
            let consumer = pg.consumer(WORKERS, GROUP, &format!("handle-{i}")).await?;
            handles.push(pg);
            let worker = drain_worker(consumer, counter.clone(), prefetch);
            workers.spawn(worker.run(token.clone()));
        }
        let go = unix_ns();
        let _ = tokio::time::timeout(self.config.drain_cap, counter.reached.notified()).await;
        token.cancel();
        while let Some(r) = workers.join_next().await {
            joined(r)?;
        }
        for pg in handles {
            pg.shutdown().await;
        }
        let last = counter.last_unix_ns.load(Ordering::Relaxed);
        Ok(Drain {
            handled: counter.handled.load(Ordering::Relaxed),
            secs: last.saturating_sub(go) as f64 / 1e9,
            how: format!("{PROCESSES} handles in one process"),
        })
    }

    /// Starts the worker processes and waits until each is ready.
    async fn spawn_children(&self, args: &[String], prefetch: Option<usize>) -> Result<Children> {
        let exe = std::env::current_exe().map_err(|e| process_error("current_exe", e))?;
        let (tx, lines) = mpsc::unbounded_channel();
        let mut children = Children {
            procs: vec![],
            lines,
        };
        for i in 0..PROCESSES {
            let spec = serde_json::to_string(&WorkerSpec {
                url: self.config.url.clone(),
                namespace: self.ns.to_owned(),
                stream: WORKERS.to_owned(),
                group: GROUP.to_owned(),
                name: format!("process-{i}"),
                concurrency: CONCURRENCY,
                prefetch,
                claim_floor: self.config.claim_floor,
                synchronous_claims: self.config.synchronous_claims,
            })?;
            let mut child = Command::new(&exe)
                .args(args)
                .env(WORKER_PROCESS_ENV, spec)
                .env("DATABASE_URL", &self.config.url)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| process_error(&format!("starting {}", exe.display()), e))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(process_error("pipes", "missing"));
            };
            children.procs.push((child, stdin));
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((i, line)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let deadline = tokio::time::Instant::now() + PROCESS_WAIT;
        let mut ready = 0;
        while ready < PROCESSES {
            match tokio::time::timeout_at(deadline, children.lines.recv()).await {
                Ok(Some((_, line))) if line == "ready" => ready += 1,
                Ok(Some(_)) => {}
                Ok(None) => return Err(process_error("start", "a process exited early")),
                Err(_) => return Err(process_error("start", "not ready in time")),
            }
        }
        Ok(children)
    }

    /// Tells the ready processes to go, stops them once they handled `backlog` (or at the drain
    /// cap), and collects their figures.
    async fn drain_children(&self, children: &mut Children, backlog: u64) -> Step<Drain> {
        let go = unix_ns();
        children.tell("go")?;
        let mut counts = [0u64; PROCESSES];
        let cap = tokio::time::Instant::now() + self.config.drain_cap;
        while counts.iter().sum::<u64>() < backlog {
            match tokio::time::timeout_at(cap, children.lines.recv()).await {
                Ok(Some((i, line))) => {
                    if let Some(n) = line.strip_prefix("n ").and_then(|n| n.parse().ok()) {
                        counts[i] = n;
                    }
                }
                Ok(None) => return Err(process_error("drain", "a process exited early").into()),
                Err(_) => break,
            }
        }
        children.tell("stop")?;
        let mut done: [Option<(u64, u64)>; PROCESSES] = [None; PROCESSES];
        let deadline = tokio::time::Instant::now() + PROCESS_WAIT;
        while done.iter().any(Option::is_none) {
            match tokio::time::timeout_at(deadline, children.lines.recv()).await {
                Ok(Some((i, line))) => {
                    let fields: Vec<u64> = line
                        .strip_prefix("done ")
                        .map(|rest| rest.split(' ').filter_map(|f| f.parse().ok()).collect())
                        .unwrap_or_default();
                    if let [handled, _acked, last] = fields[..] {
                        done[i] = Some((handled, last));
                    }
                }
                Ok(None) | Err(_) => {
                    return Err(Failure::Error(process_error(
                        "stop",
                        "a process did not report its figures",
                    )))
                }
            }
        }
        // They exit after closing their connections; wait for that, without blocking the runtime.
        let until = Instant::now() + PROCESS_WAIT;
        for (child, _) in &mut children.procs {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let handled = done.iter().flatten().map(|d| d.0).sum();
        let last = done.iter().flatten().map(|d| d.1).max().unwrap_or(go);
        Ok(Drain {
            handled,
            secs: last.saturating_sub(go) as f64 / 1e9,
            how: format!("{PROCESSES} OS processes"),
        })
    }
}
