//! The worker runtime: runs an async handler for every delivery of one group, with a cap on
//! in-flight handlers, prefetch, automatic lease extension, batched acks, retries with the
//! stream's backoff, dead-lettering, hooks around the handler, and graceful shutdown.
//!
//! Invariants: a delivery is settled exactly once by the worker (ack, nack, term or release);
//! a panicking handler is caught and its delivery retried; on shutdown, handlers still running at
//! the deadline are aborted and their deliveries retried at once (the attempt counted: the
//! payload reached a handler); claimed deliveries not started yet are released uncounted.
//!
//! A run loops over two steps, claim (`claim.rs`) and dispatch (`dispatch.rs`), then shuts down
//! (`shutdown.rs`); one handler call is a job (`job.rs`) and its outcome is settled by
//! `settle.rs`.
//!
//! With the cargo feature `metrics`, the worker records through the `metrics` facade, on every
//! backend: `pgtide_handler_duration_seconds` (labels stream, group, outcome) and, as the
//! backend confirms settles, `pgtide_acked_total`, `pgtide_nacked_total` (put back for a retry)
//! and `pgtide_dead_lettered_total` (labels stream, group).

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

mod claim;
mod dispatch;
mod job;
mod pace;
mod run;
mod settle;
mod shutdown;

use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::queue::QueueConsumer;
use crate::queue::{Delivery, Event};

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
    /// Not now, and not this key: the delivery is handed back to be tried again at `until`,
    /// and the attempt does not count (an upstream's `Retry-After` is back-pressure, not a
    /// failure). In an ordered group ([`crate::GroupConfig::ordered`]) the delivery is its key's
    /// head, so the whole key waits while other keys go on; elsewhere only this delivery waits.
    /// Settled with [`QueueConsumer::pause_batch`]; backends without their own pause count the
    /// attempt (a nack with the delay).
    PauseKey {
        /// When the delivery (and its key) may go again.
        until: chrono::DateTime<chrono::Utc>,
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

/// The default prefetch, per handler slot: large enough that quick handlers amortise a claim's
/// round trip and commit over hundreds of deliveries (see [`WorkerConfig::prefetch`]).
const DEFAULT_PREFETCH_PER_HANDLER: usize = 16;

/// Worker settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Most handlers running at once. Defaults to 16.
    pub concurrency: usize,
    /// Most deliveries claimed per fetch. Defaults to 16 × the concurrency. A claim takes the
    /// free handler slots plus what the handlers get through during two claim round trips at
    /// the pace they have been finishing (quick handlers: up to the prefetch, so a claim's round
    /// trip and commit are spread over many deliveries; slow handlers: little more than the free
    /// slots), and never more beyond the free slots than the running handlers get through in
    /// half a lease.
    pub prefetch: Option<usize>,
    /// Send `in_progress` for deliveries whose handler is still running once half a lease is
    /// left of their lease, so that long handlers keep it. Deliveries claimed and waiting for a
    /// handler slot are always extended so. Defaults to true.
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
    /// Retried (handler asked, failed, panicked, or was aborted at shutdown).
    pub retried: u64,
    /// Dead-lettered (handler asked, or retries exhausted).
    pub dead_lettered: u64,
    /// Handlers that panicked.
    pub panicked: u64,
    /// Claimed but never started, released at shutdown (the attempt not counted).
    pub released: u64,
    /// Settles refused because the lease was lost.
    pub lease_lost: u64,
    /// Handed back by [`Outcome::PauseKey`] (the attempt not counted where the backend can).
    pub paused: u64,
}

/// The dead-letter reason of a delivery that cannot be decoded: the engine's own for stored
/// messages it cannot read, and [`Worker::events`]' for payloads that are not the handler's type.
pub const MALFORMED: &str = "malformed";

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

    /// A worker running `handler` for every delivery of `consumer`'s group read as an event
    /// (see [`Delivery::event`]): the handler gets the [`Event`] with its payload decoded into
    /// `T`, and the delivery (attempt, group, ...).
    ///
    /// A delivery that is not an event of `T` (an envelope header missing or malformed, or a
    /// payload that does not decode into `T`) never reaches the handler: it is dead-lettered at
    /// once with reason `malformed`, on its first attempt, since a retry would decode the same
    /// bytes the same way. The decode error is logged (warn) with the message id.
    ///
    /// ```no_run
    /// # async fn demo(pg: pgtide::PgBackend) -> pgtide::Result<()> {
    /// #[derive(serde::Deserialize)]
    /// struct OrderCreated { order: u64 }
    /// let consumer = pg.consumer("orders", "billing", "billing-1").await?;
    /// let worker = pgtide::Worker::events(consumer, |ev: pgtide::Event<OrderCreated>, _d| async move {
    ///     println!("{} v{}: order {}", ev.envelope.event_type, ev.envelope.schema_version, ev.data.order);
    ///     Ok::<_, String>(pgtide::Outcome::Ack)
    /// });
    /// # let _ = worker; Ok(()) }
    /// ```
    pub fn events<T, F, Fut, E>(consumer: C, handler: F) -> Worker<C>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Event<T>, Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Outcome, E>> + Send + 'static,
        E: Display + 'static,
    {
        let handler: BoxHandler = Arc::new(move |d: Delivery| match d.event::<T>() {
            Ok(event) => handler(event, d)
                .map(|r| r.map_err(|e| e.to_string()))
                .boxed(),
            Err(e) => {
                tracing::warn!(error = %e, message_id = %d.id(), "pgtide worker: not an event of the handler's type; dead-lettering it as malformed");
                futures_util::future::ready(Ok(Outcome::DeadLetter {
                    reason: MALFORMED.to_owned(),
                }))
                .boxed()
            }
        });
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

    /// Sets the most deliveries claimed per fetch (default: 16 × the concurrency; claims are
    /// sized by how fast handlers finish, see [`WorkerConfig::prefetch`]).
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

    /// Runs until `token` is cancelled, then shuts down gracefully: stops fetching, releases the
    /// claimed deliveries not started yet (attempt not counted), lets running handlers finish
    /// within the grace period, retries the deliveries of those that did not at once (attempt
    /// counted), and flushes pending settles. Returns the counts.
    ///
    /// Errors while fetching or settling are logged and retried with backoff; `run` itself fails
    /// only if the group disappears.
    ///
    /// The worker holds a consumer, not the backend (which other consumers may share), so it
    /// does not close the backend: once `run` returns, call [`crate::Queue::close`] on the
    /// backend before the process exits, or the last settles may not reach a broker.
    pub async fn run(self, token: CancellationToken) -> Result<WorkerReport> {
        run::Run::new(self).await.run(token).await
    }
}
