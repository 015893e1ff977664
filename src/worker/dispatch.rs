//! The dispatch step: start a handler for each claimed delivery as handler slots free up, and
//! keep the leases of those still waiting for a slot.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::job::Job;
use super::pace::extend_at;
use super::run::Run;
use super::settle::release;
use crate::error::Error;
use crate::queue::Delivery;
use crate::queue::QueueConsumer;

impl<C: QueueConsumer> Run<C> {
    /// Starts a handler for every delivery of `batch`, the first in the slot `first`, the others
    /// as slots free up; meanwhile the waiting ones are extended once half a lease is left of
    /// their lease. Returns false when the run must stop: if cancelled meanwhile, the
    /// deliveries not started are handed back at once, their attempt not counted.
    pub(super) async fn dispatch(
        &mut self,
        first: OwnedSemaphorePermit,
        batch: Vec<Delivery>,
        token: &CancellationToken,
    ) -> bool {
        let mut first = Some(first);
        let mut queue = VecDeque::from(batch);
        while !queue.is_empty() {
            let permit = match first.take() {
                Some(p) => p,
                None => {
                    let due = self
                        .lease
                        .and_then(|lease| queue.iter().map(|d| extend_at(d, lease)).min());
                    tokio::select! {
                        biased;
                        _ = token.cancelled() => {
                            let rest: Vec<Delivery> = queue.into_iter().collect();
                            if let Err(e) = release(&self.consumer, &rest, &self.counters).await {
                                tracing::warn!(error = %e, "pgtide worker: release failed; leases will expire");
                            }
                            return false;
                        }
                        p = self.permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return false,
                        },
                        _ = sleep_until(due) => {
                            self.extend_waiting(&mut queue).await;
                            continue;
                        }
                    }
                }
            };
            if let Some(delivery) = queue.pop_front() {
                self.start(delivery, permit);
            }
        }
        // Reap finished handlers so the set does not grow with the run.
        while self.handlers.try_join_next().is_some() {}
        true
    }

    /// Extends the waiting deliveries that are due; drops those whose lease is already lost
    /// (another consumer may hold them now).
    async fn extend_waiting(&mut self, queue: &mut VecDeque<Delivery>) {
        let Some(lease) = self.lease else { return };
        let now = tokio::time::Instant::now();
        let mut failed = false;
        let mut kept = VecDeque::with_capacity(queue.len());
        for mut d in queue.drain(..) {
            if extend_at(&d, lease) <= now {
                match self.consumer.in_progress(&mut d, None).await {
                    Ok(()) => {}
                    Err(Error::LeaseLost { .. }) => {
                        tracing::warn!(message_id = %d.id(), "pgtide worker: lease of a waiting delivery lost; skipping it");
                        self.counters.add(|r| r.lease_lost += 1);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, message_id = %d.id(), "pgtide worker: in_progress (lease extension) failed; retrying");
                        failed = true;
                    }
                }
            }
            kept.push_back(d);
        }
        *queue = kept;
        if failed {
            // Do not spin on a failing backend: the failed extensions stay due.
            tokio::time::sleep(retry_after(lease)).await;
        }
    }

    /// Runs the handler for `delivery` on a task of its own, holding `permit` until it is done.
    fn start(&mut self, delivery: Delivery, permit: OwnedSemaphorePermit) {
        self.counters.add(|r| r.handled += 1);
        if let Ok(mut m) = self.in_flight.lock() {
            m.insert(delivery.id(), delivery.clone());
        }
        let job = Job {
            consumer: self.consumer.clone(),
            handler: self.handler.clone(),
            hooks: self.hooks.clone(),
            settle: self.settle_tx.clone(),
            acks: self.ack_tx.clone(),
            counters: self.counters.clone(),
            in_flight: self.in_flight.clone(),
            pace: self.pace.clone(),
            lease: self.lease.filter(|_| self.config.auto_in_progress),
        };
        self.handlers.spawn(async move {
            job.run(delivery).await;
            drop(permit);
        });
    }
}

/// Sleeps until `due`, or forever without one.
pub(super) async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long to wait before retrying a failed lease extension: a tenth of the lease, at least
/// 50 ms.
pub(super) fn retry_after(lease: Duration) -> Duration {
    (lease / 10).max(Duration::from_millis(50))
}
