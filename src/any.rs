//! Choosing a backend at run time from a URL: `memory://`, and with their cargo features
//! `postgres://` (on by default), `nats://` (`tls://`, `nats+tls://`), `redis://`
//! (`rediss://`), `amqp://` (`amqps://`), `sqs://` (`sqss://`), `kafka://`.

use std::time::Duration;

use crate::config::{GroupConfig, GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::memory::{MemoryBackend, MemoryConsumer};
#[cfg(feature = "postgres")]
use crate::postgres::{PgBackend, PgConsumer};
use crate::queue::{
    Capabilities, DeadLetter, Delivery, GroupStats, OutgoingMessage, PublishReceipt, Queue,
    QueueConsumer, SettleReport,
};

/// Any backend, chosen at run time. Implements [`Queue`] by delegating to the variant.
///
/// ```no_run
/// # async fn demo() -> pgtide::Result<()> {
/// use pgtide::{AnyBackend, Queue, QueueConsumer, OutgoingMessage, StreamConfig, GroupStart};
/// let url = std::env::var("PGTIDE_BACKEND").unwrap_or("memory://".into());
/// let queue = AnyBackend::connect(&url, "shop").await?;
/// queue.migrate().await?; // installs the namespace on Postgres; nothing to do on brokers
/// queue.ensure_stream("orders", &StreamConfig::default()).await?;
/// queue.ensure_group("orders", "billing", GroupStart::New).await?;
/// queue.publish("orders", OutgoingMessage::json(&serde_json::json!({"id": 1}))?).await?;
/// let consumer = queue.consumer("orders", "billing", "worker-1").await?;
/// for d in consumer.fetch(10, std::time::Duration::from_secs(1)).await? {
///     consumer.ack(&d).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyBackend {
    /// The PostgreSQL engine.
    #[cfg(feature = "postgres")]
    Postgres(PgBackend),
    /// In-process memory.
    Memory(MemoryBackend),
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(crate::nats::NatsBackend),
    /// Redis Streams.
    #[cfg(feature = "redis")]
    Redis(crate::redis::RedisBackend),
    /// RabbitMQ.
    #[cfg(feature = "amqp")]
    Amqp(crate::amqp::AmqpBackend),
    /// Amazon SQS.
    #[cfg(feature = "sqs")]
    Sqs(crate::sqs::SqsBackend),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(crate::kafka::KafkaBackend),
}

/// A consumer of [`AnyBackend`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyConsumer {
    /// The PostgreSQL engine.
    #[cfg(feature = "postgres")]
    Postgres(PgConsumer),
    /// In-process memory.
    Memory(MemoryConsumer),
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(crate::nats::NatsConsumer),
    /// Redis Streams.
    #[cfg(feature = "redis")]
    Redis(crate::redis::RedisConsumer),
    /// RabbitMQ.
    #[cfg(feature = "amqp")]
    Amqp(crate::amqp::AmqpConsumer),
    /// Amazon SQS.
    #[cfg(feature = "sqs")]
    Sqs(crate::sqs::SqsConsumer),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(crate::kafka::KafkaConsumer),
}

macro_rules! dispatch {
    ($enum:ident, $value:expr, $b:ident => $e:expr) => {
        match $value {
            #[cfg(feature = "postgres")]
            $enum::Postgres($b) => $e,
            $enum::Memory($b) => $e,
            #[cfg(feature = "nats")]
            $enum::Nats($b) => $e,
            #[cfg(feature = "redis")]
            $enum::Redis($b) => $e,
            #[cfg(feature = "amqp")]
            $enum::Amqp($b) => $e,
            #[cfg(feature = "sqs")]
            $enum::Sqs($b) => $e,
            #[cfg(feature = "kafka")]
            $enum::Kafka($b) => $e,
        }
    };
}

impl AnyBackend {
    /// Connects to the backend named by the URL scheme. `namespace` is the Postgres schema, or
    /// the prefix of every broker-side name (streams, keys, exchanges), so several applications
    /// or tests can share one server. For `memory://NAME`, handles with the same NAME share state
    /// inside the process; `memory://` alone is private.
    pub async fn connect(url: &str, namespace: &str) -> Result<AnyBackend> {
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => Ok(AnyBackend::Postgres(
                PgBackend::builder(url).namespace(namespace).build()?,
            )),
            "memory" => {
                crate::names::validate_namespace(namespace)?;
                let name = url.trim_start_matches("memory://");
                Ok(AnyBackend::Memory(if name.is_empty() {
                    MemoryBackend::new()
                } else {
                    MemoryBackend::named(&format!("{namespace}/{name}"))
                }))
            }
            #[cfg(feature = "nats")]
            "nats" | "tls" | "nats+tls" => Ok(AnyBackend::Nats(
                crate::nats::NatsBackend::connect(url, namespace).await?,
            )),
            #[cfg(feature = "redis")]
            "redis" | "rediss" => Ok(AnyBackend::Redis(
                crate::redis::RedisBackend::connect(url, namespace).await?,
            )),
            #[cfg(feature = "amqp")]
            "amqp" | "amqps" => Ok(AnyBackend::Amqp(
                crate::amqp::AmqpBackend::connect(url, namespace).await?,
            )),
            #[cfg(feature = "sqs")]
            "sqs" | "sqss" => Ok(AnyBackend::Sqs(
                crate::sqs::SqsBackend::connect(url, namespace).await?,
            )),
            #[cfg(not(feature = "sqs"))]
            "sqs" | "sqss" => Err(Error::InvalidConfig(
                "backend URL sqs://… needs pgtide built with the cargo feature \"sqs\"".into(),
            )),
            #[cfg(feature = "kafka")]
            "kafka" | "kafkas" => Ok(AnyBackend::Kafka(
                crate::kafka::KafkaBackend::connect(url, namespace).await?,
            )),
            #[cfg(not(feature = "kafka"))]
            "kafka" | "kafkas" => Err(Error::InvalidConfig(
                "backend URL kafka://… needs pgtide built with the cargo feature \"kafka\"".into(),
            )),
            #[allow(unreachable_patterns)]
            "postgres" | "postgresql" | "nats" | "tls" | "nats+tls" | "redis" | "rediss" | "amqp"
            | "amqps" => {
                Err(Error::InvalidConfig(format!(
                    "backend URL {scheme}://… needs pgtide built with the cargo feature {:?}",
                    if scheme.starts_with("amqp") {
                        "amqp"
                    } else if scheme.starts_with("redis") {
                        "redis"
                    } else if scheme.starts_with("postgres") {
                        "postgres"
                    } else {
                        "nats"
                    }
                )))
            }
            _ => Err(Error::InvalidConfig(format!(
                "backend URL scheme {scheme:?} is unknown: use postgres://, memory://, nats:// (tls://), redis:// (rediss://), amqp:// (amqps://), sqs:// (sqss://) or kafka://"
            ))),
        }
    }

    /// The backend's short name: `postgres`, `memory`, `nats`, `redis`, `amqp`, `sqs` or `kafka`.
    pub fn kind(&self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            AnyBackend::Postgres(_) => "postgres",
            AnyBackend::Memory(_) => "memory",
            #[cfg(feature = "nats")]
            AnyBackend::Nats(_) => "nats",
            #[cfg(feature = "redis")]
            AnyBackend::Redis(_) => "redis",
            #[cfg(feature = "amqp")]
            AnyBackend::Amqp(_) => "amqp",
            #[cfg(feature = "sqs")]
            AnyBackend::Sqs(_) => "sqs",
            #[cfg(feature = "kafka")]
            AnyBackend::Kafka(_) => "kafka",
        }
    }
}

impl Queue for AnyBackend {
    type Consumer = AnyConsumer;

    fn capabilities(&self) -> Capabilities {
        dispatch!(AnyBackend, self, b => b.capabilities())
    }
    async fn migrate(&self) -> Result<()> {
        dispatch!(AnyBackend, self, b => Queue::migrate(b).await)
    }
    async fn close(&self) -> Result<()> {
        dispatch!(AnyBackend, self, b => Queue::close(b).await)
    }
    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        dispatch!(AnyBackend, self, b => Queue::ensure_stream(b, stream, config).await)
    }
    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        dispatch!(AnyBackend, self, b => Queue::delete_stream(b, stream).await)
    }
    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        dispatch!(AnyBackend, self, b => Queue::ensure_group(b, stream, group, start).await)
    }
    async fn ensure_group_with(
        &self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
    ) -> Result<bool> {
        dispatch!(AnyBackend, self, b => Queue::ensure_group_with(b, stream, group, config).await)
    }
    async fn set_key_weight(
        &self,
        stream: &str,
        group: &str,
        key: Option<&str>,
        weight: Option<f64>,
    ) -> Result<()> {
        dispatch!(AnyBackend, self, b => Queue::set_key_weight(b, stream, group, key, weight).await)
    }
    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        dispatch!(AnyBackend, self, b => Queue::delete_group(b, stream, group).await)
    }
    async fn purge(&self, stream: &str) -> Result<()> {
        dispatch!(AnyBackend, self, b => Queue::purge(b, stream).await)
    }
    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        dispatch!(AnyBackend, self, b => Queue::stats(b, stream, group).await)
    }
    async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        dispatch!(AnyBackend, self, b => Queue::dead_letters(b, stream, group, limit).await)
    }
    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        dispatch!(AnyBackend, self, b => Queue::publish(b, stream, msg).await)
    }
    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        dispatch!(AnyBackend, self, b => Queue::publish_batch(b, stream, msgs).await)
    }
    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<AnyConsumer> {
        Ok(match self {
            #[cfg(feature = "postgres")]
            AnyBackend::Postgres(b) => {
                AnyConsumer::Postgres(Queue::consumer(b, stream, group, name).await?)
            }
            AnyBackend::Memory(b) => {
                AnyConsumer::Memory(Queue::consumer(b, stream, group, name).await?)
            }
            #[cfg(feature = "nats")]
            AnyBackend::Nats(b) => {
                AnyConsumer::Nats(Queue::consumer(b, stream, group, name).await?)
            }
            #[cfg(feature = "redis")]
            AnyBackend::Redis(b) => {
                AnyConsumer::Redis(Queue::consumer(b, stream, group, name).await?)
            }
            #[cfg(feature = "amqp")]
            AnyBackend::Amqp(b) => {
                AnyConsumer::Amqp(Queue::consumer(b, stream, group, name).await?)
            }
            #[cfg(feature = "sqs")]
            AnyBackend::Sqs(b) => AnyConsumer::Sqs(Queue::consumer(b, stream, group, name).await?),
            #[cfg(feature = "kafka")]
            AnyBackend::Kafka(b) => {
                AnyConsumer::Kafka(Queue::consumer(b, stream, group, name).await?)
            }
        })
    }
}

impl QueueConsumer for AnyConsumer {
    fn stream(&self) -> &str {
        dispatch!(AnyConsumer, self, c => QueueConsumer::stream(c))
    }
    fn group(&self) -> &str {
        dispatch!(AnyConsumer, self, c => QueueConsumer::group(c))
    }
    fn name(&self) -> &str {
        dispatch!(AnyConsumer, self, c => QueueConsumer::name(c))
    }
    fn settles_wake_fetches(&self) -> bool {
        dispatch!(AnyConsumer, self, c => QueueConsumer::settles_wake_fetches(c))
    }
    async fn lease(&self) -> Option<Duration> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::lease(c).await)
    }
    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::try_fetch(c, max).await)
    }
    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::fetch(c, max, timeout).await)
    }
    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::ack_batch(c, ds).await)
    }
    async fn ack_and_fetch(
        &self,
        done: &[&Delivery],
        max: usize,
    ) -> Result<(SettleReport, Vec<Delivery>)> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::ack_and_fetch(c, done, max).await)
    }
    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::nack_batch(c, ds, delay, error).await)
    }
    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::term_batch(c, ds, reason).await)
    }
    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::in_progress(c, d, lease).await)
    }
    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::release_batch(c, ds).await)
    }
    async fn pause_batch(
        &self,
        ds: &[&Delivery],
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<SettleReport> {
        dispatch!(AnyConsumer, self, c => QueueConsumer::pause_batch(c, ds, until).await)
    }
}
