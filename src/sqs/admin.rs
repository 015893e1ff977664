//! Streams and groups: creation, deletion, purge, stats and dead letters.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};

use super::api::{self, seconds_up};
use super::codec::{self, STREAM_TAG, TAGS_MAX};
use super::{SqsBackend, StreamMeta};
use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{DeadLetter, GroupStats};

/// The longest SQS visibility timeout (and so the longest lease): 12 hours.
pub(super) const MAX_VISIBILITY: u64 = 43_200;
/// SQS keeps messages 60 s to 14 days.
const MIN_RETENTION: u64 = 60;
const MAX_RETENTION: u64 = 14 * 86_400;
/// The largest message SQS takes: 1 MiB, body and attributes together.
pub(super) const MAX_MESSAGE: usize = 1 << 20;
/// SQS's limit on a redrive policy's `maxReceiveCount`.
const MAX_RECEIVE_COUNT: u32 = 1000;
/// How long a dead-letter browse hides what it read (handed back right after).
const BROWSE_VISIBILITY: i32 = 30;
/// Most dead letters one browse reads before sorting them.
const BROWSE_MAX: usize = 10_000;

pub(super) fn group_not_found(stream: &str, group: &str) -> Error {
    Error::GroupNotFound {
        stream: stream.to_owned(),
        group: group.to_owned(),
    }
}

/// What SQS cannot hold of a config, refused before anything is created.
fn check_config(config: &StreamConfig) -> Result<()> {
    if config.lease > Duration::from_secs(MAX_VISIBILITY) {
        return Err(Error::InvalidConfig(
            "the SQS backend's lease is a visibility timeout: at most 12 hours".into(),
        ));
    }
    Ok(())
}

impl SqsBackend {
    /// Creates queue `name` with `attributes`, or sets them on the queue if it exists (left
    /// over from a deleted stream or group); its URL.
    async fn ensure_queue(
        &self,
        name: &str,
        attributes: &[(QueueAttributeName, String)],
    ) -> Result<String> {
        let client = &self.inner.client;
        let mut create = client.create_queue().queue_name(name);
        for (k, v) in attributes {
            create = create.attributes(k.clone(), v);
        }
        let url = match self.timed(async { Ok(create.send().await) }).await? {
            Ok(out) => out.queue_url().map(str::to_owned),
            Err(e)
                if matches!(
                    api::code(&e),
                    Some("QueueAlreadyExists" | "QueueNameExists")
                ) =>
            {
                let url = self
                    .url(name)
                    .await?
                    .ok_or_else(|| api::broker(format!("queue {name} vanished"), true))?;
                let mut set = client.set_queue_attributes().queue_url(&url);
                for (k, v) in attributes {
                    set = set.attributes(k.clone(), v);
                }
                self.timed(async { set.send().await.map_err(api::sdk) })
                    .await?;
                Some(url)
            }
            Err(e) => return Err(api::sdk(e)),
        };
        let url = url.ok_or_else(|| api::broker("CreateQueue returned no URL", true))?;
        super::lock(&self.inner.urls).insert(name.to_owned(), url.clone());
        Ok(url)
    }

    /// Deletes queue `name` if it exists.
    async fn drop_queue(&self, name: &str) -> Result<bool> {
        let Some(url) = self.url(name).await? else {
            return Ok(false);
        };
        let deleted = self
            .timed(api::delete_queue(&self.inner.client, &url))
            .await?;
        self.forget_url(name);
        Ok(deleted)
    }

    pub(super) async fn create_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        validate_name("stream", stream)?;
        config.validate()?;
        check_config(config)?;
        let mut tags = codec::config_tags(config)?;
        match self.read_meta(stream).await {
            Ok(_) => return Ok(false),
            Err(Error::StreamNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        tags.insert(STREAM_TAG.to_owned(), stream.to_owned());
        let names = self.names(stream);
        let mut create = self.inner.client.create_queue().queue_name(&names.registry);
        for (k, v) in tags {
            create = create.tags(k, v);
        }
        let out = self
            .timed(async { create.send().await.map_err(api::sdk) })
            .await?;
        if let Some(url) = out.queue_url() {
            super::lock(&self.inner.urls).insert(names.registry.clone(), url.to_owned());
        }
        self.forget(stream);
        Ok(true)
    }

    pub(super) async fn remove_stream(&self, stream: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        let meta = match self.read_meta(stream).await {
            Ok(meta) => meta,
            Err(Error::StreamNotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        // The groups' queues first, the registry last: a crash in between leaves a stream that
        // can be deleted again.
        for group in &meta.groups {
            self.drop_queue(&meta.names.group(group)).await?;
            self.drop_queue(&meta.names.dead(group)).await?;
        }
        let existed = self.drop_queue(&meta.names.registry).await?;
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
        if start == GroupStart::Oldest {
            return Err(Error::Unsupported {
                backend: api::NAME,
                what: "GroupStart::Oldest (a new queue cannot receive what was sent before it existed)",
            });
        }
        let meta = self.read_meta(stream).await?;
        if meta.groups.iter().any(|g| g == group) {
            return Ok(false);
        }
        let used = 1 + codec::config_tags(&meta.config)?.len() + meta.groups.len();
        if used >= TAGS_MAX {
            return Err(Error::InvalidConfig(format!(
                "stream {stream:?} has {} groups, the most the SQS backend records in its registry queue's tags",
                meta.groups.len()
            )));
        }
        let config = &meta.config;
        let dead = self
            .ensure_queue(
                &meta.names.dead(group),
                &[
                    (
                        QueueAttributeName::MessageRetentionPeriod,
                        MAX_RETENTION.to_string(),
                    ),
                    (
                        QueueAttributeName::MaximumMessageSize,
                        MAX_MESSAGE.to_string(),
                    ),
                ],
            )
            .await?;
        let arn = self
            .timed(api::queue_arn(&self.inner.client, &dead))
            .await?
            .ok_or_else(|| {
                api::broker("the dead-letter queue vanished while being set up", true)
            })?;
        let retention = config
            .retention
            .as_secs()
            .clamp(MIN_RETENTION, MAX_RETENTION);
        let mut attributes = vec![
            (
                QueueAttributeName::VisibilityTimeout,
                seconds_up(config.lease, MAX_VISIBILITY).to_string(),
            ),
            (
                QueueAttributeName::MessageRetentionPeriod,
                retention.to_string(),
            ),
            (
                QueueAttributeName::MaximumMessageSize,
                MAX_MESSAGE.to_string(),
            ),
        ];
        // The backstop for deliveries whose last lease expired with no pgtide consumer to
        // dead-letter them (pgtide does it first when it sees them).
        let redrive = if config.max_deliver <= MAX_RECEIVE_COUNT {
            serde_json::json!({"deadLetterTargetArn": arn, "maxReceiveCount": config.max_deliver})
                .to_string()
        } else {
            String::new()
        };
        attributes.push((QueueAttributeName::RedrivePolicy, redrive));
        self.ensure_queue(&meta.names.group(group), &attributes)
            .await?;
        // The tag makes the group visible to publishers: last.
        let tag = self
            .inner
            .client
            .tag_queue()
            .queue_url(&meta.registry_url)
            .tags(codec::group_tag(group), "new");
        let tagged = self.timed(async { Ok(tag.send().await) }).await?;
        self.forget(stream);
        match tagged {
            Ok(_) => Ok(true),
            Err(e) if api::queue_missing(api::code(&e)) => {
                Err(Error::StreamNotFound(stream.to_owned()))
            }
            Err(e) => Err(api::sdk(e)),
        }
    }

    pub(super) async fn remove_group(&self, stream: &str, group: &str) -> Result<bool> {
        validate_name("group", group)?;
        let meta = self.read_meta(stream).await?;
        let existed = meta.groups.iter().any(|g| g == group);
        if existed {
            // Publishers stop sending to it first.
            let untag = self
                .inner
                .client
                .untag_queue()
                .queue_url(&meta.registry_url)
                .tag_keys(codec::group_tag(group));
            self.timed(async { untag.send().await.map_err(api::sdk) })
                .await?;
        }
        self.forget(stream);
        self.drop_queue(&meta.names.group(group)).await?;
        self.drop_queue(&meta.names.dead(group)).await?;
        Ok(existed)
    }

    pub(super) async fn purge_stream(&self, stream: &str) -> Result<()> {
        let meta = self.read_meta(stream).await?;
        for group in &meta.groups {
            for name in [meta.names.group(group), meta.names.dead(group)] {
                let Some(url) = self.url(&name).await? else {
                    continue;
                };
                let purge = self.inner.client.purge_queue().queue_url(&url);
                match self.timed(async { Ok(purge.send().await) }).await? {
                    Ok(_) => {}
                    Err(e) if api::queue_missing(api::code(&e)) => self.forget_url(&name),
                    Err(e) => return Err(api::sdk(e)),
                }
            }
        }
        Ok(())
    }

    /// The registry of a stream that has `group`, read again if the cached one lacks it.
    pub(super) async fn group_meta(&self, stream: &str, group: &str) -> Result<Arc<StreamMeta>> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let meta = self.meta(stream, true).await?;
        if meta.groups.iter().any(|g| g == group) {
            return Ok(meta);
        }
        let meta = self.read_meta(stream).await?;
        if meta.groups.iter().any(|g| g == group) {
            Ok(meta)
        } else {
            Err(group_not_found(stream, group))
        }
    }

    /// A queue's attribute counts by name; `None` if the queue is gone.
    async fn counts(
        &self,
        name: &str,
        wanted: &[QueueAttributeName],
    ) -> Result<Option<HashMap<QueueAttributeName, i64>>> {
        let Some(url) = self.url(name).await? else {
            return Ok(None);
        };
        let mut call = self.inner.client.get_queue_attributes().queue_url(&url);
        for w in wanted {
            call = call.attribute_names(w.clone());
        }
        match self.timed(async { Ok(call.send().await) }).await? {
            Ok(out) => Ok(Some(
                out.attributes()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| v.parse::<i64>().ok().map(|n| (k.clone(), n)))
                    .collect(),
            )),
            Err(e) if api::queue_missing(api::code(&e)) => {
                self.forget_url(name);
                Ok(None)
            }
            Err(e) => Err(api::sdk(e)),
        }
    }

    pub(super) async fn group_stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        let meta = self.group_meta(stream, group).await?;
        use QueueAttributeName as A;
        let wanted = [
            A::ApproximateNumberOfMessages,
            A::ApproximateNumberOfMessagesNotVisible,
            A::ApproximateNumberOfMessagesDelayed,
        ];
        let group_name = meta.names.group(group);
        let dead_name = meta.names.dead(group);
        let (counts, dead) = tokio::join!(
            self.counts(&group_name, &wanted),
            self.counts(&dead_name, &wanted[..2]),
        );
        let counts = counts?.ok_or_else(|| group_not_found(stream, group))?;
        let dead = dead?.unwrap_or_default();
        let get = |m: &HashMap<A, i64>, a: A| m.get(&a).copied().unwrap_or(0);
        Ok(GroupStats {
            stream: stream.to_owned(),
            group: Some(group.to_owned()),
            ready: get(&counts, A::ApproximateNumberOfMessages),
            delayed: get(&counts, A::ApproximateNumberOfMessagesDelayed),
            in_flight: get(&counts, A::ApproximateNumberOfMessagesNotVisible),
            dead: get(&dead, A::ApproximateNumberOfMessages)
                + get(&dead, A::ApproximateNumberOfMessagesNotVisible),
            oldest_ready_age: None,
        })
    }

    /// Reads the group's dead-letter queue without consuming it: receives everything visible
    /// (hidden for 30 s meanwhile), then makes it visible again at once.
    pub(super) async fn read_dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let meta = self.group_meta(stream, group).await?;
        let name = meta.names.dead(group);
        let Some(url) = self.url(&name).await? else {
            return Ok(vec![]);
        };
        let client = &self.inner.client;
        let mut read = vec![];
        let mut handles = vec![];
        let mut seen = HashSet::new();
        let cap = limit.clamp(1_000, BROWSE_MAX);
        let result: Result<()> = async {
            while read.len() < cap {
                let receive = client
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .visibility_timeout(BROWSE_VISIBILITY)
                    .wait_time_seconds(0)
                    .message_system_attribute_names(MessageSystemAttributeName::All)
                    .message_attribute_names(codec::META);
                let out = self
                    .timed(async { receive.send().await.map_err(api::sdk) })
                    .await?;
                let msgs = out.messages();
                if msgs.is_empty() {
                    return Ok(());
                }
                for m in msgs {
                    let Some(r) = codec::decode(m) else { continue };
                    handles.push(r.handle.clone());
                    if seen.insert(m.message_id().unwrap_or_default().to_owned()) {
                        read.push(codec::dead_letter(
                            stream,
                            group,
                            r,
                            meta.config.max_deliver,
                        ));
                    }
                }
            }
            Ok(())
        }
        .await;
        // Handed back even when the browse failed part way.
        for chunk in handles.chunks(10) {
            let mut back = client.change_message_visibility_batch().queue_url(&url);
            for (i, h) in chunk.iter().enumerate() {
                back = back.entries(
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(h)
                        .visibility_timeout(0)
                        .build()
                        .map_err(|e| api::broker(e, false))?,
                );
            }
            if let Err(e) = self
                .timed(async { back.send().await.map_err(api::sdk) })
                .await
            {
                tracing::warn!(error = %e, stream, group, "pgtide sqs: dead letters stay hidden for 30 s after a browse");
            }
        }
        result?;
        read.sort_by(|a, b| a.dead_at.cmp(&b.dead_at).then(a.id.cmp(&b.id)));
        read.truncate(limit);
        Ok(read)
    }
}
