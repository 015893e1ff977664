//! Runs a case against a backend and the reference model side by side: every step is applied to
//! both, its result is compared with what the model allows, and the invariants are checked after
//! it (stats within what the model allows, dead letters exactly the model's).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use pgtide::{
    Backoff, Delivery, Error, GroupStart, OutgoingMessage, QueueConsumer, SettleReport,
    StreamConfig,
};
use tokio::time::Instant;
use uuid::Uuid;

use super::ops::{Op, Pick, BACKOFF, CONSUMERS, GROUPS, LEASE, MAX_DELIVER};
use super::reference::{due, Dead, Due, Handle, Model, Pending, Window};
use super::ModelBackend;

pub type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

const STREAM: &str = "model";
const GROUP_NAMES: [&str; GROUPS] = ["g0", "g1"];
const TERM_REASON: &str = "model-term";

fn consumer_name(c: usize) -> String {
    format!("c{c}")
}

fn err(e: Error) -> String {
    format!("unexpected backend error: {e}")
}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

pub struct Driver<B: ModelBackend> {
    q: B,
    /// `consumers[group][consumer]`.
    consumers: Vec<Vec<B::Consumer>>,
    model: Model,
    exact_stats: bool,
    start: Instant,
}

impl<B: ModelBackend> Driver<B> {
    pub async fn new(q: B) -> Result<Self, String> {
        let caps = q.capabilities();
        // The model encodes fenced settles (after lapse, release and replay), native delays
        // and lease extension: a backend without them is not one this test is for.
        ensure!(
            caps.fenced_settle
                && caps.fenced_after_release
                && caps.lease_timeout
                && caps.lease_extension
                && caps.nack_delay
                && caps.delay,
            "backend lacks a capability the model assumes: {caps:?}"
        );
        let config = StreamConfig::default()
            .lease(LEASE)
            .max_deliver(MAX_DELIVER)
            .backoff(Backoff::schedule([BACKOFF]).jitter(0.0));
        q.ensure_stream(STREAM, &config).await.map_err(err)?;
        let mut consumers = vec![];
        for g in GROUP_NAMES {
            q.ensure_group(STREAM, g, GroupStart::New)
                .await
                .map_err(err)?;
            let mut cs = vec![];
            for c in 0..CONSUMERS {
                cs.push(
                    q.consumer(STREAM, g, &consumer_name(c))
                        .await
                        .map_err(err)?,
                );
            }
            consumers.push(cs);
        }
        Ok(Driver {
            q,
            consumers,
            model: Model::default(),
            exact_stats: caps.exact_stats,
            start: Instant::now(),
        })
    }

    /// Runs every step with the invariants checked after each, then drains the groups.
    pub async fn run(&mut self, ops: &[Op]) -> Check {
        for (i, op) in ops.iter().enumerate() {
            let at = self.ms(Instant::now());
            self.step(op)
                .await
                .map_err(|e| format!("step {i} at {at} ms, {op:?}: {e}"))?;
            self.check()
                .await
                .map_err(|e| format!("after step {i} at {at} ms, {op:?}: {e}"))?;
        }
        self.drain().await.map_err(|e| format!("final drain: {e}"))
    }

    fn ms(&self, t: Instant) -> u128 {
        t.duration_since(self.start).as_millis()
    }

    fn show(&self, p: &Pending) -> String {
        format!(
            "attempts {}, visible from [{}, {}] ms, holder {:?}",
            p.attempts,
            self.ms(p.visible.lo),
            self.ms(p.visible.hi),
            p.holder
        )
    }

    async fn step(&mut self, op: &Op) -> Check {
        match op {
            Op::Publish { count, delay } => self.publish(*count, *delay).await,
            Op::Claim {
                group,
                consumer,
                max,
            } => self.claim(*group, *consumer, *max).await,
            Op::AckAndFetch { pick, max } => self.ack_and_fetch(pick, *max).await,
            Op::Ack(picks) => {
                let hs = self.resolve_batch(picks);
                self.ack(hs).await
            }
            Op::Nack { pick, delay } => self.nack(pick, *delay).await,
            Op::Term(pick) => self.term(pick).await,
            Op::InProgress { pick, lease } => self.in_progress(pick, *lease).await,
            Op::Release(picks) => self.release(picks).await,
            Op::Wait(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
            Op::Replay { group, one } => self.replay(*group, one.as_ref()).await,
            Op::Purge => {
                self.q.purge(STREAM).await.map_err(err)?;
                for g in &mut self.model.groups {
                    g.pending.clear();
                    g.dead.clear();
                }
                Ok(())
            }
        }
    }

    async fn publish(&mut self, count: usize, delay: Option<Duration>) -> Check {
        let msgs: Vec<OutgoingMessage> = (0..count)
            .map(|k| {
                let body = format!("m{}", self.model.payloads.len() + k).into_bytes();
                let m = OutgoingMessage::bytes(body);
                match delay {
                    Some(d) => m.delay(d),
                    None => m,
                }
            })
            .collect();
        let t0 = Instant::now();
        let receipts = if count == 1 {
            vec![self.q.publish(STREAM, msgs[0].clone()).await.map_err(err)?]
        } else {
            self.q.publish_batch(STREAM, &msgs).await.map_err(err)?
        };
        let t1 = Instant::now();
        ensure!(receipts.len() == count, "receipts {receipts:?} for {count}");
        for (r, m) in receipts.iter().zip(&msgs) {
            ensure!(!r.duplicate, "no dedupe key, yet a duplicate: {r:?}");
            self.model.payloads.insert(r.id, m.payload().to_vec());
            for g in &mut self.model.groups {
                let p = Pending {
                    attempts: 0,
                    visible: Window::after(t0, t1, delay.unwrap_or_default()),
                    holder: None,
                };
                ensure!(g.pending.insert(r.id, p).is_none(), "id {} reused", r.id);
            }
        }
        Ok(())
    }

    async fn claim(&mut self, group: usize, consumer: usize, max: usize) -> Check {
        let c = self.consumers[group][consumer].clone();
        let t0 = Instant::now();
        let batch = c.try_fetch(max).await.map_err(err)?;
        let at = Window {
            lo: t0,
            hi: Instant::now(),
        };
        self.claimed(group, consumer, max, batch, at).await
    }

    /// Checks a claim of `max` that returned `batch` somewhere inside `at`, then records it.
    async fn claimed(
        &mut self,
        group: usize,
        consumer: usize,
        max: usize,
        batch: Vec<Delivery>,
        at: Window,
    ) -> Check {
        let slack = B::SLACK;
        // A claim may bury what it picks instead of handing it out: an expired lease on the
        // last allowed attempt. Whatever became dead must have been exactly that.
        let listed = self.dead_listing(group).await?;
        let g = &self.model.groups[group];
        let mut buried = vec![];
        for (id, dead) in &listed {
            if let Some(known) = g.dead.get(id) {
                ensure!(
                    known == dead,
                    "dead letter {id} changed: {known:?} -> {dead:?}"
                );
                continue;
            }
            let Some(p) = g.pending.get(id) else {
                return Err(format!("dead letter {id} the group never held: {dead:?}"));
            };
            ensure!(
                p.attempts >= MAX_DELIVER
                    && p.holder.is_some()
                    && due(p.visible, at, slack) != Due::No,
                "the claim buried {id} ({}), which was not an expired lease on its last attempt",
                self.show(p)
            );
            ensure!(
                dead.reason == "max_deliver" && dead.attempts == p.attempts,
                "buried {id} as {dead:?}, expected max_deliver after {} attempts",
                p.attempts
            );
            buried.push(*id);
        }
        if let Some(id) = g.dead.keys().find(|id| !listed.contains_key(id)) {
            return Err(format!("dead letter {id} vanished during a claim"));
        }
        ensure!(batch.len() <= max, "asked for {max}, got {}", batch.len());
        let mut seen = HashSet::new();
        for d in &batch {
            let id = d.id();
            ensure!(seen.insert(id), "{id} twice in one batch");
            let Some(p) = g.pending.get(&id) else {
                return Err(format!(
                    "handed out {id}, which the group no longer holds (acked, dead or purged)"
                ));
            };
            // Never two live holders: a delivery leased (or delayed) past the claim's instant
            // must not be handed out again.
            ensure!(
                due(p.visible, at, slack) != Due::No,
                "handed out {id} while it was not visible ({}); claim ran in [{}, {}] ms",
                self.show(p),
                self.ms(at.lo),
                self.ms(at.hi)
            );
            ensure!(
                p.attempts < MAX_DELIVER,
                "handed out {id} past max_deliver ({})",
                self.show(p)
            );
            ensure!(
                d.attempt == p.attempts + 1,
                "{id} handed out as attempt {}, expected {} ({})",
                d.attempt,
                p.attempts + 1,
                self.show(p)
            );
            ensure!(
                d.group == GROUP_NAMES[group] && d.consumer == consumer_name(consumer),
                "{id} handed to {}/{}, asked by {}/{}",
                d.group,
                d.consumer,
                GROUP_NAMES[group],
                consumer_name(consumer)
            );
            ensure!(
                self.model.payloads.get(&id).map(Vec::as_slice) == Some(&d.payload[..]),
                "{id} carries a payload that was not published with it"
            );
        }
        // Delivered until acked or dead: what was surely visible is handed out (or buried) up
        // to `max`, earliest first.
        let visible: Vec<(&Uuid, &Pending)> = g
            .pending
            .iter()
            .filter(|(_, p)| due(p.visible, at, slack) == Due::Yes)
            .collect();
        ensure!(
            batch.len() + buried.len() >= max.min(visible.len()),
            "a claim of {max} returned {} and buried {} while {} were visible",
            batch.len(),
            buried.len(),
            visible.len()
        );
        for d in &batch {
            let r = g.pending[&d.id()].visible;
            if let Some((id, p)) = visible.iter().find(|(id, p)| {
                !seen.contains(*id) && !buried.contains(*id) && p.visible.hi + slack < r.lo
            }) {
                return Err(format!(
                    "handed out {} (visible from {} ms) but not {id}, visible earlier ({})",
                    d.id(),
                    self.ms(r.lo),
                    self.show(p)
                ));
            }
        }
        let g = &mut self.model.groups[group];
        for id in buried {
            if let Some(p) = g.pending.remove(&id) {
                g.dead.insert(
                    id,
                    Dead {
                        attempts: p.attempts,
                        reason: "max_deliver".into(),
                    },
                );
            }
        }
        for d in batch {
            let handle = self.model.handles.len();
            if let Some(p) = g.pending.get_mut(&d.id()) {
                p.attempts += 1;
                p.holder = Some(handle);
                p.visible = Window::after(at.lo, at.hi, LEASE);
            }
            self.model.handles.push(Handle {
                group,
                consumer,
                delivery: d,
            });
        }
        Ok(())
    }

    /// The handle a pick names, if the case holds any.
    fn resolve(&self, pick: &Pick) -> Option<usize> {
        if pick.live {
            let live = self.model.live_handles();
            if !live.is_empty() {
                return Some(live[pick.index.index(live.len())]);
            }
        }
        let n = self.model.handles.len();
        (n > 0).then(|| pick.index.index(n))
    }

    /// The handles of a batch settle: those of the first pick's group, one per message (a
    /// report names messages, so two handles of one message in one batch would be ambiguous).
    fn resolve_batch(&self, picks: &[Pick]) -> Vec<usize> {
        let mut out: Vec<usize> = vec![];
        for h in picks.iter().filter_map(|p| self.resolve(p)) {
            let hd = &self.model.handles[h];
            let fits = out.first().map_or(true, |&f| {
                self.model.handles[f].group == hd.group
                    && out
                        .iter()
                        .all(|&o| self.model.handles[o].delivery.id() != hd.delivery.id())
            });
            if fits {
                out.push(h);
            }
        }
        out
    }

    fn consumer_of(&self, h: usize) -> B::Consumer {
        let hd = &self.model.handles[h];
        self.consumers[hd.group][hd.consumer].clone()
    }

    /// Splits handles into (live, stale) message ids.
    fn liveness(&self, hs: &[usize]) -> (Vec<usize>, Vec<Uuid>) {
        let (live, stale): (Vec<usize>, Vec<usize>) = hs.iter().partition(|&&h| self.model.live(h));
        let stale = stale
            .iter()
            .map(|&h| self.model.handles[h].delivery.id())
            .collect();
        (live, stale)
    }

    fn ids(&self, hs: &[usize]) -> Vec<Uuid> {
        hs.iter()
            .map(|&h| self.model.handles[h].delivery.id())
            .collect()
    }

    fn check_report(
        report: &SettleReport,
        settled: Vec<Uuid>,
        dead: Vec<Uuid>,
        lost: Vec<Uuid>,
    ) -> Check {
        let got = (
            sorted(report.settled.clone()),
            sorted(report.dead_lettered.clone()),
            sorted(report.lost.clone()),
        );
        let want = (sorted(settled), sorted(dead), sorted(lost));
        ensure!(
            got == want,
            "report (settled, dead, lost) {got:?}, expected {want:?} (a stale handle settled, or a live one was refused)"
        );
        Ok(())
    }

    fn pending_mut(&mut self, h: usize) -> Option<&mut Pending> {
        let hd = &self.model.handles[h];
        let id = hd.delivery.id();
        self.model.groups[hd.group].pending.get_mut(&id)
    }

    async fn ack(&mut self, hs: Vec<usize>) -> Check {
        let Some(&first) = hs.first() else {
            return Ok(());
        };
        let c = self.consumer_of(first);
        let (live, stale) = self.liveness(&hs);
        let ds: Vec<&Delivery> = hs
            .iter()
            .map(|&h| &self.model.handles[h].delivery)
            .collect();
        let report = c.ack_batch(&ds).await.map_err(err)?;
        Self::check_report(&report, self.ids(&live), vec![], stale)?;
        self.acked(&live);
        Ok(())
    }

    fn acked(&mut self, live: &[usize]) {
        for &h in live {
            let hd = &self.model.handles[h];
            let id = hd.delivery.id();
            self.model.groups[hd.group].pending.remove(&id);
        }
    }

    async fn ack_and_fetch(&mut self, pick: &Pick, max: usize) -> Check {
        let Some(h) = self.resolve(pick) else {
            return Ok(());
        };
        let c = self.consumer_of(h);
        let (group, consumer) = (self.model.handles[h].group, self.model.handles[h].consumer);
        let (live, stale) = self.liveness(&[h]);
        let t0 = Instant::now();
        let (report, batch) = c
            .ack_and_fetch(&[&self.model.handles[h].delivery], max)
            .await
            .map_err(err)?;
        let at = Window {
            lo: t0,
            hi: Instant::now(),
        };
        Self::check_report(&report, self.ids(&live), vec![], stale)?;
        self.acked(&live);
        self.claimed(group, consumer, max, batch, at).await
    }

    async fn nack(&mut self, pick: &Pick, delay: Option<Duration>) -> Check {
        let Some(h) = self.resolve(pick) else {
            return Ok(());
        };
        let c = self.consumer_of(h);
        let (live, stale) = self.liveness(&[h]);
        let attempts = self.pending_mut(h).map_or(0, |p| p.attempts);
        let last = !live.is_empty() && attempts >= MAX_DELIVER;
        let t0 = Instant::now();
        let report = c
            .nack_batch(&[&self.model.handles[h].delivery], delay, Some("model"))
            .await
            .map_err(err)?;
        let t1 = Instant::now();
        let ids = self.ids(&live);
        if last {
            Self::check_report(&report, vec![], ids, stale)?;
        } else {
            Self::check_report(&report, ids, vec![], stale)?;
        }
        if live.is_empty() {
            return Ok(());
        }
        if last {
            self.bury(h, "max_deliver");
        } else if let Some(p) = self.pending_mut(h) {
            p.holder = None;
            p.visible = Window::after(t0, t1, delay.unwrap_or(BACKOFF));
        }
        Ok(())
    }

    fn bury(&mut self, h: usize, reason: &str) {
        let hd = &self.model.handles[h];
        let id = hd.delivery.id();
        let g = &mut self.model.groups[hd.group];
        if let Some(p) = g.pending.remove(&id) {
            g.dead.insert(
                id,
                Dead {
                    attempts: p.attempts,
                    reason: reason.into(),
                },
            );
        }
    }

    async fn term(&mut self, pick: &Pick) -> Check {
        let Some(h) = self.resolve(pick) else {
            return Ok(());
        };
        let c = self.consumer_of(h);
        let live = self.model.live(h);
        let got = c.term(&self.model.handles[h].delivery, TERM_REASON).await;
        match (live, got) {
            (true, Ok(())) => self.bury(h, TERM_REASON),
            (false, Err(Error::LeaseLost { .. })) => {}
            (live, got) => {
                return Err(format!(
                    "term of a {} handle returned {got:?}",
                    if live { "live" } else { "stale" }
                ))
            }
        }
        Ok(())
    }

    async fn in_progress(&mut self, pick: &Pick, lease: Option<Duration>) -> Check {
        let Some(h) = self.resolve(pick) else {
            return Ok(());
        };
        let c = self.consumer_of(h);
        let live = self.model.live(h);
        let t0 = Instant::now();
        let got = c
            .in_progress(&mut self.model.handles[h].delivery, lease)
            .await;
        let t1 = Instant::now();
        match (live, got) {
            (true, Ok(())) => {
                if let Some(p) = self.pending_mut(h) {
                    p.visible = Window::after(t0, t1, lease.unwrap_or(LEASE));
                }
            }
            (false, Err(Error::LeaseLost { .. })) => {}
            (live, got) => {
                return Err(format!(
                    "in_progress of a {} handle returned {got:?}",
                    if live { "live" } else { "stale" }
                ))
            }
        }
        Ok(())
    }

    async fn release(&mut self, picks: &[Pick]) -> Check {
        let hs = self.resolve_batch(picks);
        let Some(&first) = hs.first() else {
            return Ok(());
        };
        let c = self.consumer_of(first);
        let (live, stale) = self.liveness(&hs);
        let ds: Vec<&Delivery> = hs
            .iter()
            .map(|&h| &self.model.handles[h].delivery)
            .collect();
        let t0 = Instant::now();
        let report = c.release_batch(&ds).await.map_err(err)?;
        let t1 = Instant::now();
        Self::check_report(&report, self.ids(&live), vec![], stale)?;
        for h in live {
            // The documented exception: a release hands back the attempt (it never reached a
            // handler), and the delivery is visible at once.
            if let Some(p) = self.pending_mut(h) {
                p.attempts = p.attempts.saturating_sub(1);
                p.holder = None;
                p.visible = Window { lo: t0, hi: t1 };
            }
        }
        Ok(())
    }

    async fn replay(&mut self, group: usize, one: Option<&proptest::sample::Index>) -> Check {
        let dead: Vec<Uuid> = self.model.groups[group].dead.keys().copied().collect();
        let ids: Option<Vec<Uuid>> = one.map(|ix| {
            if dead.is_empty() {
                vec![]
            } else {
                vec![dead[ix.index(dead.len())]]
            }
        });
        let t0 = Instant::now();
        let got = self
            .q
            .replay(STREAM, GROUP_NAMES[group], ids.as_deref())
            .await;
        let t1 = Instant::now();
        let Some(got) = got else {
            return Ok(()); // the backend has no replay
        };
        let replayed = ids.unwrap_or(dead);
        let n = got.map_err(err)?;
        ensure!(
            n == replayed.len() as u64,
            "replayed {n}, expected {}",
            replayed.len()
        );
        let g = &mut self.model.groups[group];
        for id in replayed {
            g.dead.remove(&id);
            // A fresh attempt count, visible at once; any handle from before is stale.
            g.pending.insert(
                id,
                Pending {
                    attempts: 0,
                    visible: Window { lo: t0, hi: t1 },
                    holder: None,
                },
            );
        }
        Ok(())
    }

    async fn dead_listing(&self, group: usize) -> Result<BTreeMap<Uuid, Dead>, String> {
        let listed = self
            .q
            .dead_letters(STREAM, GROUP_NAMES[group], 100_000)
            .await
            .map_err(err)?;
        let mut out = BTreeMap::new();
        for d in listed {
            ensure!(
                d.stream == STREAM && d.group == GROUP_NAMES[group],
                "dead letter of {}/{} listed for {STREAM}/{}",
                d.stream,
                d.group,
                GROUP_NAMES[group]
            );
            let dead = Dead {
                attempts: d.attempts,
                reason: d.reason,
            };
            ensure!(out.insert(d.id, dead).is_none(), "{} listed twice", d.id);
        }
        Ok(out)
    }

    /// The invariants after every step: stats within what the model allows, dead letters
    /// exactly the model's.
    async fn check(&self) -> Check {
        for (group, name) in GROUP_NAMES.iter().enumerate() {
            let t0 = Instant::now();
            let s = self.q.stats(STREAM, name).await.map_err(err)?;
            let at = Window {
                lo: t0,
                hi: Instant::now(),
            };
            if self.exact_stats {
                let e = self.model.expected_stats(group, at, B::SLACK);
                ensure!(
                    e.ready.holds(s.ready)
                        && e.in_flight.holds(s.in_flight)
                        && e.delayed.holds(s.delayed)
                        && s.ready + s.in_flight + s.delayed == e.pending
                        && s.dead == e.dead,
                    "{name}: stats {s:?}, model allows {e:?}"
                );
            }
            let listed = self.dead_listing(group).await?;
            ensure!(
                listed == self.model.groups[group].dead,
                "{name}: dead letters {listed:?}, model {:?}",
                self.model.groups[group].dead
            );
        }
        Ok(())
    }

    /// Delivered until acked or dead: once every deadline has passed, one claim per group hands
    /// out (or buries) everything the group still holds, and acking that empties it.
    async fn drain(&mut self) -> Check {
        let latest = self
            .model
            .groups
            .iter()
            .flat_map(|g| g.pending.values().map(|p| p.visible.hi))
            .max();
        if let Some(at) = latest {
            tokio::time::sleep_until(at + B::SLACK + Duration::from_millis(1)).await;
        }
        for (group, name) in GROUP_NAMES.iter().enumerate() {
            self.claim(group, 0, 100_000).await?;
            let mine: Vec<usize> = self
                .model
                .live_handles()
                .into_iter()
                .filter(|&h| self.model.handles[h].group == group)
                .collect();
            self.ack(mine).await?;
            self.check().await?;
            let left: Vec<String> = self.model.groups[group]
                .pending
                .iter()
                .map(|(id, p)| format!("{id}: {}", self.show(p)))
                .collect();
            ensure!(left.is_empty(), "{name}: never delivered: {left:?}");
        }
        Ok(())
    }
}
