//! The in-memory backend: the same semantics as the Postgres engine (groups with fan-out,
//! competing consumers, leases, delays, nack backoff, max_deliver, dead letters, dedupe,
//! fenced settles) inside one process, with nothing persisted. Use it as a fast test double.
//!
//! Time is `tokio::time`, so tests can drive it with `tokio::time::pause()`. Waiting consumers
//! sleep until a publish notifies them or their group's next delivery comes due; there is no
//! polling and no scout.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::{GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{
    uuid_time, Capabilities, DeadLetter, Delivery, GroupStats, Headers, Message, OutgoingMessage,
    PublishReceipt, Queue, QueueConsumer, SettleReport,
};

/// What the memory backend supports.
pub(crate) const MEMORY_CAPABILITIES: Capabilities = Capabilities {
    delay: true,
    native_delay: true,
    dedupe: true,
    nack_delay: true,
    lease_timeout: true,
    lease_extension: true,
    transactional_publish: false,
    priority: true,
    exact_stats: true,
    group_start_oldest: true,
    fenced_settle: true,
};

struct Stored {
    id: Uuid,
    payload: bytes::Bytes,
    is_json: bool,
    headers: Headers,
}

struct Pending {
    visible_at: Instant,
    attempts: u32,
    consumer: Option<String>,
    last_error: Option<String>,
}

#[derive(Default)]
struct Group {
    pending: HashMap<Uuid, Pending>,
    /// (visible_at, id) of every pending delivery: claims walk it from the front.
    order: BTreeSet<(Instant, Uuid)>,
    dead: Vec<DeadLetter>,
}

struct Stream {
    config: StreamConfig,
    messages: HashMap<Uuid, Arc<Stored>>,
    groups: HashMap<String, Group>,
    dedupe: HashMap<String, (Uuid, Instant)>,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    streams: HashMap<String, Stream>,
}

/// In-process backend. Cheap to clone; clones share state.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

fn named() -> &'static Mutex<HashMap<String, MemoryBackend>> {
    static NAMED: OnceLock<Mutex<HashMap<String, MemoryBackend>>> = OnceLock::new();
    NAMED.get_or_init(Default::default)
}

fn stream_not_found(s: &str) -> Error {
    Error::StreamNotFound(s.to_owned())
}

fn group_not_found(s: &str, g: &str) -> Error {
    Error::GroupNotFound {
        stream: s.to_owned(),
        group: g.to_owned(),
    }
}

impl Group {
    fn set(&mut self, id: Uuid, p: Pending) {
        if let Some(old) = self.pending.get(&id) {
            self.order.remove(&(old.visible_at, id));
        }
        self.order.insert((p.visible_at, id));
        self.pending.insert(id, p);
    }

    fn remove(&mut self, id: &Uuid) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.order.remove(&(p.visible_at, *id));
        Some(p)
    }

    /// The pending delivery `d` refers to, if its lease is still this attempt's.
    fn fenced(&self, d: &Delivery) -> bool {
        self.pending
            .get(&d.id())
            .is_some_and(|p| p.consumer.is_some() && p.attempts == d.attempt)
    }

    fn bury(
        &mut self,
        (stream, group): (&str, &str),
        msg: Option<&Stored>,
        id: Uuid,
        attempts: u32,
        reason: &str,
        error: Option<String>,
    ) {
        self.remove(&id);
        self.dead.push(DeadLetter {
            stream: stream.to_owned(),
            group: group.to_owned(),
            id,
            attempts,
            reason: reason.to_owned(),
            error,
            dead_at: Utc::now(),
            payload: msg.map(|m| m.payload.to_vec()),
            headers: msg.map(|m| m.headers.clone()).unwrap_or_default(),
        });
    }
}

impl MemoryBackend {
    /// A new, empty, private backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide backend called `name` (what `memory://name` URLs resolve to): handles
    /// opened with the same name share state.
    pub fn named(name: &str) -> Self {
        match named().lock() {
            Ok(mut map) => map.entry(name.to_owned()).or_default().clone(),
            Err(_) => Self::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the whole backend, so recover the guard.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_group<T>(
        &self,
        stream: &str,
        group: &str,
        f: impl FnOnce(&mut Stream, &str) -> Result<T>,
    ) -> Result<T> {
        let mut state = self.lock();
        let s = state
            .streams
            .get_mut(stream)
            .ok_or_else(|| stream_not_found(stream))?;
        if !s.groups.contains_key(group) {
            return Err(group_not_found(stream, group));
        }
        f(s, group)
    }
}

impl Queue for MemoryBackend {
    type Consumer = MemoryConsumer;

    fn capabilities(&self) -> Capabilities {
        MEMORY_CAPABILITIES
    }

    async fn ensure_stream(&self, stream: &str, config: &StreamConfig) -> Result<bool> {
        validate_name("stream", stream)?;
        config.validate()?;
        let mut state = self.lock();
        if state.streams.contains_key(stream) {
            return Ok(false);
        }
        state.streams.insert(
            stream.to_owned(),
            Stream {
                config: config.clone(),
                messages: HashMap::new(),
                groups: HashMap::new(),
                dedupe: HashMap::new(),
                wake: Arc::new(Notify::new()),
            },
        );
        Ok(true)
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        let removed = self.lock().streams.remove(stream);
        if let Some(s) = &removed {
            s.wake.notify_waiters();
        }
        Ok(removed.is_some())
    }

    async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let mut state = self.lock();
        let s = state
            .streams
            .get_mut(stream)
            .ok_or_else(|| stream_not_found(stream))?;
        if s.groups.contains_key(group) {
            return Ok(false);
        }
        let mut g = Group::default();
        if start == GroupStart::Oldest {
            let now = Instant::now();
            for id in s.messages.keys() {
                g.set(
                    *id,
                    Pending {
                        visible_at: now,
                        attempts: 0,
                        consumer: None,
                        last_error: None,
                    },
                );
            }
        }
        s.groups.insert(group.to_owned(), g);
        Ok(true)
    }

    async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let mut state = self.lock();
        let s = state
            .streams
            .get_mut(stream)
            .ok_or_else(|| stream_not_found(stream))?;
        Ok(s.groups.remove(group).is_some())
    }

    async fn purge(&self, stream: &str) -> Result<()> {
        validate_name("stream", stream)?;
        let mut state = self.lock();
        let s = state
            .streams
            .get_mut(stream)
            .ok_or_else(|| stream_not_found(stream))?;
        s.messages.clear();
        s.dedupe.clear();
        for g in s.groups.values_mut() {
            *g = Group::default();
        }
        Ok(())
    }

    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        self.with_group(stream, group, |s, group| {
            let g = &s.groups[group];
            let now = Instant::now();
            let (mut ready, mut delayed, mut in_flight) = (0, 0, 0);
            let mut oldest = None;
            for (at, id) in &g.order {
                if *at <= now {
                    ready += 1;
                    let age = (Utc::now() - uuid_time(id)).to_std().unwrap_or_default();
                    oldest = Some(oldest.map_or(age, |o: Duration| o.max(age)));
                } else if g.pending[id].consumer.is_some() {
                    in_flight += 1;
                } else {
                    delayed += 1;
                }
            }
            Ok(GroupStats {
                stream: stream.to_owned(),
                group: Some(group.to_owned()),
                ready,
                delayed,
                in_flight,
                dead: g.dead.len() as i64,
                oldest_ready_age: oldest,
            })
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
        self.with_group(stream, group, |s, group| {
            Ok(s.groups[group].dead.iter().take(limit).cloned().collect())
        })
    }

    async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        let mut r = self
            .publish_batch(stream, std::slice::from_ref(&msg))
            .await?;
        Ok(r.remove(0))
    }

    async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        validate_name("stream", stream)?;
        let mut state = self.lock();
        let s = state
            .streams
            .get_mut(stream)
            .ok_or_else(|| stream_not_found(stream))?;
        let limit = s.config.max_payload;
        if let Some(m) = msgs.iter().find(|m| m.payload.len() > limit) {
            return Err(Error::PayloadTooLarge {
                stream: stream.to_owned(),
                size: m.payload.len(),
                limit,
            });
        }
        let now = Instant::now();
        let mut receipts = Vec::with_capacity(msgs.len());
        for m in msgs {
            if let Some(key) = &m.dedupe_key {
                if !s.config.dedupe_window.is_zero() {
                    if let Some((id, until)) = s.dedupe.get(key) {
                        if *until > now {
                            receipts.push(PublishReceipt {
                                id: *id,
                                duplicate: true,
                            });
                            continue;
                        }
                    }
                }
            }
            let id = Uuid::now_v7();
            if let Some(key) = &m.dedupe_key {
                s.dedupe
                    .insert(key.clone(), (id, now + s.config.dedupe_window));
            }
            let visible_at = match (m.deliver_at, m.delay) {
                (Some(at), _) => now + (at - Utc::now()).to_std().unwrap_or_default(),
                (None, Some(d)) => now + d,
                (None, None) => now
                    .checked_sub(Duration::from_secs(m.priority.max(0) as u64))
                    .unwrap_or(now),
            };
            s.messages.insert(
                id,
                Arc::new(Stored {
                    id,
                    payload: m.payload.clone(),
                    is_json: m.is_json,
                    headers: m.headers.clone(),
                }),
            );
            for g in s.groups.values_mut() {
                g.set(
                    id,
                    Pending {
                        visible_at,
                        attempts: 0,
                        consumer: None,
                        last_error: None,
                    },
                );
            }
            receipts.push(PublishReceipt {
                id,
                duplicate: false,
            });
        }
        s.wake.notify_waiters();
        Ok(receipts)
    }

    async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<MemoryConsumer> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", name)?;
        self.with_group(stream, group, |_, _| Ok(()))?;
        Ok(MemoryConsumer {
            backend: self.clone(),
            stream: stream.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// A consumer of the memory backend.
#[derive(Debug, Clone)]
pub struct MemoryConsumer {
    backend: MemoryBackend,
    stream: String,
    group: String,
    name: String,
}

impl MemoryConsumer {
    /// Claims what is ready; returns the deliveries, the stream's wake-up, and when the next
    /// pending delivery of the group comes due.
    fn claim(&self, max: usize) -> Result<(Vec<Delivery>, Arc<Notify>, Option<Instant>)> {
        let (stream, group, name) = (&self.stream, &self.group, &self.name);
        self.backend.with_group(stream, group, |s, _| {
            let now = Instant::now();
            let config = s.config.clone();
            let g = s
                .groups
                .get_mut(group)
                .ok_or_else(|| group_not_found(stream, group))?;
            let mut out = vec![];
            while out.len() < max {
                let Some(&(at, id)) = g.order.iter().next() else {
                    break;
                };
                if at > now {
                    break;
                }
                let Some(p) = g.remove(&id) else { break };
                let msg = s.messages.get(&id).cloned();
                let Some(msg) = msg else { continue };
                if p.attempts >= config.max_deliver {
                    let error = p
                        .last_error
                        .or_else(|| Some(format!("lease expired on attempt {}", p.attempts)));
                    g.bury(
                        (stream, group),
                        Some(&msg),
                        id,
                        p.attempts,
                        "max_deliver",
                        error,
                    );
                    continue;
                }
                let attempts = p.attempts + 1;
                g.set(
                    id,
                    Pending {
                        visible_at: now + config.lease,
                        attempts,
                        consumer: Some(name.clone()),
                        last_error: p.last_error,
                    },
                );
                out.push(Delivery {
                    message: Message {
                        id: msg.id,
                        stream: stream.clone(),
                        payload: msg.payload.clone(),
                        is_json: msg.is_json,
                        headers: msg.headers.clone(),
                        published_at: uuid_time(&msg.id),
                    },
                    group: group.clone(),
                    consumer: name.clone(),
                    attempt: attempts,
                    lease_expires_at: Utc::now() + config.lease,
                    token: None,
                });
            }
            let next = g.order.iter().next().map(|(at, _)| *at);
            Ok((out, s.wake.clone(), next))
        })
    }

    fn settle(
        &self,
        ds: &[&Delivery],
        mut f: impl FnMut(&mut Stream, &Delivery) -> Settled,
    ) -> Result<SettleReport> {
        let (mut settled, mut dead) = (vec![], vec![]);
        let mut woke = false;
        self.backend
            .with_group(&self.stream, &self.group, |s, group| {
                for d in ds {
                    if !s.groups[group].fenced(d) {
                        continue;
                    }
                    match f(s, d) {
                        Settled::Done => settled.push(d.id()),
                        Settled::Ready => {
                            settled.push(d.id());
                            woke = true;
                        }
                        Settled::Dead => dead.push(d.id()),
                    }
                }
                if woke {
                    s.wake.notify_waiters();
                }
                Ok(())
            })?;
        Ok(SettleReport::from_parts(ds, settled, dead))
    }
}

enum Settled {
    Done,
    Ready,
    Dead,
}

impl QueueConsumer for MemoryConsumer {
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
        self.backend
            .lock()
            .streams
            .get(&self.stream)
            .map(|s| s.config.lease)
    }

    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        Ok(self.claim(max.max(1))?.0)
    }

    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let deadline = Instant::now() + timeout;
        loop {
            let (batch, wake, next) = self.claim(max.max(1))?;
            // Register interest before checking the clock so a publish in between is not missed.
            let notified = wake.notified();
            let now = Instant::now();
            if !batch.is_empty() || now >= deadline {
                return Ok(batch);
            }
            let until = next.map_or(deadline, |n| n.min(deadline)).max(now);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        let group = self.group.clone();
        self.settle(ds, |s, d| {
            if let Some(g) = s.groups.get_mut(&group) {
                g.remove(&d.id());
            }
            Settled::Done
        })
    }

    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        let (stream, group) = (self.stream.clone(), self.group.clone());
        self.settle(ds, |s, d| {
            let config = s.config.clone();
            let msg = s.messages.get(&d.id()).cloned();
            let Some(g) = s.groups.get_mut(&group) else {
                return Settled::Done;
            };
            let attempts = g.pending.get(&d.id()).map_or(d.attempt, |p| p.attempts);
            if attempts >= config.max_deliver {
                g.bury(
                    (&stream, &group),
                    msg.as_deref(),
                    d.id(),
                    attempts,
                    "max_deliver",
                    error.map(str::to_owned),
                );
                return Settled::Dead;
            }
            let wait = delay.unwrap_or_else(|| config.backoff.delay(attempts));
            g.set(
                d.id(),
                Pending {
                    visible_at: Instant::now() + wait,
                    attempts,
                    consumer: None,
                    last_error: error.map(str::to_owned),
                },
            );
            if wait.is_zero() {
                Settled::Ready
            } else {
                // Waiters recompute their next due time when woken.
                s.wake.notify_waiters();
                Settled::Done
            }
        })
    }

    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        let (stream, group) = (self.stream.clone(), self.group.clone());
        self.settle(ds, |s, d| {
            let msg = s.messages.get(&d.id()).cloned();
            if let Some(g) = s.groups.get_mut(&group) {
                let last = g.pending.get(&d.id()).and_then(|p| p.last_error.clone());
                g.bury(
                    (&stream, &group),
                    msg.as_deref(),
                    d.id(),
                    d.attempt,
                    reason,
                    last,
                );
            }
            Settled::Dead
        })
    }

    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        let group = self.group.clone();
        let mut expires = None;
        let report = self.settle(&[&*d], |s, d| {
            let lease = lease.unwrap_or(s.config.lease);
            if let Some(g) = s.groups.get_mut(&group) {
                if let Some(p) = g.remove(&d.id()) {
                    g.set(
                        d.id(),
                        Pending {
                            visible_at: Instant::now() + lease,
                            ..p
                        },
                    );
                    expires = Some(Utc::now() + lease);
                }
            }
            Settled::Done
        })?;
        if let Some(at) = expires {
            d.lease_expires_at = at;
        }
        report.single(d.id())
    }

    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        let group = self.group.clone();
        self.settle(ds, |s, d| {
            if let Some(g) = s.groups.get_mut(&group) {
                if let Some(p) = g.remove(&d.id()) {
                    g.set(
                        d.id(),
                        Pending {
                            visible_at: Instant::now(),
                            attempts: p.attempts.saturating_sub(1),
                            consumer: None,
                            ..p
                        },
                    );
                }
            }
            Settled::Ready
        })
    }
}
