//! Redis Streams backend (feature `redis`, Redis 7.0 or newer).
//!
//! Layout (see [`keys`] for the full table): one Redis stream (the *log*) per pgtide stream, with
//! one Redis consumer group per pgtide group, so every group sees every message (fan-out) and
//! the consumers of a group compete. Everything that must be atomic runs in Lua scripts
//! (`lua/*.lua`), each touching the keys of one stream only (one hash slot).
//!
//! How the pgtide semantics map onto Redis:
//!
//! - **Publish**: `XADD` of the fields `id` (a UUID v7 made by pgtide, so a delivery's message id
//!   is stable across retries), `payload`, `json`, `headers`. Retention trims the log by age with
//!   `XADD … MINID ~ now-retention` (approximate: whole radix-tree nodes), whether or not every
//!   group has read the entries, like dropping a Postgres partition.
//! - **Dedupe**: `SET key id NX PX window` in the same script as the `XADD`; a duplicate returns
//!   the original id.
//! - **Delayed publish** (emulated): the packed message waits in a sorted set scored by its due
//!   time; any fetch of any group moves due entries into the log. Groups created while a message
//!   waits there receive it too.
//! - **Leases**: a per-group sorted set of lease expiries (`leases`) next to Redis's pending
//!   list. A fetch first re-claims expired leases (`XCLAIM`, which counts a delivery), then reads
//!   new entries with `XREADGROUP >`. The pending list's owner and delivery count fence settles:
//!   a settle whose consumer or count no longer matches changed nothing and reports the delivery
//!   as lost. The attempt number is the pending list's delivery count (plus the attempts carried
//!   by a retry copy). `in_progress` sets any lease length (the pending list's idle time cannot
//!   be set into the future, so `XAUTOCLAIM` with one min-idle per stream could not honour
//!   leases longer than the stream's) and resets the idle time with `XCLAIM … JUSTID`.
//! - **Nack / release** (per group): the entry is acknowledged and a copy carrying the attempts
//!   so far goes to the group's own retry stream (at once, or through the group's `later` sorted
//!   set when delayed), so a retry never reaches the other groups. Retry copies are deleted once
//!   settled.
//! - **Dead letters**: `term`, a nack on the last allowed attempt, or a lease that expires on it
//!   `XADD` the message with `attempts`, `reason`, `error` and `dead_at` to the group's dead
//!   stream and acknowledge the entry.
//! - **Wake-ups without polling**: a fetch that finds nothing blocks in `XREAD BLOCK` on the log,
//!   the group's retry stream and a one-entry `wake` stream (poked when a delayed publish or a
//!   delayed nack adds a due time), on a dedicated connection, for at most the time until the
//!   next due time (delayed message, retry or lease expiry), the stream's lease, or the fetch
//!   timeout.
//! - **Stats** (exact, no backlog scan): ready = the group's `lag` on the log (`XINFO GROUPS`;
//!   exact because pgtide never `XDEL`s the log, capped by `XLEN` when retention trimmed unread
//!   entries) + unclaimed retry copies + lapsed leases + due delayed entries; delayed = the
//!   sorted sets' entries not yet due; in flight = live leases; dead = `XLEN` of the dead stream.
//!
//! Time is the Redis server's clock (`TIME` in the scripts); only `deliver_at` comes from the
//! caller's clock. Dead-letter streams are trimmed by the stream's retention too. Priority is
//! accepted and ignored (the log is FIFO). Consumer names should be unique per process: the
//! fence compares the pending entry's owner by name (and its delivery count).

mod admin;
mod consumer;
mod keys;
mod publish;

use std::sync::{Arc, Mutex};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{RedisError, RetryMethod, Script, Value};

use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

pub use consumer::RedisConsumer;
use keys::StreamKeys;

const NAME: &str = "redis";

/// Idle blocking connections kept for reuse.
const MAX_IDLE_BLOCKING: usize = 16;

/// What the Redis backend supports.
pub(crate) const REDIS_CAPABILITIES: Capabilities = Capabilities {
    delay: true,
    native_delay: false,
    dedupe: true,
    nack_delay: true,
    lease_timeout: true,
    lease_extension: true,
    transactional_publish: false,
    priority: false,
    exact_stats: true,
    group_start_oldest: true,
    fenced_settle: true,
    fenced_after_release: true,
    ordering_keys: false,
    concurrency_limits: false,
    rate_limits: false,
    fair_share: false,
};

/// Redis Streams backend handle. Cheap to clone; clones share one auto-reconnecting connection.
///
/// ```no_run
/// # async fn demo() -> pgtide::Result<()> {
/// use pgtide::{Queue, RedisBackend, StreamConfig};
/// let redis = RedisBackend::connect("redis://127.0.0.1:6379", "shop").await?;
/// redis.ensure_stream("orders", &StreamConfig::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    namespace: String,
    scripts: Scripts,
    /// Dedicated connections for `XREAD BLOCK`, which would stall the shared connection.
    blocking: Mutex<Vec<MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    ensure_stream: Script,
    ensure_group: Script,
    delete_group: Script,
    purge: Script,
    stats: Script,
    publish: Script,
    fetch: Script,
    settle: Script,
}

macro_rules! lua {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/common.lua"),
            include_str!(concat!("lua/", $file))
        ))
    };
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            ensure_stream: lua!("ensure_stream.lua"),
            ensure_group: lua!("ensure_group.lua"),
            delete_group: lua!("delete_group.lua"),
            purge: lua!("purge.lua"),
            stats: lua!("stats.lua"),
            publish: lua!("publish.lua"),
            fetch: lua!("fetch.lua"),
            settle: lua!("settle.lua"),
        }
    }
}

impl RedisBackend {
    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS,
    /// checked against the system roots or the CA of the `tls_ca=PATH` parameter:
    /// `rediss://host:6380/0?tls_ca=/etc/redis/ca.pem`); every key is prefixed by `namespace`. Fails if the server cannot be reached; afterwards the
    /// connection reconnects by itself and operations during an outage fail with a retryable
    /// [`Error::Broker`].
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        crate::names::validate_namespace(namespace)?;
        let (url, ca) = crate::broker_tls::take_ca_param(NAME, url)?;
        let client = match ca {
            None => redis::Client::open(url.as_str()),
            Some(ca) => redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(crate::broker_tls::read_ca(NAME, &ca)?),
                },
            ),
        }
        // Not echoing the URL: it may carry a password.
        .map_err(|e| Error::InvalidConfig(format!("redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
            .set_response_timeout(Some(std::time::Duration::from_secs(10)))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(broker)?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                client,
                conn,
                namespace: namespace.to_owned(),
                scripts: Scripts::new(),
                blocking: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The namespace (key prefix).
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    fn keys(&self, stream: &str) -> StreamKeys {
        StreamKeys::new(&self.inner.namespace, stream)
    }

    /// A connection of its own for one blocking read.
    async fn blocking_conn(&self) -> Result<MultiplexedConnection> {
        let idle = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => {
                // The read is bounded by its BLOCK argument and a timeout around it.
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
                    .set_response_timeout(None);
                self.inner
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(broker)
            }
        }
    }

    /// Forgets the idle blocking connections (after a connection error they are likely dead too).
    fn drop_blocking_conns(&self) {
        self.inner
            .blocking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Returns a blocking connection whose last read completed (it is idle again).
    fn reuse_blocking_conn(&self, conn: MultiplexedConnection) {
        let mut idle = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_BLOCKING {
            idle.push(conn);
        }
    }
}

/// A Redis error as a pgtide error: connection trouble is retryable.
fn broker(e: RedisError) -> Error {
    let retryable = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || !matches!(e.retry_method(), RetryMethod::NoRetry);
    crate::broker_tls::broker_error(NAME, e, retryable)
}

/// Maps the typed errors raised by the scripts (`PGTIDE_…`) and Redis's `NOGROUP`.
fn script_error(e: RedisError, stream: &str, group: Option<&str>) -> Error {
    let group_not_found = |g: &str| Error::GroupNotFound {
        stream: stream.to_owned(),
        group: g.to_owned(),
    };
    match (e.code(), group) {
        (Some("PGTIDE_NO_STREAM"), _) => Error::StreamNotFound(stream.to_owned()),
        (Some("PGTIDE_NO_GROUP" | "NOGROUP"), Some(g)) => group_not_found(g),
        (Some("PGTIDE_TOO_LARGE"), _) => {
            let mut it = e
                .detail()
                .unwrap_or_default()
                .split_whitespace()
                .map(|n| n.parse::<usize>().unwrap_or_default());
            Error::PayloadTooLarge {
                stream: stream.to_owned(),
                size: it.next().unwrap_or_default(),
                limit: it.next().unwrap_or_default(),
            }
        }
        _ => broker(e),
    }
}

fn bad_reply(what: &'static str) -> Error {
    Error::Broker {
        backend: NAME,
        source: format!("unexpected reply from a pgtide script: {what}").into(),
        retryable: false,
    }
}

/// Reply helpers: the scripts return nested arrays of integers and strings.
fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(bad_reply("expected an array")),
    }
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_reply("expected an integer")),
        _ => Err(bad_reply("expected an integer")),
    }
}

fn bytes(v: Value) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        Value::Nil => Ok(Vec::new()),
        _ => Err(bad_reply("expected a string")),
    }
}

fn text(v: Value) -> Result<String> {
    String::from_utf8(bytes(v)?).map_err(|_| bad_reply("expected UTF-8 text"))
}

impl Queue for RedisBackend {
    type Consumer = RedisConsumer;

    fn capabilities(&self) -> Capabilities {
        REDIS_CAPABILITIES
    }

    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        admin::ensure_stream(self, stream, config).await
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        admin::delete_stream(self, stream).await
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        admin::ensure_group(self, stream, group, start).await
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        admin::delete_group(self, stream, group).await
    }

    async fn purge(&self, stream: &str) -> Result<()> {
        admin::purge(self, stream).await
    }

    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        admin::stats(self, stream, group).await
    }

    async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        admin::dead_letters(self, stream, group, limit).await
    }

    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        crate::limits::check_messages(std::slice::from_ref(&msg))?;
        let msg = crate::otel::traced_one(msg);
        let mut receipts = publish::publish(self, stream, std::slice::from_ref(&msg)).await?;
        receipts.pop().ok_or_else(|| bad_reply("no receipt"))
    }

    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        crate::limits::check_messages(msgs)?;
        let msgs = crate::otel::traced(msgs);
        let msgs = &*msgs;
        publish::publish(self, stream, msgs).await
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<RedisConsumer> {
        RedisConsumer::new(self, stream, group, name).await
    }
}
