//! The claim step: wait for a free handler slot, then claim the free slots plus a reserve that
//! keeps handlers busy while the next claim is under way and starts well within a lease (see
//! `pace.rs`: up to the prefetch when handlers are quick, little more than the free slots when
//! they are slow). Acks of finished
//! handlers ride along with the claim (one round trip, one commit on Postgres); when nothing is
//! ready it waits for work and flushes acks that arrive meanwhile on their own.

use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::run::Run;
use super::settle::{backoff, flush_acks};
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
    async fn claim_batch(&mut self, token: &CancellationToken) -> Result<Option<Vec<Delivery>>> {
        self.pending_acks
            .extend(std::iter::from_fn(|| self.ack_rx.try_recv().ok()));
        // The slot this step holds, plus those free.
        let free = 1 + self.permits.available_permits();
        let max = self
            .pace
            .claim_size(free, self.config.concurrency, self.prefetch, self.lease);
        let done: Vec<&Delivery> = self.pending_acks.iter().collect();
        let started = std::time::Instant::now();
        let (report, batch) = self.consumer.ack_and_fetch(&done, max).await?;
        self.pace.record_claim(started.elapsed());
        self.counters.acked(&report);
        self.pending_acks.clear();
        if !batch.is_empty() {
            return Ok(Some(batch));
        }
        let wait = self.consumer.fetch(max, Duration::from_secs(3600));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return Ok(None),
                r = &mut wait => return r.map(Some),
                Some(d) = self.ack_rx.recv() => {
                    let mut acks = vec![d];
                    acks.extend(std::iter::from_fn(|| self.ack_rx.try_recv().ok()));
                    flush_acks(&self.consumer, acks, &self.counters).await;
                }
            }
        }
    }
}
