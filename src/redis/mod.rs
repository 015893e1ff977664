//! Redis Streams backend (feature `redis`): work in progress.

use std::time::Duration;

use crate::backend::{Capabilities, Queue, QueueConsumer};
use crate::{
    DeadLetter, Delivery, Error, GroupStart, GroupStats, OutgoingMessage, PublishReceipt, Result,
    SettleReport, StreamConfig,
};

const NAME: &str = "redis";

fn todo<T>() -> Result<T> {
    Err(Error::Unsupported {
        backend: NAME,
        what: "anything yet",
    })
}

/// Redis Streams backend handle.
#[derive(Debug, Clone)]
pub struct RedisBackend {
    _url: String,
    _namespace: String,
}

impl RedisBackend {
    /// Connects to `url`; every server-side name is prefixed by `namespace`.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        crate::names::validate_namespace(namespace)?;
        Ok(Self {
            _url: url.to_owned(),
            _namespace: namespace.to_owned(),
        })
    }
}

/// A consumer of the Redis Streams backend.
#[derive(Debug, Clone)]
pub struct RedisConsumer {
    stream: String,
    group: String,
    name: String,
}

impl Queue for RedisBackend {
    type Consumer = RedisConsumer;
    fn capabilities(&self) -> Capabilities {
        crate::backend::Capabilities {
            delay: false,
            native_delay: false,
            dedupe: false,
            nack_delay: false,
            lease_timeout: false,
            lease_extension: false,
            transactional_publish: false,
            priority: false,
            exact_stats: false,
            group_start_oldest: false,
            fenced_settle: false,
        }
    }
    async fn ensure_stream(&self, _: &str, _: &StreamConfig) -> Result<bool> {
        todo()
    }
    async fn delete_stream(&self, _: &str) -> Result<bool> {
        todo()
    }
    async fn ensure_group(&self, _: &str, _: &str, _: GroupStart) -> Result<bool> {
        todo()
    }
    async fn delete_group(&self, _: &str, _: &str) -> Result<bool> {
        todo()
    }
    async fn purge(&self, _: &str) -> Result<()> {
        todo()
    }
    async fn stats(&self, _: &str, _: &str) -> Result<GroupStats> {
        todo()
    }
    async fn dead_letters(&self, _: &str, _: &str, _: usize) -> Result<Vec<DeadLetter>> {
        todo()
    }
    async fn publish(&self, _: &str, _: OutgoingMessage) -> Result<PublishReceipt> {
        todo()
    }
    async fn publish_batch(&self, _: &str, _: &[OutgoingMessage]) -> Result<Vec<PublishReceipt>> {
        todo()
    }
    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<RedisConsumer> {
        Ok(RedisConsumer {
            stream: stream.into(),
            group: group.into(),
            name: name.into(),
        })
    }
}

impl QueueConsumer for RedisConsumer {
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
        None
    }
    async fn try_fetch(&self, _: usize) -> Result<Vec<Delivery>> {
        todo()
    }
    async fn fetch(&self, _: usize, _: Duration) -> Result<Vec<Delivery>> {
        todo()
    }
    async fn ack_batch(&self, _: &[&Delivery]) -> Result<SettleReport> {
        todo()
    }
    async fn nack_batch(
        &self,
        _: &[&Delivery],
        _: Option<Duration>,
        _: Option<&str>,
    ) -> Result<SettleReport> {
        todo()
    }
    async fn term_batch(&self, _: &[&Delivery], _: &str) -> Result<SettleReport> {
        todo()
    }
    async fn in_progress(&self, _: &mut Delivery, _: Option<Duration>) -> Result<()> {
        todo()
    }
    async fn release_batch(&self, _: &[&Delivery]) -> Result<SettleReport> {
        todo()
    }
}
