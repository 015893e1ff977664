//! Quick start: one stream, two consumer groups, four consumers.
//!
//! It publishes 10 000 orders to the stream `quickstart.orders` in batches of 500 while two
//! groups consume them at the same time:
//!
//! * **fan-out**: `billing` and `shipping` each receive every order;
//! * **competing consumers**: inside each group two consumers share the work, and each delivery
//!   goes to one of them;
//! * **explicit settle**: consumers fetch a batch and acknowledge it with one `ack_batch` call.
//!
//! A status line is updated while it runs; at the end it prints the groups' depth from
//! `stats()` (which reads counters, never the backlog) and the elapsed time.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! The database comes from [`pgtide_testing::database_url`]: `DATABASE_URL` if set, else the server
//! on 127.0.0.1:5432, else a throwaway cluster under `target/pgtide-postgres`. Everything lives in
//! the namespace (Postgres schema) `PGTIDE_NAMESPACE`, default `pgtide`; inspect it afterwards
//! with `psql -c 'SELECT * FROM pgtide.stream_stats'`.
//!
//! Re-running is fine: every message carries the id of the run that published it, and only this
//! run's messages are counted. Leftovers of an interrupted earlier run are acked and ignored.
//! (Two runs at the same time in one namespace would take each other's messages: give each its
//! own `PGTIDE_NAMESPACE`.)

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtide::{Delivery, GroupStart, OutgoingMessage, PgBackend, PgConsumer, StreamConfig};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const STREAM: &str = "quickstart.orders";
const GROUPS: [&str; 2] = ["billing", "shipping"];
const CONSUMERS_PER_GROUP: usize = 2;
const MESSAGES: u64 = 10_000;
const PUBLISH_BATCH: u64 = 500;
const FETCH_BATCH: usize = 100;
/// Header that tells this run's messages from an earlier run's.
const RUN_HEADER: &str = "run";

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    total_cents: u64,
}

/// Counters shared by the tasks and read by the status line.
#[derive(Default)]
struct Progress {
    published: AtomicU64,
    /// Per group, in the order of `GROUPS`.
    groups: [GroupProgress; GROUPS.len()],
}

#[derive(Default)]
struct GroupProgress {
    /// Messages of this run acked by the group.
    consumed: AtomicU64,
    /// Cancelled when `consumed` reaches `MESSAGES`: tells the group's consumers to stop.
    done: CancellationToken,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nquickstart failed: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let url = pgtide_testing::database_url().await?;
    let namespace =
        std::env::var("PGTIDE_NAMESPACE").unwrap_or_else(|_| pgtide::DEFAULT_NAMESPACE.to_owned());
    let pg = PgBackend::builder(url).namespace(namespace).build()?;

    // Idempotent setup: safe to run on every start, from every process.
    pg.migrate().await?;
    pg.ensure_stream(STREAM, &StreamConfig::default()).await?;
    for group in GROUPS {
        pg.ensure_group(STREAM, group, GroupStart::New).await?;
    }
    println!(
        "namespace {:?}: publishing {MESSAGES} orders to {STREAM:?}, consumed by groups {GROUPS:?} \
         ({CONSUMERS_PER_GROUP} consumers each)",
        pg.namespace()
    );

    let run = uuid::Uuid::now_v7().to_string();
    let progress = Arc::new(Progress::default());
    let started = Instant::now();

    let mut tasks = JoinSet::new();
    tasks.spawn(publish(pg.clone(), run.clone(), progress.clone()));
    for (g, group) in GROUPS.into_iter().enumerate() {
        for n in 1..=CONSUMERS_PER_GROUP {
            let consumer = pg.consumer(STREAM, group, &format!("{group}-{n}")).await?;
            tasks.spawn(consume(consumer, run.clone(), progress.clone(), g));
        }
    }
    let status = tokio::spawn(status_line(progress.clone(), started));

    // The first error stops the example; dropping the JoinSet aborts the other tasks.
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    status.abort();
    print_status(&progress, started);
    let elapsed = started.elapsed();
    println!();

    println!(
        "\n{:<10} {:>7} {:>7} {:>9} {:>5}",
        "group", "ready", "delayed", "in_flight", "dead"
    );
    for s in pg.stats_all().await? {
        if s.stream == STREAM {
            let group = s.group.as_deref().unwrap_or("-");
            println!(
                "{group:<10} {:>7} {:>7} {:>9} {:>5}",
                s.ready, s.delayed, s.in_flight, s.dead
            );
        }
    }
    let deliveries = MESSAGES * GROUPS.len() as u64;
    println!(
        "\n{MESSAGES} messages published and {deliveries} deliveries acked in {:.2} s",
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// Publishes `MESSAGES` orders in batches; each batch is one atomic round trip.
async fn publish(pg: PgBackend, run: String, progress: Arc<Progress>) -> Result<(), BoxError> {
    for first in (0..MESSAGES).step_by(PUBLISH_BATCH as usize) {
        let batch = (first..(first + PUBLISH_BATCH).min(MESSAGES))
            .map(|id| {
                let order = Order {
                    id,
                    customer: format!("customer-{}", id % 100),
                    total_cents: 1_000 + id % 9_000,
                };
                Ok(OutgoingMessage::json(&order)?.header(RUN_HEADER, &run))
            })
            .collect::<pgtide::Result<Vec<_>>>()?;
        pg.publish_batch(STREAM, &batch).await?;
        progress
            .published
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Fetches and acks batches until the group has consumed every message of this run.
async fn consume(
    consumer: PgConsumer,
    run: String,
    progress: Arc<Progress>,
    group: usize,
) -> Result<(), BoxError> {
    let GroupProgress { consumed, done } = &progress.groups[group];
    let is_ours = |d: &Delivery| d.headers.get(RUN_HEADER) == Some(&run);
    loop {
        // Wait up to 1 s for the first delivery, then take what is ready, up to the max. Dropping
        // a fetch loses nothing: what it claimed becomes visible again when the lease expires.
        let deliveries = tokio::select! {
            biased;
            _ = done.cancelled() => return Ok(()),
            fetched = consumer.fetch(FETCH_BATCH, Duration::from_secs(1)) => fetched?,
        };
        let mut handled = Vec::with_capacity(deliveries.len());
        for delivery in &deliveries {
            // The "work": decode the order. Something that is not an order never will be:
            // dead-letter it now (term) rather than retry it (nack).
            match delivery.json::<Order>() {
                Ok(_order) => handled.push(delivery),
                Err(e) => {
                    consumer
                        .term(delivery, &format!("not an order: {e}"))
                        .await?
                }
            }
        }
        if handled.is_empty() {
            continue;
        }
        let report = consumer.ack_batch(&handled).await?;
        // An ack is refused (listed in `report.lost`) only if the delivery's lease ran out (30 s
        // by default) and another consumer claimed it; that consumer acks it instead.
        let acked = handled
            .iter()
            .filter(|d| is_ours(d) && !report.lost.contains(&d.id()))
            .count() as u64;
        if consumed.fetch_add(acked, Ordering::Relaxed) + acked >= MESSAGES {
            done.cancel();
        }
    }
}

/// Rewrites the status line every 200 ms.
async fn status_line(progress: Arc<Progress>, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        print_status(&progress, started);
    }
}

fn print_status(progress: &Progress, started: Instant) {
    let published = progress.published.load(Ordering::Relaxed);
    let [billing, shipping] = progress
        .groups
        .each_ref()
        .map(|g| g.consumed.load(Ordering::Relaxed));
    // Acks per second across both groups since the start.
    let rate = (billing + shipping) as f64 / started.elapsed().as_secs_f64().max(1e-3);
    print!(
        "\rpublished {published:>6} | billing {billing:>6} | shipping {shipping:>6} | {rate:>8.0} msg/s"
    );
    let _ = std::io::stdout().flush();
}
