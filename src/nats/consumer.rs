//! One consumer of a group: pull requests, deliveries, settles, dead-lettering.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::{RequestErrorKind, Subject};
use bytes::Bytes;
use chrono::Utc;
use futures_util::future::join_all;
use tokio::time::Instant;

use super::admin::group_not_found;
use super::api::{self, ack_info, PullEnd};
use super::naming::Names;
use super::{codec, mover, NatsBackend, StreamMeta};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{Delivery, QueueConsumer, SettleReport};

/// The longest single pull request; a longer fetch sends several. Bounds how long the server
/// keeps a request whose fetch future was dropped.
const MAX_PULL_WAIT: Duration = Duration::from_secs(10);

/// A fetch with less than this left returns instead of sending another waiting request.
const MIN_PULL_WAIT: Duration = Duration::from_millis(10);

/// The settle handle of a delivery: its JetStream ack subject.
struct Token {
    reply: Subject,
}

/// What a settle did to one delivery.
enum Settled {
    Done,
    Dead,
    Lost,
}

/// A consumer of the NATS JetStream backend: one named fetcher of a group's durable pull
/// consumer. Cheap to clone.
#[derive(Clone)]
pub struct NatsConsumer {
    backend: NatsBackend,
    meta: Arc<StreamMeta>,
    stream: String,
    group: String,
    name: String,
    next_subject: String,
    /// The group's `ack_wait`.
    lease: Duration,
}

impl std::fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConsumer")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("name", &self.name)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl NatsConsumer {
    pub(super) async fn open(
        backend: &NatsBackend,
        stream: &str,
        group: &str,
        name: &str,
    ) -> Result<Self> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", name)?;
        let meta = backend.meta(stream).await?;
        let info = backend.group_info(&meta, stream, group).await?;
        let lease = match info.config.ack_wait {
            0 => meta.config.lease,
            ns => Duration::from_nanos(ns),
        };
        // Whoever consumes a stream also moves its delayed messages when due.
        mover::ensure(backend, &meta);
        Ok(NatsConsumer {
            backend: backend.clone(),
            next_subject: meta.names.next_subject(&Names::durable(group)),
            meta,
            stream: stream.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
            lease,
        })
    }

    /// One pull request: up to `batch` messages, at once or waiting up to `wait`.
    async fn pull(&self, batch: usize, wait: Option<Duration>) -> Result<Vec<async_nats::Message>> {
        let inner = &self.backend.inner;
        let timeout = inner.options.request_timeout;
        let mut pull = api::Pull::start(
            &inner.client,
            self.next_subject.clone(),
            batch,
            wait,
            timeout,
        )
        .await?;
        let mut out = Vec::new();
        loop {
            match pull.next().await {
                Ok(m) => out.push(m),
                Err(PullEnd::Done) => return Ok(out),
                Err(PullEnd::Silent) => {
                    if out.is_empty() {
                        // Nobody answered: tell a deleted group from a slow server.
                        self.backend
                            .group_info(&self.meta, &self.stream, &self.group)
                            .await?;
                    }
                    return Ok(out);
                }
                Err(PullEnd::Deleted) => return Err(group_not_found(&self.stream, &self.group)),
                Err(PullEnd::Failed(why)) if out.is_empty() => return Err(api::broker(why, true)),
                Err(PullEnd::Failed(_)) => return Ok(out),
            }
        }
    }

    /// Turns pulled messages into deliveries. A message delivered more often than
    /// `max_deliver` (its last lease expired unsettled) is dead-lettered instead.
    async fn accept(&self, msgs: Vec<async_nats::Message>) -> Vec<Delivery> {
        let now = Utc::now();
        let lease = chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::MAX);
        let max_deliver = self.meta.config.max_deliver;
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let Some(reply) = m.reply else { continue };
            let Some((delivered, seq)) = ack_info(&reply) else {
                continue;
            };
            let attempt = u32::try_from(delivered).unwrap_or(u32::MAX).max(1);
            let d = Delivery {
                message: codec::decode(&self.stream, m.headers.as_ref(), m.payload, seq),
                group: self.group.clone(),
                consumer: self.name.clone(),
                attempt,
                lease_expires_at: now + lease,
                token: Some(Arc::new(Token { reply })),
            };
            if attempt > max_deliver {
                let error = format!("lease expired on attempt {}", attempt - 1);
                if let Err(e) = self
                    .bury(&d, "max_deliver", Some(&error), attempt - 1)
                    .await
                {
                    // Left unacked: it comes back after the lease and is tried again.
                    tracing::warn!(error = %e, message_id = %d.id(), stream = %self.stream, group = %self.group, "pgtide nats: dead-lettering failed");
                }
                continue;
            }
            out.push(d);
        }
        out
    }

    /// Sends a settle to the delivery's ack subject and waits for the server to confirm it.
    /// False if the delivery is not this consumer's, or its consumer is gone.
    async fn reply(&self, d: &Delivery, body: Bytes) -> Result<bool> {
        let Some(token) = d.token::<Token>() else {
            return Ok(false);
        };
        if d.group != self.group || d.stream != self.stream {
            return Ok(false);
        }
        match self
            .backend
            .inner
            .client
            .request(token.reply.clone(), body)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(false),
            Err(e) => Err(api::broker(e, true)),
        }
    }

    /// Copies the delivery into the group's dead letters, then terms it.
    async fn bury(
        &self,
        d: &Delivery,
        reason: &str,
        error: Option<&str>,
        attempts: u32,
    ) -> Result<Settled> {
        if d.token::<Token>().is_none() || d.group != self.group || d.stream != self.stream {
            return Ok(Settled::Lost);
        }
        let headers = codec::dead(d, reason, error, attempts);
        let publish = PublishMessage::build()
            .payload(d.payload.clone())
            .headers(headers);
        let subject = self.meta.names.dead_subject(&self.group);
        let js = &self.backend.inner.js;
        let ack = js
            .send_publish(subject, publish)
            .await
            .map_err(|e| api::broker(e, true))?;
        ack.await.map_err(|e| api::broker(e, true))?;
        Ok(if self.reply(d, Bytes::from_static(b"+TERM")).await? {
            Settled::Dead
        } else {
            Settled::Lost
        })
    }

    /// Runs `settle` on every delivery concurrently and reports.
    async fn settle_all<'a, F, Fut>(
        &'a self,
        ds: &[&'a Delivery],
        settle: F,
    ) -> Result<SettleReport>
    where
        F: Fn(&'a Delivery) -> Fut,
        Fut: std::future::Future<Output = Result<Settled>>,
    {
        let results = join_all(ds.iter().map(|d| settle(d))).await;
        let (mut settled, mut dead) = (vec![], vec![]);
        for (d, r) in ds.iter().zip(results) {
            match r? {
                Settled::Done => settled.push(d.id()),
                Settled::Dead => dead.push(d.id()),
                Settled::Lost => {}
            }
        }
        Ok(SettleReport::from_parts(ds, settled, dead))
    }

    async fn simple(&self, d: &Delivery, body: Bytes) -> Result<Settled> {
        Ok(if self.reply(d, body).await? {
            Settled::Done
        } else {
            Settled::Lost
        })
    }
}

impl QueueConsumer for NatsConsumer {
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
        Some(self.lease)
    }

    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        let msgs = self.pull(max, None).await?;
        Ok(self.accept(msgs).await)
    }

    /// Sends a `no_wait` pull for what is ready; if nothing is, a waiting pull for one message
    /// (at most 10 s per request, repeated until `timeout`), then a `no_wait` pull for the rest
    /// of the batch. Cancel-safety: see the module docs (a dropped waiting pull may delay a
    /// message by one lease, never lose it).
    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        // Capped: a hostile timeout (Duration::MAX) must not overflow the clock.
        let deadline = Instant::now() + timeout.min(crate::MAX_DURATION);
        loop {
            let ready = self.pull(max, None).await?;
            let got_any = !ready.is_empty();
            let out = self.accept(ready).await;
            if !out.is_empty() {
                return Ok(out);
            }
            if got_any {
                // All were dead-lettered: look again.
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left < MIN_PULL_WAIT {
                return Ok(out);
            }
            let first = self.pull(1, Some(left.min(MAX_PULL_WAIT))).await?;
            if first.is_empty() {
                continue;
            }
            let mut out = self.accept(first).await;
            if out.len() < max {
                let more = self.pull(max - out.len(), None).await?;
                out.extend(self.accept(more).await);
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        self.settle_all(ds, |d| self.simple(d, Bytes::from_static(b"+ACK")))
            .await
    }

    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        crate::limits::check_nack_delay(delay)?;
        let config = &self.meta.config;
        self.settle_all(ds, |d| async move {
            if d.attempt >= config.max_deliver {
                return self.bury(d, "max_deliver", error, d.attempt).await;
            }
            let wait = delay.unwrap_or_else(|| config.backoff.delay(d.attempt));
            let body = if wait.is_zero() {
                Bytes::from_static(b"-NAK")
            } else {
                Bytes::from(format!("-NAK {{\"delay\":{}}}", wait.as_nanos()))
            };
            self.simple(d, body).await
        })
        .await
    }

    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        self.settle_all(ds, |d| self.bury(d, reason, None, d.attempt))
            .await
    }

    /// Resets the lease to the group's `ack_wait` (JetStream `+WPI`); the `lease` argument
    /// cannot be honoured: it is checked by the duration rule like on every backend, then
    /// ignored. `LeaseLost` only if the group is gone: settles are not fenced on JetStream.
    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        crate::limits::check_lease_override(lease)?;
        if !self.reply(d, Bytes::from_static(b"+WPI")).await? {
            return Err(Error::LeaseLost { id: d.id() });
        }
        d.lease_expires_at =
            Utc::now() + chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::MAX);
        Ok(())
    }

    /// A nak without delay; JetStream counts it as an attempt.
    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        self.settle_all(ds, |d| self.simple(d, Bytes::from_static(b"-NAK")))
            .await
    }
}
