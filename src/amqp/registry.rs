//! The registry: what streams and groups exist and each stream's config, kept in RabbitMQ
//! itself so that every process sees the same (AMQP cannot list or describe exchanges/queues).
//!
//! Each stream has a classic queue `<ns>.<stream>~registry` holding one JSON record. Taking the
//! record with `basic.get` (unacked) is the lock: others find the queue empty and retry until it
//! comes back. A writer publishes the new version (confirmed) before acking the old one, so a
//! crash in between leaves two records and readers take the highest version. A reader returns
//! the record unchanged (`basic.nack` requeue). If the holder dies, the broker requeues the
//! record when its channel closes. A missing queue (404) means the stream does not exist.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};

use super::conn::{broker, broker_msg, is_not_found, Conn};
use crate::config::{Backoff, StreamConfig};
use crate::error::Result;

/// How long to wait for a record another client holds.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// A stream's registry record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StreamRecord {
    pub version: u64,
    pub config: ConfigRecord,
    pub groups: BTreeSet<String>,
}

/// [`StreamConfig`] as stored (durations in milliseconds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConfigRecord {
    lease_ms: u64,
    max_deliver: u32,
    backoff_ms: Vec<u64>,
    jitter: f32,
    retention_ms: u64,
    partition_interval_ms: u64,
    dedupe_window_ms: u64,
    max_payload: usize,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl From<&StreamConfig> for ConfigRecord {
    fn from(c: &StreamConfig) -> Self {
        ConfigRecord {
            lease_ms: ms(c.lease),
            max_deliver: c.max_deliver,
            backoff_ms: c.backoff.schedule.iter().copied().map(ms).collect(),
            jitter: c.backoff.jitter,
            retention_ms: ms(c.retention),
            partition_interval_ms: ms(c.partition_interval),
            dedupe_window_ms: ms(c.dedupe_window),
            max_payload: c.max_payload,
        }
    }
}

impl ConfigRecord {
    pub(crate) fn to_config(&self) -> StreamConfig {
        let d = Duration::from_millis;
        let mut backoff = Backoff::schedule(self.backoff_ms.iter().copied().map(d));
        if backoff.schedule.is_empty() {
            backoff = Backoff::default();
        }
        StreamConfig::default()
            .lease(d(self.lease_ms.max(1)))
            .max_deliver(self.max_deliver.max(1))
            .backoff(backoff.jitter(self.jitter))
            .retention(d(self.retention_ms))
            .partition_interval(d(self.partition_interval_ms))
            .dedupe_window(d(self.dedupe_window_ms))
            .max_payload(self.max_payload)
    }
}

/// A record taken out of its queue: nobody else can read or change it until
/// [`Locked::commit`] or [`Locked::release`] (or until this is dropped: the channel closes and
/// the broker puts the record back).
pub(crate) struct Locked {
    channel: Channel,
    last_tag: u64,
    pub record: StreamRecord,
}

/// Takes the record of `queue`; `None` if the queue does not exist.
pub(crate) async fn lock(conn: &Conn, queue: &str) -> Result<Option<Locked>> {
    let channel = conn.channel().await?;
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        let mut best: Option<StreamRecord> = None;
        let mut last_tag = 0;
        // A crash between publish and ack can leave a few versions: take them all.
        for _ in 0..16 {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await;
            let msg = match got {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(broker(e)),
            };
            last_tag = msg.delivery.delivery_tag;
            match serde_json::from_slice::<StreamRecord>(&msg.delivery.data) {
                Ok(r) if best.as_ref().map_or(true, |b| r.version > b.version) => best = Some(r),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(queue, error = %e, "pgtide amqp: ignoring a bad registry record")
                }
            }
        }
        if let Some(record) = best {
            return Ok(Some(Locked {
                channel,
                last_tag,
                record,
            }));
        }
        if last_tag != 0 {
            // Only unreadable records: put them back and report.
            let _ = nack_all(&channel, last_tag).await;
            return Err(broker_msg(
                format!(
                    "registry {queue:?} holds no readable record: delete and recreate the stream"
                ),
                false,
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(broker_msg(
                format!("registry {queue:?} stayed empty for {LOCK_WAIT:?}: another client holds it, or it was purged (then delete and recreate the stream)"),
                true,
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Reads the record of `queue` without changing it; `None` if the queue does not exist.
pub(crate) async fn read(conn: &Conn, queue: &str) -> Result<Option<StreamRecord>> {
    match lock(conn, queue).await? {
        Some(l) => {
            let record = l.record.clone();
            l.release().await;
            Ok(Some(record))
        }
        None => Ok(None),
    }
}

/// Publishes a record (confirmed) to `queue` through the default exchange.
pub(crate) async fn publish(conn: &Conn, queue: &str, record: &StreamRecord) -> Result<()> {
    let body = serde_json::to_vec(record)?;
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let confirm = conn
        .publisher()
        .await?
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await
        .map_err(broker)?
        .await
        .map_err(broker)?;
    if confirm.is_nack() {
        return Err(broker_msg(
            format!("registry update of {queue:?} refused"),
            true,
        ));
    }
    Ok(())
}

async fn nack_all(channel: &Channel, last_tag: u64) -> Result<()> {
    channel
        .basic_nack(
            last_tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .map_err(broker)
}

impl Locked {
    /// Stores `record` as the next version and drops the old ones.
    pub(crate) async fn commit(
        self,
        conn: &Conn,
        queue: &str,
        mut record: StreamRecord,
    ) -> Result<()> {
        record.version = self.record.version + 1;
        publish(conn, queue, &record).await?;
        self.channel
            .basic_ack(self.last_tag, BasicAckOptions { multiple: true })
            .await
            .map_err(broker)
    }

    /// Puts the record back unchanged.
    pub(crate) async fn release(self) {
        if let Err(e) = nack_all(&self.channel, self.last_tag).await {
            // Closing the channel (on drop) puts it back too.
            tracing::debug!(error = %e, "pgtide amqp: registry release failed");
        }
    }
}
