//! One delivery's handler run (tracing span, hooks, lease extension, panic capture) and the
//! settling of its outcome: acks go back to the fetch loop to ride with the next claim; retries
//! and dead letters are settled by a task of their own.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use super::{BoxHandler, HandlerResult, Outcome, WorkerHook, WorkerReport};
use crate::queue::{Delivery, QueueConsumer, SettleReport};

pub(super) enum Settle {
    Nack(Delivery, Option<Duration>, Option<String>),
    Term(Delivery, String),
}

/// The run's report, and its metrics with the feature `metrics`.
pub(super) struct Counters {
    pub(super) report: Mutex<WorkerReport>,
    #[cfg(feature = "metrics")]
    pub(super) metrics: WorkerMetrics,
}

impl Counters {
    pub(super) fn new<C: QueueConsumer>(_consumer: &C) -> Self {
        Counters {
            report: Mutex::default(),
            #[cfg(feature = "metrics")]
            metrics: WorkerMetrics::new(_consumer.stream(), _consumer.group()),
        }
    }

    pub(super) fn add(&self, f: impl FnOnce(&mut WorkerReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    /// What an ack did.
    pub(super) fn acked(&self, r: &SettleReport) {
        self.add(|c| {
            c.acked += r.settled.len() as u64;
            c.lease_lost += r.lost.len() as u64;
        });
        #[cfg(feature = "metrics")]
        self.metrics.acked.increment(r.settled.len() as u64);
    }

    /// What a nack did: retries, and dead letters on the last attempt.
    pub(super) fn nacked(&self, r: &SettleReport) {
        self.add(|c| {
            c.retried += r.settled.len() as u64;
            c.dead_lettered += r.dead_lettered.len() as u64;
            c.lease_lost += r.lost.len() as u64;
        });
        #[cfg(feature = "metrics")]
        {
            self.metrics.nacked.increment(r.settled.len() as u64);
            self.metrics
                .dead_lettered
                .increment(r.dead_lettered.len() as u64);
        }
    }

    /// What a term did.
    pub(super) fn termed(&self, r: &SettleReport) {
        self.add(|c| {
            c.dead_lettered += r.dead_lettered.len() as u64;
            c.lease_lost += r.lost.len() as u64;
        });
        #[cfg(feature = "metrics")]
        self.metrics
            .dead_lettered
            .increment(r.dead_lettered.len() as u64);
    }

    /// How long a handler took, by how it ended.
    pub(super) fn handled(&self, _result: &HandlerResult, _elapsed: Duration) {
        #[cfg(feature = "metrics")]
        self.metrics.handler[WorkerMetrics::outcome(_result)].record(_elapsed);
    }
}

/// Metric handles made once per run, so that the hot path does not build labels. They belong to
/// the recorder installed when [`Worker::run`] started.
#[cfg(feature = "metrics")]
pub(super) struct WorkerMetrics {
    pub(super) acked: metrics::Counter,
    pub(super) nacked: metrics::Counter,
    pub(super) dead_lettered: metrics::Counter,
    /// `pgtide_handler_duration_seconds` per outcome, in the order of [`WorkerMetrics::OUTCOMES`].
    pub(super) handler: [metrics::Histogram; 5],
}

#[cfg(feature = "metrics")]
impl WorkerMetrics {
    /// The `outcome` label: the handler's [`Outcome`], or `error` / `panic`.
    const OUTCOMES: [&'static str; 5] = ["ack", "retry", "dead_letter", "error", "panic"];

    pub(super) fn new(stream: &str, group: &str) -> Self {
        let labels = [("stream", stream.to_owned()), ("group", group.to_owned())];
        WorkerMetrics {
            acked: metrics::counter!("pgtide_acked_total", &labels),
            nacked: metrics::counter!("pgtide_nacked_total", &labels),
            dead_lettered: metrics::counter!("pgtide_dead_lettered_total", &labels),
            handler: Self::OUTCOMES.map(|outcome| {
                metrics::histogram!(
                    "pgtide_handler_duration_seconds",
                    "stream" => stream.to_owned(),
                    "group" => group.to_owned(),
                    "outcome" => outcome
                )
            }),
        }
    }

    /// Index of the result's outcome in [`WorkerMetrics::OUTCOMES`].
    pub(super) fn outcome(result: &HandlerResult) -> usize {
        match result {
            HandlerResult::Outcome(Outcome::Ack) => 0,
            HandlerResult::Outcome(Outcome::Retry { .. }) => 1,
            HandlerResult::Outcome(Outcome::DeadLetter { .. }) => 2,
            HandlerResult::Failed(_) => 3,
            HandlerResult::Panicked(_) => 4,
        }
    }
}

pub(super) struct Job<C: QueueConsumer> {
    pub(super) consumer: C,
    pub(super) handler: BoxHandler,
    pub(super) hooks: Vec<Arc<dyn WorkerHook>>,
    pub(super) settle: mpsc::Sender<Settle>,
    pub(super) acks: mpsc::UnboundedSender<Delivery>,
    pub(super) counters: Arc<Counters>,
    pub(super) in_flight: Arc<Mutex<HashMap<Uuid, Delivery>>>,
    pub(super) in_progress_every: Option<Duration>,
}

impl<C: QueueConsumer> Job<C> {
    pub(super) async fn run(self, mut delivery: Delivery) {
        let span = tracing::info_span!(
            "pgtide.handle",
            stream = %delivery.message.stream,
            group = %delivery.group,
            message_id = %delivery.id(),
            attempt = delivery.attempt,
        );
        for h in &self.hooks {
            h.before(&delivery);
        }
        let started = Instant::now();
        let work = AssertUnwindSafe((self.handler)(delivery.clone()))
            .catch_unwind()
            .instrument(span);
        tokio::pin!(work);
        let result = loop {
            let in_progress_due = async {
                match self.in_progress_every {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut work => break r,
                _ = in_progress_due => {
                    if let Err(e) = self.consumer.in_progress(&mut delivery, None).await {
                        tracing::warn!(error = %e, message_id = %delivery.id(), "pgtide worker: in_progress (lease extension) failed");
                    }
                }
            }
        };
        let result = match result {
            Ok(Ok(outcome)) => HandlerResult::Outcome(outcome),
            Ok(Err(e)) => HandlerResult::Failed(e),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "handler panicked".to_owned());
                self.counters.add(|r| r.panicked += 1);
                HandlerResult::Panicked(msg)
            }
        };
        let elapsed = started.elapsed();
        self.counters.handled(&result, elapsed);
        for h in &self.hooks {
            h.after(&delivery, &result, elapsed);
        }
        if let Ok(mut m) = self.in_flight.lock() {
            m.remove(&delivery.id());
        }
        let settle = match result {
            HandlerResult::Outcome(Outcome::Ack) => {
                // The fetch loop acks it with its next claim.
                let _ = self.acks.send(delivery);
                return;
            }
            HandlerResult::Outcome(Outcome::Retry { after }) => Settle::Nack(delivery, after, None),
            HandlerResult::Outcome(Outcome::DeadLetter { reason }) => {
                Settle::Term(delivery, reason)
            }
            HandlerResult::Failed(e) => Settle::Nack(delivery, None, Some(e)),
            HandlerResult::Panicked(msg) => {
                Settle::Nack(delivery, None, Some(format!("handler panicked: {msg}")))
            }
        };
        // The settler only stops after every job is done, so this cannot fail in practice.
        let _ = self.settle.send(settle).await;
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

pub(super) fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(5))
}
