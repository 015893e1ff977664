//! The registrar: tells SQL publishers which streams this process's consumers wait on, so that
//! a publish nobody waits for sends no NOTIFY (issue 11, goal 6; protocol in
//! `sql/functions/wakeups.sql` above `_notify_inserted`).
//!
//! A fetch that found nothing and is about to wait checks that a registration of its stream is
//! in force ([`Registry::before_wait`]). If not, it asks for one and waits as usual; the registrar task writes the row and waits out the
//! publishers that may have missed it (`_wake_register`), then wakes the stream's local fetches,
//! which claim again. When the listener hears a second notification for a stream before any of
//! its fetches went idle again, publishers are outrunning the consumers: the registration is
//! taken back ([`Registry::heard`]), so a burst is notified about once per idle spell of the
//! consumers rather than once per publish. A trickle (one notification, the fetch idle again)
//! keeps its registration and costs no extra statement. Reconnecting the listener
//! voids every registration (a crash empties the unlogged table, and the rows name the old LISTEN
//! session).
//!
//! Only SQL publishes (the INSERT trigger) consult the registrations; the engine's own
//! publishes notify through the coalescing notifier as before.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{lock, Shared, Wake};
use crate::postgres::micros;

/// How long one registration waits for publishing transactions that may have missed its row.
const WAIT_OUT: Duration = Duration::from_millis(100);
/// When a wait-out timed out (a long publishing transaction), how soon it is tried again.
const RETRY: Duration = Duration::from_millis(100);
/// Notifications heard for a stream, with none of its fetches going idle in between, that take
/// its registration back.
const RELEASE_AFTER: u32 = 2;
/// How long [`release_all`] may take at shutdown.
const RELEASE_ALL: Duration = Duration::from_secs(2);

/// What the registrar does next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Register(Arc<str>),
    Release(Arc<str>),
}

/// This process's registrations and the registrar's queue.
#[derive(Default)]
pub(crate) struct Registry {
    state: Mutex<State>,
    work: Notify,
}

#[derive(Default)]
struct State {
    /// Streams whose registration is in force.
    in_force: HashSet<Arc<str>>,
    /// Notifications heard per stream since one of its fetches last went idle.
    heard: HashMap<Arc<str>, u32>,
    /// Streams whose registration was asked for and is not in force yet.
    pending: HashSet<Arc<str>>,
    ops: VecDeque<Op>,
    /// Registrations waiting to try their wait-out again.
    retries: Vec<(Instant, Arc<str>)>,
    /// Grows with every LISTEN session: a registration made for an earlier one is void.
    session: u64,
}

impl Registry {
    /// Called by a fetch that found nothing and is about to wait. Without a registration of its
    /// stream in force, one is asked for (once per stream, however many fetches ask), and the
    /// registrar wakes the stream's fetches when it is in force. Returns whether one was asked
    /// for.
    ///
    /// A registration in force now covers the fetch's claim: either it was in force when the
    /// claim began, or it came into force later and woke the stream's fetches on the bus, which
    /// this fetch subscribed to before claiming, so it claims again at once. Likewise a
    /// registration taken back since then ([`Registry::heard`]) woke it.
    pub(crate) fn before_wait(&self, stream: &str) -> bool {
        let mut state = lock(&self.state);
        if let Some(heard) = state.heard.get_mut(stream) {
            *heard = 0;
        }
        if state.in_force.contains(stream) || state.pending.contains(stream) {
            return false;
        }
        let stream: Arc<str> = Arc::from(stream);
        state.pending.insert(stream.clone());
        state.ops.push_back(Op::Register(stream));
        drop(state);
        self.work.notify_one();
        true
    }

    /// The listener heard a notification for `stream`: wakes its local fetches on `bus` and, at
    /// the second one heard before any of them went idle again, takes the registration back.
    /// Both under the registry's lock, so a fetch that looks afterwards finds none and asks anew,
    /// and one that looked before is woken.
    pub(super) fn heard(&self, stream: Arc<str>, bus: &tokio::sync::broadcast::Sender<Wake>) {
        let mut state = lock(&self.state);
        let _ = bus.send(Wake::Stream(stream.clone()));
        if !state.in_force.contains(&stream) {
            return;
        }
        let heard = state.heard.entry(stream.clone()).or_insert(0);
        *heard += 1;
        if *heard < RELEASE_AFTER {
            return;
        }
        state.heard.remove(&stream);
        if state.in_force.remove(&stream) {
            state.ops.push_back(Op::Release(stream));
            drop(state);
            self.work.notify_one();
        }
    }

    /// A new LISTEN session: every registration is void (and the session's catch-up wake-up
    /// makes every fetch claim again and ask anew).
    pub(super) fn reconnected(&self) {
        let mut state = lock(&self.state);
        state.session += 1;
        state.in_force.clear();
        state.heard.clear();
        state.pending.clear();
        state.retries.clear();
        state.ops.retain(|op| matches!(op, Op::Release(_)));
    }

    /// Streams with a registration in force (for tests and status).
    #[cfg(test)]
    pub(crate) fn in_force(&self) -> Vec<Arc<str>> {
        lock(&self.state).in_force.iter().cloned().collect()
    }

    /// The next op to run, or when to look again.
    fn next(&self) -> Result<(Op, u64), Option<Instant>> {
        let mut state = lock(&self.state);
        let now = Instant::now();
        if let Some(i) = state.retries.iter().position(|(at, _)| *at <= now) {
            let (_, stream) = state.retries.swap_remove(i);
            let session = state.session;
            return Ok((Op::Register(stream), session));
        }
        match state.ops.pop_front() {
            Some(op) => Ok((op, state.session)),
            None => Err(state.retries.iter().map(|(at, _)| *at).min()),
        }
    }

    /// Puts `op` back at the head of the queue (the registrar failed and will be restarted).
    fn requeue(&self, op: Op) {
        lock(&self.state).ops.push_front(op);
        self.work.notify_one();
    }

    /// A registration of `stream` made for LISTEN session `session` is in force: wakes the
    /// stream's fetches so that they claim again.
    fn in_force_now(
        &self,
        stream: Arc<str>,
        session: u64,
        bus: &tokio::sync::broadcast::Sender<Wake>,
    ) {
        let mut state = lock(&self.state);
        if state.session != session || !state.pending.remove(&stream) {
            return;
        }
        state.in_force.insert(stream.clone());
        let _ = bus.send(Wake::Stream(stream));
    }

    /// The wait-out of `stream` timed out: try again after [`RETRY`].
    fn retry(&self, stream: Arc<str>, session: u64) {
        let mut state = lock(&self.state);
        if state.session == session && state.pending.contains(&stream) {
            state.retries.push((Instant::now() + RETRY, stream));
        }
    }

    /// No registration of `stream` will be made (no such stream, or no LISTEN session).
    fn give_up(&self, stream: &str) {
        lock(&self.state).pending.remove(stream);
    }

    /// Whether `stream` is registered or about to be (a release must then keep the row).
    fn wanted(&self, stream: &str) -> bool {
        let state = lock(&self.state);
        state.in_force.contains(stream) || state.pending.contains(stream)
    }
}

/// The registrar task: runs the queued registrations and releases, one at a time, on pooled
/// connections. Returns `Ok` only when cancelled; an error puts the op back and ends the run (the
/// supervisor restarts it with backoff).
pub(super) async fn run(shared: Arc<Shared>, token: CancellationToken) -> crate::Result<()> {
    let registry = &shared.registry;
    loop {
        let (op, session) = match registry.next() {
            Ok(next) => next,
            Err(retry_at) => {
                let sleep = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = token.cancelled() => return Ok(()),
                    _ = registry.work.notified() => {}
                    _ = sleep => {}
                }
                continue;
            }
        };
        if let Err(e) = run_op(&shared, &op, session).await {
            registry.requeue(op);
            return Err(e);
        }
    }
}

async fn run_op(shared: &Shared, op: &Op, session: u64) -> crate::Result<()> {
    let registry = &shared.registry;
    match op {
        Op::Register(stream) => {
            let pid = shared.listener_pid.load(Ordering::Acquire);
            if pid == 0 {
                // No LISTEN session: nothing would be heard. Its reconnect wakes every fetch.
                registry.give_up(stream);
                return Ok(());
            }
            let client = shared.pool.get().await?;
            let row = shared
                .sql
                .wake_register
                .one(
                    &client,
                    &[&&**stream, &shared.holder, &pid, &micros(WAIT_OUT)],
                )
                .await?;
            match row.try_get::<_, Option<bool>>(0)? {
                Some(true) => registry.in_force_now(stream.clone(), session, &shared.bus),
                Some(false) => registry.retry(stream.clone(), session),
                None => registry.give_up(stream),
            }
        }
        Op::Release(stream) => {
            if registry.wanted(stream) {
                return Ok(());
            }
            let client = shared.pool.get().await?;
            shared
                .sql
                .wake_release
                .execute(&client, &[&Some(vec![&**stream]), &shared.holder])
                .await?;
        }
    }
    Ok(())
}

/// Takes back every registration of this process (at shutdown), within [`RELEASE_ALL`]. Rows
/// left behind by a failure are only a cost: `maintain()` removes them once the LISTEN session
/// is gone.
pub(super) async fn release_all(shared: &Shared) {
    let release = async {
        let client = shared.pool.get().await?;
        shared
            .sql
            .wake_release
            .execute(&client, &[&None::<Vec<&str>>, &shared.holder])
            .await?;
        Ok::<_, crate::Error>(())
    };
    match tokio::time::timeout(RELEASE_ALL, release).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "pgtide registrar: could not release the registrations")
        }
        Err(_) => tracing::debug!("pgtide registrar: releasing the registrations timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (
        tokio::sync::broadcast::Sender<Wake>,
        tokio::sync::broadcast::Receiver<Wake>,
    ) {
        tokio::sync::broadcast::channel(16)
    }

    #[test]
    fn one_registration_per_stream_and_taken_back_when_heard() {
        let registry = Registry::default();
        let (tx, mut rx) = bus();
        assert!(registry.before_wait("s"));
        assert!(!registry.before_wait("s"), "already asked for");
        assert!(registry.before_wait("t"));
        let (op, session) = registry.next().unwrap();
        assert_eq!(op, Op::Register("s".into()));
        registry.in_force_now("s".into(), session, &tx);
        assert_eq!(rx.try_recv().unwrap(), Wake::Stream("s".into()));
        assert_eq!(registry.in_force(), vec![Arc::<str>::from("s")]);
        assert!(!registry.before_wait("s"), "in force");

        // Heard once, then a fetch went idle again: a trickle keeps its registration.
        registry.heard("s".into(), &tx);
        assert_eq!(rx.try_recv().unwrap(), Wake::Stream("s".into()));
        assert!(!registry.before_wait("s"));
        registry.heard("s".into(), &tx);
        assert_eq!(rx.try_recv().unwrap(), Wake::Stream("s".into()));
        assert_eq!(registry.in_force(), vec![Arc::<str>::from("s")]);
        // Heard a second time with no fetch idle in between (a burst): the local fetches are
        // woken, the registration is void and taken back.
        registry.heard("s".into(), &tx);
        assert_eq!(rx.try_recv().unwrap(), Wake::Stream("s".into()));
        assert!(registry.in_force().is_empty());
        assert_eq!(registry.next().unwrap().0, Op::Register("t".into()));
        assert_eq!(registry.next().unwrap().0, Op::Release("s".into()));
        assert!(!registry.wanted("s"));
        // Asked for again before the release ran: the release keeps the row.
        assert!(registry.before_wait("s"));
        assert!(registry.wanted("s"));

        // A stream nobody registered is only woken.
        registry.heard("u".into(), &tx);
        assert_eq!(rx.try_recv().unwrap(), Wake::Stream("u".into()));
    }

    #[test]
    fn a_new_listen_session_voids_every_registration() {
        let registry = Registry::default();
        let (tx, mut rx) = bus();
        registry.before_wait("s");
        let (_, old) = registry.next().unwrap();
        registry.before_wait("t");
        registry.reconnected();
        // Made for the old session: not in force, nobody woken by it.
        registry.in_force_now("s".into(), old, &tx);
        assert!(registry.in_force().is_empty());
        assert!(rx.try_recv().is_err());
        assert!(registry.next().is_err(), "the queued registration went");
        // Asked for anew, made for the new session.
        assert!(registry.before_wait("s"));
        let (_, session) = registry.next().unwrap();
        registry.in_force_now("s".into(), session, &tx);
        assert_eq!(registry.in_force(), vec![Arc::<str>::from("s")]);
    }

    #[test]
    fn a_timed_out_wait_is_tried_again() {
        let registry = Registry::default();
        registry.before_wait("s");
        let (_, session) = registry.next().unwrap();
        registry.retry("s".into(), session);
        match registry.next() {
            Err(Some(at)) => assert!(at > Instant::now()),
            other => panic!("expected a retry later, got {other:?}"),
        }
        lock(&registry.state).retries[0].0 = Instant::now();
        assert_eq!(registry.next().unwrap().0, Op::Register("s".into()));
    }
}
