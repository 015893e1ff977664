//! Prometheus metrics (`--metrics-listen`, cargo feature `metrics`).
//!
//! The library records what it does through the `metrics` facade (see README, CLI metrics):
//! `pgtide_published_total`, `pgtide_delivered_total`, `pgtide_redeliveries_total` and
//! `pgtide_fetch_duration_seconds` in the Postgres engine; `pgtide_acked_total`,
//! `pgtide_nacked_total`, `pgtide_dead_lettered_total` and `pgtide_handler_duration_seconds` in
//! the worker. This module installs the exporter, describes those series, counts what the CLI
//! does that the library does not count itself (settles of `consume`, which does not use the
//! worker; publishes and deliveries on backends other than Postgres), so nothing is counted
//! twice, and refreshes per-group gauges from `stats` (ready, delayed, in flight, dead, oldest
//! ready age = lag). Without the feature, every call here is a no-op and `--metrics-listen` is
//! refused.

use std::net::SocketAddr;
use std::time::Duration;

use pgtide::{CancellationToken, GroupStats};

use crate::backend::Target;
use crate::error::CliResult;

#[cfg(feature = "metrics")]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::error::CliError;
    use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
    use metrics_exporter_prometheus::Matcher;

    static ENABLED: AtomicBool = AtomicBool::new(false);

    const COUNTERS: [(&str, &str); 6] = [
        (
            "pgtide_published_total",
            "Messages published by this process (duplicates excluded), per stream.",
        ),
        (
            "pgtide_delivered_total",
            "Deliveries fetched by this process, per group.",
        ),
        (
            "pgtide_redeliveries_total",
            "Deliveries fetched by this process with an attempt above 1 (after a nack or an expired lease), per group.",
        ),
        (
            "pgtide_acked_total",
            "Deliveries acknowledged by this process, per group.",
        ),
        (
            "pgtide_nacked_total",
            "Deliveries negatively acknowledged (to be retried) by this process, per group.",
        ),
        (
            "pgtide_dead_lettered_total",
            "Deliveries this process sent to the dead letters (term, or nack on the last attempt), per group.",
        ),
    ];

    /// Seconds; claims are fast, handlers are whatever the application does.
    const FETCH_BUCKETS: [f64; 13] = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ];
    const HANDLER_BUCKETS: [f64; 14] = [
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];

    pub fn install(addr: Option<SocketAddr>) -> CliResult {
        let Some(addr) = addr else { return Ok(()) };
        let failed = |e: metrics_exporter_prometheus::BuildError| {
            CliError::runtime(format!("cannot serve metrics on {addr}: {e}"))
        };
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(
                Matcher::Full("pgtide_fetch_duration_seconds".into()),
                &FETCH_BUCKETS,
            )
            .map_err(failed)?
            .set_buckets_for_metric(
                Matcher::Full("pgtide_handler_duration_seconds".into()),
                &HANDLER_BUCKETS,
            )
            .map_err(failed)?
            .install()
            .map_err(failed)?;
        for (name, help) in COUNTERS {
            describe_counter!(name, help);
            counter!(name).increment(0);
        }
        describe_histogram!(
            "pgtide_fetch_duration_seconds",
            Unit::Seconds,
            "Duration of one claim round trip (fetch, try_fetch, ack_and_fetch) on Postgres, per group."
        );
        describe_histogram!(
            "pgtide_handler_duration_seconds",
            Unit::Seconds,
            "Duration of a worker's handler, per group and outcome (ack, retry, dead_letter, error, panic)."
        );
        describe_gauge!(
            "pgtide_group_ready",
            "Deliveries ready to fetch, per group."
        );
        describe_gauge!(
            "pgtide_group_delayed",
            "Deliveries waiting for a delay or backoff, per group."
        );
        describe_gauge!(
            "pgtide_group_in_flight",
            "Deliveries leased to consumers, per group."
        );
        describe_gauge!("pgtide_group_dead", "Dead letters, per group.");
        describe_gauge!(
            "pgtide_group_lag_seconds",
            "Age of the oldest ready delivery (0 when none is ready), per group."
        );
        ENABLED.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn enabled() -> bool {
        ENABLED.load(Ordering::Relaxed)
    }

    pub fn count(name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        if !enabled() {
            return;
        }
        let labels: Vec<(&'static str, String)> =
            labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        counter!(name, &labels).increment(n);
    }

    pub fn set_gauges(stats: Vec<GroupStats>) {
        for g in stats {
            let Some(group) = g.group else { continue };
            let labels = [("stream", g.stream.clone()), ("group", group)];
            gauge!("pgtide_group_ready", &labels).set(g.ready as f64);
            gauge!("pgtide_group_delayed", &labels).set(g.delayed as f64);
            gauge!("pgtide_group_in_flight", &labels).set(g.in_flight as f64);
            gauge!("pgtide_group_dead", &labels).set(g.dead as f64);
            gauge!("pgtide_group_lag_seconds", &labels)
                .set(g.oldest_ready_age.map_or(0.0, |d| d.as_secs_f64()));
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use super::*;
    use crate::error::CliError;

    pub fn install(addr: Option<SocketAddr>) -> CliResult {
        match addr {
            Some(_) => Err(CliError::usage(
                "--metrics-listen needs a pgtide built with the `metrics` feature (cargo install pgtide --features metrics)",
            )),
            None => Ok(()),
        }
    }

    pub fn enabled() -> bool {
        false
    }

    pub fn count(_name: &'static str, _labels: &[(&'static str, &str)], _n: u64) {}

    pub fn set_gauges(_stats: Vec<GroupStats>) {}
}

/// Starts the Prometheus exporter when an address is given.
pub fn install(addr: Option<SocketAddr>) -> CliResult {
    imp::install(addr)
}

/// Refreshes the per-group gauges every `interval` until `token` is cancelled: of every group
/// on Postgres, of the group `only` on other backends (they cannot list groups).
pub fn spawn_group_gauges<B: Target>(
    b: &B,
    only: Option<(&str, &str)>,
    interval: Duration,
    token: CancellationToken,
) {
    if !imp::enabled() {
        return;
    }
    let b = b.clone();
    let only = only.map(|(s, g)| (s.to_owned(), g.to_owned()));
    if b.postgres().is_none() && only.is_none() {
        return;
    }
    tokio::spawn(async move {
        loop {
            let stats = match (b.postgres(), &only) {
                (Some(pg), _) => pg.stats_all().await,
                (None, Some((s, g))) => b.stats(s, g).await.map(|g| vec![g]),
                (None, None) => break,
            };
            match stats {
                Ok(stats) => imp::set_gauges(stats),
                Err(e) => tracing::warn!(error = %e, "pgtide metrics: stats failed"),
            }
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
}

/// Counts published messages, unless the library counted them (Postgres).
pub fn published<B: Target>(b: &B, stream: &str, n: u64) {
    if b.postgres().is_none() {
        imp::count("pgtide_published_total", &[("stream", stream)], n);
    }
}

/// Counts fetched deliveries, unless the library counted them (Postgres).
pub fn delivered<B: Target>(b: &B, stream: &str, group: &str, n: u64) {
    if b.postgres().is_none() {
        imp::count(
            "pgtide_delivered_total",
            &[("stream", stream), ("group", group)],
            n,
        );
    }
}

/// Counts acknowledged deliveries (`consume` settles without the worker, which counts its own).
pub fn acked(stream: &str, group: &str, n: u64) {
    imp::count(
        "pgtide_acked_total",
        &[("stream", stream), ("group", group)],
        n,
    );
}

/// Counts negatively acknowledged deliveries (retried).
pub fn nacked(stream: &str, group: &str, n: u64) {
    imp::count(
        "pgtide_nacked_total",
        &[("stream", stream), ("group", group)],
        n,
    );
}

/// Counts deliveries this process dead-lettered.
pub fn dead_lettered(stream: &str, group: &str, n: u64) {
    imp::count(
        "pgtide_dead_lettered_total",
        &[("stream", stream), ("group", group)],
        n,
    );
}
