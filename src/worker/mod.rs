//! The worker runtime: runs an async handler for every delivery of one group, with a cap on
//! in-flight handlers, prefetch, automatic lease extension, batched acks, retries with the
//! stream's backoff, dead-lettering, hooks around the handler, and graceful shutdown.
//!
//! Invariants: a delivery is settled exactly once by the worker (ack, nack, term or release);
//! a panicking handler is caught and its delivery retried; on shutdown, handlers still running at
//! the deadline are aborted and their deliveries released (visible again at once).
//!
//! With the cargo feature `metrics`, the worker records through the `metrics` facade, on every
//! backend: `pgtide_handler_duration_seconds` (labels stream, group, outcome) and, as the
//! backend confirms settles, `pgtide_acked_total`, `pgtide_nacked_total` (put back for a retry)
//! and `pgtide_dead_lettered_total` (labels stream, group).

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

mod job;

use job::{backoff, flush_acks, run_settler, Counters, Job, Settle};

use crate::error::Result;
use crate::queue::{Delivery, QueueConsumer};

/// What a handler decided about a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: acknowledge.
    Ack,
    /// Try again: after the given delay, or the stream's backoff when `None`.
    Retry {
        /// Delay before the next attempt.
        after: Option<Duration>,
    },
    /// Give up now: dead letter with this reason.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// How a handler invocation ended, as hooks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerResult {
    /// The handler returned an outcome.
    Outcome(Outcome),
    /// The handler returned an error (retried with the stream's backoff).
    Failed(String),
    /// The handler panicked (retried with the stream's backoff).
    Panicked(String),
}

/// Hooks around every handler call: metrics, logging, tracing. The worker already runs each
/// handler inside a `pgtide.handle` tracing span carrying stream, group, message id and attempt.
pub trait WorkerHook: Send + Sync + 'static {
    /// Called before the handler runs.
    fn before(&self, _delivery: &Delivery) {}
    /// Called after the handler finished, with how it ended and how long it took.
    fn after(&self, _delivery: &Delivery, _result: &HandlerResult, _elapsed: Duration) {}
}

impl<T: WorkerHook> WorkerHook for Arc<T> {
    fn before(&self, delivery: &Delivery) {
        (**self).before(delivery)
    }
    fn after(&self, delivery: &Delivery, result: &HandlerResult, elapsed: Duration) {
        (**self).after(delivery, result, elapsed)
    }
}

/// Worker settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Most handlers running at once. Defaults to 16.
    pub concurrency: usize,
    /// Most deliveries claimed per fetch. Defaults to the concurrency.
    pub prefetch: Option<usize>,
    /// Send `in_progress` for deliveries whose handler is still running, every half lease, so
    /// that long handlers keep their lease. Defaults to true.
    pub auto_in_progress: bool,
    /// How long shutdown waits for running handlers before releasing their deliveries.
    /// Defaults to 30 s.
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 16,
            prefetch: None,
            auto_in_progress: true,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Counts from one [`Worker::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Deliveries handed to the handler.
    pub handled: u64,
    /// Acknowledged.
    pub acked: u64,
    /// Retried (handler asked, failed or panicked).
    pub retried: u64,
    /// Dead-lettered (handler asked, or retries exhausted).
    pub dead_lettered: u64,
    /// Handlers that panicked.
    pub panicked: u64,
    /// Released unfinished at shutdown.
    pub released: u64,
    /// Settles refused because the lease was lost.
    pub lease_lost: u64,
}

type BoxHandler = Arc<
    dyn Fn(
            Delivery,
        )
            -> futures_util::future::BoxFuture<'static, std::result::Result<Outcome, String>>
        + Send
        + Sync,
>;

/// Runs a handler over one group. Build with [`Worker::new`], then [`Worker::run`].
///
/// ```no_run
/// # async fn demo(pg: pgtide::PgBackend) -> pgtide::Result<()> {
/// use pgtide::{Outcome, Worker};
/// use pgtide::CancellationToken;
///
/// let consumer = pg.consumer("orders", "billing", "billing-1").await?;
/// let worker = Worker::new(consumer, |delivery: pgtide::Delivery| async move {
///     let order: serde_json::Value = delivery.json().map_err(|e| e.to_string())?;
///     println!("billing {order}");
///     Ok::<_, String>(Outcome::Ack)
/// });
/// let token = CancellationToken::new();
/// let report = worker.run(token.clone()).await?;
/// # let _ = report; Ok(()) }
/// ```
pub struct Worker<C: QueueConsumer> {
    consumer: C,
    handler: BoxHandler,
    config: WorkerConfig,
    hooks: Vec<Arc<dyn WorkerHook>>,
}

impl<C: QueueConsumer> Worker<C> {
    /// A worker running `handler` for every delivery of `consumer`'s group. The handler returns
    /// an [`Outcome`], or an error (shown in the dead letter if retries run out) to retry with
    /// the stream's backoff.
    pub fn new<F, Fut, E>(consumer: C, handler: F) -> Worker<C>
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Outcome, E>> + Send + 'static,
        E: Display + 'static,
    {
        let handler: BoxHandler =
            Arc::new(move |d| handler(d).map(|r| r.map_err(|e| e.to_string())).boxed());
        Worker {
            consumer,
            handler,
            config: WorkerConfig::default(),
            hooks: vec![],
        }
    }

    /// Sets the most handlers running at once (default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n.max(1);
        self
    }

    /// Sets the most deliveries claimed per fetch (default: the concurrency).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.config.prefetch = Some(n.max(1));
        self
    }

    /// Sets how long shutdown waits for running handlers (default 30 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// Turns the automatic `in_progress` (lease extension) of running handlers on or off
    /// (default on).
    pub fn auto_in_progress(mut self, on: bool) -> Self {
        self.config.auto_in_progress = on;
        self
    }

    /// Adds a hook around every handler call.
    pub fn hook(mut self, hook: impl WorkerHook) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Runs until `token` is cancelled, then shuts down gracefully: stops fetching, lets running
    /// handlers finish within the grace period, releases the deliveries of those that did not,
    /// and flushes pending settles. Returns the counts.
    ///
    /// Errors while fetching or settling are logged and retried with backoff; `run` itself fails
    /// only if the group disappears.
    pub async fn run(self, token: CancellationToken) -> Result<WorkerReport> {
        let concurrency = self.config.concurrency;
        let prefetch = self.config.prefetch.unwrap_or(concurrency);
        let permits = Arc::new(Semaphore::new(concurrency));
        let counters = Arc::new(Counters::new(&self.consumer));
        let in_flight: Arc<Mutex<HashMap<Uuid, Delivery>>> = Arc::default();
        let (settle_tx, settle_rx) = mpsc::channel::<Settle>(concurrency * 4);
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Delivery>();
        let mut pending_acks: Vec<Delivery> = vec![];
        let settler = tokio::spawn(run_settler(
            self.consumer.clone(),
            settle_rx,
            counters.clone(),
        ));
        let mut handlers: JoinSet<()> = JoinSet::new();
        let lease = self.lease().await;
        let mut failures = 0u32;
        let mut fatal = None;

        'fetching: loop {
            // Wait for a free slot before claiming anything.
            let first = tokio::select! {
                biased;
                _ = token.cancelled() => break 'fetching,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'fetching },
            };
            // Claim a full prefetch: deliveries beyond the free slots wait here (leased) for the
            // next free slot, so the claims stay large when handlers are quick.
            let want = prefetch;
            // Acks of finished handlers ride along with the next claim (one round trip, one
            // commit on Postgres). When nothing is ready, wait for work and flush acks that
            // arrive meanwhile on their own.
            pending_acks.extend(std::iter::from_fn(|| ack_rx.try_recv().ok()));
            let fetched = match self
                .consumer
                .ack_and_fetch(&pending_acks.iter().collect::<Vec<_>>(), want)
                .await
            {
                Ok((report, batch)) => {
                    counters.acked(&report);
                    pending_acks.clear();
                    if batch.is_empty() {
                        let wait = self.consumer.fetch(want, Duration::from_secs(3600));
                        tokio::pin!(wait);
                        loop {
                            tokio::select! {
                                biased;
                                _ = token.cancelled() => break 'fetching,
                                r = &mut wait => break r,
                                Some(d) = ack_rx.recv() => {
                                    let mut acks = vec![d];
                                    acks.extend(std::iter::from_fn(|| ack_rx.try_recv().ok()));
                                    flush_acks(&self.consumer, acks, &counters).await;
                                }
                            }
                        }
                    } else {
                        Ok(batch)
                    }
                }
                Err(e) => Err(e),
            };
            let batch = match fetched {
                Ok(b) => {
                    failures = 0;
                    b
                }
                Err(e) if e.is_retryable() => {
                    failures += 1;
                    tracing::warn!(error = %e, stream = self.consumer.stream(), group = self.consumer.group(), "pgtide worker: fetch failed; retrying");
                    drop(first);
                    tokio::select! {
                        biased;
                        _ = token.cancelled() => break 'fetching,
                        _ = tokio::time::sleep(backoff(failures)) => continue 'fetching,
                    }
                }
                Err(e) => {
                    fatal = Some(e);
                    break 'fetching;
                }
            };
            let mut first = Some(first);
            let mut batch = batch.into_iter();
            while let Some(delivery) = batch.next() {
                let permit = match first.take() {
                    Some(p) => p,
                    None => tokio::select! {
                        biased;
                        _ = token.cancelled() => {
                            // Not started: hand them back at once, the attempt not counted.
                            let rest: Vec<Delivery> = std::iter::once(delivery).chain(batch).collect();
                            match self.consumer.release_batch(&rest.iter().collect::<Vec<_>>()).await {
                                Ok(r) => counters.add(|c| c.released += r.settled.len() as u64),
                                Err(e) => tracing::warn!(error = %e, "pgtide worker: release failed; leases will expire"),
                            }
                            break 'fetching;
                        }
                        p = permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break 'fetching,
                        },
                    },
                };
                counters.add(|r| r.handled += 1);
                if let Ok(mut m) = in_flight.lock() {
                    m.insert(delivery.id(), delivery.clone());
                }
                let job = Job {
                    consumer: self.consumer.clone(),
                    handler: self.handler.clone(),
                    hooks: self.hooks.clone(),
                    settle: settle_tx.clone(),
                    acks: ack_tx.clone(),
                    counters: counters.clone(),
                    in_flight: in_flight.clone(),
                    in_progress_every: if self.config.auto_in_progress {
                        lease.map(|l| l / 2)
                    } else {
                        None
                    },
                };
                handlers.spawn(async move {
                    job.run(delivery).await;
                    drop(permit);
                });
            }
            while handlers.try_join_next().is_some() {}
        }

        // Shutdown: let running handlers finish within the grace period.
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
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
        drop(settle_tx);
        drop(ack_tx);
        pending_acks.extend(std::iter::from_fn(|| ack_rx.try_recv().ok()));
        flush_acks(&self.consumer, pending_acks, &counters).await;
        let _ = settler.await;
        // Whatever is still marked in flight was aborted: hand it back at once.
        let leftover: Vec<Delivery> = match in_flight.lock() {
            Ok(mut m) => m.drain().map(|(_, d)| d).collect(),
            Err(_) => vec![],
        };
        if !leftover.is_empty() {
            let refs: Vec<&Delivery> = leftover.iter().collect();
            match self.consumer.release_batch(&refs).await {
                Ok(r) => counters.add(|c| c.released += r.settled.len() as u64),
                Err(e) => {
                    tracing::warn!(error = %e, "pgtide worker: release at shutdown failed; leases will expire")
                }
            }
        }
        if let Some(e) = fatal {
            return Err(e);
        }
        let report = counters.report.lock().map(|r| *r).unwrap_or_default();
        Ok(report)
    }

    async fn lease(&self) -> Option<Duration> {
        self.consumer.lease().await
    }
}
