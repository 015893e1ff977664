//! [`Queue`] and [`QueueConsumer`] for the Postgres engine: thin delegations to the inherent API.

use std::time::Duration;

use super::{Consumer, PgBackend};
use crate::backend::{Capabilities, Queue, QueueConsumer};
use crate::{
    DeadLetter, Delivery, GroupStart, GroupStats, OutgoingMessage, PublishReceipt, Result,
    SettleReport, StreamConfig,
};

/// What the Postgres engine supports: everything.
pub(crate) const POSTGRES_CAPABILITIES: Capabilities = Capabilities {
    delay: true,
    native_delay: true,
    dedupe: true,
    nack_delay: true,
    lease_timeout: true,
    lease_extension: true,
    transactional_publish: true,
    priority: true,
    exact_stats: true,
    group_start_oldest: true,
    fenced_settle: true,
    fenced_after_release: false,
};

impl Queue for PgBackend {
    type Consumer = Consumer;

    fn capabilities(&self) -> Capabilities {
        POSTGRES_CAPABILITIES
    }

    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        PgBackend::ensure_stream(self, stream, config.clone()).await
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        PgBackend::delete_stream(self, stream).await
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        PgBackend::ensure_group(self, stream, group, start).await
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        PgBackend::delete_group(self, stream, group).await
    }

    async fn purge(&self, stream: &str) -> Result<()> {
        self.purge_stream(stream).await.map(|_| ())
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
        PgBackend::dead_letters(self, stream, group, limit).await
    }

    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        PgBackend::publish(self, stream, msg).await
    }

    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        PgBackend::publish_batch(self, stream, msgs).await
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<Consumer> {
        PgBackend::consumer(self, stream, group, name).await
    }
}

impl QueueConsumer for Consumer {
    fn stream(&self) -> &str {
        Consumer::stream(self)
    }
    fn group(&self) -> &str {
        Consumer::group(self)
    }
    fn name(&self) -> &str {
        Consumer::name(self)
    }

    async fn lease(&self) -> Option<Duration> {
        Consumer::lease(self).await
    }

    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        Consumer::try_fetch(self, max).await
    }

    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        Consumer::fetch(self, max, timeout).await
    }

    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        Consumer::ack_batch(self, ds).await
    }

    async fn ack_and_fetch(
        &self,
        done: &[&Delivery],
        max: usize,
    ) -> Result<(SettleReport, Vec<Delivery>)> {
        Consumer::ack_and_fetch(self, done, max).await
    }

    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        Consumer::nack_batch(self, ds, delay, error).await
    }

    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        Consumer::term_batch(self, ds, reason).await
    }

    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        Consumer::in_progress(self, d, lease).await
    }

    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        Consumer::release_batch(self, ds).await
    }
}
