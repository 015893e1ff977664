//! Weighted fair share in the memory backend, the same start-time fair queueing as on Postgres
//! (`sql/functions/fair.sql`): a fair group's ready first-attempt deliveries sit at the group's
//! `floor` (an instant before any of its real due times) in stamp order, so the claim's walk of
//! `Group::order` serves them by stamp. A key's messages are stamped `step(weight)` apart from
//! its finish line, never below the group's virtual time V (the lowest stamp queued, or the
//! highest finish line when nothing is queued): an idle key earns no credit, a busy key only
//! pushes its own stamps further out.

use std::collections::HashMap;

use tokio::time::Instant;
use uuid::Uuid;

use super::state::{Group, Pending};

/// Where stamps start: far above 0, so deliveries moved in just before V never reach 0 (the
/// stamp of a real time).
const BASE: u64 = 1 << 62;

/// The fair state of a group.
pub(super) struct Fair {
    /// Where virtual deliveries sit in `Group::order`: the group's creation instant.
    pub(super) floor: Instant,
    /// Each key's finish line (the stamp of its last queued message); `""` is no key.
    vt: HashMap<String, u64>,
    /// Weights set with `set_key_weight` (others weigh 1).
    pub(super) weights: HashMap<String, f64>,
    /// The highest finish line given so far.
    high: u64,
}

/// Virtual time a message of weight `w` takes: 10 ms / w in microseconds, as on Postgres.
fn step(w: f64) -> u64 {
    (10_000.0 / w).round().max(1.0) as u64
}

impl Fair {
    pub(super) fn new() -> Fair {
        Fair {
            floor: Instant::now(),
            vt: HashMap::new(),
            weights: HashMap::new(),
            high: BASE,
        }
    }

    /// The state after a purge: weights stay, the queue is gone.
    pub(super) fn emptied(&self) -> Fair {
        Fair {
            floor: self.floor,
            vt: HashMap::new(),
            weights: self.weights.clone(),
            high: self.high,
        }
    }
}

impl Group {
    /// The group's virtual time V (see the module).
    fn fair_now(&self) -> u64 {
        let Some(f) = &self.fair else { return BASE };
        match self.order.iter().next() {
            Some(&(at, stamp, _)) if at == f.floor && stamp > 0 => stamp,
            _ => f.high,
        }
    }

    /// Queues a delivery in a fair group: stamped when due now, at its real time when later.
    pub(super) fn enqueue_fair(&mut self, id: Uuid, key: Option<&str>, visible_at: Instant) {
        if visible_at > Instant::now() {
            self.set(id, Pending::new(visible_at, None));
            return;
        }
        let v = self.fair_now();
        let Some(f) = &mut self.fair else { return };
        let key = key.unwrap_or_default();
        let w = f.weights.get(key).copied().unwrap_or(1.0);
        let line = f.vt.entry(key.to_owned()).or_insert(0);
        let stamp = line.saturating_add(step(w)).max(v);
        *line = stamp;
        f.high = f.high.max(stamp);
        let floor = f.floor;
        // Keys at V or behind it say nothing a missing entry would not: keep the map small.
        if f.vt.len() > 4_096 {
            f.vt.retain(|_, t| *t > v);
        }
        let mut p = Pending::new(floor, None);
        p.stamp = stamp;
        self.set(id, p);
    }

    /// Moves up to `max` deliveries that came due at a real time (retries, expired leases,
    /// releases, put-offs, delayed publishes) into the virtual queue just before V, in due
    /// order, so they never wait behind the whole virtual backlog.
    pub(super) fn restamp(&mut self, now: Instant, max: usize) {
        let Some(floor) = self.fair.as_ref().map(|f| f.floor) else {
            return;
        };
        let due: Vec<Uuid> = self
            .order
            .range((floor, u64::MAX, Uuid::max())..)
            .skip_while(|(at, _, _)| *at == floor)
            .take_while(|(at, _, _)| *at <= now)
            .take(max)
            .map(|&(_, _, id)| id)
            .collect();
        let v = self.fair_now();
        let n = due.len() as u64;
        for (i, id) in due.into_iter().enumerate() {
            if let Some(mut p) = self.remove(&id) {
                p.visible_at = floor;
                p.stamp = v.saturating_sub(n - i as u64);
                self.set(id, p);
            }
        }
    }
}
