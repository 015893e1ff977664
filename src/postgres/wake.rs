//! Wake-ups: the process-wide listener, the coalescing notifier, and the wake bus that fans
//! notifications out to local consumers and the scout.
//!
//! One dedicated connection per [`PgBackend`] (outside the pool) LISTENs on `pgtide.<ns>`. It
//! reconnects with backoff, re-LISTENs, and after every reconnect broadcasts [`Wake::All`] so each
//! local consumer runs a catch-up fetch. Publishes made by the engine's own pool do not fire the
//! NOTIFY trigger (`pgtide.notify = off` on those connections); instead they poke the notifier,
//! which sends one `pg_notify` per stream for everything poked while its previous NOTIFY was in
//! flight. Coalescing costs no fixed delay: at low rates every publish is notified at once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::sync::{broadcast, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// What a notification means to local listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wake {
    /// New ready work on this stream.
    Stream(Arc<str>),
    /// A delivery comes due at this time (epoch ms), or 0: recompute.
    Due(i64),
    /// The scout resigned: candidates should try to take over now.
    ScoutResigned,
    /// Anything may have changed (after a reconnect or a lagging receiver): fetch to catch up.
    All,
}

impl Wake {
    fn parse(payload: &str) -> Wake {
        if payload == "!scout" {
            Wake::ScoutResigned
        } else if let Some(ms) = payload.strip_prefix('@') {
            Wake::Due(ms.parse().unwrap_or(0))
        } else {
            Wake::Stream(Arc::from(payload))
        }
    }

    fn payload(&self) -> String {
        match self {
            Wake::Stream(s) => s.to_string(),
            Wake::Due(ms) => format!("@{ms}"),
            Wake::ScoutResigned => "!scout".to_owned(),
            Wake::All => String::new(),
        }
    }
}

/// State of the process-wide listener connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerStatus {
    /// Whether the LISTEN connection is up.
    pub connected: bool,
    /// When the last notification arrived.
    pub last_notification_at: Option<DateTime<Utc>>,
    /// How many times the connection was re-established.
    pub reconnects: u64,
}

pub(crate) fn channel(namespace: &str) -> String {
    format!("pgtide.{namespace}")
}

/// Runs the listener until `token` is cancelled.
pub(crate) async fn run_listener(
    config: tokio_postgres::Config,
    channel: String,
    bus: broadcast::Sender<Wake>,
    status: Arc<Mutex<ListenerStatus>>,
    token: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        let session = listen_once(&config, &channel, &bus, &status, &token, first);
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            result = session => {
                if let Ok(mut s) = status.lock() {
                    s.connected = false;
                }
                match result {
                    Ok(()) => backoff = Duration::from_millis(50),
                    Err(e) => tracing::warn!(error = %e, channel, "pgtide listener connection failed; reconnecting"),
                }
            }
        }
        first = false;
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    bus: &broadcast::Sender<Wake>,
    status: &Arc<Mutex<ListenerStatus>>,
    token: &CancellationToken,
    first: bool,
) -> Result<(), tokio_postgres::Error> {
    let mut config = config.clone();
    config.application_name("pgtide-listener");
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled while LISTEN runs, so it is driven by a task of its own that
    // forwards notifications and ends when the socket closes.
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "pgtide listener connection error");
                    break;
                }
            }
        }
    });
    let listen = client.batch_execute(&format!("LISTEN \"{channel}\"")).await;
    if let Err(e) = listen {
        driver.abort();
        return Err(e);
    }
    if let Ok(mut s) = status.lock() {
        s.connected = true;
        if !first {
            s.reconnects += 1;
        }
    }
    // Notifications sent while we were not listening are lost: every local consumer catches up.
    let _ = bus.send(Wake::All);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            payload = rx.recv() => match payload {
                Some(p) => {
                    if let Ok(mut s) = status.lock() {
                        s.last_notification_at = Some(Utc::now());
                    }
                    let _ = bus.send(Wake::parse(&p));
                }
                None => break,
            },
        }
    }
    drop(client);
    driver.abort();
    Ok(())
}

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
        if let Ok(mut p) = self.pending.lock() {
            p.insert(wake.payload());
        }
        self.ready.notify_one();
    }

    /// Sends pending notifications until `token` is cancelled, then flushes what is left.
    pub(crate) async fn run(
        self: Arc<Self>,
        pool: Pool,
        channel: String,
        token: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(20);
        loop {
            let cancelled = tokio::select! {
                biased;
                _ = token.cancelled() => true,
                _ = self.ready.notified() => false,
            };
            let batch: Vec<String> = match self.pending.lock() {
                Ok(mut p) => std::mem::take(&mut *p).into_iter().collect(),
                Err(_) => vec![],
            };
            if !batch.is_empty() {
                match send(&pool, &channel, &batch).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(20);
                        // Under load (more pokes arrived while this NOTIFY was in flight), gather
                        // for a moment before the next: each NOTIFY takes the database-wide notify
                        // lock and wakes every listener. At light rates it adds no delay.
                        let busy = self.pending.lock().map(|p| !p.is_empty()).unwrap_or(false);
                        if busy && !cancelled {
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
                        if let Ok(mut p) = self.pending.lock() {
                            p.extend(batch);
                        }
                        let busy = self.pending.lock().map(|p| !p.is_empty()).unwrap_or(false);
                        if busy && !cancelled {
                            tokio::select! {
                                biased;
                                _ = token.cancelled() => {}
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            self.ready.notify_one();
                        }
                    }
                }
            }
            if cancelled {
                break;
            }
        }
    }
}

async fn send(pool: &Pool, channel: &str, payloads: &[String]) -> crate::Result<()> {
    let client = pool.get().await?;
    let stmt = client
        // A NOTIFY-only transaction still writes a commit record: do not wait for its flush
        // (the publishes it announces are already durable; losing it in a crash loses nothing).
        .prepare_cached(
            "SELECT pg_notify($1, p) \
             FROM (SELECT set_config('synchronous_commit', 'off', true)) AS s, unnest($2::text[]) AS p",
        )
        .await?;
    client.execute(&stmt, &[&channel, &payloads]).await?;
    Ok(())
}
