//! What the memory backend holds: streams, their messages, and per group the pending
//! deliveries ordered by when they become visible.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use std::time::Duration;

use crate::config::StreamConfig;
use crate::error::Error;
use crate::queue::{DeadLetter, Delivery, Headers};
use crate::RateLimit;

pub(super) struct Stored {
    pub(super) id: Uuid,
    pub(super) payload: bytes::Bytes,
    pub(super) is_json: bool,
    pub(super) headers: Headers,
    pub(super) key: Option<String>,
}

pub(super) struct Pending {
    pub(super) visible_at: Instant,
    pub(super) attempts: u32,
    pub(super) consumer: Option<String>,
    pub(super) last_error: Option<String>,
    /// The fence token of the current claim (0 when unclaimed). A release hands the attempt
    /// back, so the attempt alone cannot tell a stale handle from the new holder's.
    pub(super) claim: u64,
    /// In an ordered group: the key whose head this delivery is.
    pub(super) key: Option<String>,
    /// In a fair group: the virtual stamp of a delivery queued at the group's floor (0: due at
    /// `visible_at`, a real time).
    pub(super) stamp: u64,
}

impl Pending {
    /// A new delivery, visible at `visible_at`.
    pub(super) fn new(visible_at: Instant, key: Option<String>) -> Pending {
        Pending {
            visible_at,
            attempts: 0,
            consumer: None,
            last_error: None,
            claim: 0,
            key,
            stamp: 0,
        }
    }
}

#[derive(Default)]
pub(super) struct Group {
    pub(super) pending: HashMap<Uuid, Pending>,
    /// (visible_at, stamp, id) of every pending delivery: claims walk it from the front.
    pub(super) order: BTreeSet<(Instant, u64, Uuid)>,
    pub(super) dead: Vec<DeadLetter>,
    /// Claims made so far: the source of fence tokens, never reused.
    pub(super) claims: u64,
    /// Per-key order (as the Postgres engine's ordered groups): a key's first delivery is in
    /// `pending` (its head, marked with the key); the rest wait in `lines` with their due times.
    pub(super) ordered: bool,
    pub(super) lines: HashMap<String, VecDeque<(Uuid, Instant)>>,
    /// At most this many leased at once (`GroupConfig::max_in_flight`).
    pub(super) max_in_flight: Option<u32>,
    /// At most this many of one key leased at once (`GroupConfig::max_in_flight_per_key`),
    /// counted when claiming (an ordered group has its lines instead).
    pub(super) max_in_flight_per_key: Option<u32>,
    /// The group's token bucket (`GroupConfig::rate_limit`), full when created.
    pub(super) rate: Option<(RateLimit, Bucket)>,
    /// Each key's rate (`GroupConfig::rate_limit_per_key`) and the keys' buckets (a missing
    /// one is full).
    pub(super) key_rate: Option<RateLimit>,
    pub(super) key_buckets: HashMap<String, Bucket>,
    /// Weighted fair share between keys (`GroupConfig::fair_share`), see `fair.rs`.
    pub(super) fair: Option<super::fair::Fair>,
}

/// A token bucket as on Postgres (`rate_buckets`): `tokens` as of `at`; `horizon`, up to when
/// its tokens are promised to deliveries put off.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    pub(super) tokens: f64,
    pub(super) at: Instant,
    pub(super) horizon: Instant,
}

impl Bucket {
    pub(super) fn full(limit: &RateLimit, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(limit.burst_size()),
            at: now,
            horizon: now,
        }
    }

    /// Refills up to `now`; returns the tokens held.
    pub(super) fn refill(&mut self, limit: &RateLimit, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * limit.rate();
        self.tokens = (self.tokens + gained).min(f64::from(limit.burst_size()));
        self.at = self.at.max(now);
        self.tokens
    }

    /// When the bucket next holds a whole token.
    pub(super) fn next_token(&self, limit: &RateLimit, now: Instant) -> Instant {
        now + Duration::from_secs_f64(((1.0 - self.tokens).max(0.0) / limit.rate()).min(86_400.0))
    }
}

pub(super) struct Stream {
    pub(super) config: StreamConfig,
    pub(super) messages: HashMap<Uuid, Arc<Stored>>,
    pub(super) groups: HashMap<String, Group>,
    pub(super) dedupe: HashMap<String, (Uuid, Instant)>,
    pub(super) wake: Arc<Notify>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) streams: HashMap<String, Stream>,
}

pub(super) fn stream_not_found(s: &str) -> Error {
    Error::StreamNotFound(s.to_owned())
}

pub(super) fn group_not_found(s: &str, g: &str) -> Error {
    Error::GroupNotFound {
        stream: s.to_owned(),
        group: g.to_owned(),
    }
}

impl Group {
    pub(super) fn set(&mut self, id: Uuid, mut p: Pending) {
        if let Some(old) = self.pending.get(&id) {
            self.order.remove(&(old.visible_at, old.stamp, id));
        }
        // A delivery given a real time (a lease, a retry, a put-off) leaves the virtual queue.
        if !self.fair.as_ref().is_some_and(|f| p.visible_at == f.floor) {
            p.stamp = 0;
        }
        self.order.insert((p.visible_at, p.stamp, id));
        self.pending.insert(id, p);
    }

    pub(super) fn remove(&mut self, id: &Uuid) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.order.remove(&(p.visible_at, p.stamp, *id));
        Some(p)
    }

    /// Queues a new delivery of message `id` (ordering key `key`) due at `visible_at`: in an
    /// ordered group a keyed message whose key already has a head joins the key's line.
    pub(super) fn enqueue(&mut self, id: Uuid, key: Option<&str>, visible_at: Instant) {
        if self.fair.is_some() {
            self.enqueue_fair(id, key, visible_at);
            return;
        }
        match key.filter(|_| self.ordered) {
            Some(k) => match self.lines.get_mut(k) {
                Some(line) => line.push_back((id, visible_at)),
                None => {
                    self.lines.insert(k.to_owned(), VecDeque::new());
                    self.set(id, Pending::new(visible_at, Some(k.to_owned())));
                }
            },
            None => self.set(id, Pending::new(visible_at, None)),
        }
    }

    /// Removes a delivery for good (acked or dead): a head's key moves on to its next delivery,
    /// due at its own time or now. Returns whether a next delivery was queued (waiting consumers
    /// then have something new to claim or to wait for).
    pub(super) fn finish(&mut self, id: &Uuid) -> bool {
        let Some(p) = self.remove(id) else {
            return false;
        };
        // With a per-key limit, the key's place is free: consumers held by it may claim again.
        let Some(key) = p.key else {
            return self.max_in_flight_per_key.is_some();
        };
        let next = self.lines.get_mut(&key).and_then(VecDeque::pop_front);
        match next {
            Some((next, at)) => {
                self.set(next, Pending::new(at.max(Instant::now()), Some(key)));
                true
            }
            None => {
                self.lines.remove(&key);
                false
            }
        }
    }

    /// How many more deliveries the group may lease now under its limit (`usize::MAX` without
    /// one).
    pub(super) fn room(&self, now: Instant) -> usize {
        let Some(cap) = self.max_in_flight else {
            return usize::MAX;
        };
        let leased = self
            .pending
            .values()
            .filter(|p| p.consumer.is_some() && p.visible_at > now)
            .count();
        (cap as usize).saturating_sub(leased)
    }

    /// Leased deliveries per key, when the group has a per-key limit (`None` without one, or
    /// in an ordered group, whose lines hold one per key already).
    pub(super) fn leased_by_key(
        &self,
        messages: &HashMap<Uuid, Arc<Stored>>,
        now: Instant,
    ) -> Option<(usize, HashMap<String, usize>)> {
        let cap = self.max_in_flight_per_key.filter(|_| !self.ordered)? as usize;
        let mut leased: HashMap<String, usize> = HashMap::new();
        for (id, p) in &self.pending {
            if p.consumer.is_some() && p.visible_at > now {
                if let Some(k) = messages.get(id).and_then(|m| m.key.as_ref()) {
                    *leased.entry(k.clone()).or_default() += 1;
                }
            }
        }
        Some((cap, leased))
    }

    /// How many deliveries the group's rate limit allows now (`usize::MAX` without one).
    pub(super) fn tokens(&mut self, now: Instant) -> usize {
        match &mut self.rate {
            Some((limit, bucket)) => bucket.refill(limit, now).max(0.0) as usize,
            None => usize::MAX,
        }
    }

    /// Takes a token of `key`'s bucket, or says when the delivery is to come back: one token
    /// apart from the key's horizon, which then moves there.
    pub(super) fn key_token(
        &mut self,
        key: &str,
        now: Instant,
    ) -> std::result::Result<(), Instant> {
        let Some(limit) = self.key_rate else {
            return Ok(());
        };
        let bucket = self
            .key_buckets
            .entry(key.to_owned())
            .or_insert_with(|| Bucket::full(&limit, now));
        if bucket.refill(&limit, now) >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let due = bucket.horizon.max(now) + Duration::from_secs_f64(1.0 / limit.rate());
        bucket.horizon = due;
        Err(due)
    }

    /// Forgets the key buckets that have refilled and promise nothing (a missing bucket is a
    /// full one), once there are many: keys come and go, the map must not grow with them.
    pub(super) fn trim_key_buckets(&mut self, now: Instant) {
        let Some(limit) = self.key_rate else {
            self.key_buckets.clear();
            return;
        };
        if self.key_buckets.len() < 4_096 {
            return;
        }
        let full = f64::from(limit.burst_size());
        self.key_buckets
            .retain(|_, b| b.horizon > now || b.refill(&limit, now) < full);
    }

    /// Deliveries waiting behind their keys' heads.
    pub(super) fn waiting(&self) -> usize {
        self.lines.values().map(VecDeque::len).sum()
    }

    /// The pending delivery `d` refers to, if its lease is still this claim's.
    pub(super) fn fenced(&self, d: &Delivery) -> bool {
        self.pending.get(&d.id()).is_some_and(|p| {
            p.consumer.is_some()
                && p.attempts == d.attempt
                && d.token.as_ref().and_then(|t| t.downcast_ref::<u64>()) == Some(&p.claim)
        })
    }

    pub(super) fn bury(
        &mut self,
        (stream, group): (&str, &str),
        msg: Option<&Stored>,
        id: Uuid,
        attempts: u32,
        reason: &str,
        error: Option<String>,
    ) -> bool {
        let ready = self.finish(&id);
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
        ready
    }
}
