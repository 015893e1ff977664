//! Steady load over time: the held-xmin case and `--soak`.
//!
//! Both first measure the most the consumers drain (4 consumers, claim of 10 then an ack or nack
//! of the batch, over a backlog) and then publish at half of it, in batches of 10 every 10 ms,
//! while the same consumers work: 1 delivery in 20 is nacked on its first attempt (a retry 1 s
//! later), the rest acked. Each interval reports what was published and acked, the claim
//! (`try_fetch(10)`) latency and the backlog; the soak also reports the size of the engine's
//! tables and indexes, runs `maintain()` every 30 s and keeps 2 minutes of messages (1-minute
//! partitions), so retention drops partitions all along.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_postgres::Client;

use super::harness::{joined, run_workers, Step};
use super::report::{Interval, Summary};
use super::{Bench, Case, Target, Unit, CONSUMERS, GROUP};
use pgtide::{Delivery, Error, GroupStart, PgConsumer, Result, StreamConfig};

pub(super) const HELD: &str = "held-xmin";
pub(super) const SOAK: &str = "soak";
const CALIBRATE: &str = "calibrate";

/// Claim size of the steady-load consumers.
const BATCH: usize = 10;
/// One delivery in this many is nacked on its first attempt.
const NACK_ONE_IN: u128 = 20;

/// Counters the load's tasks add to; the sampler takes and resets them every interval.
#[derive(Default)]
struct Counters {
    published: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    /// Retryable errors (deadlock, serialization) the load's tasks met and went on after.
    errors: AtomicU64,
    claims: Mutex<Vec<Duration>>,
}

impl Counters {
    fn take(&self) -> (u64, u64, u64, u64, Vec<Duration>) {
        let claims = std::mem::take(&mut *self.claims.lock().unwrap_or_else(|e| e.into_inner()));
        (
            self.published.swap(0, Ordering::Relaxed),
            self.acked.swap(0, Ordering::Relaxed),
            self.nacked.swap(0, Ordering::Relaxed),
            self.errors.swap(0, Ordering::Relaxed),
            claims,
        )
    }

    /// Counts a retryable error and lets the task go on; any other error ends the run.
    fn tolerate(&self, r: Result<()>) -> Result<()> {
        match r {
            Err(e) if e.is_retryable() => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }
}

/// A running steady load: publishers and consumers on one stream until `stop`.
struct Load {
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<Result<()>>,
}

impl Load {
    async fn finish(mut self) -> Step<()> {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(r) = self.tasks.join_next().await {
            joined(r)?;
        }
        Ok(())
    }
}

impl Bench<'_> {
    /// The most 4 consumers drain from a backlog with the steady load's claim and settle steps.
    async fn calibrate(&self) -> Step<f64> {
        self.pg
            .ensure_stream(CALIBRATE, &StreamConfig::default())
            .await?;
        self.pg
            .ensure_group(CALIBRATE, GROUP, GroupStart::New)
            .await?;
        let window = self.config.phase.max(Duration::from_secs(2));
        // Room for 20 000 msgs/s over the window; what is left is dropped with the namespace.
        self.fill(CALIBRATE, 20_000 * window.as_secs().max(1))
            .await?;
        let mut consumers = vec![];
        for i in 0..CONSUMERS {
            let c = self
                .pg
                .consumer(CALIBRATE, GROUP, &format!("cal-{i}"))
                .await?;
            consumers.push((c, Arc::new(Counters::default())));
        }
        let drained = run_workers(
            consumers,
            self.config.warmup,
            window,
            |(c, counters)| async move {
                let n = step(&c, &counters).await?;
                Ok((n > 0).then_some(n as u64))
            },
        )
        .await?;
        let rate = drained.rate();
        self.progress(format_args!(
            "steady load: consumers drain at most {rate:.0} msgs/s"
        ));
        Ok(rate)
    }

    /// Starts publishing `rate` msgs/s to `stream` and 4 consumers on it.
    async fn start_load(&self, stream: &'static str, rate: f64) -> Result<Load> {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        {
            let (pg, msg, counters, stop) = (
                self.pg.clone(),
                self.msg.clone(),
                counters.clone(),
                stop.clone(),
            );
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let started = Instant::now();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    // Whatever the ticks lost, catch up to the rate (in batches of at most 100).
                    let due = (started.elapsed().as_secs_f64() * rate) as u64;
                    let n = due.saturating_sub(sent).min(100) as usize;
                    if n == 0 {
                        continue;
                    }
                    let r = pg.publish_batch(stream, &vec![msg.clone(); n]).await;
                    if r.is_ok() {
                        sent += n as u64;
                        counters.published.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    counters.tolerate(r.map(|_| ()))?;
                }
                Ok(())
            });
        }
        for i in 0..CONSUMERS {
            let c = self
                .pg
                .consumer(stream, GROUP, &format!("load-{i}"))
                .await?;
            let (counters, stop) = (counters.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = async {
                        if step(&c, &counters).await? == 0 {
                            // Idle: wait for a wake-up (not timed), then settle what it brought.
                            let ds = c.fetch(BATCH, Duration::from_millis(100)).await?;
                            settle(&c, &counters, ds).await?;
                        }
                        Ok(())
                    }
                    .await;
                    counters.tolerate(r)?;
                }
                Ok(())
            });
        }
        Ok(Load {
            counters,
            stop,
            tasks,
        })
    }

    /// Samples the load every `every` until `until`, labelling rows with `phase`.
    #[allow(clippy::too_many_arguments)]
    async fn sample(
        &self,
        load: &Load,
        admin: &Client,
        stream: &str,
        phase: &str,
        every: Duration,
        until: Instant,
        sizes: bool,
        rows: &mut Vec<Interval>,
    ) -> Step<()> {
        let mut last = Instant::now();
        while last < until {
            let next = (last + every).min(until);
            tokio::time::sleep_until(next.into()).await;
            let secs = last.elapsed().as_secs_f64();
            last = Instant::now();
            let (published, acked, nacked, errors, claims) = load.counters.take();
            let summary = Summary::of(claims);
            let backlog = self.pg.stats(stream, GROUP).await?;
            let (table_mib, index_mib) = if sizes {
                let (t, i) = table_sizes(admin, self.ns).await?;
                (Some(t), Some(i))
            } else {
                (None, None)
            };
            rows.push(Interval {
                at_secs: self.started.elapsed().as_secs_f64(),
                phase: phase.to_owned(),
                published_per_s: published as f64 / secs,
                acked_per_s: acked as f64 / secs,
                nacked,
                errors,
                claim_p50_ms: summary.p50_ms,
                claim_p99_ms: summary.p99_ms,
                backlog: backlog.ready + backlog.delayed + backlog.in_flight,
                table_mib,
                index_mib,
            });
        }
        Ok(())
    }

    /// Held xmin: the steady load before, during and after another session holds a
    /// REPEATABLE READ snapshot for [`crate::BenchConfig::held_xmin`].
    pub(super) async fn held_xmin_case(
        &self,
        cases: &mut Vec<Case>,
        rows: &mut Vec<Interval>,
    ) -> Step<()> {
        let hold = self.config.held_xmin;
        let (before, after) = if self.config.quick {
            (Duration::from_secs(10), Duration::from_secs(60))
        } else {
            (Duration::from_secs(30), Duration::from_secs(60))
        };
        let every = if self.config.quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(5)
        };
        let max = self.calibrate().await?;
        let rate = (max / 2.0).max(100.0);
        self.pg
            .ensure_stream(HELD, &StreamConfig::default())
            .await?;
        self.pg.ensure_group(HELD, GROUP, GroupStart::New).await?;
        self.progress(format_args!(
            "held xmin: {rate:.0} msgs/s, {:.0} s before, {:.0} s held, {:.0} s after, claim floor {}",
            before.as_secs_f64(),
            hold.as_secs_f64(),
            after.as_secs_f64(),
            if self.config.claim_floor { "on" } else { "off" }
        ));
        let admin = super::raw::connect(&self.config.url).await?;
        let holder = super::raw::connect(&self.config.url).await?;
        let load = self.start_load(HELD, rate).await?;
        // A first interval settles the load in; it is not part of "before".
        self.sample(
            &load,
            &admin,
            HELD,
            "warm-up",
            every,
            Instant::now() + every,
            false,
            rows,
        )
        .await?;
        let warm = rows.len();
        self.sample(
            &load,
            &admin,
            HELD,
            "before",
            every,
            Instant::now() + before,
            false,
            rows,
        )
        .await?;
        holder
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;")
            .await?;
        self.sample(
            &load,
            &admin,
            HELD,
            "held",
            every,
            Instant::now() + hold,
            false,
            rows,
        )
        .await?;
        holder.batch_execute("COMMIT").await?;
        let released = Instant::now();
        let released_at = self.started.elapsed().as_secs_f64();
        self.sample(
            &load,
            &admin,
            HELD,
            "after",
            every,
            released + after,
            false,
            rows,
        )
        .await?;
        load.finish().await?;
        let of = |phase: &str| -> Vec<&Interval> {
            rows[warm..].iter().filter(|r| r.phase == phase).collect()
        };
        let mean = |v: &[&Interval], f: fn(&Interval) -> f64| -> f64 {
            v.iter().map(|r| f(r)).sum::<f64>() / v.len().max(1) as f64
        };
        let (b, h, a) = (of("before"), of("held"), of("after"));
        let before_rate = mean(&b, |r| r.acked_per_s);
        let worst_held = h
            .iter()
            .map(|r| r.acked_per_s)
            .fold(f64::INFINITY, f64::min);
        let before_p50 = mean(&b, |r| r.claim_p50_ms);
        let before_backlog = b.iter().map(|r| r.backlog).max().unwrap_or(0);
        // Recovered: from the first interval after the release from which every later one has
        // its claims back near their earlier median and its backlog near its earlier level (a
        // dip that comes back later is not a recovery).
        let ok = |r: &&Interval| {
            r.claim_p50_ms <= before_p50 * 1.5 + 1.0
                && r.backlog <= before_backlog * 2 + (rate * every.as_secs_f64()) as i64
        };
        let recovered = (0..a.len()).find(|&i| a[i..].iter().all(ok)).map(|i| a[i]);
        let after_p50 = a.last().map_or(f64::NAN, |r| r.claim_p50_ms);
        cases.push(
            Case::compared(
                format!(
                    "held xmin {:.0} s: worst interval / before (acked/s)",
                    hold.as_secs_f64()
                ),
                worst_held,
                Unit::PerSecond,
                before_rate,
                Target::RatioAtLeast(0.5),
            )
            .note(Some(format!(
                "steady load of {rate:.0} msgs/s (half the drain maximum {max:.0}/s); \
                 claim p50 {before_p50:.2} ms before, worst {:.2} ms while held, {after_p50:.2} ms \
                 in the last interval after",
                h.iter().map(|r| r.claim_p50_ms).fold(0.0, f64::max)
            ))),
        );
        let recovery = recovered.map(|r| (r.at_secs - every.as_secs_f64() - released_at).max(0.0));
        cases.push(
            Case::info(
                "held xmin: recovery after release",
                recovery.map_or(f64::NAN, |s| s * 1000.0),
                Unit::Millis,
            )
            .target(Target::ValueAtMost(60_000.0))
            .note(Some(match recovery {
                Some(_) => {
                    "start of the first interval after the release from which every interval \
                            has claim p50 <= 1.5x (+1 ms) and backlog <= 2x their levels before"
                        .to_owned()
                }
                None => format!(
                    "not recovered within the {:.0} s measured after the release",
                    after.as_secs_f64()
                ),
            })),
        );
        Ok(())
    }

    /// `--soak`: the steady load for [`crate::BenchConfig::soak`], one row a minute.
    pub(super) async fn soak_case(
        &self,
        duration: Duration,
        cases: &mut Vec<Case>,
        rows: &mut Vec<Interval>,
    ) -> Step<()> {
        let every = Duration::from_secs(60).min(duration);
        let max = self.calibrate().await?;
        let rate = (max / 2.0).max(100.0);
        let config = StreamConfig::default()
            .retention(Duration::from_secs(120))
            .partition_interval(Duration::from_secs(60));
        self.pg.ensure_stream(SOAK, &config).await?;
        self.pg.ensure_group(SOAK, GROUP, GroupStart::New).await?;
        self.progress(format_args!(
            "soak: {rate:.0} msgs/s for {:.0} s, a row a minute",
            duration.as_secs_f64()
        ));
        let admin = super::raw::connect(&self.config.url).await?;
        // A scout runs, as beside any consuming service (the bench's consumers never wait, so
        // none would start one): it wakes, and vacuums the hot tables where autovacuum is off.
        self.pg.start_scout();
        let load = self.start_load(SOAK, rate).await?;
        let maintainer = {
            let (pg, stop) = (self.pg.clone(), load.stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    pg.maintain().await?;
                }
                Ok::<_, Error>(())
            })
        };
        let start = rows.len();
        let until = Instant::now() + duration;
        self.sample(&load, &admin, SOAK, "soak", every, until, true, rows)
            .await?;
        load.finish().await?;
        joined(maintainer.await)?;
        let run = &rows[start..];
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(());
        };
        cases.push(
            Case::compared(
                "soak: claim p99, last minute / first",
                last.claim_p99_ms,
                Unit::Millis,
                first.claim_p99_ms,
                Target::RatioAtMost(2.0),
            )
            .note(Some(format!(
                "{rate:.0} msgs/s (half the drain maximum {max:.0}/s), 1 in {NACK_ONE_IN} nacked once, \
                 retention 2 min, maintain() every 30 s, {} min",
                run.len()
            ))),
        );
        // Steady state: once retention has dropped the first partitions (minute 3 on).
        let size = |r: &Interval| r.table_mib.unwrap_or(0.0) + r.index_mib.unwrap_or(0.0);
        match run.get(3) {
            Some(steady) => {
                let peak = run[3..].iter().map(size).fold(0.0, f64::max);
                cases.push(Case::compared(
                    "soak: table + index size, peak / minute 4",
                    peak,
                    Unit::Mebibytes,
                    size(steady),
                    Target::RatioAtMost(2.0),
                ));
            }
            None => cases.push(
                Case::info(
                    "soak: table + index size at the end",
                    size(last),
                    Unit::Mebibytes,
                )
                .note(Some(
                    "shorter than 4 minutes: no steady state to compare with (retention is 2 min)"
                        .to_owned(),
                )),
            ),
        }
        Ok(())
    }
}

/// One consumer step: claim (timed), then settle. Returns how many were claimed.
async fn step(c: &PgConsumer, counters: &Counters) -> Result<usize> {
    let started = Instant::now();
    let ds = c.try_fetch(BATCH).await?;
    let took = started.elapsed();
    let n = ds.len();
    if n > 0 {
        counters
            .claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(took);
        settle(c, counters, ds).await?;
    }
    Ok(n)
}

/// Acks the batch, except one delivery in [`NACK_ONE_IN`] on its first attempt: nacked, retried 1 s later.
async fn settle(c: &PgConsumer, counters: &Counters, ds: Vec<Delivery>) -> Result<()> {
    let (retry, done): (Vec<&Delivery>, Vec<&Delivery>) = ds
        .iter()
        .partition(|d| d.attempt == 1 && d.id().as_u128() % NACK_ONE_IN == 0);
    if !done.is_empty() {
        let report = c.ack_batch(&done).await?;
        counters
            .acked
            .fetch_add(report.settled.len() as u64, Ordering::Relaxed);
    }
    if !retry.is_empty() {
        let report = c
            .nack_batch(&retry, Some(Duration::from_secs(1)), Some("bench retry"))
            .await?;
        counters
            .nacked
            .fetch_add(report.settled.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Size of the namespace's tables (with TOAST) and of their indexes, in MiB.
async fn table_sizes(admin: &Client, ns: &str) -> Result<(f64, f64)> {
    let row = admin
        .query_one(
            "SELECT coalesce(sum(pg_table_size(c.oid)), 0)::float8, coalesce(sum(pg_indexes_size(c.oid)), 0)::float8
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'm')",
            &[&ns],
        )
        .await?;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    Ok((mib(row.try_get(0)?), mib(row.try_get(1)?)))
}
