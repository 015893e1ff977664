//! The in-memory backend: the same semantics as the Postgres engine (groups with fan-out,
//! competing consumers, leases, delays, nack backoff, max_deliver, dead letters, dedupe,
//! fenced settles) inside one process, with nothing persisted. Use it as a fast test double.
//!
//! Time is `tokio::time`, so tests can drive it with `tokio::time::pause()`. Waiting consumers
//! sleep until a publish notifies them or their group's next delivery comes due; there is no
//! polling and no scout.
//!
//! Files: `state.rs` (what is held), `admin.rs` (streams and groups: create, purge, stats),
//! `consumer.rs` (claims and settles), `limits.rs` (changing a group's limits at run time); the
//! handle and its [`Queue`] impl are here.

mod admin;
mod consumer;
mod fair;
mod limits;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use uuid::Uuid;

pub use self::consumer::MemoryConsumer;
use self::state::{group_not_found, stream_not_found, State, Stored, Stream};
use crate::config::{GroupConfig, GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{Capabilities, DeadLetter, GroupStats, OutgoingMessage, PublishReceipt, Queue};

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
    fenced_after_release: true,
    ordering_keys: true,
    concurrency_limits: true,
    rate_limits: true,
    fair_share: true,
};

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
        state
            .streams
            .insert(stream.to_owned(), Stream::new(config.clone()));
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
        self.ensure_group_with(stream, group, &GroupConfig::default().start(start))
            .await
    }

    async fn ensure_group_with(
        &self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
    ) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let mut state = self.lock();
        let s = state
            .streams
            .get_mut(stream)
            .ok_or_else(|| stream_not_found(stream))?;
        s.add_group(stream, group, config)
    }

    async fn set_key_weight(
        &self,
        stream: &str,
        group: &str,
        key: Option<&str>,
        weight: Option<f64>,
    ) -> Result<()> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        if let Some(k) = key {
            crate::names::validate_key(k)?;
        }
        if let Some(w) = weight {
            crate::config::validate_weight(w)?;
        }
        self.with_group(stream, group, |s, group| {
            let Some(fair) = s.groups.get_mut(group).and_then(|g| g.fair.as_mut()) else {
                return Err(Error::InvalidConfig(format!(
                    "group {group:?} on stream {stream:?} is not fair: weights apply to fair groups"
                )));
            };
            let key = key.unwrap_or_default().to_owned();
            match weight {
                Some(w) => fair.weights.insert(key, w),
                None => fair.weights.remove(&key),
            };
            Ok(())
        })
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
        s.purge();
        Ok(())
    }

    async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        self.with_group(stream, group, |s, group| Ok(s.stats(stream, group)))
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
        crate::limits::check_messages(msgs)?;
        let msgs = crate::otel::traced(msgs);
        let msgs = &*msgs;
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
                    key: m.key.clone(),
                }),
            );
            for g in s.groups.values_mut() {
                g.enqueue(id, m.key.as_deref(), visible_at);
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
