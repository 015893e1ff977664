//! The one door to the `metrics` crate. With the cargo feature `metrics` these types record
//! through its facade; without it they are empty and every call compiles to nothing, so hot
//! paths carry no `cfg`. Metric names and labels are written here and nowhere else:
//!
//! | metric | labels | recorded by |
//! |---|---|---|
//! | `pgtide_published_total` (duplicates excluded) | stream | Postgres publish |
//! | `pgtide_fetch_duration_seconds` | stream, group | Postgres claim |
//! | `pgtide_delivered_total` | stream, group | Postgres claim |
//! | `pgtide_redeliveries_total` (attempt above 1) | stream, group | Postgres claim |
//! | `pgtide_lease_expiries_total` (claimed again after a lease ran out) | stream, group | Postgres claim |
//! | `pgtide_handler_duration_seconds` | stream, group, outcome | worker, every backend |
//! | `pgtide_acked_total`, `pgtide_nacked_total`, `pgtide_dead_lettered_total` | stream, group | worker, every backend |
//!
//! Handles are made once (per consumer, per worker run), so that the hot path does not build
//! labels; they belong to the recorder installed when they were made.

// The publish and claim metrics belong to the PostgreSQL engine.
#![cfg_attr(not(feature = "postgres"), allow(dead_code))]

use std::time::Duration;

use crate::worker::HandlerResult;
use crate::{Delivery, PublishReceipt};

/// When a timed operation started (nothing without the feature).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started {
    #[cfg(feature = "metrics")]
    at: std::time::Instant,
}

/// Starts timing an operation.
#[inline]
pub(crate) fn start() -> Started {
    Started {
        #[cfg(feature = "metrics")]
        at: std::time::Instant::now(),
    }
}

/// Counts `pgtide_published_total`. Inside a caller's transaction the count is taken before the
/// caller commits.
#[inline]
pub(crate) fn published(_stream: &str, _receipts: &[PublishReceipt]) {
    #[cfg(feature = "metrics")]
    {
        let n = _receipts.iter().filter(|r| !r.duplicate).count() as u64;
        if n > 0 {
            ::metrics::counter!("pgtide_published_total", "stream" => _stream.to_owned())
                .increment(n);
        }
    }
}

/// The claim metrics of one consumer.
#[derive(Debug, Clone)]
pub(crate) struct ClaimMetrics {
    #[cfg(feature = "metrics")]
    duration: ::metrics::Histogram,
    #[cfg(feature = "metrics")]
    delivered: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    redeliveries: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    lease_expiries: ::metrics::Counter,
}

impl ClaimMetrics {
    pub(crate) fn new(_stream: &str, _group: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = [("stream", _stream.to_owned()), ("group", _group.to_owned())];
            ClaimMetrics {
                duration: ::metrics::histogram!("pgtide_fetch_duration_seconds", &labels),
                delivered: ::metrics::counter!("pgtide_delivered_total", &labels),
                redeliveries: ::metrics::counter!("pgtide_redeliveries_total", &labels),
                lease_expiries: ::metrics::counter!("pgtide_lease_expiries_total", &labels),
            }
        }
        #[cfg(not(feature = "metrics"))]
        ClaimMetrics {}
    }

    /// A claim that started at `started` returned `batch`; `expired` counts the deliveries that
    /// were claimed again after a lease ran out (only called with the feature).
    #[inline]
    pub(crate) fn claimed(
        &self,
        _started: Started,
        _batch: &[Delivery],
        _expired: impl FnOnce() -> usize,
    ) {
        #[cfg(feature = "metrics")]
        {
            self.duration.record(_started.at.elapsed());
            let expired = _expired();
            if expired > 0 {
                self.lease_expiries.increment(expired as u64);
            }
            self.delivered.increment(_batch.len() as u64);
            let again = _batch.iter().filter(|d| d.attempt > 1).count();
            if again > 0 {
                self.redeliveries.increment(again as u64);
            }
        }
    }
}

/// The metrics of one worker run.
pub(crate) struct WorkerMetrics {
    #[cfg(feature = "metrics")]
    acked: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    nacked: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    dead_lettered: ::metrics::Counter,
    /// `pgtide_handler_duration_seconds` per outcome, in the order of [`OUTCOMES`].
    #[cfg(feature = "metrics")]
    handler: [::metrics::Histogram; 5],
}

/// The `outcome` label: the handler's [`crate::Outcome`], or `error` / `panic`.
#[cfg(feature = "metrics")]
const OUTCOMES: [&str; 5] = ["ack", "retry", "dead_letter", "error", "panic"];

impl WorkerMetrics {
    pub(crate) fn new(_stream: &str, _group: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = [("stream", _stream.to_owned()), ("group", _group.to_owned())];
            WorkerMetrics {
                acked: ::metrics::counter!("pgtide_acked_total", &labels),
                nacked: ::metrics::counter!("pgtide_nacked_total", &labels),
                dead_lettered: ::metrics::counter!("pgtide_dead_lettered_total", &labels),
                handler: OUTCOMES.map(|outcome| {
                    ::metrics::histogram!(
                        "pgtide_handler_duration_seconds",
                        "stream" => _stream.to_owned(),
                        "group" => _group.to_owned(),
                        "outcome" => outcome
                    )
                }),
            }
        }
        #[cfg(not(feature = "metrics"))]
        WorkerMetrics {}
    }

    /// Deliveries the backend confirmed acked.
    #[inline]
    pub(crate) fn acked(&self, _n: usize) {
        #[cfg(feature = "metrics")]
        self.acked.increment(_n as u64);
    }

    /// Deliveries put back for a retry.
    #[inline]
    pub(crate) fn nacked(&self, _n: usize) {
        #[cfg(feature = "metrics")]
        self.nacked.increment(_n as u64);
    }

    /// Deliveries that went to the dead letters.
    #[inline]
    pub(crate) fn dead_lettered(&self, _n: usize) {
        #[cfg(feature = "metrics")]
        self.dead_lettered.increment(_n as u64);
    }

    /// How long a handler took, by how it ended.
    #[inline]
    pub(crate) fn handled(&self, _result: &HandlerResult, _elapsed: Duration) {
        #[cfg(feature = "metrics")]
        {
            use crate::worker::Outcome;
            let outcome = match _result {
                HandlerResult::Outcome(Outcome::Ack) => 0,
                HandlerResult::Outcome(Outcome::Retry { .. } | Outcome::PauseKey { .. }) => 1,
                HandlerResult::Outcome(Outcome::DeadLetter { .. }) => 2,
                HandlerResult::Failed(_) => 3,
                HandlerResult::Panicked(_) => 4,
            };
            self.handler[outcome].record(_elapsed);
        }
    }
}
