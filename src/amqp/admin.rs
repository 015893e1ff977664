//! Handle-level administration beyond the [`Queue`](crate::queue::Queue) impl: deleting a whole
//! namespace, the namespace's stream log (`<ns>~streams`), and queue depths for stats.

use std::collections::BTreeSet;
use std::sync::Weak;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;

use super::conn::{broker, broker_msg, is_not_found, is_precondition_failed};
use super::{guard, names, topology, AmqpBackend};
use crate::error::Result;
use crate::names::validate_name;
use crate::queue::Queue;

impl AmqpBackend {
    /// Deletes everything of the namespace: every stream created through pgtide (with its
    /// groups, messages and dead letters) and the delay levels. For tests and tenant teardown.
    pub async fn delete_namespace(&self) -> Result<()> {
        let log = names::stream_log(&self.inner.ns);
        let ch = self.inner.conn.channel().await?;
        let mut streams = BTreeSet::new();
        loop {
            match ch
                .basic_get(log.as_str().into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(m)) => {
                    streams.insert(String::from_utf8_lossy(&m.delivery.data).into_owned());
                }
                Ok(None) => break,
                Err(e) if is_not_found(&e) => break,
                Err(e) => return Err(broker(e)),
            }
        }
        for stream in streams
            .iter()
            .filter(|s| validate_name("stream", s).is_ok())
        {
            self.delete_stream(stream).await?;
        }
        let ch = self.inner.conn.channel().await?;
        topology::delete_delay_levels(&ch, &self.inner.ns).await?;
        ch.queue_delete(log.as_str().into(), Default::default())
            .await
            .map_err(broker)?;
        guard(&self.inner.delay_routes).clear();
        Ok(())
    }

    /// Appends `stream` to the namespace's stream log. Published `mandatory`, so that if the log
    /// was deleted between the declare and the publish (its last stream deleted meanwhile, see
    /// [`AmqpBackend::drop_stream_log_if_unused`]) the broker returns the entry and it is
    /// logged again into a re-declared queue.
    pub(super) async fn log_stream(&self, stream: &str) -> Result<()> {
        let log = names::stream_log(&self.inner.ns);
        for _ in 0..3 {
            let ch = self.inner.conn.channel().await?;
            ch.queue_declare(
                log.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
            let props = BasicProperties::default().with_delivery_mode(2);
            let publisher = self.inner.conn.publisher().await?;
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    log.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    stream.as_bytes(),
                    props,
                )
                .await
                .map_err(broker)?
                .await
                .map_err(broker)?;
            if confirm.take_message().is_none() {
                return Ok(());
            }
        }
        Err(broker_msg(
            format!("could not log stream {stream:?} in {log:?}: the queue kept disappearing"),
            true,
        ))
    }

    /// Deletes the namespace's stream log when no stream it names exists any more, so that
    /// deleting a namespace's last stream leaves no `<ns>~streams` queue behind. The delete is
    /// conditional on an empty queue: a stream logged meanwhile by another client keeps it.
    pub(super) async fn drop_stream_log_if_unused(&self) -> Result<()> {
        let log = names::stream_log(&self.inner.ns);
        let ch = self.inner.conn.channel().await?;
        let mut last_tag = 0;
        loop {
            let entry = match ch
                .basic_get(log.as_str().into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(broker(e)),
            };
            last_tag = entry.delivery.delivery_tag;
            let stream = String::from_utf8_lossy(&entry.delivery.data).into_owned();
            let exists = validate_name("stream", &stream).is_ok()
                && self
                    .depth(&self.stream_names(&stream).registry)
                    .await?
                    .is_some();
            if exists {
                // Still in use: put every entry taken back, unchanged.
                return ch
                    .basic_nack(
                        last_tag,
                        BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        },
                    )
                    .await
                    .map_err(broker);
            }
        }
        if last_tag != 0 {
            ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(broker)?;
        }
        let ch = self.inner.conn.channel().await?;
        match ch
            .queue_delete(
                log.as_str().into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(_) => Ok(()),
            // Not empty any more (a stream was logged meanwhile), or deleted by someone else.
            Err(e) if is_not_found(&e) || is_precondition_failed(&e) => Ok(()),
            Err(e) => Err(broker(e)),
        }
    }

    /// Depth of the queue `name`, or `None` if it does not exist.
    pub(super) async fn depth(&self, name: &str) -> Result<Option<u32>> {
        let ch = self.inner.conn.channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match ch
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => Ok(Some(q.message_count())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(broker(e)),
        }
    }

    /// (leased, buffered) messages of this handle's consumers of the group.
    pub(super) fn held(&self, stream: &str, group: &str) -> (usize, usize) {
        let mut consumers = guard(&self.inner.consumers);
        consumers.retain(|w| w.strong_count() > 0);
        consumers
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.stream == stream && s.group == group)
            .map(|s| s.held())
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }
}
