//! Provisioning and registry commands: migrate, grant, stream, group, trim.
//!
//! On backends other than Postgres, streams and groups are created, deleted and purged through
//! the `Queue` traits; listing, showing, updating and resetting need the Postgres registry.

use std::time::Duration;

use chrono::Utc;
use pgtide::{Backoff, GroupConfig, GroupStart, PgBackend, StreamConfig, StreamInfo};
use serde_json::json;

use crate::backend::Target;
use crate::cli::{
    GroupCommand, LimitSetting, RateSetting, StreamCommand, StreamOptions, WeightSetting,
};
use crate::error::{CliError, CliResult};
use crate::human::{
    format_age, format_duration, format_time, parse_point, plural, print_table, Point,
};

/// `migrate --print-sql`: the install script, bookkeeping included, so that the library
/// (`is_migrated`, `migrate`) sees a namespace installed by hand as current.
pub fn print_sql(namespace: &str) -> CliResult<u8> {
    print!("{}", pgtide::migration_sql(namespace)?);
    Ok(crate::error::OK)
}

/// `migrate`: says what it applied (a fresh install, an upgrade, or nothing).
pub async fn migrate(pg: &PgBackend) -> CliResult {
    let before = pg.migration_version().await?;
    pg.migrate().await?;
    let after = pg
        .migration_version()
        .await?
        .unwrap_or_else(PgBackend::latest_migration);
    println!("{}", migrate_report(pg.namespace(), before, after));
    Ok(())
}

/// The line `migrate` prints, from the newest migration before and after the run.
fn migrate_report(namespace: &str, before: Option<i64>, after: i64) -> String {
    let range = |first: i64| {
        if first == after {
            format!("migration {after}")
        } else {
            format!("migrations {first}–{after}")
        }
    };
    match before {
        None => format!("installed namespace {namespace:?} ({})", range(1)),
        Some(b) if b < after => format!("upgraded namespace {namespace:?} ({})", range(b + 1)),
        Some(_) => format!("namespace {namespace:?} is up to date (migration {after})"),
    }
}

/// `grant ROLE [--read-only | --revoke]`.
pub async fn grant(pg: &PgBackend, role: &str, read_only: bool, revoke: bool) -> CliResult {
    let ns = pg.namespace();
    if revoke {
        if pg.revoke_runtime(role).await? {
            println!("revoked every privilege of role {role:?} on namespace {ns:?}");
        } else {
            println!(
                "role {role:?} had not been granted on namespace {ns:?}; revoked whatever it held"
            );
        }
    } else if read_only {
        pg.grant_read_only(role).await?;
        println!(
            "granted role {role:?} read-only access to namespace {ns:?}: the views and the stats functions, nothing else"
        );
    } else {
        pg.grant_runtime(role).await?;
        println!(
            "granted role {role:?} the runtime privileges on namespace {ns:?}: its functions and views, no table"
        );
    }
    Ok(())
}

fn apply(mut config: StreamConfig, o: &StreamOptions) -> CliResult<StreamConfig> {
    if let Some(v) = o.lease {
        config = config.lease(v);
    }
    if let Some(v) = o.max_deliver {
        config = config.max_deliver(v);
    }
    if let Some(steps) = &o.backoff {
        let jitter = config.backoff.jitter;
        config = config.backoff(Backoff::schedule(steps.clone()).jitter(jitter));
    }
    if let Some(j) = o.backoff_jitter {
        if !(0.0..=1.0).contains(&j) {
            return Err(CliError::usage(format!(
                "--backoff-jitter {j} is out of range: use 0 to 1"
            )));
        }
        let steps = config.backoff.schedule.clone();
        config = config.backoff(Backoff::schedule(steps).jitter(j));
    }
    if let Some(v) = o.retention {
        config = config.retention(v);
    }
    if let Some(v) = o.partition_interval {
        config = config.partition_interval(v);
    }
    if let Some(v) = o.dedupe_window {
        config = config.dedupe_window(v);
    }
    if let Some(v) = o.max_payload {
        config = config.max_payload(v);
    }
    Ok(config)
}

fn stream_json(s: &StreamInfo) -> serde_json::Value {
    let c = &s.config;
    json!({
        "name": s.name,
        "lease_secs": c.lease.as_secs_f64(),
        "max_deliver": c.max_deliver,
        "backoff_secs": c.backoff.schedule.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "backoff_jitter": jitter(c.backoff.jitter),
        "retention_secs": c.retention.as_secs_f64(),
        "partition_interval_secs": c.partition_interval.as_secs_f64(),
        "dedupe_window_secs": c.dedupe_window.as_secs_f64(),
        "max_payload": c.max_payload,
        "created_at": format_time(s.created_at),
    })
}

/// The jitter as the user wrote it: it is stored as `f32`, and widening 0.1 to `f64` would print
/// 0.10000000149011612.
fn jitter(j: f32) -> f64 {
    j.to_string().parse().unwrap_or(f64::from(j))
}

fn not_found_stream(name: &str) -> CliError {
    CliError::from(pgtide::Error::StreamNotFound(name.to_owned()))
}

/// A missing stream where creating it would not help (deleting it): no "create it" advice.
fn nothing_to_delete(name: &str) -> CliError {
    let namespace = crate::error::NAMESPACE
        .get()
        .map_or("pgtide", String::as_str);
    CliError::not_found(format!(
        "stream {name:?} does not exist in namespace {namespace:?}: nothing to delete (check the name and --namespace; `pgtide stream list` shows the streams)"
    ))
}

/// `stream ...`.
pub async fn stream<B: Target>(b: &B, command: StreamCommand) -> CliResult {
    match command {
        StreamCommand::Create {
            name,
            options,
            if_not_exists,
        } => {
            let config = apply(StreamConfig::default(), &options)?;
            match b.postgres() {
                Some(pg) if !if_not_exists => pg.create_stream(&name, &config).await?,
                // Other backends create idempotently: an existing stream is reported, not changed.
                _ => {
                    if !b.ensure_stream(&name, &config).await? {
                        if !if_not_exists {
                            return Err(CliError::new(
                                crate::error::EXISTS,
                                format!("stream {name:?} already exists: use --if-not-exists to accept that"),
                            ));
                        }
                        println!("stream {name:?} exists; left unchanged");
                        return Ok(());
                    }
                }
            }
            println!("created stream {name:?}");
        }
        StreamCommand::Delete { name } => {
            if !b.delete_stream(&name).await? {
                return Err(nothing_to_delete(&name));
            }
            println!("deleted stream {name:?} with its groups, messages and dead letters");
        }
        StreamCommand::Purge { name } => {
            pgtide::validate_name("stream", &name)?;
            match b.postgres() {
                Some(pg) => {
                    let n = pg.purge(&name).await?;
                    println!(
                        "purged stream {name:?}: {} dropped, with its messages and dead letters; its groups stay",
                        plural(n, "pending delivery", "pending deliveries")
                    );
                }
                None => {
                    b.purge(&name).await?;
                    println!("purged stream {name:?}; its groups stay");
                }
            }
        }
        StreamCommand::Update { name, options } => {
            let pg = b.require_postgres("stream update")?;
            let current = pg
                .stream(&name)
                .await?
                .ok_or_else(|| not_found_stream(&name))?;
            pg.update_stream(&name, &apply(current.config, &options)?)
                .await?;
            println!("updated stream {name:?}");
        }
        StreamCommand::List { json } => {
            list_streams(b.require_postgres("stream list")?, json).await?
        }
        StreamCommand::Show { name, json } => {
            show_stream(b.require_postgres("stream show")?, &name, json).await?
        }
    }
    Ok(())
}

async fn list_streams(pg: &PgBackend, json: bool) -> CliResult {
    let streams = pg.streams().await?;
    if json {
        let list: Vec<_> = streams.iter().map(stream_json).collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        let rows: Vec<Vec<String>> = streams
            .iter()
            .map(|s| {
                let c = &s.config;
                vec![
                    s.name.clone(),
                    format_duration(c.lease),
                    c.max_deliver.to_string(),
                    format_duration(c.retention),
                    format_duration(c.partition_interval),
                    format_duration(c.dedupe_window),
                    c.max_payload.to_string(),
                    format_time(s.created_at),
                ]
            })
            .collect();
        print_table(
            &[
                "STREAM",
                "LEASE",
                "MAX_DELIVER",
                "RETENTION",
                "PARTITION",
                "DEDUPE",
                "MAX_PAYLOAD",
                "CREATED",
            ],
            &rows,
        );
    }
    Ok(())
}

async fn show_stream(pg: &PgBackend, name: &str, json: bool) -> CliResult {
    let info = pg
        .stream(name)
        .await?
        .ok_or_else(|| not_found_stream(name))?;
    let stats: Vec<_> = pg
        .stats_all()
        .await?
        .into_iter()
        .filter(|s| s.stream == name && s.group.is_some())
        .collect();
    if json {
        let mut v = stream_json(&info);
        v["groups"] = stats
            .iter()
            .map(|s| {
                json!({
                    "group": s.group, "ready": s.ready, "delayed": s.delayed,
                    "in_flight": s.in_flight, "dead": s.dead,
                    "oldest_ready_age_secs": s.oldest_ready_age.map(|d| d.as_secs_f64()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let c = &info.config;
    let backoff: Vec<String> = c
        .backoff
        .schedule
        .iter()
        .map(|d| format_duration(*d))
        .collect();
    println!("stream:             {}", info.name);
    println!("lease:              {}", format_duration(c.lease));
    println!("max deliver:        {}", c.max_deliver);
    println!(
        "backoff:            {} (jitter {})",
        backoff.join(","),
        jitter(c.backoff.jitter)
    );
    println!("retention:          {}", format_duration(c.retention));
    println!(
        "partition interval: {}",
        format_duration(c.partition_interval)
    );
    println!("dedupe window:      {}", format_duration(c.dedupe_window));
    println!("max payload:        {} bytes", c.max_payload);
    println!("created:            {}", format_time(info.created_at));
    println!();
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.group.clone().unwrap_or_default(),
                s.ready.to_string(),
                s.delayed.to_string(),
                s.in_flight.to_string(),
                s.dead.to_string(),
                s.oldest_ready_age
                    .map(format_age)
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        &["GROUP", "READY", "DELAYED", "IN_FLIGHT", "DEAD", "OLDEST"],
        &rows,
    );
    Ok(())
}

fn point_text(point: Point) -> String {
    match point {
        Point::Oldest => "the oldest retained message".to_owned(),
        Point::New => "new messages".to_owned(),
        Point::At(t) => format!("messages published from {}", format_time(t)),
    }
}

/// `group ...`.
pub async fn group<B: Target>(b: &B, command: GroupCommand) -> CliResult {
    match command {
        GroupCommand::Create {
            stream,
            group,
            from,
            if_not_exists,
            ordered,
            max_in_flight,
            max_in_flight_per_key,
            rate,
            burst,
            key_rate,
            key_burst,
            fair,
        } => {
            let point = parse_point(&from).map_err(CliError::usage)?;
            let start = match point {
                Point::Oldest => GroupStart::Oldest,
                Point::New | Point::At(_) => GroupStart::New,
            };
            let mut config = GroupConfig::default()
                .start(start)
                .ordered(ordered)
                .fair_share(fair);
            if let Some(limit) = max_in_flight {
                config = config.max_in_flight(limit);
            }
            if let Some(limit) = max_in_flight_per_key {
                config = config.max_in_flight_per_key(limit);
            }
            if let Some(r) = rate {
                config = config.rate_limit(burst.map_or(r, |b| r.burst(b)));
            }
            if let Some(r) = key_rate {
                config = config.rate_limit_per_key(key_burst.map_or(r, |b| r.burst(b)));
            }
            let created = match b.postgres() {
                Some(pg) if !if_not_exists => {
                    pg.create_group_with(&stream, &group, &config).await?;
                    true
                }
                _ => {
                    if let Point::At(_) = point {
                        b.require_postgres("group create --from <time or age>")?;
                    }
                    b.ensure_group_with(&stream, &group, &config).await?
                }
            };
            if !created {
                if !if_not_exists {
                    return Err(pgtide::Error::GroupExists { stream, group }.into());
                }
                println!("group {group:?} exists on stream {stream:?}; left unchanged");
                return Ok(());
            }
            if let Point::At(t) = point {
                b.require_postgres("group create --from <time or age>")?
                    .reset_group(&stream, &group, Some(t))
                    .await?;
            }
            println!(
                "created {}group {group:?} on stream {stream:?}, starting with {}",
                if ordered {
                    "ordered "
                } else if fair {
                    "fair "
                } else {
                    ""
                },
                point_text(point)
            );
        }
        GroupCommand::Keys {
            stream,
            group,
            limit,
            json,
        } => {
            let pg = b.require_postgres("group keys")?;
            // A missing group is "not found", not an empty list.
            pg.consumer(&stream, &group, "cli-keys").await?;
            let fair = pg
                .groups(Some(&stream))
                .await?
                .iter()
                .any(|g| g.name == group && g.fair_share);
            if fair {
                // A fair group's keys are not tracked one by one: its weights are what it keeps.
                let weights = pg.key_weights(&stream, &group, limit as usize).await?;
                if json {
                    let list: Vec<_> = weights
                        .iter()
                        .map(|(k, w)| json!({"key": k, "weight": w}))
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                } else {
                    let rows: Vec<Vec<String>> = weights
                        .iter()
                        .map(|(k, w)| {
                            vec![
                                k.clone().unwrap_or_else(|| "(no key)".into()),
                                w.to_string(),
                            ]
                        })
                        .collect();
                    print_table(&["KEY", "WEIGHT"], &rows);
                    println!("(every other key weighs 1)");
                }
                return Ok(());
            }
            let keys = pg.keys(&stream, &group, limit as usize).await?;
            if json {
                let list: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        json!({
                            "key": k.key,
                            "pending": k.pending,
                            "waiting": k.waiting,
                            "head_state": k.head_state,
                            "resumes_at": k.resumes_at.map(format_time),
                            "consumer": k.consumer,
                            "oldest_age_secs": k.oldest_age.as_secs_f64(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.key.clone(),
                            k.pending.to_string(),
                            k.waiting.to_string(),
                            k.head_state.clone().unwrap_or_default(),
                            k.resumes_at.map(format_time).unwrap_or_default(),
                            k.consumer.clone().unwrap_or_default(),
                            format_duration(k.oldest_age),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "KEY", "PENDING", "WAITING", "HEAD", "RESUMES", "CONSUMER", "OLDEST",
                    ],
                    &rows,
                );
            }
        }
        GroupCommand::Rate {
            stream,
            group,
            rate,
            burst,
            per_key,
        } => {
            let pg = b.require_postgres("group rate")?;
            let limit = match rate {
                RateSetting::Limit(r) => Some(burst.map_or(r, |b| r.burst(b))),
                RateSetting::Off if burst.is_some() => {
                    return Err(CliError::usage("--burst needs a rate, not `off`"))
                }
                RateSetting::Off => None,
            };
            if per_key {
                pg.set_rate_limit_per_key(&stream, &group, limit).await?;
            } else {
                pg.set_rate_limit(&stream, &group, limit).await?;
            }
            let whose = if per_key {
                "each key of group"
            } else {
                "group"
            };
            match limit {
                Some(l) => println!(
                    "{whose} {group:?} of stream {stream:?}: at most {} deliveries per second, burst {}",
                    l.rate(),
                    l.burst_size()
                ),
                None => println!("{whose} {group:?} of stream {stream:?}: no rate limit"),
            }
        }
        GroupCommand::Weight {
            stream,
            group,
            key,
            weight,
        } => {
            let pg = b.require_postgres("group weight")?;
            let weight = match weight {
                WeightSetting::Weight(w) => Some(w),
                WeightSetting::Default => None,
            };
            pg.set_key_weight(&stream, &group, Some(&key), weight)
                .await?;
            println!(
                "key {key:?} of group {group:?} of stream {stream:?}: weight {}",
                weight.unwrap_or(1.0)
            );
        }
        GroupCommand::Limit {
            stream,
            group,
            limit,
            per_key,
        } => {
            let pg = b.require_postgres("group limit")?;
            let limit = match limit {
                LimitSetting::Limit(n) => Some(n),
                LimitSetting::Off => None,
            };
            if per_key {
                pg.set_max_in_flight_per_key(&stream, &group, limit).await?;
            } else {
                pg.set_max_in_flight(&stream, &group, limit).await?;
            }
            let whose = if per_key {
                "each key of group"
            } else {
                "group"
            };
            match limit {
                Some(n) => println!(
                    "{whose} {group:?} of stream {stream:?}: at most {n} deliveries in flight"
                ),
                None => println!("{whose} {group:?} of stream {stream:?}: no concurrency limit"),
            }
        }
        GroupCommand::Delete { stream, group } => {
            if !b.delete_group(&stream, &group).await? {
                return Err(CliError::not_found(format!(
                    "group {group:?} does not exist on stream {stream:?}: nothing to delete (`pgtide group list {stream}` shows its groups)"
                )));
            }
            println!("deleted group {group:?} of stream {stream:?}");
        }
        GroupCommand::List { stream, json } => {
            let pg = b.require_postgres("group list")?;
            if let Some(s) = &stream {
                pg.stream(s).await?.ok_or_else(|| not_found_stream(s))?;
            }
            let groups = pg.groups(stream.as_deref()).await?;
            if json {
                let list: Vec<_> = groups
                    .iter()
                    .map(|g| json!({"stream": g.stream, "group": g.name, "created_at": format_time(g.created_at), "ordered": g.ordered, "fair": g.fair_share, "max_in_flight": g.max_in_flight, "max_in_flight_per_key": g.max_in_flight_per_key,
                        "rate": g.rate_limit.map(|r| r.rate()), "burst": g.rate_limit.map(|r| r.burst_size()),
                        "key_rate": g.rate_limit_per_key.map(|r| r.rate()), "key_burst": g.rate_limit_per_key.map(|r| r.burst_size())}))
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                let rows: Vec<Vec<String>> = groups
                    .iter()
                    .map(|g| {
                        vec![
                            g.stream.clone(),
                            g.name.clone(),
                            format_time(g.created_at),
                            if g.ordered { "yes" } else { "no" }.to_owned(),
                            if g.fair_share { "yes" } else { "no" }.to_owned(),
                        ]
                    })
                    .collect();
                print_table(&["STREAM", "GROUP", "CREATED", "ORDERED", "FAIR"], &rows);
            }
        }
        GroupCommand::Reset {
            stream,
            group,
            from,
        } => {
            let pg = b.require_postgres("group reset")?;
            let point = parse_point(&from).map_err(CliError::usage)?;
            let at = match point {
                Point::Oldest => None,
                Point::New => Some(Utc::now()),
                Point::At(t) => Some(t),
            };
            let (skipped, queued) = pg.reset_group(&stream, &group, at).await?;
            println!(
                "reset group {group:?} of stream {stream:?} to {}: {} skipped, {} queued again",
                point_text(point),
                plural(skipped, "delivery", "deliveries"),
                plural(queued, "message", "messages")
            );
        }
    }
    Ok(())
}

/// `trim STREAM`.
pub async fn trim(
    pg: &PgBackend,
    stream: &str,
    max_age: Option<Duration>,
    max_len: Option<u64>,
) -> CliResult {
    let removed = pg.trim_stream(stream, max_age, max_len).await?;
    println!(
        "trimmed {} from stream {stream:?}",
        plural(removed, "message", "messages")
    );
    Ok(())
}
