//! One delivery's handler run: tracing span, hooks, lease extension, panic capture, and the
//! hand-off of its outcome to the settle step (see `settle.rs`).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use super::dispatch::{retry_after, sleep_until};
use super::pace::{extend_at, Pace};
use super::settle::{Counters, Settle};
use super::{BoxHandler, HandlerResult, Outcome, WorkerHook};
use crate::error::Error;
use crate::queue::Delivery;
use crate::queue::QueueConsumer;

pub(super) struct Job<C: QueueConsumer> {
    pub(super) consumer: C,
    pub(super) handler: BoxHandler,
    pub(super) hooks: Vec<Arc<dyn WorkerHook>>,
    pub(super) settle: mpsc::Sender<Settle>,
    pub(super) acks: mpsc::UnboundedSender<Delivery>,
    pub(super) counters: Arc<Counters>,
    pub(super) in_flight: Arc<Mutex<HashMap<Uuid, Delivery>>>,
    pub(super) pace: Arc<Pace>,
    /// The stream's lease, when running handlers' leases are to be extended.
    pub(super) lease: Option<Duration>,
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
        crate::otel::set_parent(&span, &delivery.message.headers);
        for h in &self.hooks {
            h.before(&delivery);
        }
        let started = Instant::now();
        let work = AssertUnwindSafe((self.handler)(delivery.clone()))
            .catch_unwind()
            .instrument(span);
        tokio::pin!(work);
        // Extend once half a lease is left, timed from the delivery's actual expiry (which
        // `in_progress` moves), so time spent waiting for a slot is accounted for.
        let mut lease = self.lease;
        let mut retry_at = None;
        let result = loop {
            let due = lease.map(|l| retry_at.unwrap_or_else(|| extend_at(&delivery, l)));
            tokio::select! {
                r = &mut work => break r,
                _ = sleep_until(due) => match self.consumer.in_progress(&mut delivery, None).await {
                    Ok(()) => retry_at = None,
                    Err(Error::LeaseLost { .. }) => {
                        tracing::warn!(message_id = %delivery.id(), "pgtide worker: lease lost while the handler runs");
                        lease = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, message_id = %delivery.id(), "pgtide worker: in_progress (lease extension) failed; retrying");
                        retry_at = lease.map(|l| tokio::time::Instant::now() + retry_after(l));
                    }
                },
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
        self.pace.record(elapsed);
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
            HandlerResult::Outcome(Outcome::PauseKey { until }) => Settle::Pause(delivery, until),
            HandlerResult::Failed(e) => Settle::Nack(delivery, None, Some(e)),
            HandlerResult::Panicked(msg) => {
                Settle::Nack(delivery, None, Some(format!("handler panicked: {msg}")))
            }
        };
        // The settler only stops after every job is done, so this cannot fail in practice.
        let _ = self.settle.send(settle).await;
    }
}
