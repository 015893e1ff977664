//! The background services of one [`PgBackend`](crate::PgBackend) and their one owner.
//!
//! | service | job | runs |
//! |---|---|---|
//! | notifier | coalesces pokes from the pool's publishes into few NOTIFYs (opt-in: a publish alone in flight notifies in its own transaction instead) | on first publish/settle that wakes someone, or with the scout |
//! | listener | one LISTEN connection per handle, fanned out on the wake bus | with the scout, when notifications are on |
//! | registrar | registers the streams whose local fetches wait, so SQL publishes notify only those | with the listener |
//! | elector | the scout lease: acquire, renew, step down, resign | on the first wait of a consumer, or `start_scout()` |
//! | due-waker | wakes streams whose delayed work or expired leases came due | with the elector, acts only while elected |
//! | maintainer | `maintain()` every maintenance interval | with the elector, acts only while elected |
//! | vacuumer | `VACUUM` of the hot tables that need it and autovacuum leaves alone, checked every vacuum interval | with the elector unless turned off, acts only while elected |
//!
//! Every service is started in one place, [`Background::ensure`], the first time the handle
//! needs it (a handle built outside a runtime, or one that only runs migrations, starts
//! nothing). Every task runs under one supervisor ([`Background::spawn`]) on one
//! [`TaskTracker`]: a task that returns an error or panics is logged, its failure recorded in
//! [`ListenerStatus`] or [`ScoutStatus`], and it is restarted with backoff; nothing dies
//! silently. One [`CancellationToken`] stops them all; [`Background::shutdown`] waits for them and
//! makes sure the scout lease is given back.
//!
//! State that must survive a restart (pending notifications, the lease held) lives in
//! [`Shared`], outside the tasks. Tasks never hold the handle itself, so dropping the last handle
//! cancels them.

mod due_waker;
mod elector;
mod listener;
mod maintainer;
mod notifier;
mod registrar;
mod vacuumer;
pub(crate) mod wake;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use deadpool_postgres::Pool;

use super::statements::Statements;
use futures_util::FutureExt;
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use elector::ScoutConfig;
pub use elector::ScoutStatus;
pub use listener::ListenerStatus;
pub(crate) use wake::Wake;

use notifier::Notifier;

/// What the tasks share with each other and with the handle.
pub(crate) struct Shared {
    pool: Pool,
    /// The namespace's rendered statements.
    sql: Arc<Statements>,
    namespace: String,
    /// `pgtide.<ns>`: the one notification channel of the namespace.
    channel: String,
    /// Connection settings for the listener (without the pool's `pgtide.notify = off`).
    listen_config: tokio_postgres::Config,
    /// The TLS connector of the listener connection.
    tls: super::connect::Tls,
    scout: ScoutConfig,
    /// This process's scout candidate id.
    holder: String,
    /// The wake bus: listener → local consumers, elector and due-waker.
    bus: broadcast::Sender<Wake>,
    notifier: Notifier,
    listener: watch::Sender<ListenerStatus>,
    /// How many LISTEN sessions connected: every one after the first is a reconnect.
    listener_sessions: AtomicU64,
    /// The backend pid of the LISTEN session, 0 while there is none.
    listener_pid: AtomicI32,
    /// The streams this process's fetches wait on (see [`registrar`]).
    registry: registrar::Registry,
    scout_status: watch::Sender<ScoutStatus>,
    /// The term this process leads under; the due-waker, the maintainer and the vacuumer act
    /// only while set.
    elected: watch::Sender<Option<i64>>,
    lease: Mutex<elector::LeaseState>,
    /// Fetches blocked waiting for a wake-up (see [`Background::waiting`]).
    waiting: watch::Sender<usize>,
}

/// The services, as bits of [`Background::ensure`]'s argument.
pub(crate) mod services {
    /// The coalescing notifier.
    pub const NOTIFIER: u8 = 1;
    /// The LISTEN connection.
    pub const LISTENER: u8 = 2;
    /// The scout: elector, due-waker, maintainer and vacuumer.
    pub const SCOUT: u8 = 4;
}

/// One supervised task, for logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Notifier,
    Listener,
    Registrar,
    Elector,
    DueWaker,
    Maintainer,
    Vacuumer,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Notifier => "notifier",
            Service::Listener => "listener",
            Service::Registrar => "registrar",
            Service::Elector => "scout elector",
            Service::DueWaker => "scout due-waker",
            Service::Maintainer => "scout maintainer",
            Service::Vacuumer => "scout vacuumer",
        }
    }

    /// First and largest restart delay. The elector's stays well inside the lease TTL so that
    /// a restarted elector renews before the lease runs out.
    fn backoff(self, scout: &ScoutConfig) -> (Duration, Duration) {
        match self {
            Service::Notifier => (Duration::from_millis(20), Duration::from_secs(2)),
            Service::Listener | Service::Registrar => {
                (Duration::from_millis(50), Duration::from_secs(5))
            }
            Service::Elector => {
                let max = (scout.ttl / 6).max(Duration::from_millis(50));
                (Duration::from_millis(50).min(max), max)
            }
            Service::DueWaker => (Duration::from_millis(100), Duration::from_secs(5)),
            Service::Maintainer => {
                let every = scout.maintenance_interval.min(Duration::from_secs(30));
                (every, every)
            }
            Service::Vacuumer => {
                let every = scout.vacuum.interval.min(Duration::from_secs(30));
                (every, every)
            }
        }
    }
}

/// The owner of the background tasks of one handle.
pub(crate) struct Background {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    token: CancellationToken,
    /// Bits of [`services`] already started; read on every publish, so an atomic.
    started: AtomicU8,
    /// Serializes the slow path of [`Background::ensure`].
    starting: Mutex<()>,
    /// For [`Background::abort`]: the tracker can wait for tasks but not abort them.
    handles: Mutex<Vec<AbortHandle>>,
}

/// Settings of the background services, from the builder.
pub(crate) struct Settings {
    pub pool: Pool,
    pub sql: Arc<Statements>,
    pub namespace: String,
    pub listen_config: tokio_postgres::Config,
    /// The TLS connector the listener connects with (the pool's).
    pub tls: super::connect::Tls,
    pub scout: ScoutConfig,
}

impl Background {
    pub(crate) fn new(settings: Settings) -> Background {
        let holder = format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "pgtide".to_owned()),
            uuid::Uuid::now_v7().simple()
        );
        Background {
            shared: Arc::new(Shared {
                pool: settings.pool,
                sql: settings.sql,
                channel: wake::channel(&settings.namespace),
                namespace: settings.namespace,
                listen_config: settings.listen_config,
                tls: settings.tls,
                scout: settings.scout,
                holder,
                bus: broadcast::channel(1024).0,
                notifier: Notifier::default(),
                listener: watch::Sender::new(ListenerStatus::default()),
                listener_sessions: AtomicU64::new(0),
                listener_pid: AtomicI32::new(0),
                registry: registrar::Registry::default(),
                scout_status: watch::Sender::new(ScoutStatus::default()),
                elected: watch::Sender::new(None),
                lease: Mutex::default(),
                waiting: watch::Sender::new(0),
            }),
            tracker: TaskTracker::new(),
            token: CancellationToken::new(),
            started: AtomicU8::new(0),
            starting: Mutex::new(()),
            handles: Mutex::new(vec![]),
        }
    }

    /// Starts the services in `wanted` (bits of [`services`]) that are not running yet. Cheap
    /// when they are: one atomic load. Does nothing once stopped. Needs a tokio runtime.
    pub(crate) fn ensure(&self, wanted: u8) {
        if self.started.load(Ordering::Acquire) & wanted == wanted {
            return;
        }
        let _starting = lock(&self.starting);
        let started = self.started.load(Ordering::Acquire);
        let missing = wanted & !started;
        if missing == 0 || self.token.is_cancelled() {
            return;
        }
        if missing & services::NOTIFIER != 0 {
            self.spawn(Service::Notifier, notifier::run);
        }
        if missing & services::LISTENER != 0 {
            self.spawn(Service::Listener, listener::run);
            self.spawn(Service::Registrar, registrar::run);
        }
        if missing & services::SCOUT != 0 {
            let holder = self.shared.holder.clone();
            self.shared
                .scout_status
                .send_modify(|s| s.holder_id = holder);
            self.spawn(Service::Elector, elector::run);
            self.spawn(Service::DueWaker, due_waker::run);
            self.spawn(Service::Maintainer, maintainer::run);
            if self.shared.scout.vacuum.enabled {
                self.spawn(Service::Vacuumer, vacuumer::run);
            }
        }
        self.started.store(started | missing, Ordering::Release);
    }

    /// Whether the services were stopped ([`Background::shutdown`], [`Background::abort`] or
    /// the last handle dropped).
    pub(crate) fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Spawns `task` under supervision: it runs until it returns after cancellation; an error,
    /// a panic or an early return is logged, recorded and followed by a restart with backoff.
    fn spawn<F, Fut>(&self, service: Service, task: F)
    where
        F: Fn(Arc<Shared>, CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = crate::Result<()>> + Send + 'static,
    {
        let shared = self.shared.clone();
        let token = self.token.clone();
        let handle = self.tracker.spawn(async move {
            let (first, max) = service.backoff(&shared.scout);
            let mut delay = first;
            loop {
                let started = Instant::now();
                let outcome = AssertUnwindSafe(task(shared.clone(), token.clone()))
                    .catch_unwind()
                    .await;
                if token.is_cancelled() {
                    if let Ok(Err(e)) = outcome {
                        tracing::debug!(service = service.name(), error = %e, "pgtide background task failed while stopping");
                    }
                    break;
                }
                let error = match outcome {
                    Ok(Ok(())) => "the task ended on its own".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
                };
                // A task that ran for a while before failing restarts quickly again.
                if started.elapsed() > max {
                    delay = first;
                }
                tracing::warn!(
                    service = service.name(),
                    namespace = %shared.namespace,
                    error,
                    restart_in = ?delay,
                    "pgtide background task failed; restarting"
                );
                shared.record_failure(service, error);
                tokio::select! {
                    biased;
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(max);
            }
        });
        let mut handles = lock(&self.handles);
        handles.retain(|h| !h.is_finished());
        handles.push(handle.abort_handle());
    }

    /// Stops every task gracefully and waits for them: the scout resigns (another process
    /// takes over at once), pending notifications are flushed, the listener disconnects.
    pub(crate) async fn shutdown(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        // The elector resigns when it stops; this covers one stopped while waiting to restart.
        elector::resign_if_held(&self.shared).await;
        if self.started.load(Ordering::Acquire) & services::LISTENER != 0 {
            registrar::release_all(&self.shared).await;
        }
    }

    /// Stops every task at once, as a crash would: no resign, no flush.
    pub(crate) fn abort(&self) {
        self.token.cancel();
        self.tracker.close();
        for h in lock(&self.handles).drain(..) {
            h.abort();
        }
        elector::step_down_quietly(&self.shared);
    }

    /// Number of background tasks still running.
    pub(crate) fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Publishes a wake-up to other processes through the notifier.
    pub(crate) fn poke(&self, wake: Wake) {
        self.shared.notifier.poke(wake);
    }

    /// Counts one publish in flight until the guard is dropped; see [`notifier`].
    pub(crate) fn publishing(&self) -> notifier::Publishing<'_> {
        self.shared.notifier.publishing()
    }

    /// The namespace's notification channel, `pgtide.<ns>`.
    pub(crate) fn channel(&self) -> &str {
        &self.shared.channel
    }

    /// A receiver of the wake bus.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.shared.bus.subscribe()
    }

    pub(crate) fn listener(&self) -> watch::Receiver<ListenerStatus> {
        self.shared.listener.subscribe()
    }

    pub(crate) fn scout(&self) -> watch::Receiver<ScoutStatus> {
        self.shared.scout_status.subscribe()
    }

    /// Counts one fetch as blocked waiting for a wake-up until the guard is dropped.
    pub(crate) fn waiting(&self) -> Waiting {
        self.shared.waiting.send_modify(|n| *n += 1);
        Waiting(self.shared.clone())
    }

    pub(crate) fn watch_waiting(&self) -> watch::Receiver<usize> {
        self.shared.waiting.subscribe()
    }

    /// A fetch of `stream` found nothing and is about to wait: makes sure SQL publishes to the
    /// stream notify (see [`registrar`]).
    pub(crate) fn before_wait(&self, stream: &str) {
        self.shared.registry.before_wait(stream);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// One fetch waiting for a wake-up; see [`Background::waiting`]. Dropping it (the wait ended or
/// the fetch was cancelled) takes it off the count.
pub(crate) struct Waiting(Arc<Shared>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Shared {
    fn record_failure(&self, service: Service, error: String) {
        match service {
            Service::Listener => self.listener.send_modify(|s| {
                s.connected = false;
                s.restarts += 1;
                s.last_error = Some(error);
            }),
            Service::Elector | Service::DueWaker | Service::Maintainer | Service::Vacuumer => {
                self.scout_status.send_modify(|s| {
                    s.restarts += 1;
                    s.last_error = Some(format!("{}: {error}", service.name()));
                })
            }
            // Without the registrar, SQL publishes skip their NOTIFY and only the fallback
            // poller wakes the waiting fetches for them: shown with the listener's status.
            Service::Registrar => self.listener.send_modify(|s| {
                s.last_error = Some(format!("registrar: {error}"));
            }),
            // No status of its own: its NOTIFYs stand in for the trigger's, and the fallback
            // poller covers a lasting outage. The warning above is the record.
            Service::Notifier => {}
        }
    }
}

/// Waits until this process leads under some term; `None` once `token` is cancelled.
async fn wait_elected(
    elected: &mut watch::Receiver<Option<i64>>,
    token: &CancellationToken,
) -> Option<i64> {
    tokio::select! {
        biased;
        _ = token.cancelled() => None,
        term = elected.wait_for(Option::is_some) => term.ok().and_then(|t| *t),
    }
}

/// What ended a leader's sleep ([`sleep_elected`]).
enum Slept {
    /// The time came and this process still leads under the same term.
    StillElected,
    /// The term ended (stepped down, or another term began): wait to be elected again.
    TermEnded,
    /// Cancelled, or the elector is gone: stop.
    Stop,
}

/// Sleeps until `until` while this process leads under `term` (the maintainer's and the
/// vacuumer's cadence).
async fn sleep_elected(
    elected: &mut watch::Receiver<Option<i64>>,
    term: i64,
    until: tokio::time::Instant,
    token: &CancellationToken,
) -> Slept {
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return Slept::Stop,
            changed = elected.changed() => {
                if changed.is_err() {
                    return Slept::Stop;
                }
                if *elected.borrow_and_update() != Some(term) {
                    return Slept::TermEnded;
                }
            }
            _ = tokio::time::sleep_until(until) => return Slept::StillElected,
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain counters and sets).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests;
