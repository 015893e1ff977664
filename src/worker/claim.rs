//! The claim step: wait for a free handler slot, then claim the free slots plus a reserve that
//! keeps handlers busy while the next claim is under way and starts well within a lease (see
//! `pace.rs`: up to the prefetch when handlers are quick, little more than the free slots when
//! they are slow). Acks of finished
//! handlers ride along with the claim (one round trip, one commit on Postgres) while claims come
//! back full; once little is ready they are settled beside the claims, on a task of their own, so
//! that a claim after a wake-up never waits for an ack's commit. That needs settles that wake
//! waiting claims ([`QueueConsumer::settles_wake_fetches`]); without them (Postgres polling with
//! notifications off, other backends) acks keep riding with the claims. When nothing is ready
//! the step waits for work.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::run::Run;
use super::settle::{backoff, flush_acks, Counters};
use crate::error::{Error, Result};
use crate::queue::Delivery;
use crate::queue::QueueConsumer;

/// What a claim step ended with.
pub(super) enum Claimed {
    /// A non-empty batch, and the slot for its first delivery.
    Batch(OwnedSemaphorePermit, Vec<Delivery>),
    /// Cancelled: stop claiming.
    Stopped,
    /// A failure that retrying cannot fix (the group is gone).
    Failed(Error),
}

impl<C: QueueConsumer> Run<C> {
    /// Claims the next batch. Retryable failures are logged and retried with backoff here.
    pub(super) async fn claim(&mut self, token: &CancellationToken) -> Claimed {
        loop {
            // Wait for a free slot before claiming anything.
            let first = tokio::select! {
                biased;
                _ = token.cancelled() => return Claimed::Stopped,
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Claimed::Stopped,
                },
            };
            match self.claim_batch(token).await {
                Ok(Some(batch)) => {
                    self.failures = 0;
                    return Claimed::Batch(first, batch);
                }
                Ok(None) => return Claimed::Stopped,
                Err(e) if e.is_retryable() => {
                    self.failures += 1;
                    tracing::warn!(error = %e, stream = self.consumer.stream(), group = self.consumer.group(), "pgtide worker: fetch failed; retrying");
                    drop(first);
                    tokio::select! {
                        biased;
                        _ = token.cancelled() => return Claimed::Stopped,
                        _ = tokio::time::sleep(backoff(self.failures)) => {}
                    }
                }
                Err(e) => return Claimed::Failed(e),
            }
        }
    }

    /// Acks what finished and claims up to the claim size: deliveries beyond the free slots wait
    /// (leased, and extended) for the next free slot, so claims stay large when handlers are
    /// quick. `None` if cancelled while waiting for work.
    ///
    /// While claims come back full, acks ride with the next claim (one round trip, one commit).
    /// Once a claim comes back short, the next one will likely find little or nothing and wait
    /// for a wake-up; an ack's commit waits for its WAL flush, so a claim that carried acks would
    /// hold the next wake-up's claim behind that flush. Then acks are settled beside the claim,
    /// on a task of their own (`acking`), and the claim goes alone.
    async fn claim_batch(&mut self, token: &CancellationToken) -> Result<Option<Vec<Delivery>>> {
        self.pending_acks
            .extend(std::iter::from_fn(|| self.ack_rx.try_recv().ok()));
        // The slot this step holds, plus those free.
        let free = 1 + self.permits.available_permits();
        let max = self
            .pace
            .claim_size(free, self.config.concurrency, self.prefetch, self.lease);
        // Beside only where the acks' commit wakes the claim that waits for the room they make
        // (a capped or ordered group); elsewhere the claim must carry them to see it.
        if self.drained && self.consumer.settles_wake_fetches() {
            self.ack_beside();
        }
        if !self.drained || !self.pending_acks.is_empty() {
            let done: Vec<&Delivery> = self.pending_acks.iter().collect();
            let started = std::time::Instant::now();
            let (report, batch) = self.consumer.ack_and_fetch(&done, max).await?;
            self.pace.record_claim(started.elapsed());
            self.counters.acked(&report);
            self.pending_acks.clear();
            self.drained = batch.len() < max;
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
        }
        // `fetch` claims once more before it waits: a wake-up is only missed if its publish
        // came after the subscription that `fetch` takes first.
        let wait = self.consumer.fetch(max, Duration::from_secs(3600));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return Ok(None),
                r = &mut wait => {
                    let batch = r?;
                    self.drained = batch.len() < max;
                    return Ok(Some(batch));
                }
                _ = joined(&mut self.acking), if self.acking.is_some() => self.acking = None,
                Some(d) = self.ack_rx.recv(), if self.acking.is_none() => {
                    self.pending_acks.push(d);
                    self.pending_acks
                        .extend(std::iter::from_fn(|| self.ack_rx.try_recv().ok()));
                    self.acking = Some(spawn_acks(&self.consumer, &mut self.pending_acks, &self.counters));
                }
            }
        }
    }

    /// Settles the pending acks on a task of their own, unless one is still settling earlier
    /// acks (then they ride with the next claim).
    fn ack_beside(&mut self) {
        if self.acking.as_ref().is_some_and(JoinHandle::is_finished) {
            // Finished: its result is ready at once, and a panic in it is logged.
            if let Some(Err(e)) = self.acking.take().and_then(FutureExt::now_or_never) {
                settle_task_failed(&e);
            }
        }
        if self.acking.is_none() && !self.pending_acks.is_empty() {
            self.acking = Some(spawn_acks(
                &self.consumer,
                &mut self.pending_acks,
                &self.counters,
            ));
        }
    }
}

/// Starts settling `acks` (taken, leaving it empty) on a task of its own.
fn spawn_acks<C: QueueConsumer>(
    consumer: &C,
    acks: &mut Vec<Delivery>,
    counters: &Arc<Counters>,
) -> JoinHandle<()> {
    let (consumer, acks, counters) = (consumer.clone(), std::mem::take(acks), counters.clone());
    tokio::spawn(async move { flush_acks(&consumer, acks, &counters).await })
}

/// Waits for the settle task in `acking`, if there is one; a panic in it is logged.
pub(super) async fn joined(acking: &mut Option<JoinHandle<()>>) {
    if let Some(handle) = acking {
        if let Err(e) = handle.await {
            settle_task_failed(&e);
        }
    }
}

/// Logs a settle task that panicked or was cancelled.
fn settle_task_failed(e: &tokio::task::JoinError) {
    tracing::error!(error = %e, "pgtide worker: settling acks failed; their deliveries will be redelivered");
}
