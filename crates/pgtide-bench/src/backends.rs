//! The same publish and consume cases on every backend (issue 4, item 9), through
//! [`AnyBackend`] and the [`Queue`] / [`QueueConsumer`] traits only: Postgres, memory, and NATS,
//! Redis, RabbitMQ and SQS when built with their cargo feature and their server answers
//! (`NATS_URL`, `REDIS_URL`, `AMQP_URL`, `SQS_URL`, with loopback defaults). A backend that cannot be measured is listed
//! with the reason.
//!
//! Per backend: `publish` 1 per call and `publish_batch` 100 per call from one client for
//! [`super::BenchConfig::phase`] / 2 each; 4 consumers looping `ack_and_fetch(previous, 100)`
//! over a backlog until it is drained; publish → `fetch` latency at 500 msg/s with one consumer
//! waiting in `fetch`. Every stream is named `cmp-*` in the run's namespace and deleted at the
//! end, also when a case fails or times out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::harness::{joined, run_workers, Failure, Step};
use super::report::Summary;
use super::{BackendRow, Bench, CONSUMERS, GROUP};
use pgtide::{
    AnyBackend, Delivery, Error, GroupStart, OutgoingMessage, Queue, QueueConsumer, Result,
    StreamConfig,
};

const CMP_PUBLISH: &str = "cmp-publish";
const CMP_BATCH: &str = "cmp-batch";
const CMP_CONSUME: &str = "cmp-consume";
const CMP_LATENCY: &str = "cmp-latency";
const CMP_STREAMS: [&str; 4] = [CMP_PUBLISH, CMP_BATCH, CMP_CONSUME, CMP_LATENCY];

/// How long a server may take to accept the connection and the streams (Kafka creates
/// several topics and reads its registry per stream and group: a few seconds for the four).
const CONNECT_WAIT: Duration = Duration::from_secs(20);
/// Consume backlog per second of phase.
const BACKLOG_PER_PHASE_SEC: f64 = 10_000.0;
/// Publish rate of the latency case.
const LATENCY_RATE: f64 = 500.0;
/// Publish timestamp: microseconds since the case's epoch.
const SENT_HEADER: &str = "bench-sent-us";

impl Bench<'_> {
    pub(super) async fn backend_rows(&self) -> Step<Vec<BackendRow>> {
        let from_env = |var: &str, default: &str| std::env::var(var).unwrap_or(default.to_owned());
        let backends = [
            ("postgres", true, self.config.url.clone()),
            ("memory", true, "memory://".to_owned()),
            (
                "nats",
                cfg!(feature = "nats"),
                from_env("NATS_URL", "nats://127.0.0.1:4222"),
            ),
            (
                "redis",
                cfg!(feature = "redis"),
                from_env("REDIS_URL", "redis://127.0.0.1:6379"),
            ),
            (
                "amqp",
                cfg!(feature = "amqp"),
                from_env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            ),
            (
                "sqs",
                cfg!(feature = "sqs"),
                from_env("SQS_URL", "sqs://test:test@127.0.0.1:5000?region=us-east-1"),
            ),
            (
                "kafka",
                cfg!(feature = "kafka"),
                from_env("KAFKA_URL", "kafka://127.0.0.1:9092"),
            ),
        ];
        let mut rows = vec![];
        for (kind, built, url) in backends {
            self.progress(format_args!("backends: {kind}"));
            rows.push(self.backend_row(kind, built, &url).await?);
        }
        Ok(rows)
    }

    /// Postgres (the reference) and the backend at `url` only.
    pub(super) async fn backend_rows_for(&self, url: &str) -> Step<Vec<BackendRow>> {
        let scheme = url.split("://").next().unwrap_or_default();
        let (kind, built) = match scheme {
            "memory" => ("memory", true),
            "nats" => ("nats", cfg!(feature = "nats")),
            "redis" | "rediss" => ("redis", cfg!(feature = "redis")),
            "amqp" | "amqps" => ("amqp", cfg!(feature = "amqp")),
            "sqs" | "sqss" => ("sqs", cfg!(feature = "sqs")),
            "kafka" => ("kafka", cfg!(feature = "kafka")),
            _ => ("postgres", true),
        };
        let mut rows = vec![];
        self.progress(format_args!("backends: postgres"));
        rows.push(
            self.backend_row("postgres", true, &self.config.url.clone())
                .await?,
        );
        if kind != "postgres" {
            self.progress(format_args!("backends: {kind}"));
            rows.push(self.backend_row(kind, built, url).await?);
        }
        Ok(rows)
    }

    async fn backend_row(&self, kind: &str, built: bool, url: &str) -> Step<BackendRow> {
        let mut row = BackendRow {
            backend: kind.to_owned(),
            endpoint: endpoint(url),
            ..BackendRow::default()
        };
        if !built {
            row.skipped = Some(format!("not built (cargo feature `{kind}`)"));
            return Ok(row);
        }
        let queue =
            match tokio::time::timeout(CONNECT_WAIT, AnyBackend::connect(url, self.ns)).await {
                Ok(Ok(queue)) => queue,
                Ok(Err(e)) => {
                    row.skipped = Some(e.to_string());
                    return Ok(row);
                }
                Err(_) => {
                    row.skipped = Some(format!("no answer within {} s", CONNECT_WAIT.as_secs()));
                    return Ok(row);
                }
            };
        let mut notes = vec![];
        match tokio::time::timeout(CONNECT_WAIT, ensure(&queue)).await {
            Ok(Ok(())) => {
                let budget = self.config.drain_cap;
                match tokio::time::timeout(budget, self.measure_backend(&queue, &mut row)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(Failure::Error(e))) => notes.push(format!("stopped: {e}")),
                    Ok(Err(panic)) => {
                        cleanup(&queue).await;
                        return Err(panic);
                    }
                    Err(_) => notes.push(format!(
                        "stopped: not done within {:.0} s",
                        budget.as_secs_f64()
                    )),
                }
            }
            Ok(Err(e)) => row.skipped = Some(e.to_string()),
            Err(_) => {
                row.skipped = Some(format!(
                    "streams not created within {} s",
                    CONNECT_WAIT.as_secs()
                ))
            }
        }
        notes.extend(cleanup(&queue).await);
        if let Some(note) = row.note.take() {
            notes.insert(0, note);
        }
        row.note = (!notes.is_empty()).then(|| notes.join("; "));
        Ok(row)
    }

    /// Fills `row` case by case, so that what was measured survives a later failure.
    async fn measure_backend(&self, queue: &AnyBackend, row: &mut BackendRow) -> Step<()> {
        let (warmup, window) = (self.config.warmup, self.config.phase / 2);
        let one = vec![(queue.clone(), self.msg.clone())];
        row.publish_per_s = Some(run_workers(one, warmup, window, publish_one).await?.rate());
        let hundred = vec![(queue.clone(), Arc::new(vec![self.msg.clone(); 100]))];
        let batch = run_workers(hundred, warmup, window, publish_hundred).await?;
        row.publish_batch_per_s = Some(batch.rate());

        // A backend that publishes slowly (SQS on moto: ~100 msg/s) gets the backlog it can
        // write in one window, so that its consume and latency rows are measured at all.
        let backlog = ((self.config.phase.as_secs_f64() * BACKLOG_PER_PHASE_SEC)
            .min(batch.rate() * window.as_secs_f64()) as u64)
            .max(100)
            .next_multiple_of(100);
        fill(queue, &self.msg, backlog).await?;
        let (acked, secs) = consume(queue, backlog, self.config.drain_cap).await?;
        row.consume_per_s = Some(if secs > 0.0 { acked as f64 / secs } else { 0.0 });
        let mut notes = vec![];
        if acked < backlog {
            notes.push(format!("consumed {acked} of the backlog of {backlog}"));
        }

        let (samples, lost) = self.publish_fetch_latency(queue, warmup, window).await?;
        let summary = Summary::of(samples);
        row.latency_p50_ms = Some(summary.p50_ms);
        row.latency_p99_ms = Some(summary.p99_ms);
        if lost > 0 {
            notes.push(format!("{lost} latency messages not fetched in time"));
        }
        row.note = (!notes.is_empty()).then(|| notes.join("; "));
        Ok(())
    }

    /// Publish call → `fetch` returns the message, at [`LATENCY_RATE`], one consumer waiting in
    /// `fetch(10, …)` and acking what it got. Returns the samples and how many never arrived.
    async fn publish_fetch_latency(
        &self,
        queue: &AnyBackend,
        warmup: Duration,
        window: Duration,
    ) -> Step<(Vec<Duration>, u64)> {
        let consumer = queue.consumer(CMP_LATENCY, GROUP, "latency").await?;
        let epoch = Instant::now();
        let expected = Arc::new(AtomicU64::new(u64::MAX));
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let receiver = {
            let (expected, stop) = (expected.clone(), stop.clone());
            tokio::spawn(async move {
                let mut samples: Vec<(u64, Duration)> = vec![];
                while (samples.len() as u64) < expected.load(Ordering::Relaxed) {
                    let ds = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        ds = consumer.fetch(10, Duration::from_millis(200)) => ds?,
                    };
                    let now = Instant::now();
                    for d in &ds {
                        let sent_us: u64 = d
                            .message
                            .headers
                            .get(SENT_HEADER)
                            .and_then(|v| v.parse().ok())
                            .unwrap_or_default();
                        let sent = epoch + Duration::from_micros(sent_us);
                        samples.push((sent_us, now.saturating_duration_since(sent)));
                    }
                    if !ds.is_empty() {
                        let refs: Vec<&Delivery> = ds.iter().collect();
                        consumer.ack_batch(&refs).await?;
                    }
                }
                Ok::<_, Error>(samples)
            })
        };
        let from = Instant::now() + warmup;
        let until = from + window;
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / LATENCY_RATE));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published = 0u64;
        while Instant::now() < until {
            ticks.tick().await;
            let sent_us = epoch.elapsed().as_micros() as u64;
            let msg = self.msg.clone().header(SENT_HEADER, sent_us.to_string());
            queue.publish(CMP_LATENCY, msg).await?;
            published += 1;
        }
        expected.store(published, Ordering::Relaxed);
        let receiver = tokio::time::timeout(Duration::from_secs(3), receiver);
        let samples = match receiver.await {
            Ok(r) => joined(r)?,
            Err(_) => {
                return Err(Failure::Error(Error::InvalidConfig(
                    "latency consumer did not finish within 3 s".to_owned(),
                )))
            }
        };
        let received = samples.len() as u64;
        let from_us = from.duration_since(epoch).as_micros() as u64;
        let measured = samples
            .into_iter()
            .filter(|(sent_us, _)| *sent_us >= from_us)
            .map(|(_, took)| took)
            .collect();
        Ok((measured, published.saturating_sub(received)))
    }
}

/// The URL without credentials, path or query.
fn endpoint(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            let host = host.split(['/', '?']).next().unwrap_or_default();
            format!("{scheme}://{host}")
        }
        None => url.to_owned(),
    }
}

async fn ensure(queue: &AnyBackend) -> Result<()> {
    for stream in CMP_STREAMS {
        queue
            .ensure_stream(stream, &StreamConfig::default())
            .await?;
        queue.ensure_group(stream, GROUP, GroupStart::New).await?;
    }
    Ok(())
}

/// Deletes the streams of the comparison and stops a Postgres handle's background tasks;
/// returns what could not be deleted.
async fn cleanup(queue: &AnyBackend) -> Vec<String> {
    let mut failed = vec![];
    for stream in CMP_STREAMS {
        match tokio::time::timeout(CONNECT_WAIT, queue.delete_stream(stream)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failed.push(format!("could not delete stream {stream}: {e}")),
            Err(_) => failed.push(format!("could not delete stream {stream}: timed out")),
        }
    }
    // RabbitMQ keeps a log of the namespace's streams (and delay queues) besides the streams.
    #[cfg(feature = "amqp")]
    if let AnyBackend::Amqp(amqp) = queue {
        match tokio::time::timeout(CONNECT_WAIT, amqp.delete_namespace()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("could not delete the namespace: {e}")),
            Err(_) => failed.push("could not delete the namespace: timed out".to_owned()),
        }
    }
    if let AnyBackend::Postgres(pg) = queue {
        pg.shutdown().await;
    }
    failed
}

async fn publish_one((queue, msg): (AnyBackend, OutgoingMessage)) -> Result<Option<u64>> {
    queue.publish(CMP_PUBLISH, msg).await?;
    Ok(Some(1))
}

async fn publish_hundred(
    (queue, msgs): (AnyBackend, Arc<Vec<OutgoingMessage>>),
) -> Result<Option<u64>> {
    queue.publish_batch(CMP_BATCH, &msgs).await?;
    Ok(Some(msgs.len() as u64))
}

/// Publishes `count` messages to the consume stream in batches of 100 from 4 tasks.
async fn fill(queue: &AnyBackend, msg: &OutgoingMessage, count: u64) -> Step<()> {
    let chunks = count.div_ceil(100);
    let next = Arc::new(AtomicU64::new(0));
    let batch = Arc::new(vec![msg.clone(); 100]);
    let mut set = JoinSet::new();
    for _ in 0..4 {
        let (queue, next, batch) = (queue.clone(), next.clone(), batch.clone());
        set.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < chunks {
                queue.publish_batch(CMP_CONSUME, &batch).await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        joined(r)?;
    }
    Ok(())
}

/// [`CONSUMERS`] consumers looping `ack_and_fetch(previous, 100)` until `backlog` messages are
/// acked or `cap` passes. Returns the acked count and the seconds to the last ack. A consumer
/// that finds nothing while others still hold deliveries pauses 1 ms before asking again.
async fn consume(queue: &AnyBackend, backlog: u64, cap: Duration) -> Step<(u64, f64)> {
    let total = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + cap;
    let mut set = JoinSet::new();
    for i in 0..CONSUMERS {
        let consumer = queue
            .consumer(CMP_CONSUME, GROUP, &format!("bench-{i}"))
            .await?;
        let total = total.clone();
        set.spawn(async move {
            let (mut held, mut last): (Vec<Delivery>, Option<Instant>) = (vec![], None);
            while Instant::now() < until {
                let refs: Vec<&Delivery> = held.iter().collect();
                let (_, next) = consumer.ack_and_fetch(&refs, 100).await?;
                if !refs.is_empty() {
                    total.fetch_add(refs.len() as u64, Ordering::Relaxed);
                    last = Some(Instant::now());
                }
                let idle = next.is_empty() && held.is_empty();
                held = next;
                if held.is_empty() && total.load(Ordering::Relaxed) >= backlog {
                    break;
                }
                if idle {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            if !held.is_empty() {
                // Cut short by the cap: settle what is held, untimed.
                let refs: Vec<&Delivery> = held.iter().collect();
                consumer.ack_batch(&refs).await?;
            }
            Ok::<_, Error>(last)
        });
    }
    let mut end: Option<Instant> = None;
    while let Some(r) = set.join_next().await {
        end = end.max(joined(r)?);
    }
    let secs = end.map_or(0.0, |end| end.duration_since(started).as_secs_f64());
    Ok((total.load(Ordering::Relaxed), secs))
}
