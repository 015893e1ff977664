//! Kafka backend (feature `kafka`), written against the Kafka protocol as librdkafka speaks it;
//! tested with tansu 0.6 (in-memory storage).
//!
//! # Layout on the broker
//!
//! Every name is derived from the namespace and the pgtide name (see `naming.rs`):
//!
//! * `PGTIDE.<ns>.<stream>`: the stream's messages, [`KafkaOptions::partitions`] partitions.
//!   Every group reads it (fan-out: each pgtide group is its own Kafka consumer group,
//!   `PGTIDE.<ns>.<stream>.GROUP.<group>`).
//! * `PGTIDE.<ns>.<stream>.DELAY`: delayed publishes, each with its due time; every group reads
//!   it too and holds each record until it is due.
//! * `PGTIDE.<ns>.<stream>.RETRY.<group>`: one group's nacks, each with its due time and attempt.
//! * `PGTIDE.<ns>.<stream>.DEAD.<group>`: one group's dead letters, with reason headers.
//! * `PGTIDE.<ns>.<stream>.META`: the stream's registry (one partition): its settings, its
//!   groups and its purge marks, as JSON records read from the start.
//!
//! # Semantics
//!
//! * **Per-delivery settles on a log**: see `group.rs`. Each handle runs one Kafka consumer per
//!   group it consumes; its [`KafkaConsumer`]s share it and compete for its records. Acks may
//!   come in any order; the committed offset of each partition is the lowest unfinished one
//!   (committed every 50 ms and on [`Queue::close`]). Processes share a group's partitions as
//!   Kafka assigns them: a group spreads over at most as many processes as the stream has
//!   partitions.
//! * **Leases are emulated** in the process holding the partition: a delivery not settled
//!   within its lease is handed out again (attempt + 1), or dead-lettered on the last attempt.
//!   Settles are fenced by a claim number per lease, also after a release.
//! * **Nack and delayed publish** write a copy to the retry / delay topic with its due time;
//!   the group holds it in memory until then. Dead letters are copies in the dead-letter topic.
//! * **Purge** records the current end offsets as marks in the registry; records below them are
//!   skipped (the broker used for testing has no DeleteRecords). Deleting a stream or group
//!   marks it deleted the same way and leaves its topics: librdkafka 2.12 crashes on tansu 0.6's
//!   metadata for deleted topics. Every group runtime reads the registry again every 5 s.
//!
//! # Limits (see [`Capabilities`])
//!
//! * No dedupe keys (`Unsupported`): Kafka has no per-key duplicate detection. The producer is
//!   idempotent, so a retried send inside the client is never written twice.
//! * Priority is ignored (Kafka delivers in log order).
//! * Stats are approximate: counts come from end offsets and committed offsets, corrected by
//!   what this process holds.
//! * Attempt numbers of lease expiries live in the process holding the partition: after a crash
//!   or a rebalance a record starts again from the attempt it was written with.
//! * Records waiting for their due time are held in memory, at most
//!   [`KafkaOptions::max_held`] per group and handle; past it the delay and retry topics are
//!   paused (back-pressure), so a delayed record behind a full cap of later-due ones comes late.
//! * Plain TCP only: `kafkas://` and credentials in the URL are `Unsupported` (the bundled
//!   librdkafka is built without OpenSSL and SASL).
//! * A stopped group runtime leaves its idle librdkafka consumer open until the process exits
//!   (closing one never completes on tansu 0.6); see `group.rs`.

mod admin;
mod codec;
mod consumer;
mod group;
mod naming;
mod publish;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

pub use self::consumer::KafkaConsumer;
use self::group::Group;
use self::naming::Names;

/// The backend's name in errors.
pub(crate) const NAME: &str = "kafka";

/// What the Kafka backend supports.
pub(crate) const KAFKA_CAPABILITIES: Capabilities = Capabilities {
    delay: true,
    native_delay: false,
    dedupe: false,
    nack_delay: true,
    lease_timeout: true,
    lease_extension: true,
    transactional_publish: false,
    priority: false,
    exact_stats: false,
    group_start_oldest: true,
    fenced_settle: true,
    fenced_after_release: true,
    ordering_keys: false,
    concurrency_limits: false,
    rate_limits: false,
    fair_share: false,
};

/// Options of a [`KafkaBackend`].
///
/// ```
/// let options = pgtide::KafkaOptions::default().partitions(6);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KafkaOptions {
    /// Partitions of the main and delay topics of the streams this handle creates (a group
    /// spreads over at most this many processes). The URL parameter `partitions=N` sets it
    /// too. Defaults to 1.
    pub partitions: i32,
    /// Replication factor of the topics this handle creates. Defaults to 1.
    pub replication: i32,
    /// Timeout of one request to the cluster (metadata, admin, a publish's acknowledgement).
    /// Defaults to 10 s.
    pub request_timeout: Duration,
    /// How long a group's consumer waits at the broker for records before an empty fetch
    /// answers (librdkafka's `fetch.wait.max.ms`). A broker that answers a waiting fetch as
    /// soon as records arrive (Apache Kafka) makes this only the idle poll interval; one that
    /// does not (tansu 0.6) adds up to this much to the publish → fetch latency. Lower means
    /// more fetch requests from idle groups (one per broker and wait). 1 ms to 10 s.
    /// Defaults to 5 ms.
    pub fetch_wait: Duration,
    /// How many not-yet-due records (delayed publishes, nacks with a delay) one group's
    /// runtime holds in memory per handle. At the cap, the delay and retry topics' partitions
    /// are paused (the main topic is still read) until a quarter of the held records came due;
    /// a delayed record behind a full cap of later-due ones is delivered late. 1 to 10 000 000.
    /// Defaults to 10 000.
    pub max_held: usize,
    /// Send every record of the main topic in a batch of its own (delay and retry topics always
    /// are). For brokers that answer a fetch starting inside a record batch with the *next*
    /// batch (tansu 0.6 does): there, a group restarting from a committed offset in the middle
    /// of a batch would skip the rest of that batch. Costs publish throughput on brokers that
    /// batch correctly (Apache Kafka, Redpanda), which need it off. The URL parameter
    /// `single_record_batches=true` sets it too. Defaults to false.
    pub single_record_batches: bool,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            partitions: 1,
            replication: 1,
            request_timeout: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(5),
            max_held: 10_000,
            single_record_batches: false,
        }
    }
}

impl KafkaOptions {
    /// Sets [`KafkaOptions::partitions`].
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }
    /// Sets [`KafkaOptions::replication`].
    pub fn replication(mut self, replication: i32) -> Self {
        self.replication = replication;
        self
    }
    /// Sets [`KafkaOptions::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
    /// Sets [`KafkaOptions::fetch_wait`].
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }
    /// Sets [`KafkaOptions::max_held`].
    pub fn max_held(mut self, max: usize) -> Self {
        self.max_held = max;
        self
    }
    /// Sets [`KafkaOptions::single_record_batches`].
    pub fn single_record_batches(mut self, single: bool) -> Self {
        self.single_record_batches = single;
        self
    }
}

/// A stream's names, config, groups and purge marks, as recorded in its registry topic.
#[derive(Debug, Clone)]
struct StreamMeta {
    names: Names,
    config: StreamConfig,
    groups: HashSet<String>,
    marks: BTreeMap<String, Vec<i64>>,
}

struct Inner {
    brokers: String,
    namespace: String,
    options: KafkaOptions,
    producer: FutureProducer,
    /// Writes the delay and retry topics, one record per batch.
    single: FutureProducer,
    streams: Mutex<HashMap<String, Arc<StreamMeta>>>,
    groups: Mutex<HashMap<(String, String), Arc<Group>>>,
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the group drivers.
        self.token.cancel();
        self.tracker.close();
    }
}

/// Kafka backend handle. Cheap to clone; clones share one producer and the group consumers.
///
/// ```no_run
/// # async fn demo() -> pgtide::Result<()> {
/// use pgtide::{KafkaBackend, Queue, StreamConfig};
/// let kafka = KafkaBackend::connect("kafka://127.0.0.1:9092", "shop").await?;
/// kafka.ensure_stream("orders", &StreamConfig::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBackend")
            .field("namespace", &self.inner.namespace)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps guarded here stay consistent across a panic (single inserts and removes).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A broker error.
pub(super) fn broker(
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    retryable: bool,
) -> Error {
    Error::Broker {
        backend: NAME,
        source: e.into(),
        retryable,
    }
}

/// What `kafkas://` and credentials in a `kafka://` URL get: the bundled librdkafka is built
/// without OpenSSL and SASL (see docs/backends.md for why), so the connection would be plain
/// TCP; refusing beats sending credentials or data in the clear.
const TLS_UNSUPPORTED: Error = Error::Unsupported {
    backend: NAME,
    what: "TLS and SASL (kafkas://, user:password@ in a kafka:// URL): pgtide's librdkafka is built without OpenSSL and SASL; use kafka:// on a network you trust",
};

/// Splits `kafka://host:port[,host:port…][?partitions=N&single_record_batches=B]` into the bootstrap list and options.
fn parse_url(url: &str, mut options: KafkaOptions) -> Result<(String, KafkaOptions)> {
    let bad = |why: &str| {
        // Not echoing the URL: it may carry credentials.
        Error::InvalidConfig(format!(
            "Kafka URL: {why}: use kafka://host:port[,host:port...][?partitions=N][&single_record_batches=true|false]"
        ))
    };
    if url.starts_with("kafkas://") {
        return Err(TLS_UNSUPPORTED);
    }
    let rest = url
        .strip_prefix("kafka://")
        .ok_or_else(|| bad("the scheme must be kafka://"))?;
    let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
    let hosts = hosts.trim_end_matches('/');
    if hosts.contains('@') {
        // user:password@ would be SASL credentials.
        return Err(TLS_UNSUPPORTED);
    }
    if hosts.is_empty() || hosts.contains(['/', ' ']) {
        return Err(bad("expected host:port pairs (no user, path or spaces)"));
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("partitions", n)) => {
                options.partitions = n.parse().map_err(|_| bad("partitions must be a number"))?;
            }
            Some(("single_record_batches", flag)) => {
                options.single_record_batches = match flag {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("single_record_batches must be true or false")),
                };
            }
            _ => {
                return Err(bad(
                    "the parameters are partitions=N and single_record_batches=true|false",
                ))
            }
        }
    }
    Ok((hosts.to_owned(), options))
}

impl KafkaBackend {
    /// Connects to `url` (`kafka://host:port`, several bootstrap servers comma-separated, and
    /// `?partitions=N` for the streams this handle creates); every broker-side name is
    /// prefixed by `namespace`. Uses [`KafkaOptions::default`].
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        Self::connect_with(url, namespace, KafkaOptions::default()).await
    }

    /// Connects with explicit options. Fails with a retryable [`Error::Broker`] if no broker
    /// answers within [`KafkaOptions::request_timeout`]; once connected, the client reconnects
    /// on its own and operations fail with retryable errors meanwhile.
    pub async fn connect_with(url: &str, namespace: &str, options: KafkaOptions) -> Result<Self> {
        crate::names::validate_namespace(namespace)?;
        let (brokers, options) = parse_url(url, options)?;
        if !(1..=10_000).contains(&options.partitions) {
            return Err(Error::InvalidConfig(format!(
                "Kafka partitions must be 1 to 10000, not {}",
                options.partitions
            )));
        }
        if !(1..=16).contains(&options.replication) {
            return Err(Error::InvalidConfig(format!(
                "Kafka replication must be 1 to 16, not {}",
                options.replication
            )));
        }
        crate::limits::check_duration("request_timeout", options.request_timeout, false)?;
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&options.fetch_wait) {
            return Err(Error::InvalidConfig(format!(
                "Kafka fetch_wait must be 1 ms to 10 s, not {:?}",
                options.fetch_wait
            )));
        }
        if !(1..=10_000_000).contains(&options.max_held) {
            return Err(Error::InvalidConfig(format!(
                "Kafka max_held must be 1 to 10000000, not {}",
                options.max_held
            )));
        }
        let mut config = base_config(&brokers, &options);
        config
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                options
                    .request_timeout
                    .as_millis()
                    .min(i32::MAX as u128)
                    .to_string(),
            )
            .set("linger.ms", "0")
            .set("message.max.bytes", "16777216");
        let batched: FutureProducer = config.create().map_err(|e| broker(e, false))?;
        // Delay and retry topics get one record per batch: a group paused at its held cap
        // (see `group.rs`) resumes from the middle of what may have been one batch, and tansu
        // 0.6 answers a fetch from inside a batch with the next batch, skipping the rest.
        let single: FutureProducer = config
            .set("batch.num.messages", "1")
            .create()
            .map_err(|e| broker(e, false))?;
        let producer = if options.single_record_batches {
            single.clone()
        } else {
            batched
        };
        // Reach the cluster now, so that a wrong address fails here.
        let timeout = options.request_timeout;
        let probe = producer.clone();
        tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, timeout))
            .await
            .map_err(|e| broker(e, true))?
            .map_err(|e| broker(e, true))?;
        Ok(KafkaBackend {
            inner: Arc::new(Inner {
                brokers,
                namespace: namespace.to_owned(),
                options,
                producer,
                single,
                streams: Mutex::default(),
                groups: Mutex::default(),
                tracker: TaskTracker::new(),
                token: CancellationToken::new(),
            }),
        })
    }

    /// The namespace (prefix of every broker-side name).
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// How many not-yet-due records (delayed publishes, nacks with a delay) this handle holds
    /// in memory for the group: at most [`KafkaOptions::max_held`]. `None` when no consumer of
    /// the group was opened through this handle (nothing is read, nothing held).
    pub fn held_records(&self, stream: &str, group: &str) -> Option<usize> {
        lock(&self.inner.groups)
            .get(&(stream.to_owned(), group.to_owned()))
            .filter(|g| !g.token.is_cancelled())
            .map(|g| g.lock().held())
    }

    fn names(&self, stream: &str) -> Names {
        Names::new(&self.inner.namespace, stream)
    }

    /// A client config with the bootstrap servers and pgtide's defaults.
    fn client_config(&self) -> ClientConfig {
        base_config(&self.inner.brokers, &self.inner.options)
    }

    /// Writes one record and waits for the broker's acknowledgement.
    async fn produce(&self, topic: &str, payload: &[u8], headers: OwnedHeaders) -> Result<()> {
        let timeout = self.inner.options.request_timeout;
        produce(&self.inner.producer, timeout, topic, payload, headers).await
    }

    /// The stream's meta: cached, else read from the registry.
    async fn meta(&self, stream: &str) -> Result<Arc<StreamMeta>> {
        crate::names::validate_name("stream", stream)?;
        if let Some(m) = lock(&self.inner.streams).get(stream) {
            return Ok(m.clone());
        }
        self.fresh_meta(stream).await
    }

    /// Reads the stream's registry again (groups and purge marks may have changed).
    async fn fresh_meta(&self, stream: &str) -> Result<Arc<StreamMeta>> {
        crate::names::validate_name("stream", stream)?;
        let meta = Arc::new(
            self.read_registry(stream)
                .await?
                .ok_or_else(|| Error::StreamNotFound(stream.to_owned()))?,
        );
        lock(&self.inner.streams).insert(stream.to_owned(), meta.clone());
        Ok(meta)
    }

    /// Drops the cached meta and stops the local group runtimes of a stream.
    fn forget(&self, stream: &str) {
        lock(&self.inner.streams).remove(stream);
        lock(&self.inner.groups).retain(|(s, _), g| {
            let keep = s != stream;
            if !keep {
                g.token.cancel();
            }
            keep
        });
    }

    /// Stops the local runtime of one group.
    fn forget_group(&self, stream: &str, group: &str) {
        if let Some(g) = lock(&self.inner.groups).remove(&(stream.to_owned(), group.to_owned())) {
            g.token.cancel();
        }
    }
}

/// Writes one record and waits for the broker's acknowledgement.
async fn produce(
    producer: &FutureProducer,
    timeout: Duration,
    topic: &str,
    payload: &[u8],
    headers: OwnedHeaders,
) -> Result<()> {
    let record = FutureRecord::<(), [u8]>::to(topic)
        .payload(payload)
        .headers(headers);
    producer
        .send(record, Timeout::After(timeout))
        .await
        .map(|_| ())
        .map_err(|(e, _)| broker(e, true))
}

fn base_config(brokers: &str, options: &KafkaOptions) -> ClientConfig {
    let mut c = ClientConfig::new();
    let ms = options
        .request_timeout
        .as_millis()
        .min(i32::MAX as u128)
        .to_string();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "pgtide")
        .set("allow.auto.create.topics", "false")
        .set("socket.timeout.ms", &ms)
        .set("topic.metadata.refresh.interval.ms", "10000");
    c
}

impl Queue for KafkaBackend {
    type Consumer = KafkaConsumer;

    fn capabilities(&self) -> Capabilities {
        KAFKA_CAPABILITIES
    }

    async fn close(&self) -> Result<()> {
        // Commit what every local group finished, then flush the producer.
        let groups: Vec<Arc<Group>> = lock(&self.inner.groups).values().cloned().collect();
        for g in groups {
            g.commit(rdkafka::consumer::CommitMode::Sync).await;
        }
        let producers = [self.inner.producer.clone(), self.inner.single.clone()];
        let timeout = self.inner.options.request_timeout;
        tokio::task::spawn_blocking(move || producers.iter().try_for_each(|p| p.flush(timeout)))
            .await
            .map_err(|e| broker(e, true))?
            .map_err(|e| broker(e, true))
    }

    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        self.create_stream(stream, config).await
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        self.remove_stream(stream).await
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        self.create_group(stream, group, start).await
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        self.remove_group(stream, group).await
    }

    async fn purge(&self, stream: &str) -> Result<()> {
        self.purge_stream(stream).await
    }

    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        self.group_stats(stream, group).await
    }

    async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.read_dead_letters(stream, group, limit).await
    }

    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        crate::limits::check_messages(std::slice::from_ref(&msg))?;
        let msg = crate::otel::traced_one(msg);
        let mut receipts = self.publish_all(stream, std::slice::from_ref(&msg)).await?;
        receipts
            .pop()
            .ok_or_else(|| broker("publish returned no receipt", false))
    }

    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        crate::limits::check_messages(msgs)?;
        let msgs = crate::otel::traced(msgs);
        let msgs = &*msgs;
        self.publish_all(stream, msgs).await
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<KafkaConsumer> {
        KafkaConsumer::open(self, stream, group, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (b, o) = parse_url(
            "kafka://a:9092,b:9092?partitions=6",
            KafkaOptions::default(),
        )
        .unwrap();
        assert_eq!((b.as_str(), o.partitions), ("a:9092,b:9092", 6));
        let (b, o) = parse_url("kafka://127.0.0.1:9092/", KafkaOptions::default()).unwrap();
        assert_eq!((b.as_str(), o.partitions), ("127.0.0.1:9092", 1));
        for bad in [
            "nats://x:1",
            "kafka://",
            "kafka://x:1?partitions=many",
            "kafka://x:1?tls=1",
        ] {
            assert!(
                matches!(
                    parse_url(bad, KafkaOptions::default()),
                    Err(Error::InvalidConfig(_))
                ),
                "{bad}"
            );
        }
        for bad in ["kafkas://x:9093", "kafka://user:secret@x:9092"] {
            let e = parse_url(bad, KafkaOptions::default()).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::Unsupported {
                        backend: "kafka",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}
