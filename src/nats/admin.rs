//! Streams and groups: creation, deletion, purge, stats and dead letters.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::api::{self, Missing};
use super::naming::{Names, MOVER};
use super::{codec, NatsBackend, StreamMeta};
use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{uuid_time, DeadLetter, GroupStats};

/// JetStream's default duplicate window; used where pgtide needs one but the user set none.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long the mover may hold a delayed message before JetStream redelivers it.
const MOVER_ACK_WAIT: Duration = Duration::from_secs(30);

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

pub(super) fn group_not_found(stream: &str, group: &str) -> Error {
    Error::GroupNotFound {
        stream: stream.to_owned(),
        group: group.to_owned(),
    }
}

/// Config of the JetStream stream holding a pgtide stream's messages.
fn message_stream(names: &Names, config: &StreamConfig, replicas: usize) -> serde_json::Value {
    let window = if config.dedupe_window.is_zero() {
        DEFAULT_DUPLICATE_WINDOW
    } else {
        config.dedupe_window
    };
    json!({
        "name": names.stream,
        "description": codec::describe(config),
        "subjects": [names.ready, names.delayed],
        "retention": "limits",
        "discard": "old",
        "storage": "file",
        "num_replicas": replicas,
        "max_age": nanos(config.retention),
        "duplicate_window": nanos(window.min(config.retention)),
    })
}

/// Config of the dead-letter stream of a pgtide stream.
fn dead_stream(names: &Names, config: &StreamConfig, replicas: usize) -> serde_json::Value {
    json!({
        "name": names.dead,
        "description": "pgtide dead letters",
        "subjects": [names.dead_all],
        "retention": "limits",
        "discard": "old",
        "storage": "file",
        "num_replicas": replicas,
        "max_age": nanos(config.retention),
        "duplicate_window": nanos(DEFAULT_DUPLICATE_WINDOW.min(config.retention)),
    })
}

/// Config of a group's durable pull consumer.
fn group_consumer(
    names: &Names,
    group: &str,
    lease: Duration,
    start: GroupStart,
) -> serde_json::Value {
    json!({
        "durable_name": Names::durable(group),
        "description": format!("pgtide group {group}"),
        "deliver_policy": match start { GroupStart::Oldest => "all", GroupStart::New => "new" },
        "ack_policy": "explicit",
        "ack_wait": nanos(lease),
        "max_deliver": -1,
        "max_ack_pending": -1,
        "filter_subject": names.ready,
        "replay_policy": "instant",
    })
}

/// Config of the consumer the mover reads delayed messages with.
pub(super) fn mover_consumer(names: &Names) -> serde_json::Value {
    json!({
        "durable_name": MOVER,
        "description": "pgtide: moves delayed messages to the ready subject when due",
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": nanos(MOVER_ACK_WAIT),
        "max_deliver": -1,
        "max_ack_pending": -1,
        "filter_subject": names.delayed,
        "replay_policy": "instant",
    })
}

impl NatsBackend {
    pub(super) async fn create_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        validate_name("stream", stream)?;
        config.validate()?;
        let names = self.names(stream);
        let js = &self.inner.js;
        let replicas = self.inner.options.replicas;
        let existing = api::stream_info(js, &names.stream, None).await?;
        let created = match existing {
            // Also completes a stream whose creation was interrupted below.
            Some(_) => false,
            None => {
                // The dead-letter stream first: a message stream always has one.
                api::create_stream(js, &dead_stream(&names, config, replicas)).await?;
                api::create_stream(js, &message_stream(&names, config, replicas)).await?
            }
        };
        if existing.is_some() {
            api::create_stream(js, &dead_stream(&names, config, replicas)).await?;
        }
        if let Err(Missing::Stream) =
            api::create_consumer(js, &names.stream, &mover_consumer(&names)).await?
        {
            return Err(Error::StreamNotFound(stream.to_owned()));
        }
        Ok(created)
    }

    pub(super) async fn remove_stream(&self, stream: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        let names = self.names(stream);
        let existed = api::delete_stream(&self.inner.js, &names.stream).await?;
        api::delete_stream(&self.inner.js, &names.dead).await?;
        self.forget(stream);
        Ok(existed)
    }

    pub(super) async fn create_group(
        &self,
        stream: &str,
        group: &str,
        start: GroupStart,
    ) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let meta = self.meta(stream).await?;
        let js = &self.inner.js;
        let durable = Names::durable(group);
        match api::consumer_info(js, &meta.names.stream, &durable).await? {
            Ok(_) => return Ok(false),
            Err(Missing::Stream) => return Err(self.stream_gone(stream)),
            Err(Missing::Consumer) => {}
        }
        let config = group_consumer(&meta.names, group, meta.config.lease, start);
        match api::create_consumer(js, &meta.names.stream, &config).await? {
            Ok(()) => Ok(true),
            Err(_) => Err(self.stream_gone(stream)),
        }
    }

    pub(super) async fn remove_group(&self, stream: &str, group: &str) -> Result<bool> {
        validate_name("group", group)?;
        let meta = self.meta(stream).await?;
        api::delete_consumer(&self.inner.js, &meta.names.stream, &Names::durable(group)).await
    }

    pub(super) async fn purge_stream(&self, stream: &str) -> Result<()> {
        let meta = self.meta(stream).await?;
        if !api::purge_stream(&self.inner.js, &meta.names.stream).await? {
            return Err(self.stream_gone(stream));
        }
        api::purge_stream(&self.inner.js, &meta.names.dead).await?;
        Ok(())
    }

    /// The stream was found missing on the server: forget it and say so.
    pub(super) fn stream_gone(&self, stream: &str) -> Error {
        self.forget(stream);
        Error::StreamNotFound(stream.to_owned())
    }

    /// A group's consumer info, with typed errors for a missing stream or group.
    pub(super) async fn group_info(
        &self,
        meta: &StreamMeta,
        stream: &str,
        group: &str,
    ) -> Result<api::ConsumerInfo> {
        let durable = Names::durable(group);
        match api::consumer_info(&self.inner.js, &meta.names.stream, &durable).await? {
            Ok(info) => Ok(info),
            Err(Missing::Consumer) => Err(group_not_found(stream, group)),
            Err(Missing::Stream) => Err(self.stream_gone(stream)),
        }
    }

    pub(super) async fn group_stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        validate_name("group", group)?;
        let meta = self.meta(stream).await?;
        let js = &self.inner.js;
        let dead_subject = meta.names.dead_subject(group);
        let (info, dead, mover) = tokio::join!(
            self.group_info(&meta, stream, group),
            api::stream_info(js, &meta.names.dead, Some(&dead_subject)),
            api::consumer_info(js, &meta.names.stream, MOVER),
        );
        let info = info?;
        let dead = dead?
            .and_then(|i| i.state.subjects)
            .and_then(|s| s.get(&dead_subject).copied())
            .unwrap_or(0);
        let delayed = match mover? {
            Ok(m) => m.num_pending + m.num_ack_pending,
            Err(_) => 0,
        };
        // The oldest never-delivered message; redeliveries are counted as in flight.
        let oldest_ready_age = if info.num_pending > 0 {
            let next = info.delivered.stream_seq + 1;
            api::get_message(js, &meta.names.stream, next, Some(&meta.names.ready))
                .await?
                .and_then(|m| codec::message_id(Some(&m.headers)))
                .map(|id| (Utc::now() - uuid_time(&id)).to_std().unwrap_or_default())
        } else {
            None
        };
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        Ok(GroupStats {
            stream: stream.to_owned(),
            group: Some(group.to_owned()),
            ready: count(info.num_pending),
            delayed: count(delayed),
            in_flight: count(info.num_ack_pending),
            dead: count(dead),
            oldest_ready_age,
        })
    }

    pub(super) async fn read_dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        validate_name("group", group)?;
        let meta = self.meta(stream).await?;
        self.group_info(&meta, stream, group).await?;
        let subject = meta.names.dead_subject(group);
        let mut out = Vec::new();
        let mut seq = 1;
        while out.len() < limit {
            let Some(m) =
                api::get_message(&self.inner.js, &meta.names.dead, seq, Some(&subject)).await?
            else {
                break;
            };
            seq = m.sequence + 1;
            out.push(codec::decode_dead(stream, group, m));
        }
        Ok(out)
    }
}
