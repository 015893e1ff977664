//! How much one claim may take, and when a held lease must be extended.
//!
//! A claim takes the free handler slots plus as many deliveries as the running handlers get
//! through in half a lease, at the pace handlers have been finishing:
//! `free + concurrency * (lease / 2) / average handler time`, capped by the prefetch. Quick
//! handlers keep claims at the full prefetch (the fast path); slow handlers claim little more
//! than the free slots, so deliveries waiting for a slot start well before their lease ends.
//! Until a first handler has finished, the pace is unknown and a claim takes the free slots only.
//! The worker still extends every lease it holds (see [`extend_at`]), so a misjudged pace costs
//! extensions, never a lapse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;

use crate::queue::Delivery;

/// The recent handler time: an exponentially weighted mean of handler durations.
#[derive(Default)]
pub(super) struct Pace {
    /// Mean handler time in nanoseconds, plus one (0: nothing measured yet).
    mean_nanos: AtomicU64,
}

impl Pace {
    /// Adds one handler's duration (weight 1/4, so the mean follows a change within a few calls).
    pub(super) fn record(&self, elapsed: Duration) {
        let sample = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX - 1);
        // Racing updates may lose a sample; the mean stays a mean of recent samples.
        let mean = match self.mean_nanos.load(Ordering::Relaxed) {
            0 => sample,
            m => (m - 1) - (m - 1) / 4 + sample / 4,
        };
        self.mean_nanos
            .store(mean.saturating_add(1), Ordering::Relaxed);
    }

    /// The mean handler time, if any handler finished.
    fn mean(&self) -> Option<Duration> {
        match self.mean_nanos.load(Ordering::Relaxed) {
            0 => None,
            m => Some(Duration::from_nanos(m - 1)),
        }
    }

    /// How many deliveries to claim with `free` handler slots free (at least 1, at most
    /// `prefetch`). Without a known lease nothing can lapse early, so the full prefetch.
    pub(super) fn claim_size(
        &self,
        free: usize,
        concurrency: usize,
        prefetch: usize,
        lease: Option<Duration>,
    ) -> usize {
        let Some(lease) = lease else {
            return prefetch;
        };
        let waiting = match self.mean() {
            None => 0.0,
            Some(mean) if mean.is_zero() => f64::INFINITY,
            Some(mean) => concurrency as f64 * (lease / 2).as_secs_f64() / mean.as_secs_f64(),
        };
        // `as` saturates: an infinite or huge allowance becomes usize::MAX.
        free.saturating_add(waiting as usize)
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
        assert_eq!(Pace::default().claim_size(3, 16, 64, None), 64);
    }

    #[test]
    fn quick_handlers_claim_the_full_prefetch() {
        let pace = Pace::default();
        pace.record(Duration::from_micros(50));
        assert_eq!(pace.claim_size(1, 16, 16, LEASE), 16);
        pace.record(Duration::ZERO);
        assert_eq!(pace.claim_size(1, 16, 64, LEASE), 64);
    }

    #[test]
    fn slow_handlers_claim_what_starts_within_half_a_lease() {
        let pace = Pace::default();
        pace.record(Duration::from_millis(700));
        // 2 slots x 500 ms / 700 ms: one more than the free slot.
        assert_eq!(pace.claim_size(1, 2, 8, LEASE), 2);
        pace.record(Duration::from_secs(5));
        for _ in 0..20 {
            pace.record(Duration::from_secs(5));
        }
        assert_eq!(pace.claim_size(1, 2, 8, LEASE), 1);
    }
}
