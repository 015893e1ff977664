//! The reference model: what each group of the stream holds, per message, as the traits promise
//! it.
//!
//! Times are windows, not instants: a backend stamps a deadline (lease end, nack delay, publish
//! delay) with its own clock somewhere inside the call that set it, so the model keeps the
//! earliest and latest instant it can be. Where the backend's clock is the test's (memory under
//! `tokio::time::pause()`) the window is a point; on Postgres it spans the round trip. A
//! question about a deadline ("is it due?") then has three answers, and the checks accept what
//! is possible and nothing else.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pgtide::Delivery;
use tokio::time::Instant;
use uuid::Uuid;

/// When something comes due: at some instant in `[lo, hi]`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub lo: Instant,
    pub hi: Instant,
}

impl Window {
    /// `after` past a call that ran from `lo` to `hi`.
    pub fn after(lo: Instant, hi: Instant, after: Duration) -> Window {
        Window {
            lo: lo + after,
            hi: hi + after,
        }
    }
}

/// Whether a deadline has passed when the backend looked, given that it looked at some instant
/// of `[at.lo, at.hi]` and that its clock may differ from ours by `slack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Yes,
    No,
    Maybe,
}

pub fn due(deadline: Window, at: Window, slack: Duration) -> Due {
    if deadline.hi + slack <= at.lo {
        Due::Yes
    } else if deadline.lo > at.hi + slack {
        Due::No
    } else {
        Due::Maybe
    }
}

/// One undelivered or unsettled message of one group.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Attempts counted so far (what the next claim adds one to).
    pub attempts: u32,
    /// When it becomes visible to the group (again).
    pub visible: Window,
    /// The handle whose claim holds it now (the only one that may settle it), if claimed and not
    /// settled or released since. A lapsed lease keeps its holder until someone claims again.
    pub holder: Option<usize>,
}

/// A dead letter of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead {
    pub attempts: u32,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct GroupModel {
    pub pending: BTreeMap<Uuid, Pending>,
    pub dead: BTreeMap<Uuid, Dead>,
}

/// One delivery the backend handed out, with the group and consumer (indices) it went to.
#[derive(Debug, Clone)]
pub struct Handle {
    pub group: usize,
    pub consumer: usize,
    pub delivery: Delivery,
}

/// The whole model of one case: two groups on one stream, every payload published, and every
/// handle ever returned (stale ones stay: settling them must fail).
#[derive(Debug, Default)]
pub struct Model {
    pub groups: [GroupModel; 2],
    pub payloads: HashMap<Uuid, Vec<u8>>,
    pub handles: Vec<Handle>,
}

/// Bounds on one count of `stats()`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bounds {
    pub min: i64,
    pub max: i64,
}

impl Bounds {
    fn add(&mut self, certain: bool) {
        self.max += 1;
        if certain {
            self.min += 1;
        }
    }

    pub fn holds(&self, n: i64) -> bool {
        (self.min..=self.max).contains(&n)
    }
}

/// What `stats()` of one group may say when it looks at some instant of `at`.
#[derive(Debug, Default)]
pub struct Expected {
    pub ready: Bounds,
    pub in_flight: Bounds,
    pub delayed: Bounds,
    pub pending: i64,
    pub dead: i64,
}

impl Model {
    /// True if `handle` is the current holder of its delivery: the only handle that may settle.
    pub fn live(&self, handle: usize) -> bool {
        let h = &self.handles[handle];
        self.groups[h.group]
            .pending
            .get(&h.delivery.id())
            .is_some_and(|p| p.holder == Some(handle))
    }

    pub fn live_handles(&self) -> Vec<usize> {
        (0..self.handles.len()).filter(|&h| self.live(h)).collect()
    }

    pub fn expected_stats(&self, group: usize, at: Window, slack: Duration) -> Expected {
        let g = &self.groups[group];
        let mut e = Expected {
            pending: g.pending.len() as i64,
            dead: g.dead.len() as i64,
            ..Expected::default()
        };
        for p in g.pending.values() {
            let d = due(p.visible, at, slack);
            if d != Due::No {
                e.ready.add(d == Due::Yes);
            }
            if d != Due::Yes {
                let not_yet = d == Due::No;
                if p.holder.is_some() {
                    e.in_flight.add(not_yet);
                } else {
                    e.delayed.add(not_yet);
                }
            }
        }
        e
    }
}
