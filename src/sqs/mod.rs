//! Amazon SQS backend (feature `sqs`), tested against moto's server; any SQS-compatible
//! endpoint that speaks the AWS JSON protocol should do.
//!
//! # Layout on the server
//!
//! Queue names come from the namespace and the pgtide names (see `naming.rs`):
//!
//! * a **registry queue** `<ns>-s-<stream>` per stream, never holding a message: its tags
//!   record the stream (`pgtide.stream`), its config (`pgtide.config.NN`) and one tag per group
//!   (`pgtide.group.<group>`). Tags are the registry because every process can read them and
//!   adding or removing one tag is atomic; a handle caches them for
//!   [`SqsOptions::registry_ttl`].
//! * a standard **queue per group** `<ns>-g-<stream>_s_<group>`: visibility timeout = the
//!   stream's lease, retention = the stream's (SQS keeps 60 s to 14 days), and a redrive policy
//!   to the group's **dead-letter queue** `<ns>-d-<stream>_s_<group>` after `max_deliver`
//!   receives (where `max_deliver` ≤ 1000, SQS's limit).
//!
//! # Semantics
//!
//! * **Fan-out** is done by the publisher: every message is sent to every group's queue with
//!   `SendMessageBatch` (batches in order within a group, groups at once) (direct sends rather than SNS → SQS subscriptions: SNS has no per-message
//!   delay and would add a second service for nothing the sends lack). Entries a batch
//!   reports failed are sent again (three tries) with the same pgtide id; if one still fails,
//!   the publish fails with a retryable error saying how many groups got the message. Those
//!   groups keep it: a retried publish delivers it to them again under a new id (dedupe keys
//!   are not supported, see below).
//! * **Identity**: each message gets a UUID v7 at publish, carried in the `pgtide` message
//!   attribute (JSON: id, JSON flag, headers, due time, attempts before a re-send, dead-letter
//!   record), the same in every group and on every redelivery.
//! * **Leases are visibility timeouts**: a fetch receives with `VisibilityTimeout` = the lease
//!   (rounded up to whole seconds, at most 12 h); `in_progress` and a nack's delay are
//!   `ChangeMessageVisibility`; `release` sets the visibility to 0.
//! * **Attempts** are SQS's `ApproximateReceiveCount` plus the attempts of earlier copies of a
//!   re-sent message. pgtide dead-letters a nack on the last allowed attempt and a receive past
//!   `max_deliver` itself (with reason and error); the redrive policy is the backstop that
//!   moves a message whose last lease expired even when no pgtide consumer looks at it. A dead
//!   letter without pgtide's record was moved by the redrive policy and reads as reason
//!   `max_deliver`, error `lease expired on attempt N`. `term` copies the message to the
//!   dead-letter queue with its reason, then deletes it.
//! * **Delayed publish** is native (`DelaySeconds`, rounded up to whole seconds) up to 15
//!   minutes. A longer delay is sent with 15 minutes and its due time in the attribute; a fetch
//!   that receives it early sends it again with the remaining delay (at most 15 minutes) and
//!   deletes the early copy, so the attempt count stays right. A nack delay past 12 h (the
//!   longest visibility timeout) is done the same way.
//! * **Dead letters** are read by receiving the dead-letter queue with a visibility timeout and
//!   handing every message back at once (SQS has no browse): a second reader at the same
//!   moment may see fewer.
//! * **Stats** are SQS's approximate counts: `ready` = visible, `in_flight` = not visible
//!   (leased, or nacked and waiting for the retry), `delayed` = delayed sends, `dead` = the
//!   dead-letter queue's messages; no oldest-ready age (SQS reports none outside CloudWatch).
//!
//! # Limits (see [`Capabilities`])
//!
//! * Settles are not fenced: SQS deletes a message through any of its receipt handles, also one
//!   of an earlier receive, so a late ack from a consumer whose lease expired acks the
//!   redelivery another consumer holds. Only a visibility change (nack, term, `in_progress`,
//!   release) through the handle of a message that is gone is refused, and reported as lost.
//! * `release` counts as an attempt (a receive is a receive).
//! * No dedupe keys: only FIFO queues deduplicate, and they have no per-message delay, a fixed
//!   5-minute window and answer a duplicate without naming the original, which pgtide's
//!   receipt must return. A publish with a dedupe key fails with [`Error::Unsupported`].
//! * No [`GroupStart::Oldest`]: a new group's queue cannot receive what was sent before it
//!   existed. No priority. A publish to a stream without groups reaches nobody.
//! * A group created by another process receives what this handle publishes once this
//!   handle's registry cache expires ([`SqsOptions::registry_ttl`]).
//! * AWS refuses to create a queue within 60 s of deleting one of the same name: a stream or
//!   group deleted and created again at once fails with a retryable error there (moto allows
//!   it). A purge within 60 s of the previous one of the same queue fails the same way.

mod admin;
mod api;
mod codec;
mod connect;
mod consumer;
mod naming;
mod publish;
mod settle;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;

use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

pub use self::consumer::SqsConsumer;
use self::naming::Names;

/// What the SQS backend supports.
pub(crate) const SQS_CAPABILITIES: Capabilities = Capabilities {
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
    fenced_settle: false,
    fenced_after_release: false,
    ordering_keys: false,
    concurrency_limits: false,
    rate_limits: false,
    fair_share: false,
};

/// Options of an [`SqsBackend`].
///
/// ```
/// let options = pgtide::SqsOptions::default()
///     .region("eu-west-1")
///     .credentials("AKIDEXAMPLE", "secret");
/// # let _ = options;
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct SqsOptions {
    /// The AWS region. Defaults to the URL's `region=` parameter, else `AWS_REGION`, else
    /// `AWS_DEFAULT_REGION`; connecting fails if none is set.
    pub region: Option<String>,
    /// Access key id and secret access key. Defaults to the URL's user and password, else
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (with `AWS_SESSION_TOKEN` if set).
    /// Other credential sources (profiles, SSO, instance roles) need a client built by the
    /// caller: see [`SqsBackend::with_client`].
    pub credentials: Option<(String, String)>,
    /// Timeout of one SQS request (a long poll gets its wait on top). Defaults to 10 s.
    pub request_timeout: Duration,
    /// How long a handle trusts its cached copy of a stream's registry (config and groups)
    /// before publishing reads it again. Defaults to 2 s.
    pub registry_ttl: Duration,
    /// The longest delay left to SQS's own `DelaySeconds` (whole seconds, 1 s to 15 min);
    /// a longer one is emulated (see the module docs). Defaults to 15 min.
    pub max_native_delay: Duration,
}

impl std::fmt::Debug for SqsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("SqsOptions")
            .field("region", &self.region)
            .field("access_key_id", &self.credentials.as_ref().map(|c| &c.0))
            .field("request_timeout", &self.request_timeout)
            .field("registry_ttl", &self.registry_ttl)
            .field("max_native_delay", &self.max_native_delay)
            .finish()
    }
}

impl Default for SqsOptions {
    fn default() -> Self {
        SqsOptions {
            region: None,
            credentials: None,
            request_timeout: Duration::from_secs(10),
            registry_ttl: Duration::from_secs(2),
            max_native_delay: Duration::from_secs(publish::MAX_NATIVE_DELAY),
        }
    }
}

impl SqsOptions {
    /// Sets [`SqsOptions::region`].
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }
    /// Sets [`SqsOptions::credentials`].
    pub fn credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        self.credentials = Some((access_key_id.into(), secret.into()));
        self
    }
    /// Sets [`SqsOptions::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
    /// Sets [`SqsOptions::registry_ttl`].
    pub fn registry_ttl(mut self, ttl: Duration) -> Self {
        self.registry_ttl = ttl;
        self
    }
    /// Sets [`SqsOptions::max_native_delay`].
    pub fn max_native_delay(mut self, delay: Duration) -> Self {
        self.max_native_delay = delay;
        self
    }
}

/// A stream's registry as last read: config and groups.
#[derive(Debug)]
struct StreamMeta {
    names: Names,
    config: StreamConfig,
    registry_url: String,
    groups: Vec<String>,
    read_at: Instant,
}

struct Inner {
    client: Client,
    namespace: String,
    options: SqsOptions,
    streams: Mutex<HashMap<String, Arc<StreamMeta>>>,
    /// Queue URLs by name (SQS addresses queues by URL; looking one up is a round trip).
    urls: Mutex<HashMap<String, String>>,
}

/// Amazon SQS backend handle. Cheap to clone; clones share one HTTP client.
///
/// ```no_run
/// # async fn demo() -> pgtide::Result<()> {
/// use pgtide::{Queue, SqsBackend, StreamConfig};
/// // moto or another local server; credentials from the URL (or the AWS_* variables).
/// let sqs = SqsBackend::connect("sqs://test:test@127.0.0.1:5000?region=us-east-1", "shop").await?;
/// sqs.ensure_stream("orders", &StreamConfig::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqsBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsBackend")
            .field("namespace", &self.inner.namespace)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps guarded here stay consistent across a panic (single inserts and removes).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SqsBackend {
    /// Connects to the SQS endpoint of `url` (see the module docs for the form); every queue
    /// name starts with `namespace`. Uses [`SqsOptions::default`].
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        Self::connect_with(url, namespace, SqsOptions::default()).await
    }

    /// Connects with explicit options: `sqs://host:port` speaks plain HTTP (moto, ElasticMQ,
    /// LocalStack), `sqss://host` HTTPS with the system's roots (AWS). Sends one request
    /// (`ListQueues`) so that an unreachable endpoint or refused credentials fail here: a
    /// retryable [`Error::Broker`] for the first, a non-retryable one for the second.
    pub async fn connect_with(url: &str, namespace: &str, options: SqsOptions) -> Result<Self> {
        crate::names::validate_namespace(namespace)?;
        let client = connect::client(url, &options)?;
        let backend = Self::with_client(client, namespace, options)?;
        let inner = &backend.inner;
        api::timed(inner.options.request_timeout, async {
            inner
                .client
                .list_queues()
                .queue_name_prefix(format!("{namespace}-s-"))
                .max_results(1)
                .send()
                .await
                .map_err(api::sdk)
        })
        .await?;
        Ok(backend)
    }

    /// A handle over a client the caller built (for example with `aws-config`, to use
    /// profiles, SSO or instance roles). Sends nothing.
    pub fn with_client(client: Client, namespace: &str, options: SqsOptions) -> Result<Self> {
        crate::names::validate_namespace(namespace)?;
        let native = options.max_native_delay;
        if native < Duration::from_secs(1)
            || native > Duration::from_secs(publish::MAX_NATIVE_DELAY)
        {
            return Err(Error::InvalidConfig(
                "SqsOptions::max_native_delay must be 1 s to 15 min (SQS delays in whole seconds, at most 15 minutes)".into(),
            ));
        }
        Ok(SqsBackend {
            inner: Arc::new(Inner {
                client,
                namespace: namespace.to_owned(),
                options,
                streams: Mutex::default(),
                urls: Mutex::default(),
            }),
        })
    }

    /// The namespace (prefix of every queue name).
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    fn names(&self, stream: &str) -> Names {
        Names::new(&self.inner.namespace, stream)
    }

    /// The URL of queue `name` (cached), or `None` if it does not exist.
    async fn url(&self, name: &str) -> Result<Option<String>> {
        if let Some(url) = lock(&self.inner.urls).get(name) {
            return Ok(Some(url.clone()));
        }
        let url = self.timed(api::queue_url(&self.inner.client, name)).await?;
        if let Some(url) = &url {
            lock(&self.inner.urls).insert(name.to_owned(), url.clone());
        }
        Ok(url)
    }

    /// Forgets a queue URL found stale.
    fn forget_url(&self, name: &str) {
        lock(&self.inner.urls).remove(name);
    }

    /// One SQS call bounded by the request timeout.
    async fn timed<T>(&self, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        api::timed(self.inner.options.request_timeout, call).await
    }

    /// The stream's registry: cached if read less than `registry_ttl` ago (or `fresh` is
    /// false and any copy exists), else read from the registry queue's tags.
    async fn meta(&self, stream: &str, fresh: bool) -> Result<Arc<StreamMeta>> {
        crate::names::validate_name("stream", stream)?;
        if let Some(m) = lock(&self.inner.streams).get(stream) {
            if !fresh || m.read_at.elapsed() < self.inner.options.registry_ttl {
                return Ok(m.clone());
            }
        }
        self.read_meta(stream).await
    }

    async fn read_meta(&self, stream: &str) -> Result<Arc<StreamMeta>> {
        let names = self.names(stream);
        let missing = || {
            self.forget(stream);
            Error::StreamNotFound(stream.to_owned())
        };
        let Some(url) = self.url(&names.registry).await? else {
            return Err(missing());
        };
        let tags = match self
            .timed(async {
                match self
                    .inner
                    .client
                    .list_queue_tags()
                    .queue_url(&url)
                    .send()
                    .await
                {
                    Ok(out) => Ok(Some(out.tags().cloned().unwrap_or_default())),
                    Err(e) if api::queue_missing(api::code(&e)) => Ok(None),
                    Err(e) => Err(api::sdk(e)),
                }
            })
            .await?
        {
            Some(tags) => tags,
            None => {
                self.forget_url(&names.registry);
                return Err(missing());
            }
        };
        let config = codec::config_of(&tags).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "SQS queue {:?} was not created by pgtide: pick another stream name or namespace",
                names.registry
            ))
        })?;
        let meta = Arc::new(StreamMeta {
            groups: codec::groups_of(&tags),
            names,
            config,
            registry_url: url,
            read_at: Instant::now(),
        });
        lock(&self.inner.streams).insert(stream.to_owned(), meta.clone());
        Ok(meta)
    }

    /// Drops the cached registry of a stream (changed, deleted, or found missing).
    fn forget(&self, stream: &str) {
        lock(&self.inner.streams).remove(stream);
    }
}

impl Queue for SqsBackend {
    type Consumer = SqsConsumer;

    fn capabilities(&self) -> Capabilities {
        SQS_CAPABILITIES
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
        self.publish_all(stream, &msgs).await
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<SqsConsumer> {
        SqsConsumer::open(self, stream, group, name).await
    }
}
