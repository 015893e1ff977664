//! The coalescing notifier: publishes made by the engine's own pool do not fire the NOTIFY
//! trigger (`pgtide.notify = off` on those connections); instead they poke the notifier, which
//! sends one `pg_notify` per stream for everything poked while its previous NOTIFY was in flight.
//! Coalescing costs no fixed delay: at low rates every publish is notified at once.
//!
//! Pending payloads live in the [`Notifier`], outside the task, so a restarted task loses none.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{lock, Shared, Wake};

/// Least time between two NOTIFYs of the coalescing notifier.
const NOTIFY_GAP: Duration = Duration::from_millis(1);

/// Coalesces wake-ups into few NOTIFY statements.
#[derive(Default)]
pub(crate) struct Notifier {
    pending: Mutex<BTreeSet<String>>,
    ready: Notify,
}

impl Notifier {
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
