//! One [`Worker::run`](super::Worker::run): its shared state, and the loop over its steps —
//! claim a batch (`claim.rs`), hand it to handlers (`dispatch.rs`), and on cancellation shut
//! down (`shutdown.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::claim::Claimed;
use super::pace::Pace;
use super::settle::{run_settler, Counters, Settle};
use super::{BoxHandler, Worker, WorkerConfig, WorkerHook, WorkerReport};
use crate::error::Result;
use crate::queue::Delivery;
use crate::queue::QueueConsumer;

/// The state one run shares between its steps.
pub(super) struct Run<C: QueueConsumer> {
    pub(super) consumer: C,
    pub(super) handler: BoxHandler,
    pub(super) hooks: Vec<Arc<dyn WorkerHook>>,
    pub(super) config: WorkerConfig,
    /// Most deliveries claimed at once.
    pub(super) prefetch: usize,
    /// One permit per handler allowed to run.
    pub(super) permits: Arc<Semaphore>,
    pub(super) counters: Arc<Counters>,
    /// Deliveries whose handler runs, retried at shutdown (attempt counted) if it is aborted.
    pub(super) in_flight: Arc<Mutex<HashMap<Uuid, Delivery>>>,
    /// Retries and dead letters, to the settler task.
    pub(super) settle_tx: mpsc::Sender<Settle>,
    pub(super) settler: JoinHandle<()>,
    /// Acks of finished handlers, to ride with the next claim.
    pub(super) ack_tx: mpsc::UnboundedSender<Delivery>,
    pub(super) ack_rx: mpsc::UnboundedReceiver<Delivery>,
    /// Acks taken off `ack_rx` and not yet confirmed by the backend.
    pub(super) pending_acks: Vec<Delivery>,
    /// Acks being settled on their own, beside the claim step (`claim.rs`): at most one such
    /// settle at a time.
    pub(super) acking: Option<JoinHandle<()>>,
    /// Whether the last claim came back with less than it asked for: little is ready, so the
    /// next claim is likely to find nothing, and acks are settled beside it rather than with it.
    pub(super) drained: bool,
    pub(super) handlers: JoinSet<()>,
    /// The stream's lease, if the backend knows it: claims are sized and held leases extended
    /// by it.
    pub(super) lease: Option<Duration>,
    /// How fast handlers finish, to size claims.
    pub(super) pace: Arc<Pace>,
    /// Claims failed in a row.
    pub(super) failures: u32,
}

impl<C: QueueConsumer> Run<C> {
    pub(super) async fn new(worker: Worker<C>) -> Self {
        let Worker {
            consumer,
            handler,
            config,
            hooks,
        } = worker;
        let concurrency = config.concurrency;
        let counters = Arc::new(Counters::new(&consumer));
        let (settle_tx, settle_rx) = mpsc::channel::<Settle>(concurrency * 4);
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Delivery>();
        let settler = tokio::spawn(run_settler(consumer.clone(), settle_rx, counters.clone()));
        let lease = consumer.lease().await;
        Run {
            prefetch: config
                .prefetch
                .unwrap_or_else(|| concurrency.saturating_mul(super::DEFAULT_PREFETCH_PER_HANDLER)),
            permits: Arc::new(Semaphore::new(concurrency)),
            consumer,
            handler,
            hooks,
            config,
            counters,
            in_flight: Arc::default(),
            settle_tx,
            settler,
            ack_tx,
            ack_rx,
            pending_acks: vec![],
            acking: None,
            drained: false,
            handlers: JoinSet::new(),
            lease,
            pace: Arc::default(),
            failures: 0,
        }
    }

    /// Claims and dispatches until `token` is cancelled or the group is gone, then shuts down.
    pub(super) async fn run(mut self, token: CancellationToken) -> Result<WorkerReport> {
        let fatal = loop {
            match self.claim(&token).await {
                Claimed::Batch(first, batch) => {
                    if !self.dispatch(first, batch, &token).await {
                        break None;
                    }
                }
                Claimed::Stopped => break None,
                Claimed::Failed(e) => break Some(e),
            }
        };
        let report = self.shutdown().await;
        match fatal {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}
