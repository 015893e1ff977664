//! The JSON endpoints and the event stream. Every input is checked before it reaches the
//! library: names by its validators, ids parsed as UUIDs, limits bounded; a malformed path,
//! query or body is a JSON 4xx, never a panic or a 5xx.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use serde_json::{json, Value};
use uuid::Uuid;

use super::error::{rejection, ApiError};
use super::AppState;
use crate::dead::dead_json;

type ApiResult = Result<Json<Value>, ApiError>;

/// Most dead letters one list request returns.
const MAX_LIMIT: usize = 500;
/// Most ids one replay or purge request names.
const MAX_IDS: usize = 1000;

/// `GET /api/overview`: the latest sample.
pub(crate) async fn overview(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(with_writes(&s, s.sampler.latest().overview.clone()))
}

fn with_writes(s: &AppState, mut overview: Value) -> Value {
    overview["writes"] = json!(s.auth.enabled());
    overview
}

/// `GET /api/history`: the charts' points of the last hour (this process's samples only).
pub(crate) async fn history(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(s.sampler.history())
}

/// `GET /api/events`: one `sample` event per sample (overview and new chart point), the
/// current one first.
pub(crate) async fn events(
    State(s): State<Arc<AppState>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = s.sampler.subscribe();
    let state = s.clone();
    let stream = futures_util::stream::unfold(
        (rx, state, true),
        |(mut rx, state, first)| async move {
            // The first event is the current sample; later ones wait for a new one. The stream ends
            // when the sampler stops (shutdown).
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let latest = rx.borrow_and_update().clone();
            let data = json!({
                "overview": with_writes(&state, latest.overview.clone()),
                "point": if first { Value::Null } else { latest.point.clone().unwrap_or(Value::Null) },
            });
            let event = Event::default().event("sample").data(data.to_string());
            Some((Ok(event), (rx, state, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Query of `GET /api/dead`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct DeadQuery {
    stream: String,
    group: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/dead?stream=S[&group=G][&limit=N]`: dead letters of a group, or of every group of
/// the stream, oldest first.
pub(crate) async fn dead_list(
    State(s): State<Arc<AppState>>,
    q: Result<Query<DeadQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(rejection)?;
    let limit = match q.limit {
        None => 50,
        Some(n @ 1..=MAX_LIMIT) => n,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "limit {n} is out of range: use 1-{MAX_LIMIT}"
            )))
        }
    };
    let group = q.group.filter(|g| !g.is_empty());
    let mut letters = vec![];
    for g in s.source.groups_of(&q.stream, group.as_deref()).await? {
        let room = limit - letters.len();
        if room == 0 {
            break;
        }
        letters.extend(
            s.source
                .dead_letters(&q.stream, &g, room)
                .await?
                .iter()
                .map(dead_json),
        );
    }
    Ok(Json(json!({ "dead_letters": letters })))
}

/// `GET /api/dead/{stream}/{group}/{id}`: one dead letter with payload and headers.
pub(crate) async fn dead_show(
    State(s): State<Arc<AppState>>,
    p: Result<Path<(String, String, String)>, PathRejection>,
) -> ApiResult {
    let Path((stream, group, id)) = p.map_err(rejection)?;
    let id = parse_id(&id)?;
    let group = one_group(&s, &stream, &group).await?;
    match s.source.dead_letter(&stream, &group, id).await? {
        Some(d) => Ok(Json(dead_json(&d))),
        None => Err(ApiError::not_found(format!(
            "message {id} is not a dead letter of stream {stream:?} group {group:?}"
        ))),
    }
}

/// Body of a replay or purge: the ids, or `all: true`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Selection {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// `POST /api/dead/{stream}/{group}/replay` (needs --allow-writes and the token).
pub(crate) async fn dead_replay(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<Selection>, JsonRejection>,
) -> ApiResult {
    settle(&s, &headers, p, body, true).await
}

/// `POST /api/dead/{stream}/{group}/purge` (needs --allow-writes and the token).
pub(crate) async fn dead_purge(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<Selection>, JsonRejection>,
) -> ApiResult {
    settle(&s, &headers, p, body, false).await
}

async fn settle(
    s: &AppState,
    headers: &HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<Selection>, JsonRejection>,
    replay: bool,
) -> ApiResult {
    // The token first: without it, nothing about the request is looked at.
    s.auth.check(headers)?;
    let Path((stream, group)) = p.map_err(rejection)?;
    let Json(sel) = body.map_err(rejection)?;
    let ids = match (sel.all, sel.ids.len()) {
        (true, 0) => None,
        (true, _) => {
            return Err(ApiError::bad_request(
                "give either ids or all: true, not both",
            ))
        }
        (false, 0) => {
            return Err(ApiError::bad_request(
                "give ids (a list of message ids) or all: true",
            ))
        }
        (false, n) if n > MAX_IDS => {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_IDS} ids per request"
            )))
        }
        (false, _) => Some(
            sel.ids
                .iter()
                .map(|i| parse_id(i))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let group = one_group(s, &stream, &group).await?;
    // Writes are allowed on Postgres only (checked at start); a broker has no replay.
    let pg = s
        .source
        .postgres()
        .ok_or_else(|| ApiError::forbidden("writes are disabled on this backend"))?;
    let n = if replay {
        pg.replay_dead(&stream, &group, ids.as_deref()).await?
    } else {
        pg.purge_dead(&stream, &group, ids.as_deref()).await?
    };
    tracing::info!(
        stream,
        group,
        count = n,
        replay,
        "pgtide dashboard: dead letters settled"
    );
    let verb = if replay { "replayed" } else { "purged" };
    Ok(Json(json!({ verb: n })))
}

/// The group, checked to exist in the stream (names validated by the library).
async fn one_group(s: &AppState, stream: &str, group: &str) -> Result<String, ApiError> {
    pgtide::validate_name("group", group)?;
    let mut groups = s.source.groups_of(stream, Some(group)).await?;
    groups
        .pop()
        .ok_or_else(|| ApiError::not_found(format!("group {group:?} not found")))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(id).map_err(|_| {
        ApiError::bad_request(format!(
            "{:?} is not a message id: use a UUID such as 0190f6c4-…",
            id.chars().take(64).collect::<String>()
        ))
    })
}

/// Any other path.
pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such page or endpoint")
}
