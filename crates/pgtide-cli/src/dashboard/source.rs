//! What the dashboard reads. On Postgres: every stream and group of the namespace (the registry),
//! publish counts for the rates, the scout lease and this process's listener. On another backend
//! (`--backend nats://…`, `redis://…`, `amqp://…`): the groups named with `--group`, through the
//! `Queue` trait, which gives their counts, oldest ready age and dead letters, and nothing more
//! (no registry to list, no publish counts, no scout, no SQL to replay with).

use std::time::Instant;

use chrono::Utc;
use pgtide::{AnyBackend, DeadLetter, PgBackend, Queue};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::{CliError, CliResult};
use crate::stats::Sample;

/// Most groups one dashboard of a broker samples (each is one stats call per interval).
pub(crate) const MAX_GROUPS: usize = 100;

/// Most dead letters looked through to show one by id on a broker (its trait lists, oldest
/// first; it has no lookup by id).
const SHOW_SCAN: usize = 1000;

/// The backend behind the page.
pub(crate) enum Source {
    Postgres(PgBackend),
    Queue {
        queue: AnyBackend,
        namespace: String,
        /// (stream, group), as given with `--group`.
        groups: Vec<(String, String)>,
    },
}

impl Source {
    /// The Postgres engine (every group), or a broker with the groups given. `groups` are
    /// `STREAM/GROUP` pairs, required on a broker and refused on Postgres.
    pub(crate) fn new(queue: AnyBackend, namespace: &str, groups: &[String]) -> CliResult<Source> {
        if let AnyBackend::Postgres(pg) = queue {
            if !groups.is_empty() {
                return Err(CliError::usage(
                    "--group is for backends without a registry: on Postgres the dashboard shows every stream and group of the namespace",
                ));
            }
            return Ok(Source::Postgres(pg));
        }
        if groups.is_empty() {
            return Err(CliError::usage(format!(
                "the {} backend cannot list its streams and groups: name the ones to show with --group STREAM/GROUP (repeatable)",
                queue.kind()
            )));
        }
        if groups.len() > MAX_GROUPS {
            return Err(CliError::usage(format!(
                "at most {MAX_GROUPS} --group per dashboard"
            )));
        }
        let mut pairs: Vec<(String, String)> = vec![];
        for g in groups {
            let (stream, group) = g.split_once('/').ok_or_else(|| {
                CliError::usage(format!(
                    "--group {:?} is not STREAM/GROUP (e.g. orders/billing)",
                    g.chars().take(140).collect::<String>()
                ))
            })?;
            pgtide::validate_name("stream", stream)?;
            pgtide::validate_name("group", group)?;
            let pair = (stream.to_owned(), group.to_owned());
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
        Ok(Source::Queue {
            queue,
            namespace: namespace.to_owned(),
            groups: pairs,
        })
    }

    /// The Postgres engine, when that is the backend.
    pub(crate) fn postgres(&self) -> Option<&PgBackend> {
        match self {
            Source::Postgres(pg) => Some(pg),
            Source::Queue { .. } => None,
        }
    }

    /// `postgres`, `nats`, `redis`, `amqp` or `memory`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Source::Postgres(_) => "postgres",
            Source::Queue { queue, .. } => queue.kind(),
        }
    }

    pub(crate) fn namespace(&self) -> &str {
        match self {
            Source::Postgres(pg) => pg.namespace(),
            Source::Queue { namespace, .. } => namespace,
        }
    }

    /// The stats of every group shown (with publish counts on Postgres).
    pub(crate) async fn sample(&self) -> CliResult<Sample> {
        match self {
            Source::Postgres(pg) => crate::stats::sample_all(pg).await,
            Source::Queue { queue, groups, .. } => {
                let mut stats = Vec::with_capacity(groups.len());
                for (stream, group) in groups {
                    stats.push(queue.stats(stream, group).await?);
                }
                Ok(Sample {
                    at: Instant::now(),
                    wall: Utc::now(),
                    groups: stats,
                    published: None,
                })
            }
        }
    }

    /// The scout and listener cards: Postgres's, or why a broker has none.
    pub(crate) async fn engine_status(&self) -> (Value, Value) {
        match self {
            Source::Postgres(pg) => {
                let scout = match pg.scout_lease().await {
                    Ok(Some(l)) => json!({
                        "holder": l.holder, "term": l.term,
                        "since": l.since.map(crate::human::format_time),
                        "expires_at": crate::human::format_time(l.expires_at),
                    }),
                    Ok(None) => json!({"holder": null}),
                    Err(e) => json!({"error": CliError::from(e).message}),
                };
                let l = pg.listener_status();
                let listener = json!({
                    "connected": l.connected,
                    "last_notification_at": l.last_notification_at.map(crate::human::format_time),
                    "reconnects": l.reconnects,
                    "restarts": l.restarts,
                    "last_error": l.last_error,
                });
                (scout, listener)
            }
            Source::Queue { queue, .. } => {
                let none = format!(
                    "none on the {} backend: the scout and the LISTEN wake-ups belong to the Postgres engine",
                    queue.kind()
                );
                (json!({"unavailable": none}), json!({"unavailable": none}))
            }
        }
    }

    /// The groups a dead-letter request applies to: the one given (checked), or every group of
    /// the stream (on a broker, of those shown).
    pub(crate) async fn groups_of(
        &self,
        stream: &str,
        group: Option<&str>,
    ) -> CliResult<Vec<String>> {
        match self {
            Source::Postgres(pg) => crate::dead::groups_of(pg, stream, group).await,
            Source::Queue { groups, .. } => {
                pgtide::validate_name("stream", stream)?;
                if let Some(g) = group {
                    pgtide::validate_name("group", g)?;
                }
                let found: Vec<String> = groups
                    .iter()
                    .filter(|(s, g)| s == stream && group.map_or(true, |want| g == want))
                    .map(|(_, g)| g.clone())
                    .collect();
                if found.is_empty() {
                    return Err(CliError::not_found(format!(
                        "{stream:?}{} is not shown by this dashboard (started with --group {})",
                        group.map(|g| format!("/{g:?}")).unwrap_or_default(),
                        groups
                            .iter()
                            .map(|(s, g)| format!("{s}/{g}"))
                            .collect::<Vec<_>>()
                            .join(" --group ")
                    )));
                }
                Ok(found)
            }
        }
    }

    pub(crate) async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> pgtide::Result<Vec<DeadLetter>> {
        match self {
            Source::Postgres(pg) => pg.dead_letters(stream, group, limit).await,
            Source::Queue { queue, .. } => queue.dead_letters(stream, group, limit).await,
        }
    }

    /// One dead letter by id (on a broker, among its oldest [`SHOW_SCAN`]).
    pub(crate) async fn dead_letter(
        &self,
        stream: &str,
        group: &str,
        id: Uuid,
    ) -> pgtide::Result<Option<DeadLetter>> {
        match self {
            Source::Postgres(pg) => pg.dead_letter(stream, group, id).await,
            Source::Queue { queue, .. } => Ok(queue
                .dead_letters(stream, group, SHOW_SCAN)
                .await?
                .into_iter()
                .find(|d| d.id == id)),
        }
    }
}
