//! The engine against raw PostgreSQL: publish, publish_batch, consume, claim latency at two
//! backlogs, and peak RSS while draining a large backlog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::harness::{plural, reset_hwm, run_workers, short, vm_hwm_mib, Step};
use super::raw::{raw_clients, raw_delete, raw_insert_batch, raw_insert_one};
use super::report::Summary;
use super::{Bench, Case, Latency, Rss, Target, Unit, CONSUMERS, FILL_BATCH, FILL_TASKS, GROUP};
use pgtide::{Delivery, OutgoingMessage, PgBackend, QueueConsumer, Result};

pub(super) const PUBLISH: &str = "publish";
pub(super) const BATCH: &str = "batch";
pub(super) const CONSUME_10: &str = "consume-10";
pub(super) const CONSUME_100: &str = "consume-100";
pub(super) const CLAIM_SMALL: &str = "claim-small";
pub(super) const CLAIM_LARGE: &str = "claim-large";

/// Backlog of the small claim-latency case.
const SMALL_BACKLOG: u64 = 10_000;
/// Publisher counts of the single-publish cases.
const CLIENT_COUNTS: [usize; 3] = [1, 4, 16];
/// Peak RSS target of the drain, in MiB.
const RSS_TARGET_MIB: f64 = 64.0;
/// Drain rate (messages/s) each consume backlog and raw queue leaves room for.
const RAW_DRAIN_ROOM: f64 = 100_000.0;

/// The consume rates at B = 10 and B = 100, for the worker case to compare against.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConsumeRates {
    pub b10: f64,
    pub b100: f64,
    /// The raw `DELETE … SKIP LOCKED LIMIT 10` loop beside consume B=10.
    pub raw10: f64,
}

impl Bench<'_> {
    pub(super) async fn publish_cases(
        &self,
        baselines: &mut Vec<Case>,
        cases: &mut Vec<Case>,
    ) -> Step<()> {
        let (ns, url) = (self.ns, self.config.url.as_str());
        let sql = format!("INSERT INTO \"{ns}\".raw_insert (id, payload) VALUES ($1, $2)");
        for clients in CLIENT_COUNTS {
            self.progress(format_args!(
                "raw INSERT 1/txn vs publish, {}",
                plural(clients, "client")
            ));
            let raw = raw_clients(url, clients, &sql, self.value.clone()).await?;
            let tide = vec![(self.pg.clone(), self.msg.clone()); clients];
            let (raw, tide) = self
                .alternate(
                    |w, d| run_workers(raw.clone(), w, d, raw_insert_one),
                    |w, d| run_workers(tide.clone(), w, d, publish_one),
                )
                .await?;
            baselines.push(Case::info(
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

        self.progress(format_args!("raw INSERT 100/stmt vs publish_batch 100"));
        let sql = format!(
            "INSERT INTO \"{ns}\".raw_batch (id, payload) SELECT * FROM unnest($1::uuid[], $2::jsonb[])"
        );
        let raw = raw_clients(url, 1, &sql, Arc::new(vec![(*self.value).clone(); 100])).await?;
        let tide = vec![(self.pg.clone(), Arc::new(vec![self.msg.clone(); 100]))];
        let (raw, tide) = self
            .alternate(
                |w, d| run_workers(raw.clone(), w, d, raw_insert_batch),
                |w, d| run_workers(tide.clone(), w, d, publish_many),
            )
            .await?;
        baselines.push(Case::info(
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
        Ok(())
    }

    pub(super) async fn consume_cases(
        &self,
        baselines: &mut Vec<Case>,
        cases: &mut Vec<Case>,
    ) -> Step<ConsumeRates> {
        let ns = self.ns;
        let sql = format!(
            "DELETE FROM \"{ns}\".raw_queue WHERE id IN \
             (SELECT id FROM \"{ns}\".raw_queue ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED) RETURNING *"
        );
        let window = (self.config.phase + self.config.warmup).as_secs_f64();
        let mut rates = ConsumeRates {
            b10: 0.0,
            b100: 0.0,
            raw10: 0.0,
        };
        for (stream, batch, target) in [(CONSUME_10, 10, 0.7), (CONSUME_100, 100, 1.0)] {
            // Room for RAW_DRAIN_ROOM rows/s over the window on each side; running out is noted.
            let backlog = ((window * RAW_DRAIN_ROOM) as u64).next_multiple_of(FILL_BATCH as u64);
            self.fill_raw_queue(backlog).await?;
            self.fill(stream, backlog).await?;
            self.progress(format_args!(
                "raw DELETE SKIP LOCKED 10 vs consume B={batch}, {CONSUMERS} clients"
            ));
            let raw = raw_clients(&self.config.url, CONSUMERS, &sql, Arc::new(())).await?;
            let tide = self.consumers(stream, batch).await?;
            let (raw, tide) = self
                .alternate(
                    |w, d| run_workers(raw.clone(), w, d, raw_delete),
                    |w, d| run_workers(tide.clone(), w, d, fetch_ack),
                )
                .await?;
            if batch == 10 {
                rates.b10 = tide.rate();
                rates.raw10 = raw.rate();
            } else {
                rates.b100 = tide.rate();
            }
            baselines.push(
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
        Ok(rates)
    }

    pub(super) async fn claim_latency(&self, cases: &mut Vec<Case>) -> Step<Vec<Latency>> {
        let large = self.config.large_backlog.max(SMALL_BACKLOG);
        self.fill(CLAIM_SMALL, SMALL_BACKLOG).await?;
        let fill = self.fill(CLAIM_LARGE, large).await?;
        self.progress(format_args!(
            "claim latency, backlog {} vs {}",
            short(SMALL_BACKLOG),
            short(large)
        ));
        let (small_samples, large_samples) = self
            .alternate(
                |w, d| self.claim_samples(CLAIM_SMALL, w, d),
                |w, d| self.claim_samples(CLAIM_LARGE, w, d),
            )
            .await?;
        let name = "claim: try_fetch(10) + ack_batch";
        let latencies = vec![
            Summary::of(small_samples).latency(name, SMALL_BACKLOG),
            Summary::of(large_samples).latency(name, large),
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
        cases.push(Case::info(
            format!(
                "fill {}: publish_batch {FILL_BATCH} x {FILL_TASKS} tasks",
                short(large)
            ),
            fill.rate(),
            Unit::PerSecond,
        ));
        Ok(latencies)
    }

    /// Drains the large backlog left by [`Bench::claim_latency`] and reports the peak RSS.
    pub(super) async fn peak_rss(&self, cases: &mut Vec<Case>) -> Step<Rss> {
        let config = self.config;
        let large = config.large_backlog.max(SMALL_BACKLOG);
        self.progress(format_args!(
            "peak RSS: draining {large} with {CONSUMERS} consumers, batch 100"
        ));
        let hwm_reset = reset_hwm();
        let hwm_before_mib = vm_hwm_mib();
        let consumers = self.consumers(CLAIM_LARGE, 100).await?;
        let drain = run_workers(consumers, Duration::ZERO, config.drain_cap, fetch_ack).await?;
        let hwm_after_mib = vm_hwm_mib();
        self.progress(format_args!(
            "drained {} in {:.1} s",
            drain.items, drain.secs
        ));
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
        Ok(Rss {
            backlog: large,
            drained: drain.items,
            drain_secs: drain.secs,
            hwm_reset,
            hwm_before_mib,
            hwm_after_mib,
        })
    }

    /// Fills the raw queue server-side: the baseline is its drain, not its fill. Like pgtide's
    /// tables it is not analyzed: both run on the statistics autovacuum left.
    async fn fill_raw_queue(&self, rows: u64) -> Result<()> {
        self.progress(format_args!("filling the raw queue with {rows} rows"));
        let admin = super::raw::connect(&self.config.url).await?;
        let sql = format!(
            "INSERT INTO \"{}\".raw_queue (payload) SELECT $1::jsonb FROM generate_series(1, $2::int8)",
            self.ns
        );
        admin.execute(&sql, &[&*self.value, &(rows as i64)]).await?;
        Ok(())
    }

    /// [`CONSUMERS`] consumers of `stream`, each paired with the batch size to fetch.
    async fn consumers(
        &self,
        stream: &str,
        batch: usize,
    ) -> Result<Vec<ConsumeState<pgtide::PgConsumer>>> {
        let mut consumers = vec![];
        for i in 0..CONSUMERS {
            let consumer = self
                .pg
                .consumer(stream, GROUP, &format!("bench-{i}"))
                .await?;
            consumers.push(ConsumeState::new(consumer, batch));
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
        self.claim_samples_on(&self.pg, stream, warmup, window)
            .await
    }

    /// [`Bench::claim_samples`] through another handle (other connection settings).
    pub(super) async fn claim_samples_on(
        &self,
        pg: &PgBackend,
        stream: &'static str,
        warmup: Duration,
        window: Duration,
    ) -> Step<Vec<Duration>> {
        let consumer = pg.consumer(stream, GROUP, "latency").await?;
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
            pg.publish_batch(stream, &refill[..deliveries.len()])
                .await?;
        }
        Ok(samples)
    }
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
pub(super) struct ConsumeState<C> {
    consumer: C,
    batch: usize,
    held: Arc<tokio::sync::Mutex<Vec<Delivery>>>,
}

impl<C> ConsumeState<C> {
    pub(super) fn new(consumer: C, batch: usize) -> Self {
        ConsumeState {
            consumer,
            batch,
            held: Arc::default(),
        }
    }
}

/// One consumer step as the worker runtime does it: ack what the previous step fetched and
/// claim the next batch in one round trip (`ack_and_fetch`). Counts acked messages; `None` when
/// the group is empty and nothing is held.
pub(super) async fn fetch_ack<C: QueueConsumer>(state: ConsumeState<C>) -> Result<Option<u64>> {
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
