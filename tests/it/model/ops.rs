//! The operations a case is made of, and the strategy that generates them.
//!
//! Operations name handles by position (`Pick`), resolved against the handles the case holds
//! when the step runs, so every generated sequence is runnable and shrinks to a shorter one.

use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;

/// The stream's lease. Short, so lease expiry happens inside a case; waits reach past it.
pub const LEASE: Duration = Duration::from_millis(300);
/// Deliveries before a message becomes a dead letter: small, so exhaustion happens too.
pub const MAX_DELIVER: u32 = 3;
/// The stream's backoff (one step, no jitter: the model must know the exact delay).
pub const BACKOFF: Duration = Duration::from_millis(200);
/// Groups on the stream (fan-out) and consumers per group (competition).
pub const GROUPS: usize = 2;
pub const CONSUMERS: usize = 2;

/// Which handle a settle uses: a live one (the current holder of its delivery) when `live` and
/// one exists, else any handle the case was given, stale ones included.
#[derive(Debug, Clone)]
pub struct Pick {
    pub live: bool,
    pub index: Index,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// Publish `count` messages (one `publish`, or one `publish_batch` when more), optionally
    /// delayed.
    Publish {
        count: usize,
        delay: Option<Duration>,
    },
    /// `try_fetch(max)` by one consumer of one group.
    Claim {
        group: usize,
        consumer: usize,
        max: usize,
    },
    /// `ack_and_fetch`: ack one handle, then claim through its consumer.
    AckAndFetch {
        pick: Pick,
        max: usize,
    },
    /// `ack_batch` of the picked handles (those of the first pick's group, one per message).
    Ack(Vec<Pick>),
    /// `nack` with a delay (`None`: the stream's backoff).
    Nack {
        pick: Pick,
        delay: Option<Duration>,
    },
    Term(Pick),
    /// `in_progress` with a lease (`None`: the stream's).
    InProgress {
        pick: Pick,
        lease: Option<Duration>,
    },
    /// `release_batch` of the picked handles.
    Release(Vec<Pick>),
    /// Let time pass (past a lease, a delay or a backoff).
    Wait(Duration),
    /// Replay the group's dead letters: all of them, or one.
    Replay {
        group: usize,
        one: Option<Index>,
    },
    /// `purge` the stream.
    Purge,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pick() -> impl Strategy<Value = Pick> {
    (prop::bool::weighted(0.75), any::<Index>()).prop_map(|(live, index)| Pick { live, index })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1..=2usize, prop::option::weighted(0.2, Just(ms(150))))
            .prop_map(|(count, delay)| Op::Publish { count, delay }),
        10 => (0..GROUPS, 0..CONSUMERS, 1..=3usize)
            .prop_map(|(group, consumer, max)| Op::Claim { group, consumer, max }),
        2 => (pick(), 1..=2usize).prop_map(|(pick, max)| Op::AckAndFetch { pick, max }),
        5 => prop::collection::vec(pick(), 1..=2).prop_map(Op::Ack),
        6 => (pick(), prop_oneof![Just(Some(Duration::ZERO)), Just(Some(ms(150))), Just(None)])
            .prop_map(|(pick, delay)| Op::Nack { pick, delay }),
        2 => pick().prop_map(Op::Term),
        3 => (pick(), prop::option::of(Just(ms(100))))
            .prop_map(|(pick, lease)| Op::InProgress { pick, lease }),
        3 => prop::collection::vec(pick(), 1..=2).prop_map(Op::Release),
        5 => prop_oneof![Just(ms(60)), Just(ms(160)), Just(LEASE + ms(20))].prop_map(Op::Wait),
        3 => (0..GROUPS, prop::option::of(any::<Index>()))
            .prop_map(|(group, one)| Op::Replay { group, one }),
        1 => Just(Op::Purge),
    ]
}

/// A case: 30 to 60 operations.
pub fn case() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 30..=60)
}
