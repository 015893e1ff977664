//! How much one claim may take, and when a held lease must be extended.
//!
//! A claim takes the free handler slots plus a reserve of deliveries that wait for a slot,
//! sized by two bounds, the smaller winning:
//!
//! - **keep busy**: what the handlers get through during two claim round trips, at the pace
//!   they have been finishing: `concurrency * 2 * claim time / average handler time`. Quick
//!   handlers (a claim takes longer than many handler calls) so get large claims, up to the
//!   prefetch, which spread a claim's round trip and commit over many deliveries; slow handlers
//!   claim little more than the free slots, since a reserve larger than what runs while the
//!   next claim is under way only waits, leased to this worker and out of reach of the others.
//! - **the lease**: what the running handlers get through in half a lease,
//!   `concurrency * (lease / 2) / average handler time`, so that a delivery waiting for a slot
//!   starts well before its lease ends.
//!
//! Until a first handler has finished the pace is unknown, and a claim takes the free slots only.
//! Both means follow changes within a few samples, so claims grow and shrink as handlers speed
//! up or slow down. The worker still extends every lease it holds (see [`extend_at`]), so a
//! misjudged pace costs extensions, never a lapse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;

use crate::queue::Delivery;

/// An exponentially weighted mean of durations (weight 1/4, so it follows a change within a few
/// samples), shared between tasks.
#[derive(Default)]
struct Mean {
    /// The mean in nanoseconds, plus one (0: nothing measured yet).
    nanos: AtomicU64,
}

impl Mean {
    fn record(&self, elapsed: Duration) {
        let sample = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX - 1);
        // Racing updates may lose a sample; the mean stays a mean of recent samples.
        let mean = match self.nanos.load(Ordering::Relaxed) {
            0 => sample,
            m => (m - 1) - (m - 1) / 4 + sample / 4,
        };
        self.nanos.store(mean.saturating_add(1), Ordering::Relaxed);
    }

    fn get(&self) -> Option<Duration> {
        match self.nanos.load(Ordering::Relaxed) {
            0 => None,
            m => Some(Duration::from_nanos(m - 1)),
        }
    }
}

/// How fast handlers finish and claims come back.
#[derive(Default)]
pub(super) struct Pace {
    handler: Mean,
    claim: Mean,
}

impl Pace {
    /// Adds one handler's duration.
    pub(super) fn record(&self, elapsed: Duration) {
        self.handler.record(elapsed);
    }

    /// Adds one claim's round trip (the statement that settles acks and claims; not a wait for
    /// work).
    pub(super) fn record_claim(&self, elapsed: Duration) {
        self.claim.record(elapsed);
    }

    /// How many deliveries to claim with `free` handler slots free: at least 1, at most
    /// `prefetch`, and beyond the free slots no more than the smaller of the two bounds of the
    /// module docs. Without a known lease nothing can lapse early: only the keep-busy bound.
    pub(super) fn claim_size(
        &self,
        free: usize,
        concurrency: usize,
        prefetch: usize,
        lease: Option<Duration>,
    ) -> usize {
        let reserve = match self.handler.get() {
            None => 0.0,
            Some(mean) => {
                let per_handler = |window: Duration| {
                    if mean.is_zero() {
                        f64::INFINITY
                    } else {
                        concurrency as f64 * window.as_secs_f64() / mean.as_secs_f64()
                    }
                };
                // Before a claim time is known, assume a quick one: the lease bound still holds.
                let busy = self
                    .claim
                    .get()
                    .map_or(f64::INFINITY, |claim| per_handler(claim * 2));
                let leased = lease.map_or(f64::INFINITY, |lease| per_handler(lease / 2));
                busy.min(leased)
            }
        };
        // `as` saturates: an infinite or huge reserve becomes usize::MAX.
        free.saturating_add(reserve as usize)
            .clamp(1, prefetch.max(1))
    }
}

/// When a held delivery's lease must be extended: once half a lease (`lease`, the stream's)
/// is all that is left of it, timed from its actual expiry.
pub(super) fn extend_at(d: &Delivery, lease: Duration) -> tokio::time::Instant {
    let left = (d.lease_expires_at - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left.saturating_sub(lease / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Option<Duration> = Some(Duration::from_secs(1));

    #[test]
    fn unknown_pace_claims_the_free_slots() {
        assert_eq!(Pace::default().claim_size(3, 16, 64, LEASE), 3);
        assert_eq!(Pace::default().claim_size(3, 16, 64, None), 3);
        assert_eq!(Pace::default().claim_size(0, 16, 64, None), 1);
    }

    #[test]
    fn quick_handlers_claim_the_full_prefetch() {
        let pace = Pace::default();
        pace.record(Duration::from_micros(50));
        pace.record_claim(Duration::from_millis(2));
        // 16 x 4 ms / 50 µs: far more than the prefetch.
        assert_eq!(pace.claim_size(1, 16, 256, LEASE), 256);
        pace.record(Duration::ZERO);
        assert_eq!(pace.claim_size(1, 16, 64, None), 64);
    }

    #[test]
    fn claims_keep_handlers_busy_for_two_claim_round_trips() {
        let pace = Pace::default();
        pace.record(Duration::from_millis(10));
        pace.record_claim(Duration::from_millis(5));
        // 16 handlers x 10 ms of claims / 10 ms each: 16 beyond the 2 free slots.
        assert_eq!(pace.claim_size(2, 16, 256, LEASE), 18);
        // Slower claims: a larger reserve, up to the prefetch.
        let pace = Pace::default();
        pace.record(Duration::from_millis(10));
        pace.record_claim(Duration::from_millis(50));
        assert_eq!(pace.claim_size(2, 16, 256, LEASE), 162);
        assert_eq!(pace.claim_size(2, 16, 100, LEASE), 100);
    }

    #[test]
    fn claims_shrink_when_handlers_slow_down() {
        let pace = Pace::default();
        pace.record(Duration::from_micros(100));
        pace.record_claim(Duration::from_millis(5));
        assert_eq!(pace.claim_size(4, 16, 256, LEASE), 256);
        for _ in 0..30 {
            pace.record(Duration::from_millis(200));
        }
        // 16 x 10 ms / 200 ms: nothing beyond the free slots.
        assert_eq!(pace.claim_size(4, 16, 256, LEASE), 4);
    }

    #[test]
    fn slow_handlers_claim_what_starts_within_half_a_lease() {
        let pace = Pace::default();
        pace.record(Duration::from_millis(700));
        pace.record_claim(Duration::from_secs(3));
        // Keep busy: 2 x 6 s / 700 ms = 17; the lease: 2 x 500 ms / 700 ms = 1 beyond the free slot.
        assert_eq!(pace.claim_size(1, 2, 8, LEASE), 2);
        for _ in 0..20 {
            pace.record(Duration::from_secs(5));
        }
        assert_eq!(pace.claim_size(1, 2, 8, LEASE), 1);
    }

    #[test]
    fn never_more_than_the_prefetch_nor_less_than_one() {
        let pace = Pace::default();
        pace.record(Duration::ZERO);
        pace.record_claim(Duration::from_secs(10));
        for free in 0..40 {
            for prefetch in [0, 1, 7, 300] {
                let n = pace.claim_size(free, 16, prefetch, None);
                assert!((1..=prefetch.max(1)).contains(&n), "{free} {prefetch}: {n}");
            }
        }
    }
}
