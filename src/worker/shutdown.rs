//! The shutdown step: running handlers get the grace period, then are aborted; pending settles
//! are flushed; deliveries of aborted handlers are retried at once, the attempt counted (their
//! payload reached a handler, so a message that hangs every handler still reaches the dead
//! letters). Only deliveries never started are released uncounted (`dispatch.rs`).

use std::time::Duration;

use super::claim::joined;
use super::run::Run;
use super::settle::flush_acks;
use super::WorkerReport;
use crate::queue::Delivery;
use crate::queue::QueueConsumer;

impl<C: QueueConsumer> Run<C> {
    /// Stops the run and returns its counts.
    pub(super) async fn shutdown(self) -> WorkerReport {
        let Run {
            consumer,
            config,
            counters,
            in_flight,
            settle_tx,
            settler,
            ack_tx,
            mut ack_rx,
            mut pending_acks,
            mut acking,
            mut handlers,
            ..
        } = self;
        let deadline = tokio::time::Instant::now() + config.shutdown_grace;
        while !handlers.is_empty() {
            match tokio::time::timeout_at(deadline, handlers.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    handlers.abort_all();
                    while handlers.join_next().await.is_some() {}
                    break;
                }
            }
        }
        // Acks settled beside the claims finish first; what is left goes in one last settle.
        joined(&mut acking).await;
        // Every job is done: closing the channels lets the settler finish what is queued.
        drop(settle_tx);
        drop(ack_tx);
        pending_acks.extend(std::iter::from_fn(|| ack_rx.try_recv().ok()));
        flush_acks(&consumer, pending_acks, &counters).await;
        let _ = settler.await;
        // Whatever is still marked in flight was aborted: retry it at once, the attempt counted.
        let leftover: Vec<Delivery> = match in_flight.lock() {
            Ok(mut m) => m.drain().map(|(_, d)| d).collect(),
            Err(_) => vec![],
        };
        if !leftover.is_empty() {
            let refs: Vec<&Delivery> = leftover.iter().collect();
            let error = Some("handler aborted at worker shutdown");
            match consumer
                .nack_batch(&refs, Some(Duration::ZERO), error)
                .await
            {
                Ok(r) => counters.nacked(&r),
                Err(e) => {
                    tracing::warn!(error = %e, "pgtide worker: retry at shutdown failed; leases will expire")
                }
            }
        }
        counters.report()
    }
}
