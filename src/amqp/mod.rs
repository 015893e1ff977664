//! RabbitMQ (AMQP 0.9.1) backend (feature `amqp`, lapin). The topology, the semantics and
//! what is emulated are documented on [`AmqpBackend`]. Files: `topology.rs` (declares),
//! `registry.rs` (what exists), `publish.rs`, `fetch.rs` (pull + doorbell), `lease.rs` (lease
//! tracking and reaper), `consumer.rs` (settles), `barrier.rs` (settles applied before a
//! channel closes), `admin.rs` (namespace teardown, the stream log, queue depths); the handle
//! and its `Queue` impl are here.

mod admin;
mod barrier;
mod codec;
mod conn;
mod consumer;
mod fetch;
mod lease;
mod names;
mod publish;
mod registry;
mod topology;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use lapin::options::{BasicGetOptions, BasicNackOptions, QueuePurgeOptions};

use self::codec::decode;
use self::conn::{broker, broker_msg, is_not_found, Conn, NAME};
use self::lease::Shared;
use self::names::{GroupNames, StreamNames};
use self::registry::StreamRecord;
use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::{validate_name, validate_namespace};
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

pub use self::consumer::AmqpConsumer;

/// What the RabbitMQ backend supports.
pub(crate) const AMQP_CAPABILITIES: Capabilities = Capabilities {
    delay: true,
    native_delay: false,
    dedupe: false,
    nack_delay: true,
    lease_timeout: true,
    lease_extension: true,
    transactional_publish: false,
    priority: false,
    exact_stats: false,
    group_start_oldest: false,
    fenced_settle: true,
    fenced_after_release: true,
    ordering_keys: false,
    concurrency_limits: false,
    rate_limits: false,
    fair_share: false,
};

/// RabbitMQ (AMQP 0.9.1) backend handle, tested against RabbitMQ 3.10. Cheap to clone; clones
/// share one connection, which is reopened when lost.
///
/// # Topology (names start with the namespace `<ns>`)
///
/// | object | what |
/// |---|---|
/// | exchange `<ns>.<stream>` (direct, durable) | every publish, routing key `v1` (versioned) |
/// | queue `<ns>.<stream>/<group>` (quorum) | one per group, bound with `v1`: fan-out across groups, competing consumers inside one |
/// | exchange + queue `<ns>.<stream>/<group>~dead` | the group's dead letters (fanout exchange, classic queue; also the quorum queue's `x-dead-letter-exchange`) |
/// | queue `<ns>.<stream>~registry` | the stream's config and groups (see `registry.rs`): what makes `StreamNotFound` / `GroupNotFound` possible |
/// | queue `<ns>.<stream>~delayed` | TTL-0 landing queue of delayed publishes, dead-lettering into the stream exchange |
/// | `<ns>~delay.00` … `<ns>~delay.27`, `<ns>~delay.deliver` | the namespace's delay levels (created on first use) |
/// | queue `<ns>~streams` | log of created streams, for [`AmqpBackend::delete_namespace`] |
///
/// Everything is declared idempotently: `ensure_*` create, publishers re-declare the stream
/// exchange and consumers their group's objects on first use, so a half-created topology heals.
/// Publishes wait for publisher confirms; messages are persistent.
///
/// # Semantics, and what is emulated
///
/// * **Identity**: pgtide sets a UUID v7 `message_id` on publish; retries and dead letters are
///   copies with the same id, so `Delivery::id` is stable.
/// * **Attempts**: the quorum queue counts returns of a copy in `x-delivery-count`; a copy
///   carries the attempts before it in `pgtide-attempts`. Attempt = both + 1, correct across
///   lease expiry, consumer crash (the broker requeues on connection loss) and retries.
/// * **Leases** (emulated): RabbitMQ has no visibility timeout. Each consumer handle tracks what
///   it holds and a reaper returns expired deliveries (`basic.nack` requeue), so another
///   consumer gets them with attempt + 1; `in_progress` extends the tracked lease. A settle after
///   the reaper returned the delivery reports `LeaseLost` (fenced). Leases cannot outlive the
///   broker's `consumer_timeout` (30 min by default), which closes the channel.
/// * **Nack with delay / delayed publish** (emulated): through the delay levels, a binary
///   decomposition of the delay over queues with a fixed queue TTL of 2^k ms each, so there is
///   no head-of-line blocking (per-message TTL in one queue only expires at the head). Resolution
///   1 ms; a retry goes back to its own group's queue only, a delayed publish to every group.
///   Delays over ~74 h make several passes (`pgtide-not-before`).
/// * **Dead letters**: published to the group's dead-letter exchange with `pgtide-reason`,
///   `pgtide-error`, `pgtide-attempts-made`, `pgtide-dead-at`. `dead_letters()` browses the
///   queue with `basic.get` and puts everything back (`basic.nack` requeue), so the queue is
///   unchanged; a concurrent browse may see fewer.
/// * **Fetch** pulls with pipelined `basic.get` (batch = the fetch's `max`) and, on an empty
///   queue, waits on a "doorbell" `basic.consume` with prefetch 1 (`basic.qos`) that the broker
///   pushes the next message to; it is cancelled only once it holds that message, so no
///   delivery can cross the cancel and be counted as a phantom attempt (see `fetch.rs`).
///   Cancel-safe: a dropped fetch hands back what it received, attempt unchanged.
///
/// Not supported: dedupe keys (`Unsupported`), `GroupStart::Oldest` (`Unsupported`: a new queue
/// only gets later messages), priority (accepted and ignored: quorum queues have none),
/// retention (messages stay until consumed), transactional publish. `stats` is not exact:
/// `in_flight` counts only this handle's consumers and `delayed` is unknown (0). `purge`
/// empties the group and dead-letter queues; deliveries in flight and messages inside the delay
/// levels are not purged. Dropping a consumer handle whose doorbell is waiting can, if a
/// message is pushed at that instant, count one extra attempt on it. TLS (`amqps://`) needs
/// lapin's TLS feature, which pgtide leaves off.
#[derive(Debug, Clone)]
pub struct AmqpBackend {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub ns: String,
    pub conn: Conn,
    streams: Mutex<HashMap<String, Arc<StreamRecord>>>,
    delay_levels: tokio::sync::OnceCell<()>,
    delay_routes: Mutex<HashSet<String>>,
    consumers: Mutex<Vec<Weak<Shared>>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain caches: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AmqpBackend {
    /// Connects to `url` (`amqp://user:pass@host:5672/vhost`, or `amqps://…:5671/…` for TLS,
    /// checked against the system roots or the CA of the `tls_ca=PATH` parameter:
    /// `amqps://host/%2f?tls_ca=/etc/rabbitmq/ca.pem`); every server-side name is
    /// prefixed by `namespace`. Fails with a retryable [`Error::Broker`] if the server is down.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        validate_namespace(namespace)?;
        let backend = AmqpBackend {
            inner: Arc::new(Inner {
                ns: namespace.to_owned(),
                conn: Conn::new(url)?,
                streams: Mutex::default(),
                delay_levels: tokio::sync::OnceCell::new(),
                delay_routes: Mutex::default(),
                consumers: Mutex::default(),
            }),
        };
        backend.inner.conn.connection().await?;
        Ok(backend)
    }

    /// The namespace (prefix of every server-side name).
    pub fn namespace(&self) -> &str {
        &self.inner.ns
    }

    pub(crate) fn stream_names(&self, stream: &str) -> StreamNames {
        StreamNames::new(&self.inner.ns, stream)
    }

    fn group_names(&self, stream: &str, group: &str) -> GroupNames {
        GroupNames::new(&self.inner.ns, stream, group)
    }

    fn cache(&self, stream: &str, record: StreamRecord) -> Arc<StreamRecord> {
        let record = Arc::new(record);
        guard(&self.inner.streams).insert(stream.to_owned(), record.clone());
        record
    }

    pub(crate) fn forget(&self, stream: &str) {
        guard(&self.inner.streams).remove(stream);
    }

    pub(crate) fn delay_route_known(&self, queue: &str) -> bool {
        guard(&self.inner.delay_routes).contains(queue)
    }

    pub(crate) fn remember_delay_route(&self, queue: &str) {
        guard(&self.inner.delay_routes).insert(queue.to_owned());
    }

    /// The stream's registry record, from this handle's cache unless `fresh`.
    async fn record(&self, stream: &str, fresh: bool) -> Result<Arc<StreamRecord>> {
        if !fresh {
            if let Some(r) = guard(&self.inner.streams).get(stream) {
                return Ok(r.clone());
            }
        }
        match registry::read(&self.inner.conn, &self.stream_names(stream).registry).await? {
            Some(r) => Ok(self.cache(stream, r)),
            None => {
                self.forget(stream);
                Err(Error::StreamNotFound(stream.to_owned()))
            }
        }
    }

    /// The record for publishing; the first time, the stream exchange is re-declared.
    pub(crate) async fn publisher_record(
        &self,
        stream: &str,
        s: &StreamNames,
    ) -> Result<Arc<StreamRecord>> {
        if let Some(r) = guard(&self.inner.streams).get(stream) {
            return Ok(r.clone());
        }
        let record = self.record(stream, true).await?;
        let ch = self.inner.conn.channel().await?;
        topology::declare_stream_exchange(&ch, s).await?;
        Ok(record)
    }

    /// The record of a stream that has `group` (re-read once if the cache does not know it).
    async fn group_record(&self, stream: &str, group: &str) -> Result<Arc<StreamRecord>> {
        let mut record = self.record(stream, false).await?;
        if !record.groups.contains(group) {
            record = self.record(stream, true).await?;
        }
        if record.groups.contains(group) {
            Ok(record)
        } else {
            Err(Error::GroupNotFound {
                stream: stream.to_owned(),
                group: group.to_owned(),
            })
        }
    }
}

fn group_not_found(stream: &str, group: &str) -> Error {
    Error::GroupNotFound {
        stream: stream.to_owned(),
        group: group.to_owned(),
    }
}

impl Queue for AmqpBackend {
    type Consumer = AmqpConsumer;

    fn capabilities(&self) -> Capabilities {
        AMQP_CAPABILITIES
    }

    async fn close(&self) -> Result<()> {
        // Consumer channels first (their settles), then the publisher channel and the
        // connection. Every step is tried; the first error is returned.
        let consumers: Vec<Arc<Shared>> = guard(&self.inner.consumers)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut result = Ok(());
        tracing::debug!(n = consumers.len(), "pgtide amqp: close");
        for c in consumers {
            result = result.and(c.close().await);
        }
        result.and(self.inner.conn.close().await)
    }

    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        validate_name("stream", stream)?;
        config.validate()?;
        let s = self.stream_names(stream);
        let conn = &self.inner.conn;
        if let Some(r) = registry::read(conn, &s.registry).await? {
            self.cache(stream, r);
            return Ok(false);
        }
        let ch = conn.channel().await?;
        topology::declare_stream(&ch, &s).await?;
        let record = StreamRecord {
            version: 1,
            config: config.into(),
            groups: BTreeSet::new(),
        };
        registry::publish(conn, &s.registry, &record).await?;
        self.log_stream(stream).await?;
        self.cache(stream, record);
        Ok(true)
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        let s = self.stream_names(stream);
        let Some(locked) = registry::lock(&self.inner.conn, &s.registry).await? else {
            self.forget(stream);
            return Ok(false);
        };
        let ch = self.inner.conn.channel().await?;
        for group in &locked.record.groups {
            topology::delete_group(&ch, &self.group_names(stream, group)).await?;
            guard(&self.inner.delay_routes).remove(&self.group_names(stream, group).queue);
        }
        // Deleting the registry queue drops the record we hold.
        topology::delete_stream(&ch, &s).await?;
        drop(locked);
        guard(&self.inner.delay_routes).remove(&s.landing);
        self.forget(stream);
        self.drop_stream_log_if_unused().await?;
        Ok(true)
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        if start == GroupStart::Oldest {
            return Err(Error::Unsupported {
                backend: NAME,
                what: "GroupStart::Oldest (a new RabbitMQ queue only receives later messages)",
            });
        }
        let s = self.stream_names(stream);
        let conn = &self.inner.conn;
        let locked = registry::lock(conn, &s.registry)
            .await?
            .ok_or_else(|| Error::StreamNotFound(stream.to_owned()))?;
        let ch = conn.channel().await?;
        topology::declare_group(&ch, &s, &self.group_names(stream, group)).await?;
        if locked.record.groups.contains(group) {
            let record = locked.record.clone();
            locked.release().await;
            self.cache(stream, record);
            return Ok(false);
        }
        let mut record = locked.record.clone();
        record.groups.insert(group.to_owned());
        record.version += 1;
        locked.commit(conn, &s.registry, record.clone()).await?;
        self.cache(stream, record);
        Ok(true)
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let s = self.stream_names(stream);
        let conn = &self.inner.conn;
        let locked = registry::lock(conn, &s.registry)
            .await?
            .ok_or_else(|| Error::StreamNotFound(stream.to_owned()))?;
        if !locked.record.groups.contains(group) {
            locked.release().await;
            return Ok(false);
        }
        let g = self.group_names(stream, group);
        let ch = conn.channel().await?;
        topology::delete_group(&ch, &g).await?;
        guard(&self.inner.delay_routes).remove(&g.queue);
        let mut record = locked.record.clone();
        record.groups.remove(group);
        record.version += 1;
        locked.commit(conn, &s.registry, record.clone()).await?;
        self.cache(stream, record);
        Ok(true)
    }

    async fn purge(&self, stream: &str) -> Result<()> {
        validate_name("stream", stream)?;
        let record = self.record(stream, true).await?;
        let ch = self.inner.conn.channel().await?;
        for group in &record.groups {
            let g = self.group_names(stream, group);
            for q in [&g.queue, &g.dead] {
                match ch
                    .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
                    .await
                {
                    Ok(_) => {}
                    // Deleted meanwhile; the channel is closed now.
                    Err(e) if is_not_found(&e) => return Ok(()),
                    Err(e) => return Err(broker(e)),
                }
            }
        }
        Ok(())
    }

    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        self.group_record(stream, group).await?;
        let g = self.group_names(stream, group);
        let ready = self.depth(&g.queue).await?;
        let dead = self.depth(&g.dead).await?;
        let (Some(ready), Some(dead)) = (ready, dead) else {
            return Err(group_not_found(stream, group));
        };
        // Messages a doorbell holds unleased are ready for that consumer's next fetch.
        let (leased, buffered) = self.held(stream, group);
        Ok(GroupStats {
            stream: stream.to_owned(),
            group: Some(group.to_owned()),
            ready: i64::from(ready) + buffered as i64,
            delayed: 0,
            in_flight: leased as i64,
            dead: i64::from(dead),
            oldest_ready_age: None,
        })
    }

    async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        self.group_record(stream, group).await?;
        let g = self.group_names(stream, group);
        let ch = self.inner.conn.channel().await?;
        let mut out = Vec::new();
        let mut last_tag = None;
        while out.len() < limit {
            let m = match ch
                .basic_get(g.dead.as_str().into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(m)) => m.delivery,
                Ok(None) => break,
                Err(e) if is_not_found(&e) => return Err(group_not_found(stream, group)),
                Err(e) => return Err(broker(e)),
            };
            last_tag = Some(m.delivery_tag);
            let d = decode(&m.properties, false);
            out.push(DeadLetter {
                stream: stream.to_owned(),
                group: group.to_owned(),
                id: d.id,
                attempts: d.attempts_made.unwrap_or(d.attempt.saturating_sub(1)),
                reason: d.reason.unwrap_or_else(|| "unknown".to_owned()),
                error: d.last_error,
                dead_at: d.dead_at.unwrap_or_else(chrono::Utc::now),
                payload: Some(m.data),
                headers: d.headers,
            });
        }
        if let Some(tag) = last_tag {
            // Put every browsed message back where it was; the channel closing would too.
            let back = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            ch.basic_nack(tag, back).await.map_err(broker)?;
        }
        Ok(out)
    }

    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        crate::limits::check_messages(std::slice::from_ref(&msg))?;
        let msg = crate::otel::traced_one(msg);
        let mut r = self
            .publish_messages(stream, std::slice::from_ref(&msg))
            .await?;
        r.pop()
            .ok_or_else(|| broker_msg("publish returned no receipt", false))
    }

    /// Not atomic: on error, some of the messages may have been published.
    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        crate::limits::check_messages(msgs)?;
        let msgs = crate::otel::traced(msgs);
        let msgs = &*msgs;
        self.publish_messages(stream, msgs).await
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<AmqpConsumer> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", name)?;
        // Fresh, not cached: re-declaring a group another process deleted would resurrect it.
        let record = self.record(stream, true).await?;
        if !record.groups.contains(group) {
            return Err(group_not_found(stream, group));
        }
        let s = self.stream_names(stream);
        let g = self.group_names(stream, group);
        // Consumers declare their side too, so a half-created group heals.
        let ch = self.inner.conn.channel().await?;
        topology::declare_group(&ch, &s, &g).await?;
        let config = record.config.to_config();
        let shared = Shared::start(self.clone(), stream, group, name, g, config);
        guard(&self.inner.consumers).push(Arc::downgrade(&shared));
        Ok(AmqpConsumer { shared })
    }
}
