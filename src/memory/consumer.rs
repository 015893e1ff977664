//! [`MemoryConsumer`]: claims walk the group's pending deliveries in visibility order; settles
//! are fenced by the attempt number, as on Postgres.

use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::state::{group_not_found, Pending, Stream};
use super::MemoryBackend;
use crate::error::Result;
use crate::queue::{uuid_time, Delivery, Message, QueueConsumer, SettleReport};

/// A consumer of the memory backend.
#[derive(Debug, Clone)]
pub struct MemoryConsumer {
    pub(super) backend: MemoryBackend,
    pub(super) stream: String,
    pub(super) group: String,
    pub(super) name: String,
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
            let max = max.min(g.room(now)).min(g.tokens(now));
            // A fair group: what came due at a real time joins the virtual queue first.
            g.restamp(now, max);
            // Something ready was held back by a rate limit: come back then, not at once.
            let mut held = None;
            let mut per_key = g.leased_by_key(&s.messages, now);
            // Ready deliveries of keys at their limit stay where they are: the walk goes on
            // past them (`skipped_to`), and a fetch that got nothing waits for a settle's
            // wake-up or the next lease to end.
            let mut skipped_to: Option<(Instant, u64, Uuid)> = None;
            while out.len() < max {
                let next = match skipped_to {
                    None => g.order.iter().next(),
                    Some(c) => g.order.range((Excluded(c), Unbounded)).next(),
                };
                let Some(&(at, stamp, id)) = next else {
                    break;
                };
                if at > now {
                    break;
                }
                let msg = s.messages.get(&id).cloned();
                let Some(msg) = msg else {
                    g.remove(&id);
                    continue;
                };
                let Some((attempts, last_error)) = g
                    .pending
                    .get(&id)
                    .map(|p| (p.attempts, p.last_error.clone()))
                else {
                    break;
                };
                if attempts >= config.max_deliver {
                    let error =
                        last_error.or_else(|| Some(format!("lease expired on attempt {attempts}")));
                    // A dead head lets its key's next delivery go (ordered groups).
                    g.bury(
                        (stream, group),
                        Some(&msg),
                        id,
                        attempts,
                        "max_deliver",
                        error,
                    );
                    continue;
                }
                if let (Some((cap, leased)), Some(k)) = (&per_key, msg.key.as_ref()) {
                    if leased.get(k).is_some_and(|n| n >= cap) {
                        skipped_to = Some((at, stamp, id));
                        continue;
                    }
                }
                // A key out of tokens is put off (the attempt not counted); other keys go on.
                let key = g
                    .pending
                    .get(&id)
                    .and_then(|p| p.key.clone())
                    .or(msg.key.clone());
                if let Some(k) = key {
                    if let Err(due) = g.key_token(&k, now) {
                        if let Some(mut p) = g.remove(&id) {
                            p.visible_at = due;
                            p.consumer = None;
                            g.set(id, p);
                        }
                        continue;
                    }
                }
                let Some(p) = g.remove(&id) else { break };
                if let (Some((_, leased)), Some(k)) = (&mut per_key, msg.key.as_ref()) {
                    *leased.entry(k.clone()).or_default() += 1;
                }
                let attempts = p.attempts + 1;
                g.claims += 1;
                let claim = g.claims;
                g.set(
                    id,
                    Pending {
                        visible_at: now + config.lease,
                        attempts,
                        consumer: Some(name.clone()),
                        last_error: p.last_error,
                        claim,
                        key: p.key,
                        stamp: 0,
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
                        key: msg.key.clone(),
                    },
                    group: group.clone(),
                    consumer: name.clone(),
                    attempt: attempts,
                    lease_expires_at: Utc::now() + config.lease,
                    token: Some(Arc::new(claim)),
                });
            }
            g.trim_key_buckets(now);
            if let Some((limit, bucket)) = &mut g.rate {
                bucket.tokens -= out.len() as f64;
                let ready = g.order.iter().next().is_some_and(|(at, _, _)| *at <= now);
                if out.is_empty() && ready {
                    held = Some(bucket.next_token(limit, now));
                }
            }
            let next = if out.is_empty() && skipped_to.is_some() {
                // Only deliveries of full keys are ready: their places free up when a lease
                // ends (or a settle wakes the waiters).
                g.order
                    .range((Excluded((now, u64::MAX, Uuid::max())), Unbounded))
                    .next()
                    .map(|(at, _, _)| *at)
            } else {
                g.order.iter().next().map(|(at, _, _)| *at)
            };
            let next = match held {
                Some(h) => Some(h),
                None => next,
            };
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
        if max == 0 {
            return Ok(vec![]);
        }
        Ok(self.claim(max)?.0)
    }

    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        // Capped: a hostile timeout (Duration::MAX) must not overflow the clock.
        let deadline = Instant::now() + timeout.min(crate::MAX_DURATION);
        loop {
            let (batch, wake, next) = self.claim(max)?;
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
            // An acked head lets its key's next delivery go (ordered groups).
            let ready = s.groups.get_mut(&group).is_some_and(|g| g.finish(&d.id()));
            if ready {
                Settled::Ready
            } else {
                Settled::Done
            }
        })
    }

    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        crate::limits::check_nack_delay(delay)?;
        let (stream, group) = (self.stream.clone(), self.group.clone());
        self.settle(ds, |s, d| {
            let config = s.config.clone();
            let msg = s.messages.get(&d.id()).cloned();
            let Some(g) = s.groups.get_mut(&group) else {
                return Settled::Done;
            };
            let attempts = g.pending.get(&d.id()).map_or(d.attempt, |p| p.attempts);
            if attempts >= config.max_deliver {
                if g.bury(
                    (&stream, &group),
                    msg.as_deref(),
                    d.id(),
                    attempts,
                    "max_deliver",
                    error.map(str::to_owned),
                ) {
                    s.wake.notify_waiters();
                }
                return Settled::Dead;
            }
            let wait = delay.unwrap_or_else(|| config.backoff.delay(attempts));
            let key = g.pending.get(&d.id()).and_then(|p| p.key.clone());
            g.set(
                d.id(),
                Pending {
                    visible_at: Instant::now() + wait,
                    attempts,
                    consumer: None,
                    last_error: error.map(str::to_owned),
                    claim: 0,
                    key,
                    stamp: 0,
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
                if g.bury(
                    (&stream, &group),
                    msg.as_deref(),
                    d.id(),
                    d.attempt,
                    reason,
                    last,
                ) {
                    s.wake.notify_waiters();
                }
            }
            Settled::Dead
        })
    }

    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        crate::limits::check_lease_override(lease)?;
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

    async fn pause_batch(
        &self,
        ds: &[&Delivery],
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<SettleReport> {
        crate::limits::check_time("pause until", until)?;
        let group = self.group.clone();
        let wait = (until - Utc::now()).to_std().unwrap_or_default();
        self.settle(ds, |s, d| {
            if let Some(g) = s.groups.get_mut(&group) {
                if let Some(p) = g.remove(&d.id()) {
                    g.set(
                        d.id(),
                        Pending {
                            visible_at: Instant::now() + wait,
                            attempts: p.attempts.saturating_sub(1),
                            consumer: None,
                            claim: 0,
                            ..p
                        },
                    );
                }
            }
            // Waiters recompute their next due time when woken.
            s.wake.notify_waiters();
            Settled::Done
        })
    }
}
