//! The claim floor: where a group's claims start their walk of the claim index.
//!
//! A claim walks the claim index `(group_id, visible_at)` in order from the group's first entry.
//! Every claim moves a row's `visible_at` to its lease end and every ack deletes a row, so each
//! consumed message leaves dead index entries where that walk starts. Vacuum and the scans
//! themselves normally remove them; while any session holds a snapshot older than them (a long
//! `REPEATABLE READ` transaction, a slow `pg_dump`, a replication slot) nothing may, and a claim
//! from the start visits every entry (and its heap tuple) dead since the snapshot was taken:
//! claims grow slower the longer the snapshot is held.
//!
//! So claims start at a floor: the earliest due time (`visible_at` before the claim) in the
//! group's latest batch this process claimed, minus [`SLACK`] (never lower than before, except
//! after a sweep). A claim walks in due order from its floor, so nothing ready, unlocked and
//! committed lay between its floor and its batch's first row: the walk starts just below where
//! the last one found work and passes about `SLACK` worth of dead entries, however long the
//! snapshot has been held. Not the batch's latest due time: a batch can hold a retry due later
//! than a backlog it overtook (its rows locked by other claims), and a floor past that backlog
//! would leave it to the sweeps.
//!
//! A ready delivery can lie below the floor: a publish whose transaction committed more than
//! `SLACK` after it began (its `visible_at` is its transaction's `now()`), a claim that rolled
//! back, a priority head start longer than `SLACK`, a group reset to an earlier position. A claim
//! without the floor (a sweep) finds those. A floored claim that finds nothing is followed at
//! once by a sweep unless one started after it did (whatever it missed, that sweep saw), so a
//! consumer that has caught up gets such a delivery in the same call. While floored claims keep
//! finding work, the group's claims in this process sweep at least every [`SWEEP_EVERY`] (the
//! builder's `claim_sweep_interval`), and a fetch that waits for work after a floored claim came
//! back short wakes up for it. A sweep that finds deliveries lowers the floor to them, so a large
//! batch of them (a reset) drains at the usual pace. Such a delivery thus waits at most a sweep
//! interval (and a claim) once it is ready, as long as a consumer of the group fetches. Ordered
//! and rate-limited groups never use the floor (`_claim` ignores it for them). Off by default
//! (`PgBackendBuilder::claim_floor`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// How far below the earliest due time of the latest batch claims start: the longest a publishing transaction
/// may take to commit and still be found by the next claim rather than the next sweep. Under a
/// held snapshot a claim passes about this much of the consumed history (twice the throughput
/// times `SLACK` dead entries: the publish-time entries and, a lease later, the claim-time ones).
pub(crate) const SLACK: Duration = Duration::from_secs(1);

/// The longest a group's claims in one process go without a sweep (a claim without the floor),
/// and so the longest a ready delivery below the floor waits, by default
/// (`PgBackendBuilder::claim_sweep_interval`).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A sweep slower than this makes the next ones wait [`SWEEP_REST`] times as long as it took
/// (counted from its start), so that sweeps take at most about a tenth of one connection's time
/// when each walks a long history (under a held snapshot).
const SLOW_SWEEP: Duration = Duration::from_millis(20);

/// See [`SLOW_SWEEP`].
const SWEEP_REST: u32 = 10;

/// The floors of one backend's groups, by group id: every consumer of a group in this process
/// shares its floor and its sweeps (one sweep a second per group, not per consumer).
#[derive(Debug)]
pub(crate) struct Floors {
    /// `PgBackendBuilder::claim_floor`: when off, every claim is a sweep.
    enabled: bool,
    /// `PgBackendBuilder::claim_sweep_interval`.
    sweep_every: Duration,
    /// [`SLOW_SWEEP`] (tests set it out of reach).
    slow_sweep: Duration,
    groups: Mutex<HashMap<i32, Arc<ClaimFloor>>>,
}

impl Floors {
    pub(crate) fn new(enabled: bool, sweep_every: Duration) -> Self {
        Floors {
            enabled,
            sweep_every,
            slow_sweep: SLOW_SWEEP,
            groups: Mutex::default(),
        }
    }

    /// The floor of `group`.
    pub(crate) fn of(&self, group: i32) -> Arc<ClaimFloor> {
        let mut map = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(group)
            .or_insert_with(|| {
                Arc::new(ClaimFloor {
                    enabled: self.enabled,
                    sweep_every: self.sweep_every,
                    slow_sweep: self.slow_sweep,
                    state: Mutex::default(),
                })
            })
            .clone()
    }
}

/// One group's claim floor in this process.
#[derive(Debug)]
pub(crate) struct ClaimFloor {
    enabled: bool,
    sweep_every: Duration,
    slow_sweep: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Where floored claims start; `None` until a claim got something.
    floor: Option<DateTime<Utc>>,
    /// Bumped when a sweep moves the floor (possibly down): a floored claim that started before
    /// must not raise it again over what the sweep found.
    epoch: u64,
    /// When the last sweep started.
    last_sweep: Option<Instant>,
    /// When the latest sweep that ended (with a result, or failed or dropped: [`Claiming`])
    /// started: a sweep is running while `last_sweep` is later.
    last_done: Option<Instant>,
    /// How long the latest sweep that finished took.
    last_took: Duration,
    /// When the latest floored claim that came back short started, if no sweep started since.
    owed_since: Option<Instant>,
    /// When the latest floored claim that found nothing started, if no sweep started since: the
    /// next claim sweeps as soon as no sweep runs and the last one rested.
    empty_since: Option<Instant>,
}

/// What one claim was told: its floor (`None`: a sweep) and when it started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    /// The floor to pass to `_claim`; `None` for a sweep.
    pub(crate) floor: Option<DateTime<Utc>>,
    epoch: u64,
    started: Instant,
}

impl ClaimFloor {
    /// The floor for the claim about to run. A sweep when there is no floor yet or one is due,
    /// or when `sweep` asks for one; the claim that gets the sweep takes it, so concurrent
    /// claims keep the floor.
    pub(crate) fn ticket(&self, sweep: bool) -> Ticket {
        let started = Instant::now();
        if !self.enabled {
            return Ticket {
                floor: None,
                epoch: 0,
                started,
            };
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let every = self.sweep_every.max(s.rest(self.slow_sweep));
        let due = sweep
            || s.answer_empty_now(self.slow_sweep)
            || match s.last_sweep {
                Some(t) => started.duration_since(t) >= every,
                None => true,
            };
        let floor = match s.floor {
            Some(f) if !due => Some(f),
            _ => {
                s.last_sweep = Some(started);
                None
            }
        };
        Ticket {
            floor,
            epoch: s.epoch,
            started,
        }
    }

    /// Records what the claim of `ticket` got: `earliest_due`, the earliest due time among the
    /// deliveries it claimed (`None` if none), and whether it came back `short` of what it
    /// asked for.
    pub(crate) fn claimed(&self, ticket: Ticket, earliest_due: Option<DateTime<Utc>>, short: bool) {
        if !self.enabled {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let below = earliest_due.and_then(|d| {
            chrono::Duration::from_std(SLACK)
                .ok()
                .and_then(|slack| d.checked_sub_signed(slack))
        });
        match ticket.floor {
            None => {
                // A sweep saw everything committed before it started: whatever a floored
                // claim that started earlier missed, it found. And it started from the
                // group's first ready delivery, so what it got is where claims go on from,
                // even below the floor.
                if s.owed_since.is_some_and(|t| t <= ticket.started) {
                    s.owed_since = None;
                }
                if s.empty_since.is_some_and(|t| t <= ticket.started) {
                    s.empty_since = None;
                }
                s.last_done = Some(
                    s.last_done
                        .map_or(ticket.started, |t| t.max(ticket.started)),
                );
                s.last_took = ticket.started.elapsed();
                if let Some(f) = below {
                    s.floor = Some(f);
                    s.epoch += 1;
                }
            }
            Some(_) => {
                // Nothing from the floor up: whatever is ready lies below it (a publish that
                // committed late, a priority head start), so sweep at once rather than up to
                // a sweep interval later. A sweep that started after this claim did saw
                // everything it could have missed.
                let swept_since = matches!(s.last_sweep, Some(sweep) if sweep >= ticket.started);
                if earliest_due.is_none() && !swept_since {
                    s.empty_since = Some(
                        s.empty_since
                            .map_or(ticket.started, |t| t.max(ticket.started)),
                    );
                }
                if short {
                    s.owed_since = Some(
                        s.owed_since
                            .map_or(ticket.started, |t| t.max(ticket.started)),
                    );
                }
                if let Some(f) = below {
                    if ticket.epoch == s.epoch {
                        s.floor = Some(s.floor.map_or(f, |old| old.max(f)));
                    }
                }
            }
        }
    }

    /// [`ClaimFloor::ticket`] for a claim about to run, as a guard: if the claim ends without
    /// reporting what it got ([`Claiming::claimed`]) because it failed or its future was dropped,
    /// the guard tells the floor (see [`ClaimFloor::abandoned`]).
    pub(crate) fn start(&self, sweep: bool) -> Claiming<'_> {
        Claiming {
            floor: self,
            ticket: self.ticket(sweep),
            reported: false,
        }
    }

    /// The claim of `ticket` ended without a result. A sweep no longer runs, so waiting fetches
    /// do not keep coming back for its end, and the next can start; what a floored claim missed
    /// before it is still owed (nothing was seen).
    pub(crate) fn abandoned(&self, ticket: Ticket) {
        if !self.enabled || ticket.floor.is_some() {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.last_done = Some(
            s.last_done
                .map_or(ticket.started, |t| t.max(ticket.started)),
        );
    }

    /// Whether the next claim should be a sweep at once: a claim from the floor found nothing,
    /// no sweep started after it did and none runs, and (for a `patient` caller, one that waits
    /// for work anyway) the last one rested. A caller that does not wait (`try_fetch`) gets its
    /// sweep even after a slow one.
    pub(crate) fn sweep_now(&self, patient: bool) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if patient {
            s.answer_empty_now(self.slow_sweep)
        } else {
            s.answer_empty_now(Duration::MAX)
        }
    }

    /// How long a fetch that found nothing may wait before it should claim again for a sweep:
    /// `Some` when a floored claim came back short since the last sweep started (it may have
    /// missed a delivery below the floor; zero when it came back empty), else
    /// `None` (wait for a wake-up as usual).
    pub(crate) fn sweep_in(&self) -> Option<Duration> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.empty_since.is_some() {
            let since = s.last_sweep.map_or(Duration::MAX, |t| t.elapsed());
            return Some(if s.sweeping() {
                // Come back about when it ends.
                s.last_took.max(SLOW_SWEEP)
            } else {
                s.rest(self.slow_sweep).saturating_sub(since)
            });
        }
        s.owed_since?;
        let every = self.sweep_every.max(s.rest(self.slow_sweep));
        Some(
            s.last_sweep
                .map_or(Duration::ZERO, |t| every.saturating_sub(t.elapsed())),
        )
    }
}

/// A claim under way ([`ClaimFloor::start`]).
#[derive(Debug)]
pub(crate) struct Claiming<'a> {
    floor: &'a ClaimFloor,
    ticket: Ticket,
    reported: bool,
}

impl Claiming<'_> {
    /// The floor to pass to `_claim`; `None` for a sweep.
    pub(crate) fn floor(&self) -> Option<DateTime<Utc>> {
        self.ticket.floor
    }

    /// [`ClaimFloor::claimed`] for this claim.
    pub(crate) fn claimed(mut self, earliest_due: Option<DateTime<Utc>>, short: bool) {
        self.reported = true;
        self.floor.claimed(self.ticket, earliest_due, short);
    }
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.floor.abandoned(self.ticket);
        }
    }
}

impl State {
    /// Whether a sweep started and has not ended.
    fn sweeping(&self) -> bool {
        self.last_sweep > self.last_done
    }

    /// Whether a floored claim that found nothing is to be answered by a sweep now: not while
    /// another sweep runs (under a held snapshot each walks the dead entries, and consumers that
    /// caught up must not all walk them at once), nor before a slow one rested.
    fn answer_empty_now(&self, slow: Duration) -> bool {
        self.empty_since.is_some()
            && !self.sweeping()
            && match self.last_sweep {
                Some(t) => t.elapsed() >= self.rest(slow),
                None => true,
            }
    }

    /// How long after a sweep started the next one waits at least: ten times as long as the
    /// latest took, if that was `slow` ([`SLOW_SWEEP`]).
    fn rest(&self, slow: Duration) -> Duration {
        if self.last_took >= slow {
            self.last_took.saturating_mul(SWEEP_REST)
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group's floor whose sweeps never count as slow, whatever the machine's load.
    fn floor(enabled: bool) -> Arc<ClaimFloor> {
        let mut floors = Floors::new(enabled, SWEEP_EVERY);
        floors.slow_sweep = Duration::MAX;
        floors.of(1)
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    #[test]
    fn a_sweep_that_ended_without_a_result_does_not_hold_off_the_next() {
        let f = floor(true);
        let t = f.ticket(false);
        f.claimed(t, Some(at(10)), false);
        // A sweep whose future was dropped (or which failed) before it reported.
        let sweep = f.start(true);
        assert_eq!(sweep.floor(), None);
        drop(sweep);
        let t = f.ticket(false);
        assert!(t.floor.is_some());
        f.claimed(t, None, true);
        assert!(
            f.sweep_now(true),
            "a floored claim that found nothing sweeps at once: no sweep runs"
        );
        assert_eq!(f.sweep_in(), Some(Duration::ZERO));
    }

    #[test]
    fn turned_off_every_claim_is_a_sweep() {
        let f = floor(false);
        let t = f.ticket(false);
        f.claimed(t, Some(at(10)), true);
        assert_eq!(f.ticket(false).floor, None);
        assert_eq!(f.sweep_in(), None);
    }

    #[test]
    fn first_claim_sweeps_then_claims_use_the_floor_until_the_next_sweep() {
        let f = floor(true);
        let t = f.ticket(false);
        assert_eq!(t.floor, None, "no floor before anything was claimed");
        f.claimed(t, Some(at(10)), false);
        let t = f.ticket(false);
        assert_eq!(t.floor, Some(at(9)), "earliest due minus the slack");
        f.claimed(t, Some(at(20)), false);
        let t = f.ticket(false);
        assert_eq!(t.floor, Some(at(19)));
        // An older batch (rows another claim skipped) never lowers it.
        f.claimed(t, Some(at(5)), false);
        assert_eq!(f.ticket(false).floor, Some(at(19)));
        assert_eq!(f.sweep_in(), None, "nothing came back short");
    }

    #[test]
    fn a_short_floored_claim_owes_a_sweep_and_a_sweep_that_started_later_pays_it() {
        let f = floor(true);
        let t = f.ticket(false);
        f.claimed(t, Some(at(10)), false);
        let floored = f.ticket(false);
        assert!(floored.floor.is_some());
        f.claimed(floored, None, true);
        let wait = f.sweep_in().expect("a sweep is owed");
        assert!(wait <= SWEEP_EVERY);
        // Force the sweep as if SWEEP_EVERY had passed.
        f.state.lock().unwrap_or_else(|e| e.into_inner()).last_sweep = None;
        let sweep = f.ticket(false);
        assert_eq!(sweep.floor, None);
        // Only one claim gets the sweep.
        assert!(f.ticket(false).floor.is_some());
        f.claimed(sweep, None, true);
        assert_eq!(
            f.sweep_in(),
            None,
            "the sweep started after the short claim"
        );
    }

    #[test]
    fn a_sweep_that_finds_old_deliveries_lowers_the_floor_and_wins_over_older_claims() {
        let f = floor(true);
        let t = f.ticket(false);
        f.claimed(t, Some(at(100)), false);
        let before_sweep = f.ticket(false);
        assert_eq!(before_sweep.floor, Some(at(99)));
        f.state.lock().unwrap_or_else(|e| e.into_inner()).last_sweep = None;
        let sweep = f.ticket(false);
        // A reset put deliveries back at 10: the sweep finds them.
        f.claimed(sweep, Some(at(10)), false);
        assert_eq!(f.ticket(false).floor, Some(at(9)));
        // A floored claim that started before the sweep must not raise the floor past them.
        f.claimed(before_sweep, Some(at(101)), false);
        assert_eq!(f.ticket(false).floor, Some(at(9)));
    }

    #[test]
    fn an_empty_floored_claim_sweeps_at_once_unless_a_sweep_began_after_it() {
        let f = floor(true);
        let t = f.ticket(false);
        f.claimed(t, Some(at(100)), false);
        // Within SWEEP_EVERY of that sweep, a short floored claim that got something owes a
        // sweep later, not now.
        let floored = f.ticket(false);
        assert!(floored.floor.is_some());
        f.claimed(floored, Some(at(100)), true);
        assert!(!f.sweep_now(true));
        assert!(f.sweep_in().is_some_and(|d| d > Duration::ZERO));
        // One that found nothing: sweep at once.
        let empty = f.ticket(false);
        assert!(empty.floor.is_some());
        f.claimed(empty, None, true);
        assert!(f.sweep_now(true));
        assert_eq!(f.sweep_in(), Some(Duration::ZERO));
        let sweep = f.ticket(false);
        assert_eq!(sweep.floor, None, "the next claim sweeps");
        assert!(
            f.ticket(false).floor.is_some(),
            "one sweep, not one per claim"
        );
        // A floored claim that started before that sweep and found nothing: the sweep,
        // which saw everything committed before it started, answers it.
        let before = Ticket {
            started: sweep.started - Duration::from_millis(1),
            ..empty
        };
        f.claimed(before, None, true);
        assert!(!f.sweep_now(true));
        f.claimed(sweep, None, true);
        // One that started after the sweep and found nothing: another sweep.
        let after = f.ticket(false);
        f.claimed(after, None, true);
        assert!(f.sweep_now(true));
        // But not while a sweep runs: the periodic one follows.
        let running = f.ticket(false);
        assert_eq!(running.floor, None);
        let during = f.ticket(false);
        assert!(during.floor.is_some());
        f.claimed(during, None, true);
        assert!(!f.sweep_now(true), "a second sweep beside a running one");
        assert!(f.sweep_in().is_some(), "the periodic sweep is owed");
        assert_eq!(
            f.sweep_in(),
            Some(SLOW_SWEEP),
            "come back about when the running sweep ends"
        );
        f.claimed(running, None, true);
        // The running sweep started before that claim: once it finished, the next claim
        // sweeps for it.
        assert!(f.sweep_now(true));
        assert_eq!(f.ticket(false).floor, None);
    }

    #[test]
    fn turned_off_nothing_is_owed() {
        let f = floor(false);
        let t = f.ticket(false);
        f.claimed(t, None, true);
        assert!(!f.sweep_now(true));
        assert_eq!(f.sweep_in(), None);
    }

    #[test]
    fn slow_sweeps_rest_ten_times_as_long_as_they_took() {
        let f = Floors::new(true, Duration::from_millis(50)).of(1);
        // A first sweep that took 100 ms.
        let past = Instant::now()
            .checked_sub(Duration::from_millis(100))
            .unwrap();
        let epoch = {
            let mut s = f.state.lock().unwrap_or_else(|e| e.into_inner());
            s.last_sweep = Some(past);
            s.epoch
        };
        let slow = Ticket {
            floor: None,
            epoch,
            started: past,
        };
        f.claimed(slow, Some(at(10)), true);
        // The sweep interval (50 ms) has passed, but not its rest (1 s): claims keep the floor,
        // and one that finds nothing does not sweep at once either.
        let floored = f.ticket(false);
        assert!(floored.floor.is_some());
        f.claimed(floored, None, true);
        assert!(!f.sweep_now(true));
        assert!(
            f.sweep_now(false),
            "a caller that does not wait sweeps anyway"
        );
        let wait = f.sweep_in().unwrap();
        assert!(wait > Duration::from_millis(500), "{wait:?}");
        // Once it is over, the next claim sweeps.
        f.state.lock().unwrap_or_else(|e| e.into_inner()).last_sweep =
            Instant::now().checked_sub(Duration::from_secs(60));
        assert_eq!(f.ticket(false).floor, None);
    }
}
