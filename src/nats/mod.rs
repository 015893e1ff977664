//! NATS JetStream backend (feature `nats`), written for NATS 2.9 and later.
//!
//! # Layout on the server
//!
//! Every name is derived from the namespace and the pgtide name (see `naming.rs`; `.` is
//! encoded as `_D` because JetStream forbids it in names):
//!
//! * a JetStream stream `PGTIDE-<ns>-<stream>` per pgtide stream, with two subjects:
//!   `pgtide.<ns>.<stream>.ready` (deliverable messages) and `pgtide.<ns>.<stream>.delayed`
//!   (messages waiting for their due time). Limits retention, `max_age` = the stream's
//!   retention, `duplicate_window` = its dedupe window, file storage, [`NatsOptions::replicas`]
//!   replicas. The pgtide settings JetStream has no field for (lease, max_deliver, backoff, ...)
//!   are kept as JSON in the stream description.
//! * a durable pull consumer per group, named after the group, filtered on the ready subject:
//!   explicit ack, `ack_wait` = the stream's lease, unlimited `max_deliver` and
//!   `max_ack_pending`, deliver policy `all` ([`GroupStart::Oldest`]) or `new`. Every group sees
//!   every message (fan-out); consumers of one group compete for its deliveries.
//! * a dead-letter stream `PGTIDE-<ns>-<stream>-DEAD` with one subject per group,
//!   `pgtide.<ns>.<stream>.dead.<group>`.
//!
//! # Semantics
//!
//! * **Identity**: each message gets a UUID v7 at publish, carried in the `Pgtide-Id` header,
//!   so a delivery's id is the same on every redelivery and in every group.
//! * **Attempts** are JetStream's delivery count. pgtide enforces `max_deliver` itself (the
//!   consumer's is unlimited so that JetStream never drops a message silently): a delivery
//!   whose count exceeds `max_deliver` (its last lease expired), or a nack on the last allowed
//!   attempt, is copied into the dead-letter stream with its reason and error, then termed.
//! * **Settles** are acks with a reply (`+ACK`, `-NAK {"delay": ..}`, `+WPI`, `+TERM`), so a
//!   settle returns once the server has it; a settle whose consumer is gone reports the
//!   delivery as lost.
//! * **Dedupe** uses `Nats-Msg-Id` and the stream's duplicate window. A duplicate publish is
//!   answered with the original's stream sequence, which is read back for its pgtide id.
//! * **Delayed publish is emulated** (NATS 2.9 has neither message schedules nor per-message
//!   TTL): the message is stored on the delayed subject with a `Pgtide-Deliver-At` header.
//!   A mover (a durable consumer `PGTIDE-MOVER` on the delayed subject, run as a background
//!   task by every process that consumes or publishes delayed messages on the stream) naks
//!   each message with a delay until it is due, then publishes a copy to the ready subject
//!   (with `Nats-Msg-Id: m:<id>`, so a retried move is dropped as a duplicate inside the
//!   dedupe window) and acks it. Groups only ever see due messages, so their delivery counts
//!   (attempts) and fan-out stay exact; the price is one extra write per delayed message. A
//!   delayed message reaches the groups that exist when it comes due.
//! * **Stats** come from consumer info: `ready` = not yet delivered, `in_flight` = delivered
//!   and unacked (which on JetStream includes nacked deliveries waiting for their retry delay
//!   and expired leases not yet redelivered), `delayed` = messages waiting for the mover
//!   (stream-wide), `dead` = the group's dead letters.
//!
//! # Limits (see [`Capabilities`])
//!
//! * Settles are not fenced: JetStream acks by stream sequence, so a late ack from a consumer
//!   whose lease expired acks the redelivery another consumer holds.
//! * `in_progress` resets the lease to the group's `ack_wait`; its `lease` argument cannot be
//!   honoured and is ignored (call it again, as the worker does every half lease).
//! * `release` is a nak without delay: JetStream counts the release as an attempt.
//! * Priority is ignored (JetStream delivers in stream order).
//! * A handle caches each stream's pgtide settings on first use; a stream deleted and recreated
//!   with other settings by another process is seen with the old ones until this handle
//!   finds it missing.
//! * A fetch future dropped while its pull request is pending may leave messages the server
//!   sends afterwards unacknowledged until `ack_wait` passes; they are then redelivered with
//!   the next attempt number. Nothing is lost.

mod admin;
mod api;
mod codec;
mod consumer;
mod mover;
mod naming;
mod publish;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

use self::api::NAME;
pub use self::consumer::NatsConsumer;
use self::naming::Names;

/// What the NATS backend supports.
pub(crate) const NATS_CAPABILITIES: Capabilities = Capabilities {
    delay: true,
    native_delay: false,
    dedupe: true,
    nack_delay: true,
    lease_timeout: true,
    lease_extension: true,
    transactional_publish: false,
    priority: false,
    exact_stats: false,
    group_start_oldest: true,
    fenced_settle: false,
    fenced_after_release: false,
    ordering_keys: false,
    concurrency_limits: false,
    rate_limits: false,
    fair_share: false,
};

/// Options of a [`NatsBackend`].
///
/// ```
/// let options = pgtide::NatsOptions::default().replicas(3);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NatsOptions {
    /// Replicas of the JetStream streams (and their consumers) this handle creates: 1, or 3 or
    /// 5 in a JetStream cluster. Defaults to 1.
    pub replicas: usize,
    /// Timeout of one JetStream API request, publish acknowledgement or settle.
    /// Defaults to 5 s.
    pub request_timeout: Duration,
    /// Timeout of the initial connection. Defaults to 5 s.
    pub connect_timeout: Duration,
    /// PEM file of the certificate authority that signed the servers' certificates, trusted
    /// instead of the system roots; setting it requires TLS. The URL parameter
    /// `tls_ca=PATH` sets it too. Defaults to none: `tls://` servers are checked against the
    /// system roots.
    pub tls_ca: Option<PathBuf>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            replicas: 1,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            tls_ca: None,
        }
    }
}

impl NatsOptions {
    /// Sets [`NatsOptions::replicas`].
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }
    /// Sets [`NatsOptions::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
    /// Sets [`NatsOptions::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`NatsOptions::tls_ca`].
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }
}

/// A stream's names and config, as recorded on the server.
#[derive(Debug)]
struct StreamMeta {
    names: Names,
    config: StreamConfig,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    namespace: String,
    options: NatsOptions,
    streams: Mutex<HashMap<String, Arc<StreamMeta>>>,
    movers: Arc<Mutex<HashSet<String>>>,
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the movers.
        self.token.cancel();
        self.tracker.close();
    }
}

/// NATS JetStream backend handle. Cheap to clone; clones share one connection.
///
/// ```no_run
/// # async fn demo() -> pgtide::Result<()> {
/// use pgtide::{NatsBackend, Queue, StreamConfig};
/// let nats = NatsBackend::connect("nats://127.0.0.1:4222", "shop").await?;
/// nats.ensure_stream("orders", &StreamConfig::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackend")
            .field("namespace", &self.inner.namespace)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps guarded here stay consistent across a panic (single inserts and removes).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NatsBackend {
    /// Connects to `url` (`nats://host:port`, or several comma-separated for a cluster);
    /// every server-side name is prefixed by `namespace`. Uses [`NatsOptions::default`].
    ///
    /// `tls://host:port` (or `nats+tls://`) requires TLS, checked against the system roots or
    /// the CA of the `tls_ca=PATH` parameter (`tls://host:4222?tls_ca=/etc/nats/ca.pem`); a
    /// `nats://` server that demands TLS is upgraded as well.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        Self::connect_with(url, namespace, NatsOptions::default()).await
    }

    /// Connects with explicit options. Fails with a retryable [`Error::Broker`] if no server
    /// answers, and a non-retryable one if the server's certificate is refused; once
    /// connected, the client reconnects on its own (to any server of the cluster) and
    /// operations fail with retryable errors meanwhile.
    pub async fn connect_with(
        url: &str,
        namespace: &str,
        mut options: NatsOptions,
    ) -> Result<Self> {
        crate::names::validate_namespace(namespace)?;
        if !(1..=5).contains(&options.replicas) {
            return Err(Error::InvalidConfig(format!(
                "NATS replicas must be 1 to 5, not {}",
                options.replicas
            )));
        }
        let mut servers = Vec::new();
        for server in url.split(',').map(str::trim) {
            // async-nats knows `tls://`; `nats+tls://` is the spelling other tools use.
            let server = match server.strip_prefix("nats+tls://") {
                Some(rest) => format!("tls://{rest}"),
                None => server.to_owned(),
            };
            let (server, ca) = crate::broker_tls::take_ca_param(NAME, &server)?;
            if let Some(ca) = ca {
                if options.tls_ca.as_ref().is_some_and(|given| *given != ca) {
                    return Err(Error::InvalidConfig(
                        "NATS URL: tls_ca differs between servers or from NatsOptions::tls_ca"
                            .into(),
                    ));
                }
                options.tls_ca = Some(ca);
            }
            // Not echoing the URL: it may carry a password.
            servers.push(server.parse::<async_nats::ServerAddr>().map_err(|e| {
                Error::InvalidConfig(format!(
                    "NATS URL: {e}: use nats://host:port or tls://host:port"
                ))
            })?);
        }
        let mut connect = async_nats::ConnectOptions::new()
            .name("pgtide")
            .connection_timeout(options.connect_timeout)
            .request_timeout(Some(options.request_timeout));
        if let Some(ca) = &options.tls_ca {
            // Read here so that a wrong path is a configuration error, not a handshake failure.
            crate::broker_tls::read_ca(NAME, ca)?;
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = connect
            .connect(servers)
            .await
            .map_err(|e| crate::broker_tls::broker_error(NAME, e, true))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(options.request_timeout)
            .build(client.clone());
        Ok(NatsBackend {
            inner: Arc::new(Inner {
                client,
                js,
                namespace: namespace.to_owned(),
                options,
                streams: Mutex::default(),
                movers: Arc::default(),
                tracker: TaskTracker::new(),
                token: CancellationToken::new(),
            }),
        })
    }

    /// The namespace (prefix of every server-side name).
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    fn names(&self, stream: &str) -> Names {
        Names::new(&self.inner.namespace, stream)
    }

    /// The stream's names and config: cached, else read from the server.
    async fn meta(&self, stream: &str) -> Result<Arc<StreamMeta>> {
        crate::names::validate_name("stream", stream)?;
        if let Some(m) = lock(&self.inner.streams).get(stream) {
            return Ok(m.clone());
        }
        let names = self.names(stream);
        let info = api::stream_info(&self.inner.js, &names.stream, None)
            .await?
            .ok_or_else(|| Error::StreamNotFound(stream.to_owned()))?;
        let config = codec::config_of(info.config.description.as_deref()).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "JetStream stream {:?} was not created by pgtide: pick another stream name or namespace",
                names.stream
            ))
        })?;
        let meta = Arc::new(StreamMeta { names, config });
        lock(&self.inner.streams).insert(stream.to_owned(), meta.clone());
        Ok(meta)
    }

    /// Drops the cached meta of a stream (deleted, or found missing).
    fn forget(&self, stream: &str) {
        lock(&self.inner.streams).remove(stream);
    }
}

impl Queue for NatsBackend {
    type Consumer = NatsConsumer;

    fn capabilities(&self) -> Capabilities {
        NATS_CAPABILITIES
    }

    async fn close(&self) -> Result<()> {
        // Settles wait for the server's reply already; the flush covers anything written
        // without one, so it reaches the server before the process exits.
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| api::broker(e, true))
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
            .ok_or_else(|| api::broker("publish returned no receipt", false))
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

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<NatsConsumer> {
        NatsConsumer::open(self, stream, group, name).await
    }
}
