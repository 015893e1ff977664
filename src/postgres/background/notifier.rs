//! The coalescing notifier: publishes made by the engine's own pool do not fire the NOTIFY
//! trigger (`pgtide.notify = off` on those connections); instead they poke the notifier, which
//! sends one `pg_notify` per stream for everything poked while its previous NOTIFY was in flight,
//! so publishers never queue on PostgreSQL's notify lock and a busy stream costs listeners far
//! fewer than one NOTIFY per publish. Coalescing costs no fixed delay: at low rates every poke is
//! sent at once.
//!
//! A publish that is the only one of this process in flight, and finds no other in-transaction
//! notifier committing (an advisory key taken without waiting), may send its NOTIFY **in its own
//! transaction** (`sql/publish_wake.sql`) and poke nobody. That saves the notifier's transaction
//! (a second round trip, and a wait for PostgreSQL's notify lock behind other commits: the
//! largest part of an idle consumer's wake-up tail under load, docs/performance.md "Idle
//! wake-up tail") but gives up coalescing: measured 0.27–0.88× the coalescing notifier for one
//! publisher publishing back to back with a listener connected (every publish then wakes every
//! listener), 0.97–1.33× at 16. So by default only a *quiet* publish notifies in its
//! transaction: one that starts at least [`QUIET`] after this process's previous publish ended,
//! when coalescing has nothing to gather anyway (at 500 publishes a second from one task the
//! NOTIFY then arrives with the commit, a round trip earlier: docs/performance.md).
//! `notify_in_transaction` (hidden, for the benches) makes every publish alone in flight do it.
//!
//! Pending payloads live in the [`Notifier`], outside the task, so a restarted task loses none.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{lock, Shared, Wake};

/// Least time between two NOTIFYs of the coalescing notifier.
const NOTIFY_GAP: Duration = Duration::from_millis(1);

/// How long after this process's previous publish ended a publish counts as quiet: it may
/// notify in its own transaction by default. Publishers that follow each other closer than this
/// coalesce. It is [`NOTIFY_GAP`]: a publish that starts this long after the previous one ended
/// would get a NOTIFY of its own from the coalescing notifier too, one round trip later.
pub(crate) const QUIET: Duration = NOTIFY_GAP;

/// Coalesces wake-ups into few NOTIFY statements, and counts the publishes in flight that decide
/// between notifying in the transaction and coalescing.
#[derive(Default)]
pub(crate) struct Notifier {
    pending: Mutex<BTreeSet<String>>,
    ready: Notify,
    /// Publishes of this process between their start and their commit.
    publishing: AtomicUsize,
    /// When the last publish of this process ended (None: none yet).
    last_end: Mutex<Option<Instant>>,
}

/// One publish in flight (see [`Notifier::publishing`]); dropping it, however the publish ends,
/// takes it off the count.
pub(crate) struct Publishing<'a> {
    notifier: &'a Notifier,
    alone: bool,
    quiet: bool,
}

impl Publishing<'_> {
    /// Whether no other publish of this process was in flight when this one started: then it
    /// may notify inside its own transaction.
    pub(crate) fn alone(&self) -> bool {
        self.alone
    }

    /// Whether this publish is alone and started at least [`QUIET`] after the previous one
    /// ended: then it notifies inside its own transaction by default.
    pub(crate) fn quiet(&self) -> bool {
        self.alone && self.quiet
    }
}

impl Drop for Publishing<'_> {
    fn drop(&mut self) {
        *lock(&self.notifier.last_end) = Some(Instant::now());
        self.notifier.publishing.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Notifier {
    /// Counts one publish in flight until the guard is dropped.
    pub(crate) fn publishing(&self) -> Publishing<'_> {
        let before = self.publishing.fetch_add(1, Ordering::Relaxed);
        let quiet = match *lock(&self.last_end) {
            Some(end) => end.elapsed() >= QUIET,
            None => true,
        };
        Publishing {
            notifier: self,
            alone: before == 0,
            quiet,
        }
    }

    pub(crate) fn poke(&self, wake: Wake) {
        if wake == Wake::All {
            return;
        }
        lock(&self.pending).insert(wake.payload());
        self.ready.notify_one();
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.pending))
            .into_iter()
            .collect()
    }

    fn busy(&self) -> bool {
        !lock(&self.pending).is_empty()
    }
}

/// Sends pending notifications until `token` is cancelled, then flushes what is left. Failed
/// NOTIFYs are kept and retried here (the fallback poller covers a lasting outage), so this
/// returns only on cancellation.
pub(super) async fn run(shared: Arc<Shared>, token: CancellationToken) -> crate::Result<()> {
    let notifier = &shared.notifier;
    let mut backoff = Duration::from_millis(20);
    loop {
        let cancelled = tokio::select! {
            biased;
            _ = token.cancelled() => true,
            _ = notifier.ready.notified() => false,
        };
        let batch = notifier.take();
        if !batch.is_empty() {
            match send(&shared, &batch).await {
                Ok(()) => {
                    backoff = Duration::from_millis(20);
                    // Under load (more pokes arrived while this NOTIFY was in flight), gather
                    // for a moment before the next: each NOTIFY takes the database-wide notify
                    // lock and wakes every listener. At light rates it adds no delay.
                    if notifier.busy() && !cancelled {
                        tokio::select! {
                            biased;
                            _ = token.cancelled() => {}
                            _ = tokio::time::sleep(NOTIFY_GAP) => {}
                        }
                    }
                }
                Err(e) => {
                    // Keep them for the next round; the fallback poller covers a lasting outage.
                    tracing::warn!(error = %e, "pgtide notifier failed; retrying");
                    lock(&notifier.pending).extend(batch);
                    if notifier.busy() && !cancelled {
                        tokio::select! {
                            biased;
                            _ = token.cancelled() => {}
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        notifier.ready.notify_one();
                    }
                }
            }
        }
        if cancelled {
            return Ok(());
        }
    }
}

async fn send(shared: &Shared, payloads: &[String]) -> crate::Result<()> {
    let client = shared.pool.get().await?;
    // `sql/notify.sql`: does not wait for the commit record's flush.
    shared
        .sql
        .notify
        .rows(&client, &[&shared.channel, &payloads])
        .await?;
    Ok(())
}
