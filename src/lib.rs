//! # pgtide
//!
//! Durable streams with consumer groups in the PostgreSQL you already run.
//!
//! * **Streams and groups**: every group of a stream receives every message (fan-out); inside a
//!   group, consumers compete and each delivery is leased to one of them at a time.
//! * **Transactional publish**: [`PgBackend::publish_in`] (tokio-postgres) and
//!   [`PgBackend::publish_sqlx`] write inside your transaction; the message exists iff you commit.
//! * **At-least-once, explicit settle**: ack, nack (retry with backoff), term (dead letter),
//!   in_progress (extend the lease); settles are fenced by the attempt number.
//! * **Everything in SQL**: `pgtide.publish(...)`, `pgtide.read(...)`, `pgtide.ack(...)`, and the
//!   views `stream_stats`, `deliveries`, `dead_letters`.
//!
//! ```no_run
//! use std::time::Duration;
//! use pgtide::{GroupStart, OutgoingMessage, PgBackend, StreamConfig};
//!
//! # async fn demo() -> pgtide::Result<()> {
//! let pg = PgBackend::connect("postgres://postgres@127.0.0.1/postgres").await?;
//! pg.migrate().await?;
//! pg.ensure_stream("orders", &StreamConfig::default()).await?;
//! pg.ensure_group("orders", "billing", GroupStart::New).await?;
//!
//! let receipt = pg.publish("orders", OutgoingMessage::json(&serde_json::json!({"id": 1}))?).await?;
//!
//! let consumer = pg.consumer("orders", "billing", "worker-1").await?;
//! for delivery in consumer.fetch(10, Duration::from_secs(1)).await? {
//!     let order: serde_json::Value = delivery.json()?;
//!     println!("{} {order}", delivery.id());
//!     consumer.ack(&delivery).await?;
//! }
//! # let _ = receipt;
//! # Ok(()) }
//! ```

// The README's program compiles (and the test suite checks it) as a doctest.
#[cfg(all(doctest, feature = "postgres"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(feature = "amqp")]
mod amqp;
mod any;
#[cfg(any(feature = "nats", feature = "redis", feature = "amqp"))]
mod broker_tls;
mod config;
mod error;
#[cfg(feature = "kafka")]
mod kafka;
mod limits;
mod memory;
mod metrics;
mod names;
#[cfg(feature = "nats")]
mod nats;
mod otel;
#[cfg(feature = "postgres")]
mod postgres;
mod queue;
mod rate;
#[cfg(feature = "redis")]
mod redis;
mod relay;
#[cfg(feature = "sqs")]
mod sqs;
mod worker;

#[cfg(feature = "amqp")]
pub use crate::amqp::{AmqpBackend, AmqpConsumer};
pub use crate::any::{AnyBackend, AnyConsumer};
pub use crate::config::{
    validate_weight, Backoff, GroupConfig, GroupStart, StreamConfig, MAX_WEIGHT, MIN_WEIGHT,
};
pub use crate::error::{ConnectProblem, Error, Result};
#[cfg(feature = "kafka")]
pub use crate::kafka::{KafkaBackend, KafkaConsumer, KafkaOptions};
pub use crate::limits::{check_duration, check_time, MAX_DURATION};
pub use crate::memory::{MemoryBackend, MemoryConsumer};
pub use crate::names::{
    validate_key, validate_name, validate_namespace, MAX_KEY_LEN, MAX_NAME_LEN,
};
#[cfg(feature = "nats")]
pub use crate::nats::{NatsBackend, NatsConsumer, NatsOptions};
#[cfg(feature = "postgres")]
#[doc(hidden)]
pub use crate::postgres::{connect_raw, redact_url, RawConnection};
#[cfg(feature = "postgres")]
pub use crate::postgres::{
    migration_sql, GroupInfo, HotTable, Inbox, KeyInfo, ListenerStatus, MaintenanceReport,
    MigrateReport, PgBackend, PgBackendBuilder, PgConsumer, ScoutLease, ScoutStatus, StatementMode,
    StreamInfo, VacuumStatus, DEFAULT_NAMESPACE,
};
pub use crate::queue::{
    Capabilities, DeadLetter, Delivery, Envelope, Event, GroupStats, Headers, Message,
    OutgoingMessage, PublishReceipt, Queue, QueueConsumer, SettleReport, EVENT_ID_HEADER,
    EVENT_PRODUCED_AT_HEADER, EVENT_PRODUCER_HEADER, EVENT_SCHEMA_VERSION_HEADER,
    EVENT_TYPE_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER,
};
pub use crate::rate::RateLimit;
#[cfg(feature = "redis")]
pub use crate::redis::{RedisBackend, RedisConsumer};
pub use crate::relay::{Relay, RelayReport, Tee, TeeMode, SOURCE_ID_HEADER};
#[cfg(feature = "sqs")]
pub use crate::sqs::{SqsBackend, SqsConsumer, SqsOptions};
pub use crate::worker::{
    HandlerResult, Outcome, Worker, WorkerConfig, WorkerHook, WorkerReport, MALFORMED,
};
/// Re-exported: stops workers and background tasks.
pub use tokio_util::sync::CancellationToken;
