//! Settling what handlers decided, and the run's counts: acks go back to the claim step to ride
//! with the next claim; retries and dead letters are settled by a task of their own, so a slow
//! settle never holds up a claim.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{HandlerResult, WorkerReport};
use crate::metrics::WorkerMetrics;
use crate::queue::QueueConsumer;
use crate::queue::{Delivery, SettleReport};

/// A settle the settler task runs (acks travel on their own channel).
pub(super) enum Settle {
    Nack(Delivery, Option<Duration>, Option<String>),
    Term(Delivery, String),
    Pause(Delivery, chrono::DateTime<chrono::Utc>),
}

/// The run's report and its metrics.
pub(super) struct Counters {
    pub(super) report: Mutex<WorkerReport>,
    metrics: WorkerMetrics,
}

impl Counters {
    pub(super) fn new<C: QueueConsumer>(consumer: &C) -> Self {
        Counters {
            report: Mutex::default(),
            metrics: WorkerMetrics::new(consumer.stream(), consumer.group()),
        }
    }

    pub(super) fn add(&self, f: impl FnOnce(&mut WorkerReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    /// The counts so far.
    pub(super) fn report(&self) -> WorkerReport {
        self.report.lock().map(|r| *r).unwrap_or_default()
    }

    /// What an ack did.
    pub(super) fn acked(&self, r: &SettleReport) {
        self.add(|c| {
            c.acked += r.settled.len() as u64;
            c.lease_lost += r.lost.len() as u64;
        });
        self.metrics.acked(r.settled.len());
    }

    /// What a nack did: retries, and dead letters on the last attempt.
    pub(super) fn nacked(&self, r: &SettleReport) {
        self.add(|c| {
            c.retried += r.settled.len() as u64;
            c.dead_lettered += r.dead_lettered.len() as u64;
            c.lease_lost += r.lost.len() as u64;
        });
        self.metrics.nacked(r.settled.len());
        self.metrics.dead_lettered(r.dead_lettered.len());
    }

    /// What a term did.
    pub(super) fn termed(&self, r: &SettleReport) {
        self.add(|c| {
            c.dead_lettered += r.dead_lettered.len() as u64;
            c.lease_lost += r.lost.len() as u64;
        });
        self.metrics.dead_lettered(r.dead_lettered.len());
    }

    /// How long a handler took, by how it ended.
    pub(super) fn handled(&self, result: &HandlerResult, elapsed: Duration) {
        self.metrics.handled(result, elapsed);
    }
}

/// Settles retries and dead letters as handlers finish (acks go with the next claim).
pub(super) async fn run_settler<C: QueueConsumer>(
    consumer: C,
    mut rx: mpsc::Receiver<Settle>,
    counters: Arc<Counters>,
) {
    while let Some(settle) = rx.recv().await {
        match settle {
            Settle::Nack(d, after, error) => {
                match consumer.nack_batch(&[&d], after, error.as_deref()).await {
                    Ok(r) => counters.nacked(&r),
                    Err(e) => {
                        tracing::warn!(error = %e, message_id = %d.id(), "pgtide worker: nack failed; the lease will expire")
                    }
                }
            }
            Settle::Term(d, reason) => match consumer.term_batch(&[&d], &reason).await {
                Ok(r) => counters.termed(&r),
                Err(e) => {
                    tracing::warn!(error = %e, message_id = %d.id(), "pgtide worker: term failed; the lease will expire")
                }
            },
            Settle::Pause(d, until) => match consumer.pause_batch(&[&d], until).await {
                Ok(r) => counters.add(|c| {
                    c.paused += (r.settled.len() + r.dead_lettered.len()) as u64;
                    c.lease_lost += r.lost.len() as u64;
                }),
                Err(e) => {
                    tracing::warn!(error = %e, message_id = %d.id(), "pgtide worker: pause failed; the lease will expire")
                }
            },
        }
    }
}

/// Acks a batch, retrying transient failures a few times; what still fails is redelivered later.
pub(super) async fn flush_acks<C: QueueConsumer>(
    consumer: &C,
    acks: Vec<Delivery>,
    counters: &Counters,
) {
    if acks.is_empty() {
        return;
    }
    let refs: Vec<&Delivery> = acks.iter().collect();
    let mut failures = 0;
    loop {
        match consumer.ack_batch(&refs).await {
            Ok(r) => {
                counters.acked(&r);
                return;
            }
            Err(e) if e.is_retryable() && failures < 5 => {
                failures += 1;
                tracing::warn!(error = %e, "pgtide worker: ack failed; retrying");
                tokio::time::sleep(backoff(failures)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, count = refs.len(), "pgtide worker: ack failed; deliveries will be redelivered");
                return;
            }
        }
    }
}

/// Hands deliveries back unprocessed (visible at once, attempt not counted) and counts them.
pub(super) async fn release<C: QueueConsumer>(
    consumer: &C,
    ds: &[Delivery],
    counters: &Counters,
) -> crate::Result<()> {
    let report = consumer
        .release_batch(&ds.iter().collect::<Vec<_>>())
        .await?;
    counters.add(|c| c.released += report.settled.len() as u64);
    Ok(())
}

/// Wait before retrying after `failures` failures in a row: 100 ms doubling, capped at 5 s.
pub(super) fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(5))
}
