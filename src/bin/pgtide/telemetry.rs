//! Prometheus metrics (`--metrics-listen`, cargo feature `metrics`): counters of what this
//! process did (published, delivered, acked, nacked, dead-lettered) and per-group gauges read
//! from `stats` (ready, delayed, in flight, dead, oldest ready age = lag). Without the feature,
//! every call here is a no-op and `--metrics-listen` is refused.

use std::net::SocketAddr;
use std::time::Duration;

use pgtide::{CancellationToken, PgBackend};

use crate::error::CliResult;

#[cfg(feature = "metrics")]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::error::CliError;
    use metrics::{counter, describe_counter, describe_gauge, gauge};

    static ENABLED: AtomicBool = AtomicBool::new(false);

    const COUNTERS: [(&str, &str); 5] = [
        (
            "pgtide_published_total",
            "Messages published by this process.",
        ),
        (
            "pgtide_delivered_total",
            "Deliveries fetched by this process.",
        ),
        (
            "pgtide_acked_total",
            "Deliveries acknowledged by this process.",
        ),
        (
            "pgtide_nacked_total",
            "Deliveries negatively acknowledged by this process.",
        ),
        (
            "pgtide_dead_lettered_total",
            "Deliveries dead-lettered by this process.",
        ),
    ];

    pub fn install(addr: Option<SocketAddr>) -> CliResult {
        let Some(addr) = addr else { return Ok(()) };
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| CliError::runtime(format!("cannot serve metrics on {addr}: {e}")))?;
        for (name, help) in COUNTERS {
            describe_counter!(name, help);
            counter!(name).increment(0);
        }
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

    pub fn count(name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        if !ENABLED.load(Ordering::Relaxed) {
            return;
        }
        let labels: Vec<(&'static str, String)> =
            labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        counter!(name, &labels).increment(n);
    }

    pub fn spawn_group_gauges(pg: &PgBackend, interval: Duration, token: CancellationToken) {
        if !ENABLED.load(Ordering::Relaxed) {
            return;
        }
        let pg = pg.clone();
        tokio::spawn(async move {
            loop {
                match pg.stats().await {
                    Ok(stats) => {
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
                    Err(e) => tracing::warn!(error = %e, "pgtide metrics: stats failed"),
                }
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
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

    pub fn count(_name: &'static str, _labels: &[(&'static str, &str)], _n: u64) {}

    pub fn spawn_group_gauges(_pg: &PgBackend, _interval: Duration, _token: CancellationToken) {}
}

/// Starts the Prometheus exporter when an address is given.
pub fn install(addr: Option<SocketAddr>) -> CliResult {
    imp::install(addr)
}

/// Refreshes the per-group gauges every `interval` until `token` is cancelled.
pub fn spawn_group_gauges(pg: &PgBackend, interval: Duration, token: CancellationToken) {
    imp::spawn_group_gauges(pg, interval, token)
}

/// Counts published messages.
pub fn published(stream: &str, n: u64) {
    imp::count("pgtide_published_total", &[("stream", stream)], n);
}

/// Counts fetched deliveries.
pub fn delivered(stream: &str, group: &str, n: u64) {
    imp::count(
        "pgtide_delivered_total",
        &[("stream", stream), ("group", group)],
        n,
    );
}

/// Counts acknowledged deliveries.
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
