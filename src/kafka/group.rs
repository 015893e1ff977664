//! The group runtime: one Kafka consumer per pgtide group per backend handle, shared by every
//! [`super::KafkaConsumer`] of that group the handle makes.
//!
//! Kafka hands a group's partitions to one member each and tracks one committed offset per
//! partition; pgtide promises per-delivery settles and leases. The runtime bridges the two:
//!
//! * A driver task reads the group's topics (main, delay, the group's retry topic) and buffers
//!   the records: due ones in `ready`, not yet due ones (delayed publishes, nacks with a delay)
//!   in `held` until their time.
//! * A fetch leases buffered records to a named consumer; each claim gets a fresh claim number,
//!   carried in the delivery's token. A settle or `in_progress` whose claim number is no longer
//!   the current lease of that record changes nothing (`LeaseLost`): fenced.
//! * An ack finishes the record's offset. Offsets are finished out of order; the driver commits,
//!   per partition, the contiguous prefix (the lowest unfinished offset), so a crash redelivers
//!   at most what was not finished.
//! * A lease that runs out puts the record back in `ready` with the next attempt number, or, on
//!   the last allowed attempt, dead-letters it.
//! * When Kafka takes partitions away (another process joined the group), their records are
//!   dropped from the buffers and leases (their settles become `LeaseLost`) after committing
//!   what was finished; the new owner reads them from the committed offset.
//!
//! Not-yet-due records are bounded by [`super::KafkaOptions::max_held`]: a record of the delay or
//! retry topic that would go over it is not buffered; its partition is paused and rewound to it
//! (back-pressure, not spill: copying it to the end of its topic again would only move the
//! problem, every record read again and again until due) and resumed once the held records fell
//! to three quarters of the cap. The main topic is never paused, so delayed records do not hold
//! up due ones; a delayed record behind a full cap of later-due ones is released late, when
//! enough of them came due.
//!
//! Attempt numbers of lease expiries live in this process: a record redelivered by Kafka after
//! a crash or a rebalance starts again from the attempt it was written with (1, or the retry's).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message as _, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{self, Record, RecordHeaders};
use super::{broker, KafkaBackend, StreamMeta};
use crate::config::StreamConfig;
use crate::error::Result;

/// How often the driver reaps expired leases, releases due records and commits.
const TICK: Duration = Duration::from_millis(50);

/// How often the driver reads the stream's registry again, to see purges and deletions made by
/// other processes.
const REFRESH: Duration = Duration::from_secs(5);

/// The driver stops reading while this many due records wait in `ready` unclaimed.
const MAX_READY: usize = 10_000;

/// Distinguishes runtimes, so a delivery from a runtime that was replaced (group deleted and
/// created again) is never taken for one of the new runtime's.
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// Which of the group's topics a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Topic {
    Main,
    Delay,
    Retry,
}

/// A record's place: topic, partition, offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Key {
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
}

/// The settle handle of a delivery.
pub(super) struct Token {
    pub epoch: u64,
    pub key: Key,
    pub claim: u64,
}

/// A buffered record.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub key: Key,
    pub record: Record,
    /// Set when the record is to be dead-lettered instead of delivered (a failed attempt to
    /// dead-letter it is retried this way).
    pub bury: Option<(String, Option<String>)>,
}

pub(super) struct Lease {
    pub claim: u64,
    pub expires: Instant,
    pub entry: Entry,
}

/// A delay or retry partition paused because the held records reached the cap.
#[derive(Debug, Clone, Copy)]
struct Rewind {
    /// The first offset not buffered: reading starts again there.
    from: i64,
    /// Still paused (records of the partition that arrive are dropped: librdkafka fetched them
    /// before the pause took effect, and they come again from `from`).
    paused: bool,
}

/// Offsets of one partition.
#[derive(Debug, Default)]
struct Part {
    /// Received and not finished.
    outstanding: BTreeSet<i64>,
    /// One past the highest offset received.
    next: i64,
    /// The last offset committed (or -1).
    committed: i64,
    /// Records below this offset were purged.
    floor: i64,
}

impl Part {
    fn commit_point(&self) -> i64 {
        self.outstanding.first().copied().unwrap_or(self.next)
    }
}

#[derive(Default)]
pub(super) struct State {
    parts: HashMap<(Topic, i32), Part>,
    pub ready: VecDeque<Entry>,
    held: BTreeMap<(DateTime<Utc>, u64), Entry>,
    held_seq: u64,
    pub leased: HashMap<Key, Lease>,
    next_claim: u64,
    dirty: bool,
    /// Paused (or resumed and not yet back at their first unbuffered offset) partitions.
    rewind: HashMap<(Topic, i32), Rewind>,
}

impl State {
    fn part(&mut self, topic: Topic, partition: i32) -> &mut Part {
        self.parts.entry((topic, partition)).or_insert(Part {
            committed: -1,
            ..Part::default()
        })
    }

    /// Marks a record's offset finished.
    pub(super) fn finish(&mut self, key: Key) {
        if let Some(p) = self.parts.get_mut(&(key.topic, key.partition)) {
            p.outstanding.remove(&key.offset);
            self.dirty = true;
        }
    }

    pub(super) fn hold(&mut self, at: DateTime<Utc>, entry: Entry) {
        self.held_seq += 1;
        self.held.insert((at, self.held_seq), entry);
    }

    /// Moves expired leases and due held records; returns what is to be dead-lettered.
    fn reap(&mut self, max_deliver: u32) -> Vec<Entry> {
        let now = Instant::now();
        let mut bury = vec![];
        let expired: Vec<Key> = self
            .leased
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            let Some(lease) = self.leased.remove(&key) else {
                continue;
            };
            let mut entry = lease.entry;
            let attempt = entry.record.attempt;
            if attempt >= max_deliver {
                entry.bury = Some((
                    "max_deliver".to_owned(),
                    Some(format!("lease expired on attempt {attempt}")),
                ));
                bury.push(entry);
            } else {
                entry.record.attempt = attempt + 1;
                self.ready.push_back(entry);
            }
        }
        let wall = Utc::now();
        while let Some(first) = self.held.first_entry() {
            if first.key().0 > wall {
                break;
            }
            let entry = first.remove();
            if entry.bury.is_some() {
                bury.push(entry);
            } else {
                self.ready.push_back(entry);
            }
        }
        bury
    }

    /// When the next lease expires or held record comes due.
    fn next_due(&self) -> Option<Instant> {
        let lease = self.leased.values().map(|l| l.expires).min();
        let held = self.held.keys().next().map(|(at, _)| {
            let wait = (*at - Utc::now()).to_std().unwrap_or_default();
            Instant::now() + wait
        });
        match (lease, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops every record of the partition below `floor` (purged).
    fn apply_floor(&mut self, topic: Topic, partition: i32, floor: i64) {
        let below = |k: &Key| k.topic == topic && k.partition == partition && k.offset < floor;
        self.ready.retain(|e| !below(&e.key));
        self.held.retain(|_, e| !below(&e.key));
        self.leased.retain(|k, _| !below(k));
        let p = self.part(topic, partition);
        p.floor = p.floor.max(floor);
        p.outstanding = p.outstanding.split_off(&floor);
        p.next = p.next.max(floor);
        self.dirty = true;
    }

    /// Drops every record of a partition taken away by a rebalance.
    fn drop_partition(&mut self, topic: Topic, partition: i32) {
        let of = |k: &Key| k.topic == topic && k.partition == partition;
        self.ready.retain(|e| !of(&e.key));
        self.held.retain(|_, e| !of(&e.key));
        self.leased.retain(|k, _| !of(k));
        self.parts.remove(&(topic, partition));
        self.rewind.remove(&(topic, partition));
    }

    /// How many not-yet-due records are held.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// The offsets to commit (those that moved since the last commit).
    fn take_commit(&mut self, topics: &Topics) -> Option<TopicPartitionList> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in &mut self.parts {
            let point = p.commit_point();
            if point > p.committed {
                p.committed = point;
                let _ = tpl.add_partition_offset(
                    topics.name(*topic),
                    *partition,
                    Offset::Offset(point),
                );
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }

    /// Claims up to `max` ready records for `lease`.
    pub(super) fn claim(&mut self, max: usize, lease: Duration) -> Vec<(Entry, u64)> {
        let expires = Instant::now() + lease.min(crate::MAX_DURATION);
        let mut out = vec![];
        while out.len() < max {
            let Some(entry) = self.ready.pop_front() else {
                break;
            };
            self.next_claim += 1;
            let claim = self.next_claim;
            self.leased.insert(
                entry.key,
                Lease {
                    claim,
                    expires,
                    entry: entry.clone(),
                },
            );
            out.push((entry, claim));
        }
        out
    }

    /// Counts for stats: (ready, held, leased, finished-but-uncommitted per partition).
    pub(super) fn counts(&self) -> (usize, usize, usize) {
        (self.ready.len(), self.held.len(), self.leased.len())
    }

    /// Local commit points and the number of finished offsets beyond them, per partition.
    pub(super) fn progress(&self) -> Vec<(Topic, i32, i64, i64)> {
        self.parts
            .iter()
            .map(|((t, p), part)| {
                let point = part.commit_point();
                // Received at or above the commit point and finished.
                let finished = (part.next - point) - part.outstanding.len() as i64;
                (*t, *p, point, finished.max(0))
            })
            .collect()
    }
}

/// The group's topic names.
#[derive(Debug, Clone)]
pub(super) struct Topics {
    pub main: String,
    pub delay: String,
    pub retry: String,
    pub dead: String,
}

impl Topics {
    pub(super) fn name(&self, t: Topic) -> &str {
        match t {
            Topic::Main => &self.main,
            Topic::Delay => &self.delay,
            Topic::Retry => &self.retry,
        }
    }

    fn kind(&self, name: &str) -> Option<Topic> {
        if name == self.main {
            Some(Topic::Main)
        } else if name == self.delay {
            Some(Topic::Delay)
        } else if name == self.retry {
            Some(Topic::Retry)
        } else {
            None
        }
    }
}

/// Whether a record is to be held (due later than now).
fn entry_due_later(record: &Record) -> bool {
    record.deliver_at.is_some_and(|at| at > Utc::now())
}

/// A duration in whole milliseconds for librdkafka.
fn millis(d: Duration) -> String {
    d.as_millis().min(i32::MAX as u128).to_string()
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state stays consistent across a panic: every change is a single insert or remove.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The consumer context: drops revoked partitions' records after committing their progress.
pub(super) struct Ctx {
    state: Arc<Mutex<State>>,
    topics: Topics,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        // Finished offsets of these partitions that the driver has not committed yet are
        // delivered again by their next owner (at-least-once). No commit here: this callback
        // also runs inside the consumer's close, where librdkafka waits for an answer that
        // tansu never sends to a leaving member.
        let mut state = lock(&self.state);
        let mut paused = TopicPartitionList::new();
        for e in tpl.elements() {
            if let Some(topic) = self.topics.kind(e.topic()) {
                if state.rewind.contains_key(&(topic, e.partition())) {
                    paused.add_partition(e.topic(), e.partition());
                }
                state.drop_partition(topic, e.partition());
            }
        }
        drop(state);
        // Whoever holds the partition next starts from its committed offset, unpaused.
        if paused.count() > 0 {
            if let Err(e) = consumer.resume(&paused) {
                tracing::debug!(error = %e, "pgtide kafka: resuming revoked partitions failed");
            }
        }
    }
}

/// A group's Kafka consumer. When the last reference goes it unsubscribes (the broker hands
/// its partitions to the other members after the session timeout) and is then left open, not
/// closed: closing a group consumer blocks until the broker confirms that it left the group,
/// which tansu 0.6 never does, and a close still running when the process exits crashes it.
/// So a stopped runtime (its group deleted, or its handle dropped) keeps its idle librdkafka
/// client until the process exits.
pub(super) struct Closer(std::mem::ManuallyDrop<StreamConsumer<Ctx>>);

impl std::ops::Deref for Closer {
    type Target = StreamConsumer<Ctx>;
    fn deref(&self) -> &StreamConsumer<Ctx> {
        &self.0
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        // Never dropped (see above): the client is unsubscribed and left to the process's end.
        self.0.unsubscribe();
    }
}

/// One pgtide group's runtime in this handle.
pub(super) struct Group {
    pub stream: String,
    pub group: String,
    pub epoch: u64,
    pub config: StreamConfig,
    pub topics: Topics,
    pub state: Arc<Mutex<State>>,
    pub notify: Arc<Notify>,
    consumer: Arc<Closer>,
    pub token: CancellationToken,
    /// The handle's producer and (weakly) the handle: the handle's map holds this runtime.
    producer: FutureProducer,
    /// The handle's producer of single-record batches (retries).
    single: FutureProducer,
    backend: Weak<super::Inner>,
    timeout: Duration,
    /// [`super::KafkaOptions::max_held`].
    max_held: usize,
}

impl Group {
    /// Starts the runtime: subscribes the group's Kafka consumer and spawns the driver.
    pub(super) fn start(
        backend: &KafkaBackend,
        meta: &StreamMeta,
        stream: &str,
        group: &str,
    ) -> Result<Arc<Group>> {
        let names = &meta.names;
        let topics = Topics {
            main: names.main.clone(),
            delay: names.delay.clone(),
            retry: names.retry(group),
            dead: names.dead(group),
        };
        let state: Arc<Mutex<State>> = Arc::default();
        {
            let mut s = lock(&state);
            for (topic, marks) in &meta.marks {
                let Some(kind) = topics.kind(topic) else {
                    continue;
                };
                for (partition, floor) in marks.iter().enumerate() {
                    s.apply_floor(kind, partition as i32, *floor);
                }
            }
            s.dirty = false;
        }
        let ctx = Ctx {
            state: state.clone(),
            topics: topics.clone(),
        };
        let consumer: StreamConsumer<Ctx> = backend
            .client_config()
            .set("group.id", names.group_id(group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // An empty fetch waits this long at a broker that does not answer a long poll
            // when records arrive (tansu 0.6): the floor of the publish → fetch latency.
            .set(
                "fetch.wait.max.ms",
                millis(backend.inner.options.fetch_wait),
            )
            .set("fetch.min.bytes", "1")
            // A member that stopped without leaving the group (see `Closer`) keeps its
            // partitions until this passes.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(ctx)
            .map_err(|e| broker(e, false))?;
        consumer
            .subscribe(&[&topics.main, &topics.delay, &topics.retry])
            .map_err(|e| broker(e, false))?;
        let g = Arc::new(Group {
            stream: stream.to_owned(),
            group: group.to_owned(),
            epoch: EPOCH.fetch_add(1, Ordering::Relaxed),
            config: meta.config.clone(),
            topics,
            state,
            notify: Arc::new(Notify::new()),
            consumer: Arc::new(Closer(std::mem::ManuallyDrop::new(consumer))),
            token: backend.inner.token.child_token(),
            producer: backend.inner.producer.clone(),
            single: backend.inner.single.clone(),
            backend: Arc::downgrade(&backend.inner),
            timeout: backend.inner.options.request_timeout,
            max_held: backend.inner.options.max_held,
        });
        backend.inner.tracker.spawn(g.clone().drive());
        Ok(g)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The driver: reads records, reaps leases, releases due records, commits progress.
    async fn drive(self: Arc<Self>) {
        let consumer = self.consumer.clone();
        let mut failures = 0u32;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval_at(Instant::now() + REFRESH, REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let can_read = self.lock().ready.len() < MAX_READY;
            tokio::select! {
                biased;
                _ = self.token.cancelled() => break,
                _ = tick.tick() => self.housekeep().await,
                _ = refresh.tick() => self.refresh().await,
                r = consumer.recv(), if can_read => match r {
                    Ok(m) => {
                        failures = 0;
                        let headers = RecordHeaders::read(m.headers());
                        let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
                        let topic = m.topic().to_owned();
                        let (partition, offset) = (m.partition(), m.offset());
                        drop(m);
                        self.receive(&topic, partition, offset, &headers, payload);
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, stream = %self.stream, group = %self.group, "pgtide kafka: reading the group's topics failed; retrying");
                        let wait = Duration::from_millis(50 * 2u64.pow(failures.min(6)));
                        tokio::select! {
                            biased;
                            _ = self.token.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        // Stopped (deleted, or the handle closed): commit what was finished. The consumer is
        // closed when its last reference goes (see `Closer`).
        drop(consumer);
        self.commit(CommitMode::Sync).await;
    }

    /// Reads the registry again: applies new purge marks, stops if the group or stream is gone.
    async fn refresh(&self) {
        let Some(inner) = self.backend.upgrade() else {
            return;
        };
        let backend = KafkaBackend { inner };
        match backend.read_registry(&self.stream).await {
            Ok(Some(meta)) if meta.groups.contains(&self.group) => self.apply_marks(&meta.marks),
            Ok(_) => {
                tracing::info!(stream = %self.stream, group = %self.group, "pgtide kafka: the group was deleted; its consumers stop");
                backend.forget_group(&self.stream, &self.group);
                self.token.cancel();
            }
            Err(e) => {
                tracing::debug!(error = %e, stream = %self.stream, "pgtide kafka: reading the registry failed; trying again later");
            }
        }
    }

    /// Buffers one received record.
    fn receive(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        headers: &RecordHeaders,
        payload: Bytes,
    ) {
        let Some(kind) = self.topics.kind(topic) else {
            return;
        };
        let record = codec::decode(&self.stream, headers, payload, partition, offset);
        let key = Key {
            topic: kind,
            partition,
            offset,
        };
        let mut state = self.lock();
        if let Some(r) = state.rewind.get(&(kind, partition)).copied() {
            if r.paused || offset != r.from {
                if !r.paused && offset > r.from {
                    // Resumed, but the rewind has not taken effect: ask again (never skip
                    // records between `from` and here).
                    drop(state);
                    self.seek(kind, partition, r.from);
                }
                return;
            }
            state.rewind.remove(&(kind, partition));
        }
        let part = state.part(kind, partition);
        if offset < part.floor || offset < part.next {
            // Purged, or read again (a fetch retried by the client): already accounted for.
            return;
        }
        let later = entry_due_later(&record);
        if later && kind != Topic::Main && state.held.len() >= self.max_held {
            // Not buffered: its offset stays unaccounted (`next` stays at or below it), so
            // nothing past it is committed; read again from it once resumed.
            state.rewind.insert(
                (kind, partition),
                Rewind {
                    from: offset,
                    paused: true,
                },
            );
            drop(state);
            self.pause(kind, partition, offset);
            return;
        }
        let part = state.part(kind, partition);
        if part.outstanding.is_empty() && part.next < offset {
            // The first record seen (or a gap: compacted or transaction markers).
            part.next = offset;
        }
        part.outstanding.insert(offset);
        part.next = part.next.max(offset + 1);
        let entry = Entry {
            key,
            record,
            bury: None,
        };
        match entry.record.deliver_at {
            Some(at) if at > Utc::now() => state.hold(at, entry),
            _ => {
                state.ready.push_back(entry);
                drop(state);
                self.notify.notify_waiters();
            }
        }
    }

    /// Pauses a partition at the held cap and rewinds it to `offset`.
    fn pause(&self, kind: Topic, partition: i32, offset: i64) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.topics.name(kind), partition);
        if let Err(e) = self.consumer.pause(&tpl) {
            // Still rewound: records that arrive are dropped until the resume.
            tracing::warn!(error = %e, stream = %self.stream, group = %self.group, "pgtide kafka: pausing a partition at the held cap failed");
        }
        self.seek(kind, partition, offset);
    }

    /// Asks librdkafka to read `partition` from `offset` (asynchronously; records fetched before
    /// are discarded by librdkafka).
    fn seek(&self, kind: Topic, partition: i32, offset: i64) {
        let topic = self.topics.name(kind);
        if let Err(e) = self
            .consumer
            .seek(topic, partition, Offset::Offset(offset), Duration::ZERO)
        {
            // The resume asks again; until the rewind is seen, records past it are dropped.
            tracing::warn!(error = %e, stream = %self.stream, group = %self.group, "pgtide kafka: rewinding a paused partition failed");
        }
    }

    /// Resumes paused partitions once the held records fell to three quarters of the cap.
    fn resume_below_cap(&self) {
        let resumed: Vec<(Topic, i32, i64)> = {
            let mut state = self.lock();
            if state.held.len() > self.max_held - self.max_held / 4 {
                return;
            }
            state
                .rewind
                .iter_mut()
                .filter(|(_, r)| r.paused)
                .map(|((kind, partition), r)| {
                    r.paused = false;
                    (*kind, *partition, r.from)
                })
                .collect()
        };
        if resumed.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (kind, partition, _) in &resumed {
            tpl.add_partition(self.topics.name(*kind), *partition);
        }
        if let Err(e) = self.consumer.resume(&tpl) {
            tracing::warn!(error = %e, stream = %self.stream, group = %self.group, "pgtide kafka: resuming paused partitions failed; trying again");
            let mut state = self.lock();
            for (kind, partition, _) in &resumed {
                if let Some(r) = state.rewind.get_mut(&(*kind, *partition)) {
                    r.paused = true;
                }
            }
            return;
        }
        // Resuming reads from where librdkafka stopped handing records out, past `from`.
        for (kind, partition, from) in resumed {
            self.seek(kind, partition, from);
        }
    }

    /// Reaps leases and due records, dead-letters what is due for it, resumes paused
    /// partitions, commits.
    pub(super) async fn housekeep(&self) {
        let (bury, woke) = {
            let mut state = self.lock();
            let before = state.ready.len();
            let bury = state.reap(self.config.max_deliver);
            (bury, state.ready.len() > before)
        };
        self.resume_below_cap();
        if woke {
            self.notify.notify_waiters();
        }
        for entry in bury {
            self.bury_entry(entry).await;
        }
        self.commit(CommitMode::Async).await;
    }

    /// Dead-letters an entry nobody holds; on failure it is held and tried again in a second.
    async fn bury_entry(&self, entry: Entry) {
        let (reason, error) = entry.bury.clone().unwrap_or_default();
        let attempts = entry.record.attempt;
        match self
            .dead_letter(&entry.record, &reason, error.as_deref(), attempts)
            .await
        {
            Ok(()) => self.lock().finish(entry.key),
            Err(e) => {
                tracing::warn!(error = %e, stream = %self.stream, group = %self.group, "pgtide kafka: dead-lettering failed; retrying");
                let at = Utc::now() + chrono::Duration::seconds(1);
                self.lock().hold(at, entry);
            }
        }
    }

    /// Writes a dead letter of `record` to the group's dead-letter topic.
    pub(super) async fn dead_letter(
        &self,
        record: &Record,
        reason: &str,
        error: Option<&str>,
        attempts: u32,
    ) -> Result<()> {
        let m = &record.message;
        let headers = codec::Out::message(m.id, m.is_json, &m.headers)?
            .dead(reason, error, attempts)
            .build();
        self.produce(&self.topics.dead, &m.payload, headers).await
    }

    /// Writes a retry of `record` to the group's retry topic, due at `at`.
    pub(super) async fn retry(
        &self,
        record: &Record,
        attempt: u32,
        at: DateTime<Utc>,
        error: Option<&str>,
    ) -> Result<()> {
        let m = &record.message;
        let headers = codec::Out::message(m.id, m.is_json, &m.headers)?
            .deliver_at(at)
            .retry(attempt, error)
            .build();
        super::produce(
            &self.single,
            self.timeout,
            &self.topics.retry,
            &m.payload,
            headers,
        )
        .await
    }

    async fn produce(&self, topic: &str, payload: &[u8], headers: OwnedHeaders) -> Result<()> {
        super::produce(&self.producer, self.timeout, topic, payload, headers).await
    }

    /// Commits the finished prefixes that moved.
    pub(super) async fn commit(&self, mode: CommitMode) {
        let Some(tpl) = self.lock().take_commit(&self.topics) else {
            return;
        };
        let consumer = self.consumer.clone();
        let result = match mode {
            CommitMode::Async => consumer
                .commit(&tpl, CommitMode::Async)
                .map_err(|e| broker(e, true)),
            // librdkafka's synchronous commit has no timeout (and tansu left some unanswered):
            // an asynchronous one, confirmed by reading the offsets back, bounded.
            CommitMode::Sync => {
                let timeout = self.timeout;
                tokio::task::spawn_blocking(move || {
                    super::admin::commit_confirmed(&**consumer, &tpl, timeout)
                })
                .await
                .unwrap_or_else(|e| Err(broker(e, true)))
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, stream = %self.stream, group = %self.group, "pgtide kafka: committing offsets failed; finished records may be delivered again");
            // Make the next tick try again.
            let mut state = self.lock();
            for p in state.parts.values_mut() {
                p.committed = -1;
            }
            state.dirty = true;
        }
    }

    /// Applies purge marks read from the registry.
    pub(super) fn apply_marks(&self, marks: &BTreeMap<String, Vec<i64>>) {
        let mut state = self.lock();
        for (topic, marks) in marks {
            let Some(kind) = self.topics.kind(topic) else {
                continue;
            };
            for (partition, floor) in marks.iter().enumerate() {
                state.apply_floor(kind, partition as i32, *floor);
            }
        }
    }

    /// Waits until records may have become ready, or until `deadline`.
    pub(super) async fn wait(&self, deadline: Instant) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = self.lock().next_due().map_or(deadline, |d| d.min(deadline));
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(next) => {}
            _ = self.token.cancelled() => {}
        }
    }
}
