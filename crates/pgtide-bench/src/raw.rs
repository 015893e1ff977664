//! Raw-PostgreSQL clients for the baselines: tokio-postgres directly, one connection per client,
//! prepared statements, no pool. Also a raw LISTEN connection, for the NOTIFY round-trip floor
//! and for counting the notifications a publish path sends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Statement};
use uuid::Uuid;

use super::PAYLOAD_BYTES;
use pgtide::Result;

pub(super) async fn connect(url: &str) -> Result<Client> {
    // The same URL rules and TLS as the engine: the baseline pays what pgtide pays to connect.
    let (client, connection) = pgtide::connect_raw(url).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "bench: raw connection ended with an error");
        }
    });
    Ok(client)
}

/// One raw-PostgreSQL client: a connection, its prepared statement and the statement's input.
pub(super) struct Raw<P> {
    pub client: Arc<Client>,
    pub stmt: Statement,
    pub input: Arc<P>,
}

// Not derived: that would ask `P: Clone`, and the input is shared, never copied.
impl<P> Clone for Raw<P> {
    fn clone(&self) -> Self {
        Raw {
            client: self.client.clone(),
            stmt: self.stmt.clone(),
            input: self.input.clone(),
        }
    }
}

/// `n` raw connections, each with `sql` prepared.
pub(super) async fn raw_clients<P>(
    url: &str,
    n: usize,
    sql: &str,
    input: Arc<P>,
) -> Result<Vec<Raw<P>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let client = connect(url).await?;
        let stmt = client.prepare(sql).await?;
        clients.push(Raw {
            client: Arc::new(client),
            stmt,
            input: input.clone(),
        });
    }
    Ok(clients)
}

pub(super) async fn raw_insert_one(raw: Raw<serde_json::Value>) -> Result<Option<u64>> {
    let id = Uuid::now_v7();
    raw.client.execute(&raw.stmt, &[&id, &*raw.input]).await?;
    Ok(Some(1))
}

pub(super) async fn raw_insert_batch(raw: Raw<Vec<serde_json::Value>>) -> Result<Option<u64>> {
    let ids: Vec<Uuid> = (0..raw.input.len()).map(|_| Uuid::now_v7()).collect();
    raw.client.execute(&raw.stmt, &[&ids, &*raw.input]).await?;
    Ok(Some(ids.len() as u64))
}

pub(super) async fn raw_delete(raw: Raw<()>) -> Result<Option<u64>> {
    let n = raw.client.query(&raw.stmt, &[]).await?.len() as u64;
    Ok((n > 0).then_some(n))
}

/// Input of the engine's own publish statement (`sql/publish.sql`) sent by hand.
pub(super) struct PublishInput {
    pub stream: String,
    pub payload: Vec<u8>,
}

/// One message through the engine's publish statement on a raw connection: whether the NOTIFY
/// trigger fires depends only on the connection's `pgtide.notify` setting.
pub(super) async fn raw_publish(raw: Raw<PublishInput>) -> Result<Option<u64>> {
    let input = &*raw.input;
    let ids = vec![Uuid::now_v7()];
    let payloads = vec![input.payload.clone()];
    let headers: Vec<Option<serde_json::Value>> = vec![None];
    let deliver_at: Vec<Option<chrono::DateTime<chrono::Utc>>> = vec![None];
    let delay_us: Vec<Option<i64>> = vec![None];
    raw.client
        .query_one(
            &raw.stmt,
            &[
                &input.stream,
                &ids,
                &payloads,
                &vec![true],
                &headers,
                &deliver_at,
                &delay_us,
                &vec![0i32],
            ],
        )
        .await?;
    Ok(Some(1))
}

/// Sets `pgtide.notify` on every connection: `off` (the trigger stays quiet) or the server
/// default (the trigger notifies).
pub(super) async fn set_notify(clients: &[Raw<PublishInput>], on: bool) -> Result<()> {
    let sql = if on {
        "RESET pgtide.notify"
    } else {
        "SET pgtide.notify = off"
    };
    for c in clients {
        c.client.batch_execute(sql).await?;
    }
    Ok(())
}

/// A raw LISTEN connection: counts the notifications it receives and, when asked, hands them
/// over with their arrival time.
pub(super) struct Listener {
    _client: Client,
    received: Arc<AtomicU64>,
    rx: mpsc::UnboundedReceiver<(String, Instant)>,
    driver: JoinHandle<()>,
}

impl Listener {
    /// LISTENs on `channel`. With `forward` off it only counts: nothing piles up in memory.
    pub(super) async fn connect(url: &str, channel: &str, forward: bool) -> Result<Listener> {
        let (client, mut connection) = pgtide::connect_raw(url).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        // The connection must be polled for notifications to arrive: a task of its own does it.
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        let at = Instant::now();
                        count.fetch_add(1, Ordering::Relaxed);
                        if forward && tx.send((n.payload().to_owned(), at)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "bench: listener connection error");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await?;
        Ok(Listener {
            _client: client,
            received,
            rx,
            driver,
        })
    }

    /// Notifications received so far.
    pub(super) fn received(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }

    /// Forgets the notifications received but not yet taken.
    pub(super) fn clear(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Arrival times of the notifications received so far with this payload, oldest first;
    /// forgets the others.
    pub(super) fn take_arrivals(&mut self, payload: &str) -> Vec<Instant> {
        let mut arrivals = vec![];
        while let Ok((p, at)) = self.rx.try_recv() {
            if p == payload {
                arrivals.push(at);
            }
        }
        arrivals
    }

    /// The next notification whose payload is `payload`, with its arrival time; `None` after
    /// `timeout`.
    pub(super) async fn wait_for(&mut self, payload: &str, timeout: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((p, at))) if p == payload => return Some(at),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The NOTIFY round trip: `pg_notify` on one connection (autocommit) → arrival on a LISTEN
/// connection, at `rate` per second. A notification that does not arrive within 1 s counts as
/// 1 s.
pub(super) async fn notify_round_trips(
    sender: &Client,
    listener: &mut Listener,
    channel: &str,
    rate: f64,
    warmup: Duration,
    window: Duration,
) -> Result<Vec<Duration>> {
    let stmt = sender.prepare("SELECT pg_notify($1, $2)").await?;
    let from = Instant::now() + warmup;
    let until = from + window;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    listener.clear();
    let (mut samples, mut seq) = (vec![], 0u64);
    while Instant::now() < until {
        ticks.tick().await;
        seq += 1;
        let payload = seq.to_string();
        let sent = Instant::now();
        sender.execute(&stmt, &[&channel, &payload]).await?;
        let took = match listener.wait_for(&payload, Duration::from_secs(1)).await {
            Some(at) => at.saturating_duration_since(sent),
            None => Duration::from_secs(1),
        };
        if sent >= from {
            samples.push(took);
        }
    }
    Ok(samples)
}

/// A JSON object whose text is exactly [`PAYLOAD_BYTES`] long.
pub(super) fn payload() -> serde_json::Value {
    let with_pad = |pad: String| serde_json::json!({"kind": "bench", "order": 1234567, "pad": pad});
    let bare = serde_json::to_vec(&with_pad(String::new()))
        .map(|v| v.len())
        .unwrap_or(0);
    with_pad("x".repeat(PAYLOAD_BYTES.saturating_sub(bare)))
}
