//! RabbitMQ (AMQP 0.9.1) backend (feature `amqp`, lapin). The topology, the semantics and
//! what is emulated are documented on [`AmqpBackend`]. Files: `topology.rs` (declares),
//! `registry.rs` (what exists), `publish.rs`, `fetch.rs` (pull + doorbell), `lease.rs` (lease
//! tracking and reaper), `consumer.rs` (settles), `admin.rs` (the `Queue` impl).

mod admin;
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

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;

use self::conn::{broker, broker_msg, is_not_found, is_precondition_failed, Conn};
use self::lease::Shared;
use self::names::{GroupNames, StreamNames};
use self::registry::StreamRecord;
use crate::error::{Error, Result};
use crate::names::{validate_name, validate_namespace};
use crate::queue::{Capabilities, Queue};

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
    /// Connects to `url` (`amqp://user:pass@host:5672/vhost`); every server-side name is
    /// prefixed by `namespace`. Fails with a retryable [`Error::Broker`] if the server is down.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        validate_namespace(namespace)?;
        let backend = AmqpBackend {
            inner: Arc::new(Inner {
                ns: namespace.to_owned(),
                conn: Conn::new(url),
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

    /// Deletes everything of the namespace: every stream created through pgtide (with its
    /// groups, messages and dead letters) and the delay levels. For tests and tenant teardown.
    pub async fn delete_namespace(&self) -> Result<()> {
        let log = names::stream_log(&self.inner.ns);
        let ch = self.inner.conn.channel().await?;
        let mut streams = BTreeSet::new();
        loop {
            match ch
                .basic_get(log.as_str().into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(m)) => {
                    streams.insert(String::from_utf8_lossy(&m.delivery.data).into_owned());
                }
                Ok(None) => break,
                Err(e) if is_not_found(&e) => break,
                Err(e) => return Err(broker(e)),
            }
        }
        for stream in streams
            .iter()
            .filter(|s| validate_name("stream", s).is_ok())
        {
            self.delete_stream(stream).await?;
        }
        let ch = self.inner.conn.channel().await?;
        topology::delete_delay_levels(&ch, &self.inner.ns).await?;
        ch.queue_delete(log.as_str().into(), Default::default())
            .await
            .map_err(broker)?;
        guard(&self.inner.delay_routes).clear();
        Ok(())
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

    /// Appends `stream` to the namespace's stream log. Published `mandatory`, so that if the log
    /// was deleted between the declare and the publish (its last stream deleted meanwhile, see
    /// [`AmqpBackend::drop_stream_log_if_unused`]) the broker returns the entry and it is
    /// logged again into a re-declared queue.
    async fn log_stream(&self, stream: &str) -> Result<()> {
        let log = names::stream_log(&self.inner.ns);
        for _ in 0..3 {
            let ch = self.inner.conn.channel().await?;
            ch.queue_declare(
                log.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
            let props = BasicProperties::default().with_delivery_mode(2);
            let publisher = self.inner.conn.publisher().await?;
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    log.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    stream.as_bytes(),
                    props,
                )
                .await
                .map_err(broker)?
                .await
                .map_err(broker)?;
            if confirm.take_message().is_none() {
                return Ok(());
            }
        }
        Err(broker_msg(
            format!("could not log stream {stream:?} in {log:?}: the queue kept disappearing"),
            true,
        ))
    }

    /// Deletes the namespace's stream log when no stream it names exists any more, so that
    /// deleting a namespace's last stream leaves no `<ns>~streams` queue behind. The delete is
    /// conditional on an empty queue: a stream logged meanwhile by another client keeps it.
    async fn drop_stream_log_if_unused(&self) -> Result<()> {
        let log = names::stream_log(&self.inner.ns);
        let ch = self.inner.conn.channel().await?;
        let mut last_tag = 0;
        loop {
            let entry = match ch
                .basic_get(log.as_str().into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(broker(e)),
            };
            last_tag = entry.delivery.delivery_tag;
            let stream = String::from_utf8_lossy(&entry.delivery.data).into_owned();
            let exists = validate_name("stream", &stream).is_ok()
                && self
                    .depth(&self.stream_names(&stream).registry)
                    .await?
                    .is_some();
            if exists {
                // Still in use: put every entry taken back, unchanged.
                return ch
                    .basic_nack(
                        last_tag,
                        BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        },
                    )
                    .await
                    .map_err(broker);
            }
        }
        if last_tag != 0 {
            ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(broker)?;
        }
        let ch = self.inner.conn.channel().await?;
        match ch
            .queue_delete(
                log.as_str().into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(_) => Ok(()),
            // Not empty any more (a stream was logged meanwhile), or deleted by someone else.
            Err(e) if is_not_found(&e) || is_precondition_failed(&e) => Ok(()),
            Err(e) => Err(broker(e)),
        }
    }

    /// Depth of the queue `name`, or `None` if it does not exist.
    async fn depth(&self, name: &str) -> Result<Option<u32>> {
        let ch = self.inner.conn.channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match ch
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => Ok(Some(q.message_count())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(broker(e)),
        }
    }

    /// (leased, buffered) messages of this handle's consumers of the group.
    fn held(&self, stream: &str, group: &str) -> (usize, usize) {
        let mut consumers = guard(&self.inner.consumers);
        consumers.retain(|w| w.strong_count() > 0);
        consumers
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.stream == stream && s.group == group)
            .map(|s| s.held())
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }
}
