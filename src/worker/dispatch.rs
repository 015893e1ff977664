//! The dispatch step: start a handler for each claimed delivery as handler slots free up.

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::job::Job;
use super::run::Run;
use super::settle::release;
use crate::queue::Delivery;
use crate::queue::QueueConsumer;

impl<C: QueueConsumer> Run<C> {
    /// Starts a handler for every delivery of `batch`, the first in the slot `first`, the others
    /// as slots free up. Returns false when the run must stop: if cancelled meanwhile, the
    /// deliveries not started are handed back at once, their attempt not counted.
    pub(super) async fn dispatch(
        &mut self,
        first: OwnedSemaphorePermit,
        batch: Vec<Delivery>,
        token: &CancellationToken,
    ) -> bool {
        let mut first = Some(first);
        let mut batch = batch.into_iter();
        while let Some(delivery) = batch.next() {
            let permit = match first.take() {
                Some(p) => p,
                None => tokio::select! {
                    biased;
                    _ = token.cancelled() => {
                        let rest: Vec<Delivery> = std::iter::once(delivery).chain(batch).collect();
                        if let Err(e) = release(&self.consumer, &rest, &self.counters).await {
                            tracing::warn!(error = %e, "pgtide worker: release failed; leases will expire");
                        }
                        return false;
                    }
                    p = self.permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return false,
                    },
                },
            };
            self.start(delivery, permit);
        }
        // Reap finished handlers so the set does not grow with the run.
        while self.handlers.try_join_next().is_some() {}
        true
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
            in_progress_every: self.in_progress_every,
        };
        self.handlers.spawn(async move {
            job.run(delivery).await;
            drop(permit);
        });
    }
}
