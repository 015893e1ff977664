//! `dead list|show|replay|purge`: dead letters of one group, or of every group of a stream.
//!
//! On backends other than Postgres, `dead list --group G` reads one group through
//! `Queue::dead_letters`; the rest needs the Postgres registry and SQL.

use pgtide::{DeadLetter, PgBackend};
use serde_json::json;

use crate::backend::{unsupported, Target};
use crate::cli::{DeadCommand, DeadSelection};
use crate::error::{CliError, CliResult};
use crate::human::{format_time, payload_json, plural, print_table};

/// The groups a command applies to: the one given (checked), or every group of the stream.
pub(crate) async fn groups_of(
    pg: &PgBackend,
    stream: &str,
    group: Option<&str>,
) -> CliResult<Vec<String>> {
    pgtide::validate_name("stream", stream)?;
    if pg.stream(stream).await?.is_none() {
        return Err(pgtide::Error::StreamNotFound(stream.to_owned()).into());
    }
    let all: Vec<String> = pg
        .groups(Some(stream))
        .await?
        .into_iter()
        .map(|g| g.name)
        .collect();
    match group {
        None => Ok(all),
        Some(g) if all.iter().any(|x| x == g) => Ok(vec![g.to_owned()]),
        Some(g) => {
            pgtide::validate_name("group", g)?;
            Err(pgtide::Error::GroupNotFound {
                stream: stream.to_owned(),
                group: g.to_owned(),
            }
            .into())
        }
    }
}

pub(crate) fn dead_json(d: &DeadLetter) -> serde_json::Value {
    let (payload, encoding) = match &d.payload {
        Some(bytes) => {
            let (v, e) = payload_json(bytes, None);
            (v, Some(e))
        }
        None => (serde_json::Value::Null, None),
    };
    json!({
        "id": d.id,
        "stream": d.stream,
        "group": d.group,
        "attempts": d.attempts,
        "reason": d.reason,
        "error": d.error,
        "dead_at": format_time(d.dead_at),
        "headers": d.headers,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// `dead ...`.
pub async fn run<B: Target>(b: &B, command: DeadCommand) -> CliResult {
    match command {
        DeadCommand::List {
            stream,
            group,
            limit,
            json,
        } => {
            let groups = match (b.postgres(), group) {
                (Some(pg), group) => groups_of(pg, &stream, group.as_deref()).await?,
                (None, Some(g)) => vec![g],
                (None, None) => {
                    return Err(unsupported("`pgtide dead list` without --group", b.kind()))
                }
            };
            let mut rows = vec![];
            for g in groups {
                for d in b.dead_letters(&stream, &g, limit).await? {
                    if json {
                        println!("{}", dead_json(&d));
                    } else {
                        rows.push(vec![
                            d.group.clone(),
                            d.id.to_string(),
                            d.attempts.to_string(),
                            d.reason.clone(),
                            format_time(d.dead_at),
                            d.error.clone().unwrap_or_default().replace('\n', " "),
                        ]);
                    }
                }
            }
            if !json {
                print_table(
                    &["GROUP", "ID", "ATTEMPTS", "REASON", "DEAD_AT", "ERROR"],
                    &rows,
                );
            }
        }
        DeadCommand::Show { stream, group, id } => {
            let pg = b.require_postgres("dead show")?;
            let mut found = false;
            for g in groups_of(pg, &stream, group.as_deref()).await? {
                if let Some(d) = pg.dead_letter(&stream, &g, id).await? {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&dead_json(&d)).unwrap_or_default()
                    );
                    found = true;
                }
            }
            if !found {
                return Err(CliError::not_found(format!(
                    "message {id} is not a dead letter of stream {stream:?}{}: list them with `pgtide dead list {stream}`",
                    group.map(|g| format!(" group {g:?}")).unwrap_or_default()
                )));
            }
        }
        DeadCommand::Replay(sel) => settle(b.require_postgres("dead replay")?, sel, true).await?,
        DeadCommand::Purge(sel) => settle(b.require_postgres("dead purge")?, sel, false).await?,
    }
    Ok(())
}

/// Replays (`replay`) or purges the selected dead letters.
async fn settle(pg: &PgBackend, sel: DeadSelection, replay: bool) -> CliResult {
    let ids = if sel.all {
        None
    } else {
        Some(sel.ids.as_slice())
    };
    let mut total = 0;
    for g in groups_of(pg, &sel.stream, sel.group.as_deref()).await? {
        let n = if replay {
            pg.replay_dead(&sel.stream, &g, ids).await?
        } else {
            pg.purge_dead(&sel.stream, &g, ids).await?
        };
        if n > 0 {
            println!(
                "{} {} of group {g:?}",
                if replay { "replayed" } else { "purged" },
                plural(n, "dead letter", "dead letters")
            );
        }
        total += n;
    }
    if total == 0 && ids.is_some() {
        return Err(CliError::not_found(format!(
            "no dead letter with the given id(s) in stream {:?}{}: list them with `pgtide dead list {}`",
            sel.stream,
            sel.group.map(|g| format!(" group {g:?}")).unwrap_or_default(),
            sel.stream
        )));
    }
    if total == 0 {
        println!("no dead letters");
    }
    Ok(())
}
