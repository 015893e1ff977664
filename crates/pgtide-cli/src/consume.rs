//! `consume`: fetch deliveries, print one JSON object per line, then acknowledge them.
//!
//! Order of effects per batch: print, flush, ack. A crash between flush and ack redelivers (at
//! least once); nothing is acknowledged that was not written. On SIGINT/SIGTERM the command stops
//! fetching, finishes the batch in hand, and hands back what a fetch claimed after the signal,
//! so nothing stays leased to a process that is gone.
//!
//! A fetch is never dropped, since a dropped claim may have committed and would stay leased to
//! nobody: on Postgres the fetch stops waiting when the signal comes (`fetch_until`) but a claim
//! already running finishes and its batch is released; other backends wait at most
//! [`FETCH_SLICE`] at a time, the signal is noticed between slices, and whatever the last fetch
//! returned after it is released. Nothing relies on statement order on one connection, so the
//! Postgres backend runs on a small pool of its own, shared with this process's scout and
//! notifier without starving the consumer.
//!
//! Only what was never printed is released (attempt not counted). What `--no-ack` printed stays
//! leased, so it comes back after the lease with the attempt counted (a poison message reaches
//! the dead letters); `--requeue-on-exit` nacks it with no delay instead. `main` closes the
//! backend after this returns, on every path, so the settles reach the server before the exit.

use std::io::Write;
use std::time::Duration;

use pgtide::{Delivery, PgConsumer, QueueConsumer};
use serde_json::json;

use crate::backend::Target;
use crate::cli::ConsumeArgs;
use crate::error::{CliError, CliResult};
use crate::human::{format_time, payload_json};
use crate::telemetry;

/// One delivery as a JSON line.
pub fn delivery_json(d: &Delivery) -> serde_json::Value {
    let (payload, encoding) = payload_json(&d.payload, Some(d.is_json));
    json!({
        "id": d.id(),
        "stream": d.stream,
        "group": d.group,
        "consumer": d.consumer,
        "attempt": d.attempt,
        "published_at": format_time(d.published_at),
        "lease_expires_at": format_time(d.lease_expires_at),
        "headers": d.headers,
        "key": d.message.key,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

fn default_consumer_name() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("cli-{}-{}", std::process::id(), &id[id.len() - 8..])
}

/// Longest single wait of a fetch on backends whose fetches must not be dropped.
const FETCH_SLICE: Duration = Duration::from_secs(1);

/// A Postgres fetch for `consume`: waits as the flags say, stops waiting once `token` is
/// cancelled, and never interrupts a claim.
async fn fetch_until(
    c: &PgConsumer,
    args: &ConsumeArgs,
    want: usize,
    token: &pgtide::CancellationToken,
) -> pgtide::Result<Vec<Delivery>> {
    if args.follow {
        c.fetch_until(want, Duration::from_secs(3600), token).await
    } else if args.wait.is_zero() {
        c.try_fetch(want).await
    } else {
        c.fetch_until(want, args.wait, token).await
    }
}

/// As [`fetch_until`], on any backend: in waits of at most [`FETCH_SLICE`], returning early once `token` is cancelled.
async fn fetch_in_slices<C: QueueConsumer>(
    c: &C,
    args: &ConsumeArgs,
    want: usize,
    token: &pgtide::CancellationToken,
) -> pgtide::Result<Vec<Delivery>> {
    if !args.follow && args.wait.is_zero() {
        return c.try_fetch(want).await;
    }
    let deadline = (!args.follow).then(|| tokio::time::Instant::now() + args.wait);
    loop {
        let slice = deadline.map_or(FETCH_SLICE, |d| {
            d.saturating_duration_since(tokio::time::Instant::now())
                .min(FETCH_SLICE)
        });
        let batch = c.fetch(want, slice).await?;
        let expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if !batch.is_empty() || expired || token.is_cancelled() {
            return Ok(batch);
        }
    }
}

/// `consume STREAM --group G`.
pub async fn run<B: Target>(b: &B, args: ConsumeArgs) -> CliResult {
    let name = args.consumer.clone().unwrap_or_else(default_consumer_name);
    let consumer = b
        .open_consumer(&args.stream, &args.group, &name, args.lease)
        .await?;
    let limit = args.count.unwrap_or(if args.follow { u64::MAX } else { 1 });
    let token = crate::shutdown_signal();
    telemetry::spawn_group_gauges(
        b,
        Some((&args.stream, &args.group)),
        Duration::from_secs(15),
        token.clone(),
    );
    let mut out = std::io::BufWriter::new(std::io::stdout());
    // Claimed but never printed (released at the end), and printed by --no-ack.
    let mut unprinted: Vec<Delivery> = vec![];
    let mut printed: Vec<Delivery> = vec![];
    let mut seen = 0u64;
    let mut interrupted = false;
    let mut failures = 0u32;
    let result: CliResult = loop {
        if seen >= limit {
            break Ok(());
        }
        let want = (limit - seen).min(u64::from(args.batch)) as usize;
        if token.is_cancelled() {
            interrupted = true;
            break Ok(());
        }
        let fetched = match b.postgres_consumer(&consumer) {
            Some(pg) => fetch_until(pg, &args, want, &token).await,
            None => fetch_in_slices(&consumer, &args, want, &token).await,
        };
        let fetched = match fetched {
            // Claimed after the signal: hand it back unprinted.
            Ok(batch) if token.is_cancelled() => {
                unprinted.extend(batch);
                interrupted = true;
                break Ok(());
            }
            r => r,
        };
        let batch = match fetched {
            Ok(b) => {
                failures = 0;
                b
            }
            Err(e) if args.follow && e.is_retryable() => {
                failures += 1;
                tracing::warn!(error = %e, stream = %args.stream, group = %args.group, "pgtide consume: fetch failed; retrying");
                let pause = Duration::from_millis(100 << failures.min(6));
                tokio::select! {
                    _ = token.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
            Err(e) => break Err(e.into()),
        };
        if batch.is_empty() {
            if args.follow {
                continue;
            }
            break Ok(());
        }
        telemetry::delivered(b, &args.stream, &args.group, batch.len() as u64);
        let written = batch
            .iter()
            .try_for_each(|d| writeln!(out, "{}", delivery_json(d)))
            .and_then(|()| out.flush());
        let refs: Vec<&Delivery> = batch.iter().collect();
        if let Err(e) = written {
            // Not written, so not acknowledged: hand the batch back for someone else.
            let _ = consumer.release_batch(&refs).await;
            break Err(CliError::runtime(format!(
                "cannot write to stdout ({e}); the unprinted deliveries were released"
            )));
        }
        seen += batch.len() as u64;
        if args.no_ack {
            printed.extend(batch);
            continue;
        }
        let settled = if args.nack {
            consumer
                .nack_batch(
                    &refs,
                    args.nack_delay,
                    Some("nacked by pgtide consume --nack"),
                )
                .await
        } else {
            consumer.ack_batch(&refs).await
        };
        match settled {
            Ok(report) => {
                let n = report.settled.len() as u64;
                if args.nack {
                    telemetry::nacked(&args.stream, &args.group, n);
                    let dead = report.dead_lettered.len() as u64;
                    telemetry::dead_lettered(&args.stream, &args.group, dead);
                } else {
                    telemetry::acked(&args.stream, &args.group, n);
                }
                if !report.lost.is_empty() {
                    tracing::warn!(
                        count = report.lost.len(),
                        "pgtide consume: leases expired before the settle; those deliveries will be redelivered"
                    );
                }
            }
            Err(e) => {
                break Err(CliError::from(e)
                    .prefixed("printed deliveries could not be settled and will be redelivered"))
            }
        }
    };
    if !unprinted.is_empty() {
        let refs: Vec<&Delivery> = unprinted.iter().collect();
        if let Err(e) = consumer.release_batch(&refs).await {
            tracing::warn!(error = %e, "pgtide consume: release failed; the leases will expire");
        }
    }
    if args.requeue_on_exit && !printed.is_empty() {
        requeue(&consumer, &args, &printed).await;
    }
    if interrupted {
        tracing::info!(consumed = seen, "pgtide consume: stopped");
    }
    // Closed while the consumer is alive: on RabbitMQ closing its channel is what makes the
    // broker confirm its acks (a connection close alone may overtake them). `main` closes the
    // backend again on every path; a second close has nothing left to do.
    if b.postgres().is_none() {
        if let Err(e) = b.close().await {
            let e = CliError::from(e).prefixed(
                "closing the connection failed; the last settles may not have reached the server",
            );
            return result.and(Err(e));
        }
    }
    drop(consumer);
    result
}

/// `--requeue-on-exit`: the printed deliveries go back at once, the attempt counted.
async fn requeue<C: QueueConsumer>(consumer: &C, args: &ConsumeArgs, printed: &[Delivery]) {
    let refs: Vec<&Delivery> = printed.iter().collect();
    let error = Some("handed back by pgtide consume --no-ack --requeue-on-exit");
    match consumer
        .nack_batch(&refs, Some(Duration::ZERO), error)
        .await
    {
        Ok(report) => {
            telemetry::nacked(&args.stream, &args.group, report.settled.len() as u64);
            let dead = report.dead_lettered.len() as u64;
            telemetry::dead_lettered(&args.stream, &args.group, dead);
        }
        Err(e) => {
            tracing::warn!(error = %e, "pgtide consume: requeue failed; the leases will expire");
        }
    }
}
