//! Leases, emulated: RabbitMQ has no visibility timeout, so each consumer handle tracks the
//! deliveries it holds (unacked on its channel) with a lease deadline, and a reaper task hands
//! expired ones back with `basic.nack(requeue)`. The quorum queue counts that return in
//! `x-delivery-count`, so the next consumer sees attempt + 1. A settle first removes the
//! delivery from the tracker: if the reaper (or a channel loss) got there first, the settle
//! changes nothing and reports the lease lost (fenced settles).
//!
//! Delivery tags only mean something on the channel that received them: when the channel is
//! replaced (server error, lost connection), the broker has requeued everything it held, so the
//! tracker starts a new generation and settles of older deliveries report the lease lost.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use lapin::options::{BasicNackOptions, BasicQosOptions};
use lapin::Channel;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::names::GroupNames;
use super::AmqpBackend;
use crate::config::StreamConfig;
use crate::error::Result;

/// A message the doorbell consumer received while no fetch was waiting: not leased yet, handed
/// out by the next fetch, or handed back (attempt unchanged) if none comes within a lease.
pub(crate) struct Buffered {
    pub generation: u64,
    pub delivery: lapin::message::Delivery,
    pub received: Instant,
}

/// A delivery this handle holds.
struct Entry {
    id: Uuid,
    expires: Instant,
}

#[derive(Default)]
struct Tracked {
    generation: u64,
    /// By delivery tag on the current channel.
    entries: HashMap<u64, Entry>,
}

/// The settle handle stored in [`crate::Delivery`]: which channel generation and tag.
pub(crate) struct Token {
    pub shared: Arc<Shared>,
    pub generation: u64,
    pub tag: u64,
    pub last_error: Option<String>,
}

/// A delivery removed from the tracker by a settle: the settle now owns its tag.
pub(crate) struct Claimed {
    pub generation: u64,
    pub tag: u64,
    expires: Instant,
    id: Uuid,
}

/// State shared by the clones of one consumer handle (and by its deliveries' tokens).
pub(crate) struct Shared {
    pub backend: AmqpBackend,
    pub stream: String,
    pub group: String,
    pub name: String,
    pub names: GroupNames,
    pub config: StreamConfig,
    slot: tokio::sync::Mutex<Option<(Channel, u64)>>,
    tracked: Mutex<Tracked>,
    reaper: Arc<Notify>,
    /// Cancelled when the last reference drops: stops the reaper and running fetches.
    pub token: CancellationToken,
    consumer_seq: AtomicU64,
    /// The prefetch last set on the current channel.
    qos: Mutex<(u64, u16)>,
    /// What the doorbell consumer received (see `fetch.rs`).
    pub buffer: Mutex<VecDeque<Buffered>>,
    /// Signalled when the buffer gets a message.
    pub arrived: Notify,
    /// The doorbell consumer currently registered: (channel generation, consumer tag).
    pub doorbell: tokio::sync::Mutex<Option<(u64, String)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl Shared {
    /// A new consumer state with its reaper running.
    pub(crate) fn start(
        backend: AmqpBackend,
        stream: &str,
        group: &str,
        name: &str,
        names: GroupNames,
        config: StreamConfig,
    ) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            backend,
            stream: stream.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
            names,
            config,
            slot: tokio::sync::Mutex::new(None),
            tracked: Mutex::new(Tracked::default()),
            reaper: Arc::new(Notify::new()),
            token: CancellationToken::new(),
            consumer_seq: AtomicU64::new(0),
            qos: Mutex::new((0, 0)),
            buffer: Mutex::new(VecDeque::new()),
            arrived: Notify::new(),
            doorbell: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(reap_loop(
            Arc::downgrade(&shared),
            shared.reaper.clone(),
            shared.token.clone(),
        ));
        shared
    }

    fn tracked(&self) -> MutexGuard<'_, Tracked> {
        // The map stays consistent across a panic elsewhere (single inserts/removes).
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The consumer's channel and its generation, opening a new one if needed.
    pub(crate) async fn channel(&self) -> Result<(Channel, u64)> {
        let mut slot = self.slot.lock().await;
        if let Some((ch, generation)) = slot.as_ref() {
            if ch.status().connected() {
                return Ok((ch.clone(), *generation));
            }
        }
        let ch = self.backend.inner.conn.channel().await?;
        let generation = {
            let mut t = self.tracked();
            t.generation += 1;
            t.entries.clear();
            t.generation
        };
        *slot = Some((ch.clone(), generation));
        Ok((ch, generation))
    }

    /// The channel of `generation` if it is still the current one.
    pub(crate) async fn channel_of(&self, generation: u64) -> Option<Channel> {
        let slot = self.slot.lock().await;
        match slot.as_ref() {
            Some((ch, g)) if *g == generation && ch.status().connected() => Some(ch.clone()),
            _ => None,
        }
    }

    /// Drops the channel of `generation`: the broker requeues whatever it held.
    pub(crate) async fn reset(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|(_, g)| *g == generation) {
            *slot = None;
            let mut t = self.tracked();
            t.generation += 1;
            t.entries.clear();
        }
    }

    /// Sets the per-consumer prefetch for the next `basic.consume`, if it changed.
    pub(crate) async fn prefetch(&self, ch: &Channel, generation: u64, n: u16) -> Result<()> {
        {
            let q = self.qos.lock().unwrap_or_else(|e| e.into_inner());
            if *q == (generation, n) {
                return Ok(());
            }
        }
        ch.basic_qos(n, BasicQosOptions { global: false })
            .await
            .map_err(super::conn::broker)?;
        *self.qos.lock().unwrap_or_else(|e| e.into_inner()) = (generation, n);
        Ok(())
    }

    /// A unique consumer tag on this channel.
    pub(crate) fn consumer_tag(&self) -> String {
        let n = self.consumer_seq.fetch_add(1, Ordering::Relaxed);
        format!("pgtide.{}.{n}", self.name)
    }

    /// Starts the lease of a received delivery. False if its channel was replaced meanwhile
    /// (the broker requeued it): it must not be handed out.
    pub(crate) fn track(&self, generation: u64, tag: u64, id: Uuid, lease: Duration) -> bool {
        let mut t = self.tracked();
        if t.generation != generation {
            return false;
        }
        let expires = Instant::now() + lease;
        t.entries.insert(tag, Entry { id, expires });
        drop(t);
        self.reaper.notify_one();
        true
    }

    /// Takes the delivery out of the tracker if this token still holds its lease.
    pub(crate) fn claim(&self, token: &Token, id: Uuid) -> Option<Claimed> {
        let mut t = self.tracked();
        if t.generation != token.generation || t.entries.get(&token.tag).map(|e| e.id) != Some(id) {
            return None;
        }
        let e = t.entries.remove(&token.tag)?;
        Some(Claimed {
            generation: token.generation,
            tag: token.tag,
            expires: e.expires,
            id: e.id,
        })
    }

    /// Puts back a claim whose settle failed, so the lease still runs out normally.
    pub(crate) fn unclaim(&self, c: Claimed) {
        let mut t = self.tracked();
        if t.generation == c.generation {
            t.entries.insert(
                c.tag,
                Entry {
                    id: c.id,
                    expires: c.expires,
                },
            );
        }
        drop(t);
        self.reaper.notify_one();
    }

    /// Moves the lease deadline; false if the lease is no longer held.
    pub(crate) fn in_progress(&self, token: &Token, id: Uuid, lease: Duration) -> bool {
        let mut t = self.tracked();
        if t.generation != token.generation {
            return false;
        }
        match t.entries.get_mut(&token.tag) {
            Some(e) if e.id == id => {
                e.expires = Instant::now() + lease;
                true
            }
            _ => false,
        }
    }

    /// Deliveries leased by this handle, and messages it holds unleased in its buffer.
    pub(crate) fn held(&self) -> (usize, usize) {
        let buffered = self.buffer.lock().unwrap_or_else(|e| e.into_inner()).len();
        (self.tracked().entries.len(), buffered)
    }

    /// Closes the consumer channel gracefully (for [`crate::Queue::close`]). Buffered messages
    /// never reached anyone, so they go back first with the attempt unchanged; then the
    /// channel close waits for the broker's close-ok, which comes after every settle written
    /// on the channel before it was processed, and a barrier (`barrier.rs`) makes sure the
    /// queue applied those settles first. Leased deliveries return to the queue with the
    /// channel (the attempt counted). A later fetch opens a new channel.
    pub(crate) async fn close(self: &Arc<Self>) -> Result<()> {
        let unclaimed: Vec<Buffered> = self
            .buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for m in unclaimed {
            if let Err(e) = self.hand_back(m.generation, m.delivery).await {
                tracing::warn!(error = %e, "pgtide amqp: handing back an unclaimed message at close failed; it was requeued instead");
            }
        }
        let current = self.slot.lock().await.clone();
        let Some((ch, generation)) = current else {
            tracing::debug!("pgtide amqp: close: no channel");
            return Ok(());
        };
        // Close-ok alone does not mean the queue applied the acks (see `barrier.rs`). Run while
        // the channel is still current, so a message pushed to the barrier can be handed back.
        let barrier = if ch.status().connected() {
            self.settle_barrier(&ch, generation).await
        } else {
            Ok(())
        };
        {
            let mut slot = self.slot.lock().await;
            if slot.as_ref().is_some_and(|(_, g)| *g == generation) {
                *slot = None;
                let mut t = self.tracked();
                t.generation += 1;
                t.entries.clear();
            }
        }
        tracing::debug!(
            connected = ch.status().connected(),
            "pgtide amqp: close: closing the consumer channel"
        );
        if !ch.status().connected() {
            return barrier; // already closed: the broker requeued what it held
        }
        let closed = super::conn::close_ok(
            "consumer channel",
            ch.close(200, "pgtide: consumer closed".into()),
        )
        .await;
        barrier.and(closed)
    }

    /// Wakes the reaper (a new deadline may be earlier than the one it sleeps for).
    pub(crate) fn wake_reaper(&self) {
        self.reaper.notify_one();
    }

    /// Buffered messages nobody fetched within a lease go back to the queue (as copies with
    /// the attempt unchanged), so an idle handle does not sit on them.
    async fn reap_buffer(self: &Arc<Self>) -> Option<Instant> {
        let hold = self.config.lease;
        let now = Instant::now();
        let stale: Vec<Buffered> = {
            let mut b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
            let keep = b
                .iter()
                .position(|m| m.received + hold > now)
                .unwrap_or(b.len());
            b.drain(..keep).collect()
        };
        for m in stale {
            if let Err(e) = self.hand_back(m.generation, m.delivery).await {
                tracing::warn!(error = %e, "pgtide amqp: handing back an unclaimed message failed; it was requeued instead");
            }
        }
        let b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        b.front().map(|m| m.received + hold)
    }

    /// Hands expired deliveries back to the queue; returns the next deadline.
    async fn reap(self: &Arc<Self>) -> Option<Instant> {
        let buffered_due = self.reap_buffer().await;
        let next = self.reap_leases().await;
        match (buffered_due, next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn reap_leases(&self) -> Option<Instant> {
        let now = Instant::now();
        let (generation, expired, next) = {
            let mut t = self.tracked();
            let expired: Vec<u64> = t
                .entries
                .iter()
                .filter(|(_, e)| e.expires <= now)
                .map(|(tag, _)| *tag)
                .collect();
            for tag in &expired {
                t.entries.remove(tag);
            }
            let next = t.entries.values().map(|e| e.expires).min();
            (t.generation, expired, next)
        };
        if expired.is_empty() {
            return next;
        }
        let Some(ch) = self.channel_of(generation).await else {
            return next; // channel gone: the broker requeued them already
        };
        for tag in expired {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            if let Err(e) = ch.basic_nack(tag, requeue).await {
                tracing::warn!(error = %e, stream = %self.stream, group = %self.group,
                    "pgtide amqp: returning an expired delivery failed; dropping the channel so the broker requeues it");
                self.reset(generation).await;
                break;
            }
        }
        next
    }
}

/// The reaper: sleeps until the earliest lease deadline (or a new delivery), then returns what
/// expired. Holds only a weak reference, so it never keeps a dropped consumer alive.
async fn reap_loop(shared: Weak<Shared>, wake: Arc<Notify>, token: CancellationToken) {
    loop {
        let next = match shared.upgrade() {
            Some(s) => s.reap().await,
            None => break,
        };
        let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}
