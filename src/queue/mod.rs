//! The seam between the engine and its callers: the backend-neutral traits and the data that
//! crosses them.
//!
//! [`Queue`] is a handle to one backend (publish, admin, stats); [`QueueConsumer`] is one named
//! consumer of one group (fetch and settle). Handlers written against [`Delivery`] and the
//! [`crate::Worker`] run unchanged on every backend. Where backends differ, [`Capabilities`] says
//! so; the conformance suite checks each promise on every backend.
//!
//! The methods return `impl Future + Send` (no `async-trait` boxing). Everything here depends
//! only on the crate's config and error types: no backend is a dependency of the seam.

mod delivery;
mod envelope;
mod message;
mod stats;

use std::future::Future;
use std::time::Duration;

pub use self::delivery::{Delivery, SettleReport};
pub use self::envelope::{
    Envelope, Event, EVENT_ID_HEADER, EVENT_PRODUCED_AT_HEADER, EVENT_PRODUCER_HEADER,
    EVENT_SCHEMA_VERSION_HEADER, EVENT_TYPE_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER,
};
pub(crate) use self::message::uuid_time;
#[cfg(feature = "postgres")]
pub(crate) use self::message::{headers_from_json, headers_to_json};
pub use self::message::{Headers, Message, OutgoingMessage, PublishReceipt};
pub use self::stats::{DeadLetter, GroupStats};
use crate::config::{GroupConfig, GroupStart, StreamConfig};
use crate::error::Result;

/// What a backend can do natively. Operations a backend lacks either are emulated (documented
/// per backend) or fail with [`crate::Error::Unsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Delayed publish (`OutgoingMessage::delay` / `deliver_at`).
    pub delay: bool,
    /// Delay is native to the server (not emulated by pgtide).
    pub native_delay: bool,
    /// Dedupe keys are honoured.
    pub dedupe: bool,
    /// Nack with an explicit delay.
    pub nack_delay: bool,
    /// A delivery left unsettled past its lease is redelivered (to any consumer of the group).
    pub lease_timeout: bool,
    /// `in_progress` extends a lease.
    pub lease_extension: bool,
    /// Publish inside the caller's database transaction.
    pub transactional_publish: bool,
    /// Priority ordering.
    pub priority: bool,
    /// Exact per-group depth (ready / in-flight / dead) in `stats`.
    pub exact_stats: bool,
    /// A new group can start at the oldest retained message.
    pub group_start_oldest: bool,
    /// Settles are fenced: a consumer whose lease lapsed and was re-claimed gets `LeaseLost`.
    pub fenced_settle: bool,
    /// Settles are fenced after a release too: a handle whose delivery was handed back
    /// (`release_batch`) and claimed again gets `LeaseLost`. False where the fence token is the
    /// attempt number, which a release gives back (Postgres): such a stale handle could settle
    /// the new claim. The worker never settles a delivery it released.
    pub fenced_after_release: bool,
    /// Ordered groups ([`crate::GroupConfig::ordered`]): per-key order with at most one
    /// delivery of a key in flight, and the key carried to consumers ([`Message::key`]).
    /// Backends without it accept keyed messages but neither order nor carry the key, and
    /// refuse to create ordered groups ([`crate::Error::Unsupported`]).
    pub ordering_keys: bool,
    /// Concurrency limits, of the group ([`crate::GroupConfig::max_in_flight`]) and of each
    /// key ([`crate::GroupConfig::max_in_flight_per_key`]), enforced across every consumer and
    /// process. Backends without it refuse such groups ([`crate::Error::Unsupported`]).
    pub concurrency_limits: bool,
    /// Rate limits ([`crate::GroupConfig::rate_limit`], [`crate::GroupConfig::rate_limit_per_key`])
    /// enforced across every consumer and process. Backends without it refuse rate-limited
    /// groups ([`crate::Error::Unsupported`]).
    pub rate_limits: bool,
    /// Weighted fair share between the keys of a group ([`crate::GroupConfig::fair_share`]),
    /// across every consumer and process. Backends without it refuse fair groups
    /// ([`crate::Error::Unsupported`]).
    pub fair_share: bool,
}

/// A handle to one backend: publish, administer, inspect, and make consumers. Cheap to clone.
pub trait Queue: Clone + Send + Sync + 'static {
    /// The consumer type of this backend.
    type Consumer: QueueConsumer;

    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Installs or upgrades what the backend needs on the server before first use; idempotent.
    /// On Postgres this is [`crate::PgBackend::migrate`] (the namespace's schema); brokers
    /// create their objects on demand, so for them it does nothing. Call it once at startup,
    /// before the first other operation. If the future is dropped, calling it again finishes
    /// the work.
    fn migrate(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Closes the handle gracefully: settles already sent reach the server and the server has
    /// confirmed the close before this returns. Call it once before the process exits, after the
    /// last settle (a settle can count as done once its frame is written, so an exit without
    /// `close` may lose it and the delivery comes back). Deliveries still leased stay leased
    /// where the server keeps leases (Postgres, NATS, Redis: redelivered after the lease); on
    /// RabbitMQ closing the channel returns them at once, counting the attempt.
    ///
    /// Per backend: Postgres [`crate::PgBackend::shutdown`]; NATS flushes the connection;
    /// RabbitMQ closes every consumer channel, the publisher channel and the connection, each
    /// waiting for the broker's close-ok; Redis, SQS and memory have nothing pending. Using the
    /// handle afterwards reconnects where the backend can (RabbitMQ), and is not recommended.
    fn close(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Creates the stream unless it exists. Returns true if it was created.
    fn ensure_stream(
        &self,
        stream: &str,
        config: &StreamConfig,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes a stream with everything in it. Returns false if it did not exist.
    fn delete_stream(&self, stream: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Creates the group unless it exists. Returns true if it was created.
    fn ensure_group(
        &self,
        stream: &str,
        group: &str,
        start: GroupStart,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Creates the group with `config` unless it exists. Returns true if it was created. An
    /// ordered group needs [`Capabilities::ordering_keys`]; backends without it fail with
    /// [`crate::Error::Unsupported`] and create nothing. Where a backend keeps the setting
    /// (Postgres, memory), an existing group with the other `ordered` setting is an error.
    fn ensure_group_with(
        &self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
    ) -> impl Future<Output = Result<bool>> + Send {
        async move {
            if config.ordered && !self.capabilities().ordering_keys {
                return Err(crate::Error::Unsupported {
                    backend: "this",
                    what: "ordered groups (Capabilities::ordering_keys)",
                });
            }
            if (config.max_in_flight.is_some() || config.max_in_flight_per_key.is_some())
                && !self.capabilities().concurrency_limits
            {
                return Err(crate::Error::Unsupported {
                    backend: "this",
                    what: "group concurrency limits (Capabilities::concurrency_limits)",
                });
            }
            if (config.rate_limit.is_some() || config.rate_limit_per_key.is_some())
                && !self.capabilities().rate_limits
            {
                return Err(crate::Error::Unsupported {
                    backend: "this",
                    what: "rate limits (Capabilities::rate_limits)",
                });
            }
            if config.fair_share && !self.capabilities().fair_share {
                return Err(crate::Error::Unsupported {
                    backend: "this",
                    what: "fair groups (Capabilities::fair_share)",
                });
            }
            self.ensure_group(stream, group, config.start).await
        }
    }

    /// Sets (`Some`) or resets to the default 1 (`None`) the weight of `key` (`None`: the
    /// messages without a key) in a fair group ([`crate::GroupConfig::fair_share`]). It applies
    /// to the key's messages published after it. Backends without
    /// [`Capabilities::fair_share`] fail with [`crate::Error::Unsupported`]. Errors: an invalid
    /// key ([`crate::Error::InvalidKey`]), a weight out of bounds ([`crate::validate_weight`])
    /// or a group that is not fair ([`crate::Error::InvalidConfig`]), a missing group.
    fn set_key_weight(
        &self,
        stream: &str,
        group: &str,
        key: Option<&str>,
        weight: Option<f64>,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (stream, group, key, weight);
        async {
            Err(crate::Error::Unsupported {
                backend: "this",
                what: "key weights (Capabilities::fair_share)",
            })
        }
    }

    /// Deletes a group. Returns false if it did not exist.
    fn delete_group(&self, stream: &str, group: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Removes every message of the stream and every pending delivery and dead letter of its
    /// groups; the stream and groups stay.
    fn purge(&self, stream: &str) -> impl Future<Output = Result<()>> + Send;

    /// Depth of one group.
    fn stats(&self, stream: &str, group: &str) -> impl Future<Output = Result<GroupStats>> + Send;

    /// Dead letters of a group, oldest first.
    fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;

    /// Publishes one message to every group of the stream.
    fn publish(
        &self,
        stream: &str,
        msg: OutgoingMessage,
    ) -> impl Future<Output = Result<PublishReceipt>> + Send;

    /// Publishes many messages; receipts in input order.
    fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> impl Future<Output = Result<Vec<PublishReceipt>>> + Send;

    /// A consumer named `name` of `group`.
    fn consumer(
        &self,
        stream: &str,
        group: &str,
        name: &str,
    ) -> impl Future<Output = Result<Self::Consumer>> + Send;
}

/// One named consumer of one group. Cheap to clone.
pub trait QueueConsumer: Clone + Send + Sync + 'static {
    /// The stream.
    fn stream(&self) -> &str;
    /// The group.
    fn group(&self) -> &str;
    /// The consumer name.
    fn name(&self) -> &str;

    /// The lease a fetch grants, if known (the worker extends leases at half of it).
    fn lease(&self) -> impl Future<Output = Option<Duration>> + Send;

    /// Whether this consumer's settles wake the fetches waiting on its group, in any process,
    /// when they make room: an ack, nack, term or pause in a group with a concurrency limit, or
    /// one that lets an ordered key's next message go. The worker settles acks beside its
    /// claims only when they do; otherwise the acks ride with the next claim, which then sees
    /// the room they made. `false` unless the backend says so (Postgres with notifications on).
    fn settles_wake_fetches(&self) -> bool {
        false
    }

    /// Claims up to `max` ready deliveries without waiting. `max` 0 claims nothing and returns
    /// an empty batch.
    fn try_fetch(&self, max: usize) -> impl Future<Output = Result<Vec<Delivery>>> + Send;

    /// Claims up to `max` deliveries, waiting up to `timeout` for the first. `max` 0 returns an
    /// empty batch at once.
    fn fetch(
        &self,
        max: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send;

    /// Acknowledges deliveries.
    fn ack_batch(&self, ds: &[&Delivery]) -> impl Future<Output = Result<SettleReport>> + Send;

    /// Retries deliveries after `delay` (the stream's backoff when `None`); on the last allowed
    /// attempt they become dead letters.
    fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> impl Future<Output = Result<SettleReport>> + Send;

    /// Dead-letters deliveries now, with `reason`.
    fn term_batch(
        &self,
        ds: &[&Delivery],
        reason: &str,
    ) -> impl Future<Output = Result<SettleReport>> + Send;

    /// Extends a delivery's lease (`lease` from now, or the stream's lease).
    fn in_progress(
        &self,
        d: &mut Delivery,
        lease: Option<Duration>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Hands back deliveries that never reached anyone (claimed, but the payload was never
    /// handed to a handler or printed), visible again at once. The attempt is not counted
    /// (except on NATS, where JetStream counts every delivery). A delivery whose payload was
    /// handed out goes back with [`QueueConsumer::nack_batch`] (no delay to retry at once), so
    /// the attempt counts toward `max_deliver`.
    fn release_batch(&self, ds: &[&Delivery]) -> impl Future<Output = Result<SettleReport>> + Send;

    /// Hands deliveries back to be tried again at `until` (now if it has passed), the attempt not
    /// counted: what a handler's [`crate::Outcome::PauseKey`] does. In an ordered group the
    /// delivery is its key's head, so the key waits. Backends without their own (brokers) nack
    /// with the delay instead, which counts the attempt (and on the last one dead-letters).
    fn pause_batch(
        &self,
        ds: &[&Delivery],
        until: chrono::DateTime<chrono::Utc>,
    ) -> impl Future<Output = Result<SettleReport>> + Send {
        async move {
            crate::limits::check_time("pause until", until)?;
            let delay = (until - chrono::Utc::now()).to_std().unwrap_or_default();
            self.nack_batch(ds, Some(delay), Some("paused")).await
        }
    }

    /// Acknowledges `done`, then claims up to `max` new deliveries without waiting (none when
    /// `max` is 0). Backends that can do both in one round trip (Postgres: one statement, one
    /// commit) override this.
    fn ack_and_fetch(
        &self,
        done: &[&Delivery],
        max: usize,
    ) -> impl Future<Output = Result<(SettleReport, Vec<Delivery>)>> + Send {
        async move {
            let report = if done.is_empty() {
                SettleReport::default()
            } else {
                self.ack_batch(done).await?
            };
            Ok((report, self.try_fetch(max).await?))
        }
    }

    /// Acknowledges one delivery; [`crate::Error::LeaseLost`] if the lease was lost.
    fn ack(&self, d: &Delivery) -> impl Future<Output = Result<()>> + Send {
        async move { self.ack_batch(&[d]).await?.single(d.id()) }
    }

    /// Retries one delivery (see [`QueueConsumer::nack_batch`]).
    fn nack(
        &self,
        d: &Delivery,
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> impl Future<Output = Result<()>> + Send {
        async move { self.nack_batch(&[d], delay, error).await?.single(d.id()) }
    }

    /// Dead-letters one delivery now.
    fn term(&self, d: &Delivery, reason: &str) -> impl Future<Output = Result<()>> + Send {
        async move { self.term_batch(&[d], reason).await?.single(d.id()) }
    }
}
