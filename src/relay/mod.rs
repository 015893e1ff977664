//! Built on the traits: an outbox relay from one backend's group into another backend's stream,
//! and a tee that writes to two backends while a service migrates between them.
//!
//! The relay is at-least-once: a message is acknowledged in the source only after the sink
//! confirmed it; a crash in between publishes it again, and the sink's dedupe (the source message
//! id is the dedupe key) turns that into exactly one copy on sinks that support dedupe.

mod tee;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use tee::{Tee, TeeMode};

use crate::error::Result;
use crate::queue::{Delivery, OutgoingMessage, Queue, QueueConsumer};

/// Header carrying the source message id on relayed messages.
pub const SOURCE_ID_HEADER: &str = "pgtide-source-id";

/// Counts from one [`Relay::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Messages published to the sink (duplicates included).
    pub relayed: u64,
    /// Of those, the ones the sink recognised as duplicates of earlier relays.
    pub duplicates: u64,
    /// Batches that failed to publish and were retried later.
    pub failed_batches: u64,
}

/// Forwards every delivery of a source group (typically a Postgres outbox stream that the
/// application publishes to inside its own transactions) to a stream of another backend.
///
/// ```no_run
/// # async fn demo(pg: pgtide::PgBackend, nats: pgtide::AnyBackend) -> pgtide::Result<()> {
/// use pgtide::{CancellationToken, Relay};
/// let outbox = pg.consumer("outbox.orders", "relay", "relay-1").await?;
/// let report = Relay::new(outbox, nats, "orders").run(CancellationToken::new()).await?;
/// # let _ = report; Ok(()) }
/// ```
pub struct Relay<S: QueueConsumer, D: Queue> {
    source: S,
    sink: D,
    sink_stream: String,
    batch: usize,
}

impl<S: QueueConsumer, D: Queue> Relay<S, D> {
    /// A relay from `source` to `sink_stream` on `sink`.
    pub fn new(source: S, sink: D, sink_stream: &str) -> Self {
        Relay {
            source,
            sink,
            sink_stream: sink_stream.to_owned(),
            batch: 100,
        }
    }

    /// Most messages per sink publish (default 100).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// The sink copy of a source delivery: same payload, headers and ordering key, the source id as header
    /// and (when the sink dedupes) as dedupe key.
    fn copy(&self, d: &Delivery, dedupe: bool) -> OutgoingMessage {
        let mut m = OutgoingMessage::bytes(d.message.payload.clone())
            .headers(d.message.headers.clone())
            .header(SOURCE_ID_HEADER, d.id().to_string());
        m.is_json = d.message.is_json;
        m.key = d.message.key.clone();
        if dedupe {
            m = m.dedupe_key(d.id().to_string());
        }
        m
    }

    /// Relays until `token` is cancelled. Sink failures are logged and the batch is retried with
    /// backoff (nacked in the source); nothing is acknowledged before the sink confirmed it.
    /// The relay does not close the backends (they may be shared): once `run` returns, call
    /// [`crate::Queue::close`] on the source's backend and on the sink before the process exits,
    /// or the last acknowledgements may not reach a broker.
    pub async fn run(self, token: CancellationToken) -> Result<RelayReport> {
        let dedupe = self.sink.capabilities().dedupe;
        let mut report = RelayReport::default();
        let mut failures = 0u32;
        loop {
            let batch = tokio::select! {
                biased;
                _ = token.cancelled() => break,
                r = self.source.fetch(self.batch, Duration::from_secs(30)) => r,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) if e.is_retryable() => {
                    failures += 1;
                    tracing::warn!(error = %e, "pgtide relay: source fetch failed; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if batch.is_empty() {
                continue;
            }
            let copies: Vec<OutgoingMessage> = batch.iter().map(|d| self.copy(d, dedupe)).collect();
            let refs: Vec<&Delivery> = batch.iter().collect();
            match self.sink.publish_batch(&self.sink_stream, &copies).await {
                Ok(receipts) => {
                    failures = 0;
                    report.relayed += receipts.len() as u64;
                    report.duplicates += receipts.iter().filter(|r| r.duplicate).count() as u64;
                    // If this ack fails the batch is relayed again; dedupe absorbs it.
                    if let Err(e) = self.source.ack_batch(&refs).await {
                        tracing::warn!(error = %e, "pgtide relay: source ack failed; the batch will be relayed again");
                    }
                }
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => {
                    failures += 1;
                    report.failed_batches += 1;
                    tracing::warn!(error = %e, stream = %self.sink_stream, "pgtide relay: sink publish failed; retrying");
                    let delay = backoff(failures);
                    if let Err(e) = self
                        .source
                        .nack_batch(&refs, Some(delay), Some(&e.to_string()))
                        .await
                    {
                        tracing::warn!(error = %e, "pgtide relay: source nack failed; leases will expire");
                    }
                }
            }
        }
        Ok(report)
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(10))
}
