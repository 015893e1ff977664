//! The tee: a [`Queue`] that writes to two backends, for migrating a service from one to the
//! other without touching its handlers. Admin calls and publishes go to both; consumers read
//! from the primary. Switch reads by swapping primary and secondary once the secondary has caught
//! up, then drop the tee.

use crate::config::{GroupConfig, GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

/// What a failed write to the secondary does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TeeMode {
    /// Fail the call (the primary write has happened: retry with a dedupe key). The default.
    #[default]
    Strict,
    /// Log and carry on: the primary is the source of truth.
    BestEffort,
}

/// Dual writes to `primary` and `secondary`; reads from `primary`.
#[derive(Debug, Clone)]
pub struct Tee<A: Queue, B: Queue> {
    primary: A,
    secondary: B,
    mode: TeeMode,
}

impl<A: Queue, B: Queue> Tee<A, B> {
    /// A tee writing to both, reading from `primary`.
    pub fn new(primary: A, secondary: B, mode: TeeMode) -> Self {
        Tee {
            primary,
            secondary,
            mode,
        }
    }

    /// The primary backend.
    pub fn primary(&self) -> &A {
        &self.primary
    }

    /// The secondary backend.
    pub fn secondary(&self) -> &B {
        &self.secondary
    }

    fn second<T>(&self, what: &str, r: Result<T>) -> Result<()> {
        match (r, self.mode) {
            (Ok(_), _) => Ok(()),
            (Err(e), TeeMode::Strict) => Err(e),
            (Err(e), TeeMode::BestEffort) => {
                tracing::warn!(error = %e, what, "pgtide tee: secondary write failed");
                Ok(())
            }
        }
    }
}

impl<A: Queue, B: Queue> Queue for Tee<A, B> {
    type Consumer = A::Consumer;

    /// The primary's capabilities, except that dedupe, delay and transactional publish need both.
    fn capabilities(&self) -> Capabilities {
        let (a, b) = (self.primary.capabilities(), self.secondary.capabilities());
        Capabilities {
            dedupe: a.dedupe && b.dedupe,
            delay: a.delay && b.delay,
            transactional_publish: false,
            ..a
        }
    }

    /// Migrates both (the secondary as the mode says: a failure is an error only when strict).
    async fn migrate(&self) -> Result<()> {
        self.primary.migrate().await?;
        self.second("migrate", self.secondary.migrate().await)
    }

    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        let created = self.primary.ensure_stream(stream, config).await?;
        self.second(
            "ensure_stream",
            self.secondary.ensure_stream(stream, config).await,
        )?;
        Ok(created)
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        let deleted = self.primary.delete_stream(stream).await?;
        self.second("delete_stream", self.secondary.delete_stream(stream).await)?;
        Ok(deleted)
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        let created = self.primary.ensure_group(stream, group, start).await?;
        self.second(
            "ensure_group",
            self.secondary.ensure_group(stream, group, start).await,
        )?;
        Ok(created)
    }

    async fn ensure_group_with(
        &self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
    ) -> Result<bool> {
        let created = self
            .primary
            .ensure_group_with(stream, group, config)
            .await?;
        self.second(
            "ensure_group",
            self.secondary
                .ensure_group_with(stream, group, config)
                .await,
        )?;
        Ok(created)
    }

    async fn set_key_weight(
        &self,
        stream: &str,
        group: &str,
        key: Option<&str>,
        weight: Option<f64>,
    ) -> Result<()> {
        self.primary
            .set_key_weight(stream, group, key, weight)
            .await?;
        self.second(
            "set_key_weight",
            self.secondary
                .set_key_weight(stream, group, key, weight)
                .await,
        )
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        let deleted = self.primary.delete_group(stream, group).await?;
        self.second(
            "delete_group",
            self.secondary.delete_group(stream, group).await,
        )?;
        Ok(deleted)
    }

    async fn purge(&self, stream: &str) -> Result<()> {
        self.primary.purge(stream).await?;
        self.second("purge", self.secondary.purge(stream).await)
    }

    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        self.primary.stats(stream, group).await
    }

    async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.primary.dead_letters(stream, group, limit).await
    }

    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        let mut r = self
            .publish_batch(stream, std::slice::from_ref(&msg))
            .await?;
        r.pop()
            .ok_or_else(|| Error::InvalidConfig("tee: empty receipt".to_owned()))
    }

    /// Publishes to the primary, then the same messages to the secondary with the primary's ids
    /// as dedupe keys where the secondary dedupes (so a retried call does not duplicate there).
    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        let receipts = self.primary.publish_batch(stream, msgs).await?;
        let dedupe = self.secondary.capabilities().dedupe;
        let copies: Vec<OutgoingMessage> = msgs
            .iter()
            .zip(&receipts)
            .filter(|(_, r)| !r.duplicate)
            .map(|(m, r)| {
                let mut m = m.clone().header(super::SOURCE_ID_HEADER, r.id.to_string());
                if !dedupe {
                    // The secondary cannot dedupe: do not make it refuse the copy.
                    m.dedupe_key = None;
                } else if m.dedupe_key.is_none() {
                    m = m.dedupe_key(r.id.to_string());
                }
                m
            })
            .collect();
        if !copies.is_empty() {
            self.second(
                "publish",
                self.secondary.publish_batch(stream, &copies).await,
            )?;
        }
        Ok(receipts)
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<A::Consumer> {
        self.primary.consumer(stream, group, name).await
    }
}
