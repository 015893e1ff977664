//! Publishing: every message to every group's queue (fan-out by the publisher), in batches of
//! up to 10 entries and 1 MiB sent in order per group (groups concurrently), entries that fail
//! sent again with the same pgtide id.

use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use chrono::Utc;
use futures_util::stream::{self, StreamExt};
use uuid::Uuid;

use super::admin::MAX_MESSAGE;
use super::api::{self, seconds_up};
use super::codec::{self, Meta};
use super::SqsBackend;
use crate::error::{Error, Result};
use crate::queue::{OutgoingMessage, PublishReceipt};

/// SQS delays a message natively by at most 15 minutes.
pub(super) const MAX_NATIVE_DELAY: u64 = 900;
/// Entries per `SendMessageBatch`.
const BATCH: usize = 10;
/// Tries of one batch's failed entries.
const TRIES: u32 = 3;
/// Groups sent to at once by one publish call.
const CONCURRENCY: usize = 16;

/// One message, encoded for SQS.
pub(super) struct Outgoing {
    pub id: Uuid,
    pub body: String,
    pub attribute: MessageAttributeValue,
    pub delay: i32,
    pub size: usize,
}

impl Outgoing {
    /// Encodes a message (or a re-send of one) due at `due_ms` (Unix ms), if delayed; SQS
    /// delays it by at most `native` (whole seconds).
    pub(super) fn new(
        body: String,
        mut meta: Meta,
        due_ms: Option<i64>,
        native: Duration,
    ) -> Result<Self> {
        let now = Utc::now().timestamp_millis();
        let left = due_ms
            .filter(|at| *at > now)
            .map(|at| Duration::from_millis((at - now) as u64));
        let native = native.as_secs();
        let delay = match left {
            None => 0,
            Some(left) => seconds_up(left, native),
        };
        // The due time travels only when SQS does not wait that long itself.
        meta.due = due_ms.filter(|_| left.is_some_and(|l| l > Duration::from_secs(native)));
        let size = body.len() + meta.size();
        Ok(Outgoing {
            id: meta.id,
            attribute: meta.attribute()?,
            body,
            delay,
            size,
        })
    }

    fn entry(&self, index: usize) -> Result<SendMessageBatchRequestEntry> {
        SendMessageBatchRequestEntry::builder()
            .id(index.to_string())
            .message_body(&self.body)
            .delay_seconds(self.delay)
            .message_attributes(codec::META, self.attribute.clone())
            .build()
            .map_err(|e| api::broker(e, false))
    }
}

/// Why sending to one queue failed.
pub(super) enum SendError {
    /// The queue does not exist (its group was deleted).
    Gone,
    Failed(Error),
}

/// Splits messages into `SendMessageBatch` calls: at most 10 entries and 1 MiB each.
fn batches(all: &[Outgoing]) -> Vec<Vec<&Outgoing>> {
    let mut out: Vec<Vec<&Outgoing>> = vec![];
    let mut size = 0;
    for m in all {
        match out.last_mut() {
            Some(b) if b.len() < BATCH && size + m.size <= MAX_MESSAGE => {
                size += m.size;
                b.push(m);
            }
            _ => {
                size = m.size;
                out.push(vec![m]);
            }
        }
    }
    out
}

impl SqsBackend {
    /// Sends `batch` to the queue at `url`; entries SQS reports failed for a reason of its own
    /// are sent again (same ids) up to three times.
    pub(super) async fn send_batch(
        &self,
        url: &str,
        batch: &[&Outgoing],
    ) -> std::result::Result<(), SendError> {
        let mut pending: Vec<&Outgoing> = batch.to_vec();
        let mut last = None;
        for attempt in 0..TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            let mut call = self.inner.client.send_message_batch().queue_url(url);
            for (i, m) in pending.iter().enumerate() {
                call = call.entries(m.entry(i).map_err(SendError::Failed)?);
            }
            let out = match self.timed(async { Ok(call.send().await) }).await {
                Ok(Ok(out)) => out,
                Ok(Err(e)) if api::queue_missing(api::code(&e)) => return Err(SendError::Gone),
                Ok(Err(e)) => {
                    let e = api::sdk(e);
                    if !e.is_retryable() {
                        return Err(SendError::Failed(e));
                    }
                    last = Some(e);
                    continue;
                }
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let failed = out.failed();
            if failed.is_empty() {
                return Ok(());
            }
            if let Some(f) = failed.iter().find(|f| f.sender_fault()) {
                return Err(SendError::Failed(api::broker(
                    format!(
                        "SQS refused a message: {}: {}",
                        f.code(),
                        f.message().unwrap_or_default()
                    ),
                    false,
                )));
            }
            last = Some(api::broker(
                format!(
                    "SQS failed {} entries of a batch: {}",
                    failed.len(),
                    failed[0].code()
                ),
                true,
            ));
            pending = failed
                .iter()
                .filter_map(|f| f.id().parse::<usize>().ok())
                .filter_map(|i| pending.get(i).copied())
                .collect();
        }
        Err(SendError::Failed(last.unwrap_or_else(|| {
            api::broker("SendMessageBatch failed", true)
        })))
    }

    /// Sends the batches to the queue `name` of `group` one after another, so that a queue
    /// that keeps arrival order (moto; SQS standard queues only try) keeps the caller's order.
    async fn send_to_group<'a>(
        &self,
        name: String,
        group: &'a String,
        batches: &[Vec<&Outgoing>],
    ) -> (&'a String, std::result::Result<(), SendError>) {
        let url = match self.url(&name).await {
            Ok(Some(url)) => url,
            Ok(None) => return (group, Err(SendError::Gone)),
            Err(e) => return (group, Err(SendError::Failed(e))),
        };
        for batch in batches {
            match self.send_batch(&url, batch).await {
                Ok(()) => {}
                Err(SendError::Gone) => {
                    self.forget_url(&name);
                    return (group, Err(SendError::Gone));
                }
                Err(e) => return (group, Err(e)),
            }
        }
        (group, Ok(()))
    }

    /// Publishes `msgs` to every group of the stream; receipts in input order. See the module
    /// docs for what a partial failure leaves behind.
    pub(super) async fn publish_all(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        let meta = self.meta(stream, true).await?;
        if msgs.iter().any(|m| m.dedupe_key.is_some()) {
            return Err(Error::Unsupported {
                backend: api::NAME,
                what: "dedupe keys (only FIFO queues deduplicate, without naming the original)",
            });
        }
        let limit = meta.config.max_payload;
        let now = Utc::now();
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let too_large = |limit| Error::PayloadTooLarge {
                stream: stream.to_owned(),
                size: m.payload.len(),
                limit,
            };
            if m.payload.len() > limit {
                return Err(too_large(limit));
            }
            let due = match (m.deliver_at, m.delay) {
                (Some(at), _) => Some(at),
                (None, Some(d)) => chrono::Duration::from_std(d).ok().map(|d| now + d),
                (None, None) => None,
            };
            let (body, enc) = codec::body(&m.payload);
            let meta = Meta {
                id: Uuid::now_v7(),
                json: m.is_json,
                enc,
                headers: m.headers.clone(),
                due: None,
                base: 0,
                dead: None,
            };
            let o = Outgoing::new(
                body,
                meta,
                due.map(|d| d.timestamp_millis()),
                self.inner.options.max_native_delay,
            )?;
            if o.size > MAX_MESSAGE {
                // What is left of SQS's 1 MiB after the encoding and the attribute.
                let room = MAX_MESSAGE.saturating_sub(o.size - m.payload.len());
                return Err(too_large(room.min(limit)));
            }
            out.push(o);
        }
        let receipts = out
            .iter()
            .map(|o| PublishReceipt {
                id: o.id,
                duplicate: false,
            })
            .collect();
        if meta.groups.is_empty() {
            return Ok(receipts);
        }
        let batches = batches(&out);
        let mut jobs = Vec::with_capacity(meta.groups.len());
        for group in &meta.groups {
            jobs.push(self.send_to_group(meta.names.group(group), group, &batches));
        }
        let results: Vec<(&String, std::result::Result<(), SendError>)> = stream::iter(jobs)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut failed_groups = std::collections::BTreeSet::new();
        let mut gone_groups = std::collections::BTreeSet::new();
        let mut first_error = None;
        for (group, r) in results {
            match r {
                Ok(()) => {}
                Err(SendError::Gone) => {
                    gone_groups.insert(group.clone());
                }
                Err(SendError::Failed(e)) => {
                    failed_groups.insert(group.clone());
                    first_error.get_or_insert(e);
                }
            }
        }
        if !gone_groups.is_empty() {
            // Deleted meanwhile (or the stream was): only groups still registered count.
            let now = self.read_meta(stream).await?;
            failed_groups.extend(gone_groups.into_iter().filter(|g| now.groups.contains(g)));
        }
        if failed_groups.is_empty() {
            return Ok(receipts);
        }
        let reached = meta.groups.len() - failed_groups.len();
        let why = first_error
            .map(|e| e.to_string())
            .unwrap_or_else(|| "a group's queue is missing".to_owned());
        Err(api::broker(
            format!(
                "published to {reached} of {} groups of stream {stream:?} (not to {}): {why}; a retry publishes again to all of them",
                meta.groups.len(),
                failed_groups.into_iter().collect::<Vec<_>>().join(", ")
            ),
            true,
        ))
    }
}
