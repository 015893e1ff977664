//! The shutdown step: running handlers get the grace period, then are aborted; pending settles
//! are flushed; deliveries of aborted handlers are handed back at once.

use super::run::Run;
use super::settle::{flush_acks, release};
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
        // Every job is done: closing the channels lets the settler finish what is queued.
        drop(settle_tx);
        drop(ack_tx);
        pending_acks.extend(std::iter::from_fn(|| ack_rx.try_recv().ok()));
        flush_acks(&consumer, pending_acks, &counters).await;
        let _ = settler.await;
        // Whatever is still marked in flight was aborted: hand it back at once.
        let leftover: Vec<Delivery> = match in_flight.lock() {
            Ok(mut m) => m.drain().map(|(_, d)| d).collect(),
            Err(_) => vec![],
        };
        if !leftover.is_empty() {
            if let Err(e) = release(&consumer, &leftover, &counters).await {
                tracing::warn!(error = %e, "pgtide worker: release at shutdown failed; leases will expire");
            }
        }
        counters.report()
    }
}
