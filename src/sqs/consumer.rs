//! One consumer of a group: receives from the group's queue, settles through receipt handles,
//! moves dead letters and re-sends messages that came early.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{Message as SqsMessage, MessageSystemAttributeName};
use chrono::Utc;
use tokio::time::Instant;

use super::admin::{group_not_found, MAX_VISIBILITY};
use super::api::{self, seconds_up};
use super::codec::{self, Received};
use super::settle::{Settled, Token};
use super::{SqsBackend, StreamMeta};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{Delivery, QueueConsumer, SettleReport};

/// SQS's longest long poll.
const MAX_WAIT: u64 = 20;
/// Pause between short polls when less than a second of a fetch's timeout is left (SQS waits
/// in whole seconds).
const SHORT_POLL: Duration = Duration::from_millis(50);
/// Messages per receive and entries per settle batch.
pub(super) const BATCH: usize = 10;

/// A consumer of the SQS backend: one named receiver of a group's queue. Cheap to clone.
#[derive(Clone)]
pub struct SqsConsumer {
    pub(super) backend: SqsBackend,
    pub(super) meta: Arc<StreamMeta>,
    pub(super) stream: String,
    pub(super) group: String,
    name: String,
    pub(super) url: String,
    /// The lease in whole seconds, as the visibility timeout of every receive.
    pub(super) visibility: i32,
}

impl std::fmt::Debug for SqsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsConsumer")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("name", &self.name)
            .field("visibility", &self.visibility)
            .finish_non_exhaustive()
    }
}

impl SqsConsumer {
    pub(super) async fn open(
        backend: &SqsBackend,
        stream: &str,
        group: &str,
        name: &str,
    ) -> Result<Self> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", name)?;
        let meta = backend.group_meta(stream, group).await?;
        let url = backend
            .url(&meta.names.group(group))
            .await?
            .ok_or_else(|| group_not_found(stream, group))?;
        Ok(SqsConsumer {
            backend: backend.clone(),
            visibility: seconds_up(meta.config.lease, MAX_VISIBILITY),
            meta,
            stream: stream.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
            url,
        })
    }

    pub(super) fn client(&self) -> &aws_sdk_sqs::Client {
        &self.backend.inner.client
    }

    /// The group's queue is gone: forget it and say so.
    pub(super) fn gone(&self) -> Error {
        self.backend.forget_url(&self.meta.names.group(&self.group));
        self.backend.forget(&self.stream);
        group_not_found(&self.stream, &self.group)
    }

    /// One receive of up to `max` (≤ 10) messages, waiting up to `wait` seconds for the first.
    async fn receive(&self, max: usize, wait: u64) -> Result<Vec<SqsMessage>> {
        let call = self
            .client()
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.min(BATCH) as i32)
            .wait_time_seconds(wait.min(MAX_WAIT) as i32)
            .visibility_timeout(self.visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names(codec::META);
        let timeout = self.backend.inner.options.request_timeout + Duration::from_secs(wait);
        match api::timed(timeout, async { Ok(call.send().await) }).await? {
            Ok(out) => Ok(out.messages.unwrap_or_default()),
            Err(e) if api::queue_missing(api::code(&e)) => Err(self.gone()),
            Err(e) => Err(api::sdk(e)),
        }
    }

    /// Turns received messages into deliveries. One that came before its due time is sent
    /// again with the rest of its delay; one received more often than `max_deliver` (its last
    /// lease expired unsettled) is dead-lettered.
    async fn accept(&self, msgs: Vec<SqsMessage>) -> Vec<Delivery> {
        let now = Utc::now();
        let lease = chrono::Duration::seconds(i64::from(self.visibility));
        let max_deliver = self.meta.config.max_deliver;
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let Some(r) = codec::decode(&m) else { continue };
            if let Some(due) = r.meta.due.filter(|due| *due > now.timestamp_millis()) {
                if let Err(e) = self.resend(&r.handle, &r.body, r.meta.clone(), due).await {
                    // Stays invisible for one lease, then comes back here.
                    tracing::warn!(error = %e, message_id = %r.meta.id, stream = %self.stream, group = %self.group, "pgtide sqs: re-sending an early message failed");
                }
                continue;
            }
            let attempt = r.meta.base.saturating_add(r.receives);
            if attempt > max_deliver {
                let error = format!("lease expired on attempt {}", attempt - 1);
                if let Err(e) = self
                    .bury(
                        &r.handle,
                        &r.body,
                        &r.meta,
                        "max_deliver",
                        Some(&error),
                        attempt - 1,
                    )
                    .await
                {
                    tracing::warn!(error = %e, message_id = %r.meta.id, stream = %self.stream, group = %self.group, "pgtide sqs: dead-lettering failed");
                }
                continue;
            }
            out.push(self.delivery(r, attempt, now + lease));
        }
        out
    }

    fn delivery(&self, r: Received, attempt: u32, lease_end: chrono::DateTime<Utc>) -> Delivery {
        Delivery {
            message: r.message(&self.stream),
            group: self.group.clone(),
            consumer: self.name.clone(),
            attempt,
            lease_expires_at: lease_end,
            token: Some(Arc::new(Token {
                handle: r.handle,
                body: r.body,
                meta: r.meta,
            })),
        }
    }

    /// Receives without waiting until `max` deliveries are in hand or the queue runs short.
    async fn drain(&self, max: usize, mut out: Vec<Delivery>) -> Result<Vec<Delivery>> {
        while out.len() < max {
            let want = (max - out.len()).min(BATCH);
            let msgs = self.receive(want, 0).await?;
            let short = msgs.len() < want;
            out.extend(self.accept(msgs).await);
            if short {
                break;
            }
        }
        Ok(out)
    }
}

impl QueueConsumer for SqsConsumer {
    fn stream(&self) -> &str {
        &self.stream
    }
    fn group(&self) -> &str {
        &self.group
    }
    fn name(&self) -> &str {
        &self.name
    }

    async fn lease(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.visibility as u64))
    }

    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        self.drain(max, vec![]).await
    }

    /// Long polls (whole seconds, at most 20 per request) until a delivery arrives or
    /// `timeout` passes; under a second left, short polls 50 ms apart. Then receives the rest
    /// of the batch without waiting. If the future is dropped while a long poll is pending,
    /// messages SQS hands to that request stay invisible for one lease and are then delivered
    /// again with the next attempt number: nothing is lost.
    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        let deadline = Instant::now() + timeout.min(crate::MAX_DURATION);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = left.as_secs().min(MAX_WAIT);
            let want = max.min(BATCH);
            let msgs = self.receive(want, wait).await?;
            let (got_any, full) = (!msgs.is_empty(), msgs.len() == want);
            let out = self.accept(msgs).await;
            if !out.is_empty() {
                return if full {
                    self.drain(max, out).await
                } else {
                    Ok(out)
                };
            }
            if got_any {
                // All were early or dead-lettered: look again.
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(out);
            }
            if wait == 0 {
                tokio::time::sleep(left.min(SHORT_POLL)).await;
            }
        }
    }

    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        let done = self.batch(ds, None).await?;
        Ok(SettleReport::from_parts(ds, done, vec![]))
    }

    /// A delay of up to 12 h is a visibility change (rounded up to whole seconds); a longer one
    /// re-sends the message with its due time. The last allowed attempt goes to the dead
    /// letters with `error`.
    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        crate::limits::check_nack_delay(delay)?;
        let config = &self.meta.config;
        let mut simple: Vec<(&Delivery, i32)> = vec![];
        let mut other: Vec<&Delivery> = vec![];
        for d in ds {
            let wait = delay.unwrap_or_else(|| config.backoff.delay(d.attempt));
            if d.attempt < config.max_deliver && wait <= Duration::from_secs(MAX_VISIBILITY) {
                simple.push((d, seconds_up(wait, MAX_VISIBILITY)));
            } else {
                other.push(d);
            }
        }
        let mut report = self
            .settle_each(&other, |d, t| async move {
                if d.attempt >= config.max_deliver {
                    return self
                        .bury(&t.handle, &t.body, &t.meta, "max_deliver", error, d.attempt)
                        .await;
                }
                let wait = delay.unwrap_or_else(|| config.backoff.delay(d.attempt));
                let due = Utc::now()
                    .timestamp_millis()
                    .saturating_add(wait.as_millis() as i64);
                let mut meta = t.meta.clone();
                meta.base = d.attempt;
                Ok(if self.resend(&t.handle, &t.body, meta, due).await? {
                    Settled::Done
                } else {
                    Settled::Lost
                })
            })
            .await?;
        // The usual case: one visibility batch per distinct delay.
        let mut by_delay: Vec<(i32, Vec<&Delivery>)> = vec![];
        for (d, seconds) in simple {
            match by_delay.iter_mut().find(|(s, _)| *s == seconds) {
                Some((_, v)) => v.push(d),
                None => by_delay.push((seconds, vec![d])),
            }
        }
        for (seconds, group) in by_delay {
            report
                .settled
                .extend(self.batch(&group, Some(seconds)).await?);
        }
        Ok(SettleReport::from_parts(
            ds,
            report.settled,
            report.dead_lettered,
        ))
    }

    /// Checks the handle (a visibility change), copies the message to the dead-letter queue
    /// with `reason`, then deletes it.
    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        self.settle_each(ds, |d, t| async move {
            if !self.set_visibility(&t.handle, self.visibility).await? {
                return Ok(Settled::Lost);
            }
            self.bury(&t.handle, &t.body, &t.meta, reason, None, d.attempt)
                .await
        })
        .await
    }

    /// A visibility change to `lease` (or the stream's) from now, rounded up to whole seconds
    /// and capped at SQS's 12 h. `LeaseLost` if SQS no longer knows the handle.
    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        crate::limits::check_lease_override(lease)?;
        let seconds = seconds_up(lease.unwrap_or(self.meta.config.lease), MAX_VISIBILITY);
        let Some(t) = self.token(d) else {
            return Err(Error::LeaseLost { id: d.id() });
        };
        if !self.set_visibility(&t.handle, seconds).await? {
            return Err(Error::LeaseLost { id: d.id() });
        }
        d.lease_expires_at = Utc::now() + chrono::Duration::seconds(i64::from(seconds));
        Ok(())
    }

    /// Visibility 0; SQS counts the receive, so the release counts as an attempt.
    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        let done = self.batch(ds, Some(0)).await?;
        Ok(SettleReport::from_parts(ds, done, vec![]))
    }
}
