//! Streams and groups: create, ensure, delete, list. All registry changes go through the
//! namespace's SQL functions, so psql users and the engine share one implementation.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::{micros, PgBackend, STREAM_CACHE_TTL};
use crate::config::{GroupStart, StreamConfig};
use crate::error::Ctx;
use crate::names::validate_name;
use crate::{Backoff, Error, Result};

/// A stream as stored in the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInfo {
    /// Stream name.
    pub name: String,
    /// Its configuration.
    pub config: StreamConfig,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A group as stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Stream name.
    pub stream: String,
    /// Group name.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

const STREAM_COLUMNS: &str = "name, extract(epoch FROM lease)::float8, max_deliver, \
    (SELECT array_agg(extract(epoch FROM b)::float8 ORDER BY i) FROM unnest(backoff) WITH ORDINALITY AS x (b, i)), \
    backoff_jitter, extract(epoch FROM retention)::float8, extract(epoch FROM partition_interval)::float8, \
    extract(epoch FROM dedupe_window)::float8, max_payload, created_at";

/// A stream configuration as SQL parameters $2..$9 (durations in microseconds), after the name.
struct ConfigParams {
    lease: i64,
    max_deliver: i32,
    backoff: Vec<i64>,
    retention: i64,
    dedupe_window: i64,
    max_payload: i32,
    partition_interval: i64,
    jitter: f32,
}

impl ConfigParams {
    fn new(c: &StreamConfig) -> Self {
        ConfigParams {
            lease: micros(c.lease),
            max_deliver: c.max_deliver as i32,
            backoff: c.backoff.schedule.iter().map(|d| micros(*d)).collect(),
            retention: micros(c.retention),
            dedupe_window: micros(c.dedupe_window),
            max_payload: c.max_payload as i32,
            partition_interval: micros(c.partition_interval),
            jitter: c.backoff.jitter,
        }
    }

    fn values<'a>(&'a self, name: &'a &'a str) -> Vec<&'a (dyn ToSql + Sync)> {
        vec![
            name,
            &self.lease,
            &self.max_deliver,
            &self.backoff,
            &self.retention,
            &self.dedupe_window,
            &self.max_payload,
            &self.partition_interval,
            &self.jitter,
        ]
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn stream_from_row(row: &tokio_postgres::Row) -> StreamInfo {
    let backoff: Vec<f64> = row.get(3);
    StreamInfo {
        name: row.get(0),
        config: StreamConfig {
            lease: secs(row.get(1)),
            max_deliver: row.get::<_, i32>(2) as u32,
            backoff: Backoff {
                schedule: backoff.into_iter().map(secs).collect(),
                jitter: row.get(4),
            },
            retention: secs(row.get(5)),
            partition_interval: secs(row.get(6)),
            dedupe_window: secs(row.get(7)),
            max_payload: row.get::<_, i32>(8) as usize,
        },
        created_at: row.get(9),
    }
}

impl PgBackend {
    async fn create_stream_inner(
        &self,
        name: &str,
        config: &StreamConfig,
        if_not_exists: bool,
    ) -> Result<bool> {
        validate_name("stream", name)?;
        config.validate()?;
        let client = self.client().await?;
        let sql = format!(
            "SELECT \"{ns}\".create_stream($1, $2::int8 * interval '1 microsecond', $3, \
             (SELECT array_agg(b * interval '1 microsecond' ORDER BY i) FROM unnest($4::int8[]) WITH ORDINALITY AS x (b, i)), \
             $5::int8 * interval '1 microsecond', $6::int8 * interval '1 microsecond', $7, \
             $8::int8 * interval '1 microsecond', $9::float4, $10)",
            ns = self.namespace()
        );
        let params = ConfigParams::new(config);
        let mut values = params.values(&name);
        values.push(&if_not_exists);
        let row = client.query_one(&sql, &values).await.map_err(|e| {
            Error::from_pg(
                e,
                Ctx {
                    stream: Some(name),
                    group: None,
                },
            )
        })?;
        self.forget_stream(name);
        Ok(row.get(0))
    }

    /// Creates a stream. Fails with [`Error::StreamExists`] if it exists.
    pub async fn create_stream(&self, name: &str, config: &StreamConfig) -> Result<()> {
        self.create_stream_inner(name, config, false)
            .await
            .map(|_| ())
    }

    /// Creates the stream unless it exists (an existing stream keeps its configuration; change it
    /// with [`PgBackend::update_stream`]). Returns true if it was created.
    pub async fn ensure_stream(&self, name: &str, config: &StreamConfig) -> Result<bool> {
        self.create_stream_inner(name, config, true).await
    }

    /// Changes the configuration of an existing stream. Partition width changes apply to new
    /// partitions only.
    pub async fn update_stream(&self, name: &str, config: &StreamConfig) -> Result<()> {
        validate_name("stream", name)?;
        config.validate()?;
        let client = self.client().await?;
        let sql = format!(
            "UPDATE \"{ns}\".streams SET lease = $2::int8 * interval '1 microsecond', max_deliver = $3, \
             backoff = (SELECT array_agg(b * interval '1 microsecond' ORDER BY i) FROM unnest($4::int8[]) WITH ORDINALITY AS x (b, i)), \
             retention = $5::int8 * interval '1 microsecond', dedupe_window = $6::int8 * interval '1 microsecond', \
             max_payload = $7, partition_interval = $8::int8 * interval '1 microsecond', backoff_jitter = $9::float4 \
             WHERE name = $1",
            ns = self.namespace()
        );
        let params = ConfigParams::new(config);
        let n = client.execute(&sql, &params.values(&name)).await?;
        self.forget_stream(name);
        if n == 0 {
            return Err(Error::StreamNotFound(name.to_owned()));
        }
        Ok(())
    }

    /// Deletes a stream with its groups, messages, deliveries and dead letters. Returns false if it
    /// did not exist.
    pub async fn delete_stream(&self, name: &str) -> Result<bool> {
        validate_name("stream", name)?;
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!("SELECT \"{}\".delete_stream($1)", self.namespace()),
                &[&name],
            )
            .await?;
        self.forget_stream(name);
        Ok(row.get(0))
    }

    /// Removes every message of the stream and every pending delivery and dead letter of its
    /// groups; the stream and its groups stay. Returns how many deliveries were dropped
    /// ([`crate::Queue::purge`] does the same and drops the count).
    pub async fn purge(&self, name: &str) -> Result<u64> {
        validate_name("stream", name)?;
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!("SELECT \"{}\".purge_stream($1)", self.namespace()),
                &[&name],
            )
            .await
            .map_err(|e| {
                Error::from_pg(
                    e,
                    Ctx {
                        stream: Some(name),
                        group: None,
                    },
                )
            })?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Reads one stream, or `None` if it does not exist.
    pub async fn stream(&self, name: &str) -> Result<Option<StreamInfo>> {
        validate_name("stream", name)?;
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {STREAM_COLUMNS} FROM \"{}\".streams WHERE name = $1",
                    self.namespace()
                ),
                &[&name],
            )
            .await?;
        Ok(row.as_ref().map(stream_from_row))
    }

    /// Lists all streams, by name.
    pub async fn streams(&self) -> Result<Vec<StreamInfo>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {STREAM_COLUMNS} FROM \"{}\".streams ORDER BY name",
                    self.namespace()
                ),
                &[],
            )
            .await?;
        Ok(rows.iter().map(stream_from_row).collect())
    }

    async fn create_group_inner(
        &self,
        stream: &str,
        group: &str,
        start: GroupStart,
        if_not_exists: bool,
    ) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT \"{}\".create_group($1, $2, $3, $4)",
                    self.namespace()
                ),
                &[&stream, &group, &start.as_sql(), &if_not_exists],
            )
            .await
            .map_err(|e| {
                Error::from_pg(
                    e,
                    Ctx {
                        stream: Some(stream),
                        group: Some(group),
                    },
                )
            })?;
        Ok(row.get(0))
    }

    /// Creates a consumer group. Every group receives every message published after its creation
    /// (and, with [`GroupStart::Oldest`], every retained message). Fails with
    /// [`Error::GroupExists`] if it exists.
    pub async fn create_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<()> {
        self.create_group_inner(stream, group, start, false)
            .await
            .map(|_| ())
    }

    /// Creates the group unless it exists. Returns true if it was created.
    pub async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        self.create_group_inner(stream, group, start, true).await
    }

    /// Deletes a group with its pending deliveries and dead letters. Returns false if it did not
    /// exist.
    pub async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!("SELECT \"{}\".delete_group($1, $2)", self.namespace()),
                &[&stream, &group],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Lists the groups of a stream (all streams when `stream` is `None`).
    pub async fn groups(&self, stream: Option<&str>) -> Result<Vec<GroupInfo>> {
        if let Some(s) = stream {
            validate_name("stream", s)?;
        }
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT s.name, g.name, g.created_at FROM \"{ns}\".groups g JOIN \"{ns}\".streams s ON s.id = g.stream_id \
                     WHERE $1::text IS NULL OR s.name = $1 ORDER BY s.name, g.name",
                    ns = self.namespace()
                ),
                &[&stream],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| GroupInfo {
                stream: r.get(0),
                name: r.get(1),
                created_at: r.get(2),
            })
            .collect())
    }

    /// Stream metadata from a short-lived cache (publish needs the payload limit).
    pub(crate) async fn cached_stream(&self, name: &str) -> Result<StreamInfo> {
        if let Ok(cache) = self.inner.streams.lock() {
            if let Some((info, at)) = cache.get(name) {
                if at.elapsed() < STREAM_CACHE_TTL {
                    return Ok(info.clone());
                }
            }
        }
        let info = self
            .stream(name)
            .await?
            .ok_or_else(|| Error::StreamNotFound(name.to_owned()))?;
        if let Ok(mut cache) = self.inner.streams.lock() {
            cache.insert(name.to_owned(), (info.clone(), Instant::now()));
        }
        Ok(info)
    }

    pub(crate) fn forget_stream(&self, name: &str) {
        if let Ok(mut cache) = self.inner.streams.lock() {
            cache.remove(name);
        }
    }
}
