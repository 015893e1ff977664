//! A worker: a handler run for every delivery of one group, with retries, dead letters and
//! graceful shutdown.
//!
//! ```sh
//! cargo run --example worker            # Postgres: DATABASE_URL, else a local or throwaway server
//! PGTIDE_BACKEND=memory:// cargo run --example worker
//! PGTIDE_BACKEND=postgres://postgres@127.0.0.1:5432/postgres cargo run --example worker
//! ```
//!
//! Any backend URL works in `PGTIDE_BACKEND`; `PGTIDE_NAMESPACE` picks the namespace (default
//! `pgtide`), which `migrate()` installs on Postgres if it is new.
//!
//! It publishes 1 000 payments, one in a hundred of them invalid, and runs a worker with 16
//! handlers in flight. Valid payments are acknowledged; a transient failure (every 7th payment's
//! first attempt) is retried with the stream's backoff; an invalid payment is dead-lettered at
//! once. When everything is settled the worker is cancelled, finishes what is in flight, and
//! prints its report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtide::{
    AnyBackend, Backoff, CancellationToken, Delivery, GroupStart, GroupStats, Outcome,
    OutgoingMessage, Queue, StreamConfig, Worker,
};

const STREAM: &str = "example.payments";
const GROUP: &str = "ledger";
const COUNT: u64 = 1000;

#[tokio::main]
async fn main() -> pgtide::Result<()> {
    let namespace = std::env::var("PGTIDE_NAMESPACE").unwrap_or_else(|_| "pgtide".to_owned());
    let url = backend_url(std::env::var("PGTIDE_BACKEND").ok()).await?;
    run(&url, &namespace).await?;
    Ok(())
}

/// The backend to run on: `PGTIDE_BACKEND` as given, whatever its scheme; without it Postgres
/// (`DATABASE_URL`, else a local or throwaway server) when the library has it, else memory.
///
/// (`pub(crate)` here and on [`run`]: the integration tests include this file as a module.)
pub(crate) async fn backend_url(pgtide_backend: Option<String>) -> pgtide::Result<String> {
    match pgtide_backend {
        Some(url) if !url.is_empty() => Ok(url),
        _ if cfg!(feature = "postgres") => pgtide_testing::database_url()
            .await
            .map_err(|e| pgtide::Error::InvalidConfig(e.to_string())),
        _ => Ok("memory://".to_owned()),
    }
}

/// Publishes the payments, works them off, and returns the group's final depth.
pub(crate) async fn run(url: &str, namespace: &str) -> pgtide::Result<GroupStats> {
    let queue = AnyBackend::connect(url, namespace).await?;
    // Installs or upgrades the namespace on Postgres; nothing to do on the brokers.
    queue.migrate().await?;
    println!("backend: {}, namespace {namespace:?}", queue.kind());

    let config = StreamConfig::default()
        .max_deliver(3)
        .backoff(Backoff::schedule([Duration::from_millis(100)]));
    queue.ensure_stream(STREAM, &config).await?;
    queue.ensure_group(STREAM, GROUP, GroupStart::New).await?;
    queue.purge(STREAM).await?;

    let payments: Vec<OutgoingMessage> = (0..COUNT)
        .map(|i| {
            let amount = if i % 100 == 99 {
                -1
            } else {
                (i as i64 % 50) + 1
            };
            OutgoingMessage::json(&serde_json::json!({ "payment": i, "amount": amount }))
        })
        .collect::<Result<_, _>>()?;
    for chunk in payments.chunks(250) {
        queue.publish_batch(STREAM, chunk).await?;
    }

    let settled = Arc::new(AtomicU64::new(0));
    let handler = {
        let settled = settled.clone();
        move |delivery: Delivery| {
            let settled = settled.clone();
            async move {
                let payment: serde_json::Value = delivery.json().map_err(|e| e.to_string())?;
                let id = payment["payment"].as_u64().unwrap_or_default();
                if payment["amount"].as_i64().unwrap_or(0) <= 0 {
                    settled.fetch_add(1, Ordering::Relaxed);
                    return Ok(Outcome::DeadLetter {
                        reason: format!("payment {id}: amount must be positive"),
                    });
                }
                if id % 7 == 0 && delivery.attempt == 1 {
                    // Returned errors are retried with the stream's backoff.
                    return Err(format!("payment {id}: ledger busy, try again"));
                }
                settled.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Ack)
            }
        }
    };

    let consumer = queue.consumer(STREAM, GROUP, "example-worker").await?;
    let worker = Worker::new(consumer, handler)
        .concurrency(16)
        .shutdown_grace(Duration::from_secs(5));
    let token = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(worker.run(token.clone()));

    // Stop on Ctrl-C, or once every payment is settled.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if settled.load(Ordering::Relaxed) >= COUNT {
                    break;
                }
            }
        }
    }
    token.cancel();
    let report = run
        .await
        .map_err(|e| pgtide::Error::InvalidConfig(format!("worker task: {e}")))??;
    println!(
        "handled {} deliveries in {:.2?}: {} acked, {} retried, {} dead-lettered",
        report.handled,
        started.elapsed(),
        report.acked,
        report.retried,
        report.dead_lettered
    );
    let stats = queue.stats(STREAM, GROUP).await?;
    println!(
        "group {GROUP:?}: ready {} in flight {} dead {}",
        stats.ready, stats.in_flight, stats.dead
    );
    #[cfg(feature = "postgres")]
    if let AnyBackend::Postgres(pg) = &queue {
        pg.shutdown().await;
    }
    Ok(stats)
}
