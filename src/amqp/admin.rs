//! The [`Queue`] implementation: administration, inspection, publish, consumers.

use std::collections::BTreeSet;
use std::sync::Arc;

use lapin::options::{BasicGetOptions, BasicNackOptions, QueuePurgeOptions};

use super::codec::decode;
use super::conn::{broker, is_not_found, NAME};
use super::lease::Shared;
use super::registry::{self, StreamRecord};
use super::{guard, topology, AmqpBackend, AmqpConsumer, AMQP_CAPABILITIES};
use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

fn group_not_found(stream: &str, group: &str) -> Error {
    Error::GroupNotFound {
        stream: stream.to_owned(),
        group: group.to_owned(),
    }
}

impl Queue for AmqpBackend {
    type Consumer = AmqpConsumer;

    fn capabilities(&self) -> Capabilities {
        AMQP_CAPABILITIES
    }

    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        validate_name("stream", stream)?;
        config.validate()?;
        let s = self.stream_names(stream);
        let conn = &self.inner.conn;
        if let Some(r) = registry::read(conn, &s.registry).await? {
            self.cache(stream, r);
            return Ok(false);
        }
        let ch = conn.channel().await?;
        topology::declare_stream(&ch, &s).await?;
        let record = StreamRecord {
            version: 1,
            config: config.into(),
            groups: BTreeSet::new(),
        };
        registry::publish(conn, &s.registry, &record).await?;
        self.log_stream(stream).await?;
        self.cache(stream, record);
        Ok(true)
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        let s = self.stream_names(stream);
        let Some(locked) = registry::lock(&self.inner.conn, &s.registry).await? else {
            self.forget(stream);
            return Ok(false);
        };
        let ch = self.inner.conn.channel().await?;
        for group in &locked.record.groups {
            topology::delete_group(&ch, &self.group_names(stream, group)).await?;
            guard(&self.inner.delay_routes).remove(&self.group_names(stream, group).queue);
        }
        // Deleting the registry queue drops the record we hold.
        topology::delete_stream(&ch, &s).await?;
        drop(locked);
        guard(&self.inner.delay_routes).remove(&s.landing);
        self.forget(stream);
        self.drop_stream_log_if_unused().await?;
        Ok(true)
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        if start == GroupStart::Oldest {
            return Err(Error::Unsupported {
                backend: NAME,
                what: "GroupStart::Oldest (a new RabbitMQ queue only receives later messages)",
            });
        }
        let s = self.stream_names(stream);
        let conn = &self.inner.conn;
        let locked = registry::lock(conn, &s.registry)
            .await?
            .ok_or_else(|| Error::StreamNotFound(stream.to_owned()))?;
        let ch = conn.channel().await?;
        topology::declare_group(&ch, &s, &self.group_names(stream, group)).await?;
        if locked.record.groups.contains(group) {
            let record = locked.record.clone();
            locked.release().await;
            self.cache(stream, record);
            return Ok(false);
        }
        let mut record = locked.record.clone();
        record.groups.insert(group.to_owned());
        record.version += 1;
        locked.commit(conn, &s.registry, record.clone()).await?;
        self.cache(stream, record);
        Ok(true)
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let s = self.stream_names(stream);
        let conn = &self.inner.conn;
        let locked = registry::lock(conn, &s.registry)
            .await?
            .ok_or_else(|| Error::StreamNotFound(stream.to_owned()))?;
        if !locked.record.groups.contains(group) {
            locked.release().await;
            return Ok(false);
        }
        let g = self.group_names(stream, group);
        let ch = conn.channel().await?;
        topology::delete_group(&ch, &g).await?;
        guard(&self.inner.delay_routes).remove(&g.queue);
        let mut record = locked.record.clone();
        record.groups.remove(group);
        record.version += 1;
        locked.commit(conn, &s.registry, record.clone()).await?;
        self.cache(stream, record);
        Ok(true)
    }

    async fn purge(&self, stream: &str) -> Result<()> {
        validate_name("stream", stream)?;
        let record = self.record(stream, true).await?;
        let ch = self.inner.conn.channel().await?;
        for group in &record.groups {
            let g = self.group_names(stream, group);
            for q in [&g.queue, &g.dead] {
                match ch
                    .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
                    .await
                {
                    Ok(_) => {}
                    // Deleted meanwhile; the channel is closed now.
                    Err(e) if is_not_found(&e) => return Ok(()),
                    Err(e) => return Err(broker(e)),
                }
            }
        }
        Ok(())
    }

    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        self.group_record(stream, group).await?;
        let g = self.group_names(stream, group);
        let ready = self.depth(&g.queue).await?;
        let dead = self.depth(&g.dead).await?;
        let (Some(ready), Some(dead)) = (ready, dead) else {
            return Err(group_not_found(stream, group));
        };
        // Messages a doorbell holds unleased are ready for that consumer's next fetch.
        let (leased, buffered) = self.held(stream, group);
        Ok(GroupStats {
            stream: stream.to_owned(),
            group: Some(group.to_owned()),
            ready: i64::from(ready) + buffered as i64,
            delayed: 0,
            in_flight: leased as i64,
            dead: i64::from(dead),
            oldest_ready_age: None,
        })
    }

    async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        self.group_record(stream, group).await?;
        let g = self.group_names(stream, group);
        let ch = self.inner.conn.channel().await?;
        let mut out = Vec::new();
        let mut last_tag = None;
        while out.len() < limit {
            let m = match ch
                .basic_get(g.dead.as_str().into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(m)) => m.delivery,
                Ok(None) => break,
                Err(e) if is_not_found(&e) => return Err(group_not_found(stream, group)),
                Err(e) => return Err(broker(e)),
            };
            last_tag = Some(m.delivery_tag);
            let d = decode(&m.properties, false);
            out.push(DeadLetter {
                stream: stream.to_owned(),
                group: group.to_owned(),
                id: d.id,
                attempts: d.attempts_made.unwrap_or(d.attempt.saturating_sub(1)),
                reason: d.reason.unwrap_or_else(|| "unknown".to_owned()),
                error: d.last_error,
                dead_at: d.dead_at.unwrap_or_else(chrono::Utc::now),
                payload: Some(m.data),
                headers: d.headers,
            });
        }
        if let Some(tag) = last_tag {
            // Put every browsed message back where it was; the channel closing would too.
            let back = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            ch.basic_nack(tag, back).await.map_err(broker)?;
        }
        Ok(out)
    }

    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        let mut r = self
            .publish_messages(stream, std::slice::from_ref(&msg))
            .await?;
        r.pop()
            .ok_or_else(|| super::conn::broker_msg("publish returned no receipt", false))
    }

    /// Not atomic: on error, some of the messages may have been published.
    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        self.publish_messages(stream, msgs).await
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<AmqpConsumer> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", name)?;
        // Fresh, not cached: re-declaring a group another process deleted would resurrect it.
        let record = self.record(stream, true).await?;
        if !record.groups.contains(group) {
            return Err(group_not_found(stream, group));
        }
        let s = self.stream_names(stream);
        let g = self.group_names(stream, group);
        // Consumers declare their side too, so a half-created group heals.
        let ch = self.inner.conn.channel().await?;
        topology::declare_group(&ch, &s, &g).await?;
        let config = record.config.to_config();
        let shared = Shared::start(self.clone(), stream, group, name, g, config);
        guard(&self.inner.consumers).push(Arc::downgrade(&shared));
        Ok(AmqpConsumer { shared })
    }
}
