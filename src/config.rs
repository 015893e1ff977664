//! Stream and group configuration.

use std::time::Duration;

use crate::error::{Error, Result};

/// Per-stream configuration, stored in the registry.
///
/// ```
/// use std::time::Duration;
/// let config = pgtide::StreamConfig::default()
///     .lease(Duration::from_secs(60))
///     .max_deliver(10)
///     .retention(Duration::from_secs(3 * 86_400));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StreamConfig {
    /// Visibility timeout: how long a fetched delivery stays invisible to the rest of its group.
    /// Defaults to 30 s.
    pub lease: Duration,
    /// Deliveries of one message to one group before it becomes a dead letter. Defaults to 5.
    pub max_deliver: u32,
    /// Delay before retry after a nack without explicit delay.
    /// Defaults to the schedule 1 s, 5 s, 15 s, 30 s, 60 s with ±10 % jitter.
    pub backoff: Backoff,
    /// How long messages are kept (whole partitions are dropped after that). Defaults to 7 days.
    pub retention: Duration,
    /// Width of one storage partition. Defaults to 1 day.
    pub partition_interval: Duration,
    /// How long a dedupe key is remembered. Defaults to 1 hour; zero turns dedupe off.
    pub dedupe_window: Duration,
    /// Largest payload accepted, in bytes. Defaults to 1 MiB.
    pub max_payload: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            lease: Duration::from_secs(30),
            max_deliver: 5,
            backoff: Backoff::default(),
            retention: Duration::from_secs(7 * 86_400),
            partition_interval: Duration::from_secs(86_400),
            dedupe_window: Duration::from_secs(3600),
            max_payload: 1 << 20,
        }
    }
}

impl StreamConfig {
    /// Sets [`StreamConfig::lease`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
    /// Sets [`StreamConfig::max_deliver`].
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.max_deliver = n;
        self
    }
    /// Sets [`StreamConfig::backoff`].
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
    /// Sets [`StreamConfig::retention`].
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }
    /// Sets [`StreamConfig::partition_interval`].
    pub fn partition_interval(mut self, width: Duration) -> Self {
        self.partition_interval = width;
        self
    }
    /// Sets [`StreamConfig::dedupe_window`].
    pub fn dedupe_window(mut self, window: Duration) -> Self {
        self.dedupe_window = window;
        self
    }
    /// Sets [`StreamConfig::max_payload`].
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidConfig(m.to_owned()));
        if self.lease < Duration::from_millis(1) {
            return bad("lease must be at least 1 ms");
        }
        crate::limits::check_duration("lease", self.lease, false)?;
        crate::limits::check_duration("retention", self.retention, false)?;
        crate::limits::check_duration("partition_interval", self.partition_interval, false)?;
        crate::limits::check_duration("dedupe_window", self.dedupe_window, true)?;
        for step in &self.backoff.schedule {
            crate::limits::check_duration("backoff step", *step, true)?;
        }
        if self.max_deliver == 0 || self.max_deliver > i32::MAX as u32 {
            return bad("max_deliver must be at least 1");
        }
        if self.retention.is_zero() {
            return bad("retention must be positive");
        }
        if self.partition_interval < Duration::from_secs(60) {
            return bad("partition_interval must be at least 1 minute");
        }
        if self.max_payload == 0 || self.max_payload > i32::MAX as usize {
            return bad("max_payload must be between 1 and 2^31-1 bytes");
        }
        if self.backoff.schedule.is_empty() {
            return bad("backoff needs at least one step");
        }
        if !(0.0..=1.0).contains(&self.backoff.jitter) {
            return bad("backoff jitter must be between 0 and 1");
        }
        Ok(())
    }
}

/// Retry delay after a failed attempt: attempt `n` waits `schedule[n-1]` (the last step repeats),
/// scaled by a random factor in `1 ± jitter`.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// Delay per attempt.
    pub schedule: Vec<Duration>,
    /// Relative jitter, 0.0 to 1.0.
    pub jitter: f32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::schedule([1, 5, 15, 30, 60].map(Duration::from_secs)).jitter(0.1)
    }
}

impl Backoff {
    /// A fixed schedule without jitter.
    pub fn schedule(steps: impl IntoIterator<Item = Duration>) -> Self {
        Backoff {
            schedule: steps.into_iter().collect(),
            jitter: 0.0,
        }
    }

    /// Exponential: `base * factor^(n-1)`, capped at `max`, for `steps` steps.
    pub fn exponential(base: Duration, factor: f64, max: Duration, steps: usize) -> Self {
        let schedule = (0..steps.max(1))
            .map(|i| base.mul_f64(factor.max(1.0).powi(i as i32)).min(max))
            .collect();
        Backoff {
            schedule,
            jitter: 0.0,
        }
    }

    /// Sets the relative jitter (clamped to 0.0..=1.0).
    pub fn jitter(mut self, jitter: f32) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// The delay before the retry that follows failed attempt `attempt` (from 1): the schedule's
    /// step for it (the last step repeats), scaled by a random factor in `1 ± jitter`. The same
    /// rule as the Postgres engine's `_nack`; broker backends and memory use it to emulate it.
    pub fn delay(&self, attempt: u32) -> std::time::Duration {
        let Some(last) = self.schedule.last() else {
            return std::time::Duration::ZERO;
        };
        let base = self
            .schedule
            .get(attempt.max(1) as usize - 1)
            .copied()
            .unwrap_or(*last);
        let jitter = f64::from(self.jitter);
        if jitter == 0.0 {
            return base;
        }
        base.mul_f64((1.0 + jitter * (rand::random::<f64>() * 2.0 - 1.0)).max(0.0))
    }
}

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupStart {
    /// Only messages published after the group is created. The default.
    #[default]
    New,
    /// Every retained message of the stream, then new ones.
    Oldest,
}

/// Per-group configuration, fixed when the group is created
/// ([`crate::Queue::ensure_group_with`], [`crate::PgBackend::create_group_with`]).
///
/// ```
/// let config = pgtide::GroupConfig::default().ordered(true);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct GroupConfig {
    /// Where the group starts reading. Defaults to [`GroupStart::New`].
    pub start: GroupStart,
    /// Per-key order: the messages of one ordering key ([`crate::OutgoingMessage::key`]) are
    /// delivered one at a time, in publish order, across every consumer and process. A key
    /// whose head is in flight, delayed or waiting for a retry holds back only that key; when
    /// the head is acked or becomes a dead letter, the key's next message goes. Messages
    /// without a key are not ordered. Needs [`crate::Capabilities::ordering_keys`]. Defaults
    /// to false.
    pub ordered: bool,
    /// Concurrency limit: at most this many deliveries of the group leased at once, across
    /// every consumer and process (claims take turns on Postgres and never lease past it).
    /// Needs [`crate::Capabilities::concurrency_limits`]. Set at creation; change it with
    /// [`crate::PgBackend::set_max_in_flight`]. Defaults to `None` (no limit).
    pub max_in_flight: Option<u32>,
    /// Per-key concurrency limit: at most this many deliveries of one ordering key
    /// ([`crate::OutgoingMessage::key`]) at once, across every consumer and process; the key's
    /// other messages wait, in publish order, and other keys go on. Messages without a key are
    /// not limited by it. On Postgres a delivery holds its key's place while it is ready,
    /// delayed (a retry) or leased, and gives it up when acked, termed or dead-lettered (see
    /// `docs/ordering.md`). An ordered group already means one per key: only `1` goes with
    /// [`GroupConfig::ordered`]. Needs [`crate::Capabilities::concurrency_limits`]. Change it
    /// with [`crate::PgBackend::set_max_in_flight_per_key`]. Defaults to `None` (no limit).
    pub max_in_flight_per_key: Option<u32>,
    /// Rate limit of the whole group: a token bucket shared by every consumer and process,
    /// taken at claim time (a fetch returns at most the tokens available and then waits for
    /// the next one). Needs [`crate::Capabilities::rate_limits`]. Set at creation; change it
    /// with [`crate::PgBackend::set_rate_limit`]. Defaults to `None` (no limit).
    pub rate_limit: Option<crate::RateLimit>,
    /// Rate limit of each ordering key ([`crate::OutgoingMessage::key`]) of the group: a
    /// delivery whose key has no token left is put off until its key's next token, without
    /// holding back the other keys (messages without a key are not limited by it). Works in
    /// ordered and unordered groups. Needs [`crate::Capabilities::rate_limits`]. Defaults to
    /// `None` (no limit).
    pub rate_limit_per_key: Option<crate::RateLimit>,
    /// Weighted fair share between keys: while several keys (tenants) have ready deliveries,
    /// each gets claims in proportion to its weight (1 unless set with
    /// [`crate::PgBackend::set_key_weight`]), so a key with a huge backlog does not starve a key
    /// with a small one; spare capacity goes to whoever has work. Messages without a key share
    /// as one more key of weight 1. Not with [`GroupConfig::ordered`]. Fixed at creation. Needs
    /// [`crate::Capabilities::fair_share`]. Defaults to false.
    pub fair_share: bool,
}

impl GroupConfig {
    /// Sets [`GroupConfig::start`].
    pub fn start(mut self, start: GroupStart) -> Self {
        self.start = start;
        self
    }
    /// Sets [`GroupConfig::ordered`].
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }
    /// Sets [`GroupConfig::max_in_flight`].
    pub fn max_in_flight(mut self, limit: u32) -> Self {
        self.max_in_flight = Some(limit);
        self
    }

    /// Sets [`GroupConfig::max_in_flight_per_key`].
    pub fn max_in_flight_per_key(mut self, limit: u32) -> Self {
        self.max_in_flight_per_key = Some(limit);
        self
    }

    /// Sets [`GroupConfig::rate_limit`].
    pub fn rate_limit(mut self, limit: crate::RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }
    /// Sets [`GroupConfig::rate_limit_per_key`].
    pub fn rate_limit_per_key(mut self, limit: crate::RateLimit) -> Self {
        self.rate_limit_per_key = Some(limit);
        self
    }
    /// Sets [`GroupConfig::fair_share`].
    pub fn fair_share(mut self, fair: bool) -> Self {
        self.fair_share = fair;
        self
    }

    pub(crate) fn validate(&self) -> crate::error::Result<()> {
        if self.fair_share && self.ordered {
            return Err(crate::error::Error::InvalidConfig(
                "a group cannot be both ordered and fair: an ordered group already serves its keys one at a time each"
                    .into(),
            ));
        }
        for limit in [&self.rate_limit, &self.rate_limit_per_key]
            .into_iter()
            .flatten()
        {
            limit.validate()?;
        }
        check_limit("max_in_flight", self.max_in_flight)?;
        check_key_limit(self.ordered, self.max_in_flight_per_key)?;
        check_fair_key_limit(self.fair_share, self.max_in_flight_per_key)
    }
}

/// Fair share and a per-key limit do not combine (the SQL `create_group` and
/// `set_max_in_flight_per_key` refuse it the same way).
pub(crate) fn check_fair_key_limit(fair: bool, limit: Option<u32>) -> crate::error::Result<()> {
    match limit {
        Some(_) if fair => Err(crate::error::Error::InvalidConfig(
            "a fair group cannot have a per-key limit: fair share and max_in_flight_per_key do not combine"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// A concurrency limit fits Postgres's `integer` and is positive.
fn check_limit(what: &str, limit: Option<u32>) -> crate::error::Result<()> {
    match limit {
        Some(n) if n == 0 || n > i32::MAX as u32 => Err(crate::error::Error::InvalidConfig(
            format!("{what} must be between 1 and 2147483647, not {n}"),
        )),
        _ => Ok(()),
    }
}

/// The per-key limit's rule (SQL `_check_key_limit`): a concurrency limit, and only 1 in an
/// ordered group (which already delivers one message of a key at a time).
pub(crate) fn check_key_limit(ordered: bool, limit: Option<u32>) -> crate::error::Result<()> {
    check_limit("max_in_flight_per_key", limit)?;
    match limit {
        Some(n) if ordered && n > 1 => Err(crate::error::Error::InvalidConfig(format!(
            "an ordered group delivers one message of a key at a time: max_in_flight_per_key must be 1 or unset, not {n}"
        ))),
        _ => Ok(()),
    }
}

impl GroupConfig {
    /// The limit check of the runtime setters (`set_max_in_flight`).
    pub(crate) fn check_max_in_flight(limit: Option<u32>) -> crate::error::Result<()> {
        check_limit("max_in_flight", limit)
    }
}

/// Smallest key weight of a fair group ([`validate_weight`]).
pub const MIN_WEIGHT: f64 = 0.01;
/// Largest key weight of a fair group ([`validate_weight`]).
pub const MAX_WEIGHT: f64 = 1000.0;

/// Checks a key's weight in a fair group ([`GroupConfig::fair_share`]): finite, between
/// [`MIN_WEIGHT`] and [`MAX_WEIGHT`] (the same rule as the SQL functions' `_check_weight`).
/// A key's messages take `10 ms / weight` of virtual time each, to the microsecond.
pub fn validate_weight(weight: f64) -> crate::error::Result<()> {
    if (MIN_WEIGHT..=MAX_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(crate::error::Error::InvalidConfig(format!(
            "a key's weight must be between {MIN_WEIGHT} and {MAX_WEIGHT}, not {weight}"
        )))
    }
}

// The spelling both the SQL functions and the Redis group records use.
#[cfg(any(feature = "postgres", feature = "redis"))]
impl GroupStart {
    pub(crate) fn as_sql(self) -> &'static str {
        match self {
            GroupStart::New => "new",
            GroupStart::Oldest => "oldest",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_finite_and_within_bounds_and_fair_is_not_ordered() {
        for ok in [MIN_WEIGHT, 0.5, 1.0, 3.0, MAX_WEIGHT] {
            assert!(validate_weight(ok).is_ok(), "{ok}");
        }
        for bad in [
            0.0,
            -1.0,
            0.009,
            1000.001,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert!(validate_weight(bad).is_err(), "{bad}");
        }
        let both = GroupConfig::default().fair_share(true).ordered(true);
        assert!(both.validate().is_err());
        assert!(GroupConfig::default().fair_share(true).validate().is_ok());
    }

    #[test]
    fn backoff_delay_follows_the_schedule_and_repeats_the_last_step() {
        let b = Backoff::schedule([1, 5, 15].map(Duration::from_secs));
        let got: Vec<u64> = (0..=5).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(got, vec![1, 1, 5, 15, 15, 15]);
        let jittered = Backoff::schedule([Duration::from_secs(10)]).jitter(0.1);
        for _ in 0..100 {
            let d = jittered.delay(1);
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
        assert_eq!(
            Backoff {
                schedule: vec![],
                jitter: 0.0
            }
            .delay(1),
            Duration::ZERO
        );
    }
}
