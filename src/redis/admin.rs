//! Registry and inspection: ensure/delete streams and groups, purge, stats, dead letters.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{array, broker, bytes, int, script_error, text, RedisBackend};
use crate::config::{Backoff, GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{uuid_time, DeadLetter, GroupStats, Headers};

/// A stream's config as stored in the registry (`config` field of the meta hash, and the
/// namespace-wide `streams` hash).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StoredConfig {
    lease_ms: u64,
    max_deliver: u32,
    backoff_ms: Vec<u64>,
    jitter: f32,
    retention_ms: u64,
    partition_interval_ms: u64,
    dedupe_window_ms: u64,
    max_payload: usize,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&StreamConfig> for StoredConfig {
    fn from(c: &StreamConfig) -> Self {
        StoredConfig {
            // Leases are whole milliseconds; validate() guarantees at least 1 ms.
            lease_ms: ms(c.lease).max(1),
            max_deliver: c.max_deliver,
            backoff_ms: c.backoff.schedule.iter().map(|d| ms(*d)).collect(),
            jitter: c.backoff.jitter,
            retention_ms: ms(c.retention),
            partition_interval_ms: ms(c.partition_interval),
            dedupe_window_ms: ms(c.dedupe_window),
            max_payload: c.max_payload,
        }
    }
}

impl StoredConfig {
    pub(super) fn to_config(&self) -> StreamConfig {
        StreamConfig::default()
            .lease(Duration::from_millis(self.lease_ms))
            .max_deliver(self.max_deliver)
            .backoff(
                Backoff::schedule(self.backoff_ms.iter().map(|m| Duration::from_millis(*m)))
                    .jitter(self.jitter),
            )
            .retention(Duration::from_millis(self.retention_ms))
            .partition_interval(Duration::from_millis(self.partition_interval_ms))
            .dedupe_window(Duration::from_millis(self.dedupe_window_ms))
            .max_payload(self.max_payload)
    }
}

pub(super) async fn ensure_stream(
    b: &RedisBackend,
    stream: &str,
    config: &StreamConfig,
) -> Result<bool> {
    validate_name("stream", stream)?;
    config.validate()?;
    let keys = b.keys(stream);
    let stored = StoredConfig::from(config);
    let json = serde_json::to_string(&stored)?;
    let mut conn = b.conn();
    let created: i64 = b
        .inner
        .scripts
        .ensure_stream
        .key(&keys.meta)
        .arg(stored.lease_ms)
        .arg(stored.max_deliver)
        .arg(stored.retention_ms)
        .arg(stored.dedupe_window_ms)
        .arg(stored.max_payload)
        .arg(&json)
        .invoke_async(&mut conn)
        .await
        .map_err(broker)?;
    // The listing registry lives in another hash slot, so it is written separately (idempotent).
    let _: i64 = conn
        .hset(&keys.registry, stream, &json)
        .await
        .map_err(broker)?;
    Ok(created == 1)
}

pub(super) async fn delete_stream(b: &RedisBackend, stream: &str) -> Result<bool> {
    validate_name("stream", stream)?;
    let keys = b.keys(stream);
    let mut conn = b.conn();
    let existed: i64 = b
        .inner
        .scripts
        .purge
        .key(&keys.meta)
        .key(&keys.groups)
        .key(&keys.log)
        .key(&keys.delayed)
        .key(&keys.wake)
        .arg("delete")
        .arg(keys.group_prefix())
        .invoke_async(&mut conn)
        .await
        .map_err(broker)?;
    let _: i64 = conn.hdel(&keys.registry, stream).await.map_err(broker)?;
    forget_dedupe_keys(b, &keys.dedupe_pattern()).await?;
    Ok(existed == 1)
}

/// Deletes a stream's dedupe keys (SCAN, so it never blocks the server for long).
async fn forget_dedupe_keys(b: &RedisBackend, pattern: &str) -> Result<()> {
    let mut conn = b.conn();
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(broker)?;
        if !found.is_empty() {
            let _: i64 = conn.unlink(&found).await.map_err(broker)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

pub(super) async fn ensure_group(
    b: &RedisBackend,
    stream: &str,
    group: &str,
    start: GroupStart,
) -> Result<bool> {
    validate_name("stream", stream)?;
    validate_name("group", group)?;
    let keys = b.keys(stream);
    let g = keys.group(group);
    let info = serde_json::json!({
        "start": start.as_sql(),
        "created_at": Utc::now().to_rfc3339(),
    });
    let created: i64 = b
        .inner
        .scripts
        .ensure_group
        .key(&keys.meta)
        .key(&keys.groups)
        .key(&keys.log)
        .key(&g.retry)
        .arg(group)
        .arg(match start {
            GroupStart::New => "$",
            GroupStart::Oldest => "0",
        })
        .arg(info.to_string())
        .invoke_async(&mut b.conn())
        .await
        .map_err(|e| script_error(e, stream, Some(group)))?;
    Ok(created == 1)
}

pub(super) async fn delete_group(b: &RedisBackend, stream: &str, group: &str) -> Result<bool> {
    validate_name("stream", stream)?;
    validate_name("group", group)?;
    let keys = b.keys(stream);
    let g = keys.group(group);
    let existed: i64 = b
        .inner
        .scripts
        .delete_group
        .key(&keys.meta)
        .key(&keys.groups)
        .key(&keys.log)
        .key(&g.retry)
        .key(&g.later)
        .key(&g.leases)
        .key(&g.dead)
        .arg(group)
        .invoke_async(&mut b.conn())
        .await
        .map_err(|e| script_error(e, stream, Some(group)))?;
    Ok(existed == 1)
}

pub(super) async fn purge(b: &RedisBackend, stream: &str) -> Result<()> {
    validate_name("stream", stream)?;
    let keys = b.keys(stream);
    let _: i64 = b
        .inner
        .scripts
        .purge
        .key(&keys.meta)
        .key(&keys.groups)
        .key(&keys.log)
        .key(&keys.delayed)
        .key(&keys.wake)
        .arg("purge")
        .arg(keys.group_prefix())
        .invoke_async(&mut b.conn())
        .await
        .map_err(|e| script_error(e, stream, None))?;
    forget_dedupe_keys(b, &keys.dedupe_pattern()).await
}

pub(super) async fn stats(b: &RedisBackend, stream: &str, group: &str) -> Result<GroupStats> {
    validate_name("stream", stream)?;
    validate_name("group", group)?;
    let keys = b.keys(stream);
    let g = keys.group(group);
    let reply: redis::Value = b
        .inner
        .scripts
        .stats
        .key(&keys.meta)
        .key(&keys.groups)
        .key(&keys.log)
        .key(&keys.delayed)
        .key(&g.retry)
        .key(&g.later)
        .key(&g.leases)
        .key(&g.dead)
        .arg(group)
        .invoke_async(&mut b.conn())
        .await
        .map_err(|e| script_error(e, stream, Some(group)))?;
    let mut r = array(reply)?.into_iter();
    let mut next_int = || r.next().as_ref().map_or(Ok(0), int);
    let (ready, delayed, in_flight, dead) = (next_int()?, next_int()?, next_int()?, next_int()?);
    let now = Utc::now();
    let oldest_ready_age = match r.next() {
        Some(ids) if ready > 0 => array(ids)?
            .into_iter()
            .filter_map(|v| text(v).ok()?.parse::<Uuid>().ok())
            .map(|id| (now - uuid_time(&id)).to_std().unwrap_or_default())
            .max(),
        _ => None,
    };
    Ok(GroupStats {
        stream: stream.to_owned(),
        group: Some(group.to_owned()),
        ready,
        delayed,
        in_flight,
        dead,
        oldest_ready_age,
    })
}

pub(super) async fn dead_letters(
    b: &RedisBackend,
    stream: &str,
    group: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    validate_name("stream", stream)?;
    validate_name("group", group)?;
    let keys = b.keys(stream);
    let g = keys.group(group);
    let (stream_exists, group_exists, entries): (bool, bool, redis::Value) = redis::pipe()
        .exists(&keys.meta)
        .hexists(&keys.groups, group)
        .cmd("XRANGE")
        .arg(&g.dead)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(limit.max(1))
        .query_async(&mut b.conn())
        .await
        .map_err(broker)?;
    if !stream_exists {
        return Err(Error::StreamNotFound(stream.to_owned()));
    }
    if !group_exists {
        return Err(Error::GroupNotFound {
            stream: stream.to_owned(),
            group: group.to_owned(),
        });
    }
    let mut out = Vec::new();
    for entry in array(entries)?.into_iter().take(limit) {
        let mut entry = array(entry)?.into_iter();
        let (Some(_), Some(fields)) = (entry.next(), entry.next()) else {
            continue;
        };
        let f = fields_map(fields)?;
        let Some(id) = f
            .get("id")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        else {
            continue;
        };
        let field = |k: &str| f.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
        out.push(DeadLetter {
            stream: stream.to_owned(),
            group: group.to_owned(),
            id,
            attempts: field("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
            reason: field("reason").unwrap_or_default(),
            error: field("error"),
            dead_at: field("dead_at")
                .and_then(|m| m.parse::<i64>().ok())
                .and_then(DateTime::from_timestamp_millis)
                .unwrap_or_default(),
            payload: f.get("payload").cloned(),
            headers: parse_headers(f.get("headers").map(Vec::as_slice)),
        });
    }
    Ok(out)
}

/// A stream entry's flat field list as a map.
pub(super) fn fields_map(
    fields: redis::Value,
) -> Result<std::collections::HashMap<String, Vec<u8>>> {
    let mut it = array(fields)?.into_iter();
    let mut map = std::collections::HashMap::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(text(k)?, bytes(v)?);
    }
    Ok(map)
}

/// Headers as stored (a JSON object), empty when absent or unreadable.
pub(super) fn parse_headers(raw: Option<&[u8]>) -> Headers {
    match raw {
        Some(raw) if !raw.is_empty() => serde_json::from_slice(raw).unwrap_or_default(),
        _ => Headers::new(),
    }
}

/// The stream's config as stored (for consumers: lease, backoff). Fails if the stream or the
/// group does not exist.
pub(super) async fn load_config(
    b: &RedisBackend,
    stream: &str,
    group: &str,
) -> Result<StreamConfig> {
    let keys = b.keys(stream);
    let (config, group_exists): (Option<String>, bool) = redis::pipe()
        .hget(&keys.meta, "config")
        .hexists(&keys.groups, group)
        .query_async(&mut b.conn())
        .await
        .map_err(broker)?;
    let Some(config) = config else {
        return Err(Error::StreamNotFound(stream.to_owned()));
    };
    if !group_exists {
        return Err(Error::GroupNotFound {
            stream: stream.to_owned(),
            group: group.to_owned(),
        });
    }
    Ok(serde_json::from_str::<StoredConfig>(&config)?.to_config())
}
