//! Streams and groups: topics, the registry topic, purge marks, stats and dead letters.
//!
//! librdkafka's metadata, watermark, offset and reader calls block: they run on the blocking
//! pool, bounded by the request timeout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::Producer as _;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::codec::{self, MetaRecord, RecordHeaders, StoredConfig};
use super::group::Topic;
use super::naming::{Names, MAX_TOPIC_LEN};
use super::{broker, lock, KafkaBackend, StreamMeta};
use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{DeadLetter, GroupStats};

/// How long a read waits for more records once it reached the reported end.
const QUIET: Duration = Duration::from_millis(40);

/// One record read back: offset, headers, payload.
type Raw = (i64, RecordHeaders, Option<Vec<u8>>);

pub(super) fn group_not_found(stream: &str, group: &str) -> Error {
    Error::GroupNotFound {
        stream: stream.to_owned(),
        group: group.to_owned(),
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| broker(e, true))?
}

/// Commits `tpl` asynchronously and waits (blocking, at most `timeout`) until the group's
/// committed offsets read back as at least these. librdkafka's synchronous commit has no timeout
/// of its own.
pub(super) fn commit_confirmed<X, C>(
    consumer: &X,
    tpl: &TopicPartitionList,
    timeout: Duration,
) -> Result<()>
where
    X: Consumer<C>,
    C: rdkafka::consumer::ConsumerContext + 'static,
{
    consumer
        .commit(tpl, CommitMode::Async)
        .map_err(|e| broker(e, true))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(broker(
                "the broker did not confirm an offset commit in time",
                true,
            ));
        }
        let read = consumer
            .committed_offsets(tpl.clone(), left)
            .map_err(|e| broker(e, true))?;
        let done = tpl.elements().iter().all(|want| {
            read.find_partition(want.topic(), want.partition())
                .and_then(|got| got.offset().to_raw())
                .zip(want.offset().to_raw())
                .is_some_and(|(got, want)| got >= want)
        });
        if done {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One past the last record of a partition whose reported end is `high` (see
/// [`KafkaBackend::watermarks`]): reads from `high - 1` until a short quiet spell.
fn read_end(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    low: i64,
    high: i64,
    timeout: Duration,
) -> Result<i64> {
    if high <= low {
        return Ok(high);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(high - 1))
        .map_err(|e| broker(e, false))?;
    consumer.assign(&tpl).map_err(|e| broker(e, true))?;
    let deadline = Instant::now() + timeout;
    let mut end = high;
    let mut seen = false;
    loop {
        // Wait long for the first record (it exists), then stop at the first quiet spell.
        let wait = if seen {
            QUIET
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        if wait.is_zero() {
            return Err(broker(
                format!("reading the end of {topic} timed out"),
                true,
            ));
        }
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                end = end.max(m.offset() + 1);
                seen = true;
            }
            Some(Err(e)) => return Err(broker(e, true)),
            None if seen => return Ok(end),
            None => {}
        }
    }
}

impl KafkaBackend {
    /// A consumer for reads and offset commits outside a group runtime.
    fn plain_consumer(&self, group_id: &str) -> Result<BaseConsumer> {
        self.client_config()
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .map_err(|e| broker(e, false))
    }

    /// The partition count of a topic, `None` if it does not exist.
    pub(super) async fn partitions_of(&self, topic: &str) -> Result<Option<i32>> {
        let producer = self.inner.producer.clone();
        let timeout = self.inner.options.request_timeout;
        let topic = topic.to_owned();
        blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| broker(e, true))?;
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.partitions().len() as i32))
        })
        .await
    }

    /// (low, end) of every partition of `topic`, `end` being one past the last record.
    ///
    /// tansu 0.6 answers a ListOffsets for the latest offset with the base offset of the last
    /// record batch plus one, not the end of that batch; so the end is found by reading from
    /// there until nothing more comes (the Fetch path reports true offsets).
    async fn watermarks(&self, topic: &str, partitions: i32) -> Result<Vec<(i64, i64)>> {
        let consumer = self.plain_consumer("pgtide-reader")?;
        let timeout = self.inner.options.request_timeout;
        let topic = topic.to_owned();
        blocking(move || {
            let mut out = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(|e| broker(e, true))?;
                out.push((low, read_end(&consumer, &topic, p, low, high, timeout)?));
            }
            Ok(out)
        })
        .await
    }

    /// Creates topics; true for each that was created, false for each that existed.
    async fn create_topics(&self, topics: &[(&str, i32)]) -> Result<Vec<bool>> {
        let replication = self.inner.options.replication;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| {
                NewTopic::new(name, *partitions, TopicReplication::Fixed(replication))
            })
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(self.inner.options.request_timeout))
            .request_timeout(Some(self.inner.options.request_timeout));
        let admin = self.admin()?;
        let results = admin
            .create_topics(new.iter(), &options)
            .await
            .map_err(|e| broker(e, true))?;
        results
            .into_iter()
            .map(|r| match r {
                Ok(_) => Ok(true),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => Ok(false),
                Err((name, code)) => Err(broker(format!("creating topic {name}: {code}"), true)),
            })
            .collect()
    }

    fn admin(&self) -> Result<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>> {
        self.client_config().create().map_err(|e| broker(e, false))
    }

    /// Reads up to `max` records of one partition from `from`, up to its end at call time.
    async fn read_partition(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        max: usize,
    ) -> Result<Vec<Raw>> {
        let consumer = self.plain_consumer("pgtide-reader")?;
        let timeout = self.inner.options.request_timeout;
        let topic = topic.to_owned();
        blocking(move || {
            let (low, high) = consumer
                .fetch_watermarks(&topic, partition, timeout)
                .map_err(|e| broker(e, true))?;
            // `high` may be short of the end (see `watermarks`): read on past it until a
            // quiet spell.
            let from = from.max(low);
            let mut out = vec![];
            if from >= high || max == 0 {
                return Ok(out);
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, Offset::Offset(from))
                .map_err(|e| broker(e, false))?;
            consumer.assign(&tpl).map_err(|e| broker(e, true))?;
            let deadline = Instant::now() + timeout;
            let mut reached = false;
            while out.len() < max {
                let wait = if reached {
                    QUIET
                } else {
                    deadline.saturating_duration_since(Instant::now())
                };
                if wait.is_zero() {
                    return Err(broker(format!("reading {topic} timed out"), true));
                }
                match consumer.poll(wait) {
                    Some(Ok(m)) => {
                        let offset = m.offset();
                        out.push((
                            offset,
                            RecordHeaders::read(m.headers()),
                            m.payload().map(<[u8]>::to_vec),
                        ));
                        reached |= offset + 1 >= high;
                    }
                    Some(Err(e)) => return Err(broker(e, true)),
                    None if reached => break,
                    None => {}
                }
            }
            Ok(out)
        })
        .await
    }

    /// Appends a record to the stream's registry.
    async fn append_meta(&self, names: &Names, record: &MetaRecord) -> Result<()> {
        let body = serde_json::to_vec(record)?;
        self.produce(&names.meta, &body, rdkafka::message::OwnedHeaders::new())
            .await
    }

    /// Reads the stream's registry; `None` if the stream does not exist.
    pub(super) async fn read_registry(&self, stream: &str) -> Result<Option<StreamMeta>> {
        let names = self.names(stream);
        if self.partitions_of(&names.main).await?.is_none() {
            return Ok(None);
        }
        let records = self.read_partition(&names.meta, 0, 0, usize::MAX).await?;
        let mut meta = StreamMeta {
            names,
            config: StreamConfig::default(),
            groups: Default::default(),
            marks: BTreeMap::new(),
        };
        let mut configured = false;
        let mut deleted = false;
        for (_, _, payload) in records {
            let Some(record) = payload.and_then(|p| serde_json::from_slice::<MetaRecord>(&p).ok())
            else {
                continue;
            };
            match record {
                MetaRecord::Config(c) => {
                    if let (false, Some(config)) = (configured, c.config()) {
                        meta.config = config;
                        configured = true;
                    }
                }
                MetaRecord::Group { name } => {
                    meta.groups.insert(name);
                }
                MetaRecord::GroupDeleted { name, marks } => {
                    meta.groups.remove(&name);
                    meta.marks.extend(marks);
                }
                MetaRecord::Purge { marks } => meta.marks.extend(marks),
                MetaRecord::StreamDeleted { marks } => {
                    meta.marks.extend(marks);
                    meta.groups.clear();
                    configured = false;
                    deleted = true;
                }
            }
        }
        match (configured, deleted) {
            (true, _) => Ok(Some(meta)),
            (false, true) => Ok(None),
            (false, false) => Err(Error::InvalidConfig(format!(
                "Kafka topic {:?} was not created by pgtide: pick another stream name or namespace",
                meta.names.main
            ))),
        }
    }

    /// The stream's meta for a group that must exist: the cached one when it knows the group
    /// (reading the registry costs a client and a read), else read again.
    async fn group_meta(&self, stream: &str, group: &str) -> Result<std::sync::Arc<StreamMeta>> {
        let cached = self.meta(stream).await?;
        let meta = if cached.groups.contains(group) {
            cached
        } else {
            self.fresh_meta(stream).await?
        };
        if !meta.groups.contains(group) {
            return Err(group_not_found(stream, group));
        }
        Ok(meta)
    }

    /// The end offsets of `topics` (those that exist), as registry marks.
    async fn ends(&self, topics: &[String]) -> Result<BTreeMap<String, Vec<i64>>> {
        let mut marks = BTreeMap::new();
        for topic in topics {
            if let Some(partitions) = self.partitions_of(topic).await? {
                let ends = self.watermarks(topic, partitions).await?;
                marks.insert(
                    topic.clone(),
                    ends.into_iter().map(|(_, high)| high).collect(),
                );
            }
        }
        Ok(marks)
    }

    pub(super) async fn create_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        validate_name("stream", stream)?;
        config.validate()?;
        let names = self.names(stream);
        if names.dead(&"x".repeat(64)).len() > MAX_TOPIC_LEN {
            return Err(Error::InvalidConfig(format!(
                "Kafka topic names of stream {stream:?} in namespace {:?} could pass 249 characters: use a shorter namespace or stream name",
                self.inner.namespace
            )));
        }
        if self.partitions_of(&names.main).await?.is_some() {
            if self.read_registry(stream).await?.is_some() {
                return Ok(false);
            }
            // Deleted before: its topics stayed, so it comes back by its registry.
            self.append_meta(&names, &MetaRecord::Config(StoredConfig::of(config)))
                .await?;
            self.forget(stream);
            return Ok(true);
        }
        // The registry first, then the delay topic, the main topic last: a stream whose main
        // topic exists is complete.
        self.create_topics(&[(&names.meta, 1)]).await?;
        if self.read_partition(&names.meta, 0, 0, 1).await?.is_empty() {
            self.append_meta(&names, &MetaRecord::Config(StoredConfig::of(config)))
                .await?;
        }
        let partitions = self.inner.options.partitions;
        self.create_topics(&[(&names.delay, partitions)]).await?;
        let created = self.create_topics(&[(&names.main, partitions)]).await?;
        lock(&self.inner.streams).remove(stream);
        Ok(created.first().copied().unwrap_or(false))
    }

    /// Deletes a stream in its registry: its topics stay on the broker, and a stream created
    /// again under the name ignores their records (marks). Deleting the topics is what Kafka
    /// would do, but librdkafka 2.12 crashes on tansu 0.6's metadata for deleted topics.
    pub(super) async fn remove_stream(&self, stream: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        let Some(meta) = self.read_registry(stream).await? else {
            self.forget(stream);
            return Ok(false);
        };
        let topics: Vec<String> = self
            .purgeable(&meta)
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let marks = self.ends(&topics).await?;
        self.forget(stream);
        self.append_meta(&meta.names, &MetaRecord::StreamDeleted { marks })
            .await?;
        let groups: Vec<String> = meta.groups.iter().cloned().collect();
        self.delete_kafka_groups(&meta.names, &groups).await;
        self.forget(stream);
        Ok(true)
    }

    /// Deletes the Kafka consumer groups of pgtide groups (their committed offsets).
    async fn delete_kafka_groups(&self, names: &Names, groups: &[String]) {
        let ids: Vec<String> = groups.iter().map(|g| names.group_id(g)).collect();
        if ids.is_empty() {
            return;
        }
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let options = AdminOptions::new().request_timeout(Some(self.inner.options.request_timeout));
        let Ok(admin) = self.admin() else { return };
        if let Err(e) = admin.delete_groups(&ids, &options).await {
            // Only offsets are at stake: a group created again commits its own start.
            tracing::debug!(error = %e, "pgtide kafka: deleting consumer groups failed");
        }
    }

    pub(super) async fn create_group(
        &self,
        stream: &str,
        group: &str,
        start: GroupStart,
    ) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let meta = self.fresh_meta(stream).await?;
        let names = &meta.names;
        let (retry, dead) = (names.retry(group), names.dead(group));
        let partitions = self
            .partitions_of(&names.main)
            .await?
            .ok_or_else(|| Error::StreamNotFound(stream.to_owned()))?;
        self.create_topics(&[(&retry, partitions), (&dead, 1)])
            .await?;
        if meta.groups.contains(group) {
            return Ok(false);
        }
        // Start offsets, committed before the group is registered: New starts at the current
        // ends, Oldest at the oldest retained (unpurged) record.
        let mut tpl = TopicPartitionList::new();
        for topic in [&names.main, &names.delay, &retry] {
            let ends = self.watermarks(topic, partitions).await?;
            let marks = meta.marks.get(topic.as_str());
            for (p, (low, high)) in ends.into_iter().enumerate() {
                let floor = marks.and_then(|m| m.get(p)).copied().unwrap_or(0).max(low);
                let at = match (start, topic == &retry) {
                    (GroupStart::Oldest, false) => floor,
                    _ => high,
                };
                tpl.add_partition_offset(topic, p as i32, Offset::Offset(at))
                    .map_err(|e| broker(e, false))?;
            }
        }
        let consumer = self.plain_consumer(&names.group_id(group))?;
        let timeout = self.inner.options.request_timeout;
        blocking(move || commit_confirmed(&consumer, &tpl, timeout)).await?;
        self.append_meta(
            names,
            &MetaRecord::Group {
                name: group.to_owned(),
            },
        )
        .await?;
        self.fresh_meta(stream).await?;
        Ok(true)
    }

    pub(super) async fn remove_group(&self, stream: &str, group: &str) -> Result<bool> {
        validate_name("group", group)?;
        let meta = self.fresh_meta(stream).await?;
        if !meta.groups.contains(group) {
            return Ok(false);
        }
        let names = &meta.names;
        // Its topics stay (see `remove_stream`); a group created again ignores their records.
        let marks = self.ends(&[names.retry(group), names.dead(group)]).await?;
        self.forget_group(stream, group);
        self.append_meta(
            names,
            &MetaRecord::GroupDeleted {
                name: group.to_owned(),
                marks,
            },
        )
        .await?;
        self.delete_kafka_groups(names, &[group.to_owned()]).await;
        self.fresh_meta(stream).await?;
        Ok(true)
    }

    /// Every topic a purge marks, with its partition count.
    async fn purgeable(&self, meta: &StreamMeta) -> Result<Vec<(String, i32)>> {
        let names = &meta.names;
        let mut topics = vec![names.main.clone(), names.delay.clone()];
        for g in &meta.groups {
            topics.push(names.retry(g));
            topics.push(names.dead(g));
        }
        let mut out = vec![];
        for t in topics {
            if let Some(p) = self.partitions_of(&t).await? {
                out.push((t, p));
            }
        }
        Ok(out)
    }

    pub(super) async fn purge_stream(&self, stream: &str) -> Result<()> {
        let meta = self.fresh_meta(stream).await?;
        let topics: Vec<String> = self
            .purgeable(&meta)
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let marks = self.ends(&topics).await?;
        self.append_meta(
            &meta.names,
            &MetaRecord::Purge {
                marks: marks.clone(),
            },
        )
        .await?;
        self.fresh_meta(stream).await?;
        let groups: Vec<_> = lock(&self.inner.groups)
            .iter()
            .filter(|((s, _), _)| s == stream)
            .map(|(_, g)| g.clone())
            .collect();
        for g in groups {
            g.apply_marks(&marks);
        }
        Ok(())
    }

    pub(super) async fn group_stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        validate_name("group", group)?;
        let meta = self.group_meta(stream, group).await?;
        let names = &meta.names;
        let topics = [
            (Topic::Main, names.main.clone()),
            (Topic::Delay, names.delay.clone()),
            (Topic::Retry, names.retry(group)),
        ];
        let mut ends = vec![];
        let mut tpl = TopicPartitionList::new();
        for (kind, topic) in &topics {
            let Some(partitions) = self.partitions_of(topic).await? else {
                continue;
            };
            for (p, (low, high)) in self
                .watermarks(topic, partitions)
                .await?
                .into_iter()
                .enumerate()
            {
                let floor = meta
                    .marks
                    .get(topic)
                    .and_then(|m| m.get(p))
                    .copied()
                    .unwrap_or(0);
                ends.push((*kind, p as i32, low.max(floor), high));
                tpl.add_partition(topic, p as i32);
            }
        }
        let consumer = self.plain_consumer(&names.group_id(group))?;
        let timeout = self.inner.options.request_timeout;
        let committed = blocking(move || {
            consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| broker(e, true))
        })
        .await?;
        let local = lock(&self.inner.groups)
            .get(&(stream.to_owned(), group.to_owned()))
            .cloned();
        let (progress, (_, held, leased), oldest) = match &local {
            Some(g) => {
                let s = g.lock();
                let oldest = s.ready.front().map(|e| {
                    (Utc::now() - e.record.message.published_at)
                        .to_std()
                        .unwrap_or_default()
                });
                (s.progress(), s.counts(), oldest)
            }
            None => (vec![], (0, 0, 0), None),
        };
        let mut unfinished = 0i64;
        for (kind, p, floor, high) in ends {
            let topic = &topics
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, t)| t.clone())
                .unwrap_or_default();
            let (start, finished) =
                match progress.iter().find(|(k, pp, _, _)| *k == kind && *pp == p) {
                    Some((_, _, point, finished)) => (*point, *finished),
                    None => (
                        committed
                            .find_partition(topic, p)
                            .and_then(|e| e.offset().to_raw())
                            .filter(|o| *o >= 0)
                            .unwrap_or(floor),
                        0,
                    ),
                };
            unfinished += (high - start.max(floor) - finished).max(0);
        }
        let (held, leased) = (held as i64, leased as i64);
        let dead_topic = names.dead(group);
        let dead = match self.partitions_of(&dead_topic).await? {
            Some(p) => {
                let floor = meta
                    .marks
                    .get(&dead_topic)
                    .and_then(|m| m.first())
                    .copied()
                    .unwrap_or(0);
                self.watermarks(&dead_topic, p)
                    .await?
                    .into_iter()
                    .map(|(low, high)| high - low.max(floor))
                    .sum::<i64>()
                    .max(0)
            }
            None => 0,
        };
        Ok(GroupStats {
            stream: stream.to_owned(),
            group: Some(group.to_owned()),
            ready: (unfinished - leased - held).max(0),
            delayed: held,
            in_flight: leased,
            dead,
            oldest_ready_age: oldest,
        })
    }

    pub(super) async fn read_dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        validate_name("group", group)?;
        let meta = self.group_meta(stream, group).await?;
        let topic = meta.names.dead(group);
        let floor = meta
            .marks
            .get(&topic)
            .and_then(|m| m.first())
            .copied()
            .unwrap_or(0);
        let records = self.read_partition(&topic, 0, floor, limit).await?;
        Ok(records
            .into_iter()
            .map(|(offset, h, payload)| {
                codec::decode_dead(stream, group, &h, payload.as_deref(), 0, offset)
            })
            .collect())
    }
}
