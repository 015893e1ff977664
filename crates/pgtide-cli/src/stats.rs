//! `stats`, `health` and `scout`: watching a namespace and keeping it running.
//!
//! On backends other than Postgres, `stats STREAM --group G` shows that one group through
//! `Queue::stats` (without rates: brokers keep no publish counts); `health` and `scout` are
//! Postgres only.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgtide::{GroupStats, PgBackend};
use serde_json::json;

use crate::backend::Target;
use crate::cli::{Global, ScoutArgs, StatsArgs};
use crate::error::{CliError, CliResult};
use crate::human::{format_age, format_duration, format_time, print_table};

pub(crate) struct Sample {
    pub(crate) at: Instant,
    pub(crate) wall: DateTime<Utc>,
    pub(crate) groups: Vec<GroupStats>,
    /// Messages published so far per stream (Postgres only), for rates.
    pub(crate) published: Option<HashMap<String, i64>>,
}

/// Messages per second in (published, per stream) and out (settled: acked or dead-lettered, per
/// group), from two samples: out = in - growth of the group's pending deliveries.
pub(crate) struct Rates {
    pub(crate) publish: HashMap<String, f64>,
    pub(crate) settle: HashMap<(String, String), f64>,
}

/// Every group of the namespace with publish counts (the dashboard's sample): the stats
/// functions and views only, so a read-only role can run it.
#[cfg(feature = "dashboard")]
pub(crate) async fn sample_all(pg: &PgBackend) -> CliResult<Sample> {
    let groups = pg.stats_all().await?;
    let published = pg.publish_counts().await?.into_iter().collect();
    Ok(Sample {
        at: Instant::now(),
        wall: Utc::now(),
        groups,
        published: Some(published),
    })
}

async fn sample<B: Target>(b: &B, args: &StatsArgs) -> CliResult<Sample> {
    let (groups, published) = match (b.postgres(), &args.stream, &args.group) {
        (Some(pg), stream, group) => {
            let groups: Vec<GroupStats> = pg
                .stats_all()
                .await?
                .into_iter()
                .filter(|g| stream.as_ref().map_or(true, |s| &g.stream == s))
                .filter(|g| group.is_none() || g.group == *group)
                .collect();
            if let (Some(stream), Some(group)) = (stream, group) {
                if groups.is_empty() {
                    return Err(pgtide::Error::GroupNotFound {
                        stream: stream.clone(),
                        group: group.clone(),
                    }
                    .into());
                }
            }
            let published = pg.publish_counts().await?.into_iter().collect();
            (groups, Some(published))
        }
        (None, Some(stream), Some(group)) => (vec![b.stats(stream, group).await?], None),
        (None, _, _) => {
            return Err(crate::backend::unsupported(
                "`pgtide stats` without STREAM --group GROUP",
                b.kind(),
            ))
        }
    };
    Ok(Sample {
        at: Instant::now(),
        wall: Utc::now(),
        groups,
        published,
    })
}

fn pending(g: &GroupStats) -> i64 {
    g.ready + g.delayed + g.in_flight
}

/// Rates between two samples, when both carry publish counts.
pub(crate) fn rates(prev: &Sample, cur: &Sample) -> Option<Rates> {
    let (before, now) = (prev.published.as_ref()?, cur.published.as_ref()?);
    let secs = cur.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let publish: HashMap<String, f64> = now
        .iter()
        .map(|(s, n)| {
            let before = before.get(s).copied().unwrap_or(*n);
            (s.clone(), ((n - before) as f64 / secs).max(0.0))
        })
        .collect();
    let mut settle = HashMap::new();
    for g in &cur.groups {
        let Some(name) = &g.group else { continue };
        let Some(p) = prev
            .groups
            .iter()
            .find(|p| p.stream == g.stream && p.group.as_ref() == Some(name))
        else {
            continue;
        };
        let growth = (pending(g) - pending(p)) as f64 / secs;
        let incoming = publish.get(&g.stream).copied().unwrap_or(0.0);
        settle.insert(
            (g.stream.clone(), name.clone()),
            (incoming - growth).max(0.0),
        );
    }
    Some(Rates { publish, settle })
}

fn print_sample(namespace: &str, s: &Sample, r: Option<&Rates>, json: bool) {
    let rate = |v: Option<f64>| v.map(|x| (x * 10.0).round() / 10.0);
    if json {
        let groups: Vec<_> = s
            .groups
            .iter()
            .map(|g| {
                let mut v = json!({
                    "stream": g.stream, "group": g.group, "ready": g.ready, "delayed": g.delayed,
                    "in_flight": g.in_flight, "dead": g.dead,
                    "oldest_ready_age_secs": g.oldest_ready_age.map(|d| d.as_secs_f64()),
                });
                if let Some(r) = r {
                    v["publish_rate"] = json!(rate(r.publish.get(&g.stream).copied()));
                    v["settle_rate"] =
                        json!(rate(g.group.as_ref().and_then(|n| {
                            r.settle.get(&(g.stream.clone(), n.clone())).copied()
                        })));
                }
                v
            })
            .collect();
        println!(
            "{}",
            json!({"at": format_time(s.wall), "namespace": namespace, "groups": groups})
        );
        return;
    }
    let fmt_rate = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"));
    let rows: Vec<Vec<String>> = s
        .groups
        .iter()
        .map(|g| {
            let mut row = vec![
                g.stream.clone(),
                g.group.clone().unwrap_or_else(|| "(no group)".into()),
                g.ready.to_string(),
                g.delayed.to_string(),
                g.in_flight.to_string(),
                g.dead.to_string(),
                g.oldest_ready_age
                    .map(format_age)
                    .unwrap_or_else(|| "-".into()),
            ];
            if let Some(r) = r {
                row.push(fmt_rate(r.publish.get(&g.stream).copied()));
                row.push(fmt_rate(g.group.as_ref().and_then(|n| {
                    r.settle.get(&(g.stream.clone(), n.clone())).copied()
                })));
            }
            row
        })
        .collect();
    let mut header = vec![
        "STREAM",
        "GROUP",
        "READY",
        "DELAYED",
        "IN_FLIGHT",
        "DEAD",
        "OLDEST",
    ];
    if r.is_some() {
        header.extend(["IN/S", "OUT/S"]);
    }
    print_table(&header, &rows);
}

/// `stats [STREAM [--group G]] [--json] [--watch [INTERVAL]]`.
pub async fn run<B: Target>(b: &B, args: StatsArgs) -> CliResult {
    let namespace = crate::error::NAMESPACE
        .get()
        .map_or("pgtide", String::as_str);
    if let (Some(pg), Some(s)) = (b.postgres(), &args.stream) {
        if pg.stream(s).await?.is_none() {
            return Err(pgtide::Error::StreamNotFound(s.clone()).into());
        }
    }
    if !b.capabilities().exact_stats {
        eprintln!(
            "note: the {} backend's counts are approximate (see the README, Backends)",
            b.kind()
        );
    }
    let Some(interval) = args.watch else {
        let s = sample(b, &args).await?;
        print_sample(namespace, &s, None, args.json);
        return Ok(());
    };
    // Sampling runs a query per group: under 100 ms it would load the database for nothing.
    let interval = interval.max(Duration::from_millis(100));
    let token = crate::shutdown_signal();
    let clear = !args.json && std::io::stdout().is_terminal();
    let mut prev: Option<Sample> = None;
    loop {
        let s = sample(b, &args).await?;
        let r = prev.as_ref().and_then(|p| rates(p, &s));
        if clear {
            print!("\x1b[2J\x1b[H");
            println!(
                "pgtide stats: namespace {namespace:?}, {} (every {}, Ctrl-C to stop)\n",
                format_time(s.wall),
                format_duration(interval)
            );
        } else if !args.json {
            println!("# {}", format_time(s.wall));
        }
        print_sample(namespace, &s, r.as_ref(), args.json);
        if !args.json && !clear {
            println!();
        }
        prev = Some(s);
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

struct Check {
    name: &'static str,
    ok: bool,
    /// Passes, but needs attention (shown as WARN; does not make the namespace unhealthy).
    warn: bool,
    detail: String,
}

/// `health`: exit 0 when the database answers, the namespace is current, a scout holds the
/// lease and (with `--max-lag`) no group lags more; exit 4 with the reasons otherwise. Vacuum
/// (autovacuum off, hot tables nothing vacuums) is a warning: it degrades, it does not stop.
pub async fn health(global: &Global, json: bool, max_lag: Option<Duration>) -> CliResult<u8> {
    let url = crate::backend::postgres_url(global, "health")?;
    let pg = crate::backend::pg_builder(global, url, Duration::from_secs(5))
        .pool_size(1)
        .build()?;
    let ns = pg.namespace().to_owned();
    let mut checks = vec![];
    let mut vacuum_warns = false;
    let mut check = |name, ok, detail: String| {
        checks.push(Check {
            name,
            ok,
            warn: false,
            detail,
        })
    };
    match pg.is_migrated().await {
        Err(e) => check("database", false, CliError::from(e).message),
        Ok(migrated) => {
            check("database", true, "reachable".to_owned());
            if migrated {
                check("migrations", true, format!("namespace {ns:?} is current"));
            } else {
                check(
                    "migrations",
                    false,
                    format!(
                        "namespace {ns:?} is not installed or out of date: run `pgtide migrate`"
                    ),
                );
            }
            if migrated {
                match pg.scout_holder().await {
                    Ok(Some(holder)) => check("scout", true, format!("{holder} holds the lease")),
                    Ok(None) => check(
                        "scout",
                        false,
                        "no scout holds the lease: run `pgtide scout` or a consuming process (delayed messages and expired leases wait for the fallback poll)".to_owned(),
                    ),
                    Err(e) => check("scout", false, CliError::from(e).message),
                }
                match pg.vacuum_status().await {
                    Ok(status) => {
                        let warnings = status.warnings();
                        if warnings.is_empty() {
                            check(
                                "vacuum",
                                true,
                                "autovacuum is on for the hot tables and none is neglected"
                                    .to_owned(),
                            );
                        } else {
                            vacuum_warns = true;
                            check("vacuum", true, warnings.join("; "));
                        }
                    }
                    Err(e) => check("vacuum", false, CliError::from(e).message),
                }
                if let Some(max) = max_lag {
                    match pg.stats_all().await {
                        Ok(stats) => {
                            let lagging: Vec<String> = stats
                                .iter()
                                .filter_map(|g| {
                                    let age = g.oldest_ready_age?;
                                    (age > max).then(|| {
                                        format!(
                                            "{}/{} lags {}",
                                            g.stream,
                                            g.group.as_deref().unwrap_or("-"),
                                            format_age(age)
                                        )
                                    })
                                })
                                .collect();
                            if lagging.is_empty() {
                                check(
                                    "lag",
                                    true,
                                    format!("no group lags more than {}", format_duration(max)),
                                );
                            } else {
                                check(
                                    "lag",
                                    false,
                                    format!(
                                        "{} (max {})",
                                        lagging.join(", "),
                                        format_duration(max)
                                    ),
                                );
                            }
                        }
                        Err(e) => check("lag", false, CliError::from(e).message),
                    }
                }
            }
        }
    }
    pg.shutdown().await;
    for c in &mut checks {
        c.warn = c.name == "vacuum" && vacuum_warns;
    }
    let healthy = checks.iter().all(|c| c.ok);
    if json {
        let list: Vec<_> = checks
            .iter()
            .map(|c| json!({"check": c.name, "ok": c.ok, "warning": c.warn, "detail": c.detail}))
            .collect();
        println!(
            "{}",
            json!({"healthy": healthy, "namespace": ns, "checks": list})
        );
    } else {
        for c in &checks {
            println!(
                "{:<4}  {:<10}  {}",
                match (c.ok, c.warn) {
                    (false, _) => "FAIL",
                    (true, true) => "WARN",
                    (true, false) => "ok",
                },
                c.name,
                c.detail
            );
        }
    }
    if healthy {
        Ok(crate::error::OK)
    } else {
        if !json {
            eprintln!("pgtide: namespace {ns:?} is unhealthy");
        }
        Ok(crate::error::UNHEALTHY)
    }
}

/// `scout`: be a scout candidate until SIGINT/SIGTERM, then resign (done by the caller's
/// shutdown) so another process takes over at once.
pub async fn scout(pg: &PgBackend, args: ScoutArgs) -> CliResult {
    if !pg.is_migrated().await? {
        return Err(pgtide::Error::NotMigrated(pg.namespace().to_owned()).into());
    }
    let token = crate::shutdown_signal();
    pg.start_scout();
    crate::telemetry::spawn_group_gauges(pg, None, args.stats_interval, token.clone());
    tracing::info!(
        namespace = pg.namespace(),
        candidate = %pg.scout_status().holder_id,
        "pgtide scout: candidate started"
    );
    token.cancelled().await;
    tracing::info!("pgtide scout: stopping; resigning the lease");
    Ok(())
}
