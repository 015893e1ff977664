//! Streams and groups: create, ensure, delete, list. All registry changes go through the
//! namespace's SQL functions, so psql users and the engine share one implementation.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::exec::{Params, Statement};
use super::{micros, PgBackend, STREAM_CACHE_TTL};
use crate::config::{GroupConfig, GroupStart, StreamConfig};
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
    /// Whether it is ordered ([`GroupConfig::ordered`]).
    pub ordered: bool,
    /// Its concurrency limit ([`GroupConfig::max_in_flight`]).
    pub max_in_flight: Option<u32>,
    /// Its per-key concurrency limit ([`GroupConfig::max_in_flight_per_key`]).
    pub max_in_flight_per_key: Option<u32>,
    /// Its rate limit ([`GroupConfig::rate_limit`]).
    pub rate_limit: Option<crate::RateLimit>,
    /// Its per-key rate limit ([`GroupConfig::rate_limit_per_key`]).
    pub rate_limit_per_key: Option<crate::RateLimit>,
    /// Whether it shares its deliveries between keys by weight ([`GroupConfig::fair_share`]).
    pub fair_share: bool,
}

/// One ordering key of an ordered group with pending deliveries ([`PgBackend::keys`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct KeyInfo {
    /// The key.
    pub key: String,
    /// Its pending deliveries (the head and those waiting behind it).
    pub pending: i64,
    /// Those waiting behind the head.
    pub waiting: i64,
    /// The head's state: `ready`, `delayed` (a retry or a pause) or `in_flight`.
    pub head_state: Option<String>,
    /// When a delayed head (a paused key) goes again.
    pub resumes_at: Option<DateTime<Utc>>,
    /// The consumer holding an in-flight head.
    pub consumer: Option<String>,
    /// Age of the key's oldest pending message.
    pub oldest_age: Duration,
}

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

/// A row of `sql/stream_read.sql`.
fn stream_from_row(row: &tokio_postgres::Row) -> Result<StreamInfo> {
    let backoff: Vec<f64> = row.try_get(3)?;
    Ok(StreamInfo {
        name: row.try_get(0)?,
        config: StreamConfig {
            lease: secs(row.try_get(1)?),
            max_deliver: row.try_get::<_, i32>(2)?.max(0) as u32,
            backoff: Backoff {
                schedule: backoff.into_iter().map(secs).collect(),
                jitter: row.try_get(4)?,
            },
            retention: secs(row.try_get(5)?),
            partition_interval: secs(row.try_get(6)?),
            dedupe_window: secs(row.try_get(7)?),
            max_payload: row.try_get::<_, i32>(8)?.max(0) as usize,
        },
        created_at: row.try_get(9)?,
    })
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
        let params = ConfigParams::new(config);
        let mut values = params.values(&name);
        values.push(&if_not_exists);
        let created = self
            .sql_value(&self.inner.sql.stream_create, &values, Ctx::stream(name))
            .await;
        self.forget_stream(name);
        let created = created?;
        // A statement of its own: the partitions' locks are then held for one short
        // transaction instead of to the end of the stream's (`create_stream` in SQL).
        let _: i32 = self
            .sql_value(
                &self.inner.sql.stream_partitions,
                &[&name],
                Ctx::stream(name),
            )
            .await?;
        Ok(created)
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
        let params = ConfigParams::new(config);
        let n = self
            .inner
            .sql
            .stream_update
            .execute(&client, &params.values(&name))
            .await?;
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
        let deleted = self
            .sql_value(&self.inner.sql.stream_delete, &[&name], Ctx::default())
            .await;
        self.forget_stream(name);
        deleted
    }

    /// Removes every message of the stream and every pending delivery and dead letter of its
    /// groups; the stream and its groups stay. Returns how many deliveries were dropped
    /// ([`crate::Queue::purge`] does the same and drops the count).
    pub async fn purge(&self, name: &str) -> Result<u64> {
        validate_name("stream", name)?;
        let n: i64 = self
            .sql_value(&self.inner.sql.stream_purge, &[&name], Ctx::stream(name))
            .await?;
        Ok(n.max(0) as u64)
    }

    /// Reads one stream, or `None` if it does not exist.
    pub async fn stream(&self, name: &str) -> Result<Option<StreamInfo>> {
        validate_name("stream", name)?;
        let name = Some(name);
        self.sql_row_opt(&self.inner.sql.stream_read, &[&name], Ctx::default())
            .await?
            .as_ref()
            .map(stream_from_row)
            .transpose()
    }

    /// Lists all streams, by name.
    pub async fn streams(&self) -> Result<Vec<StreamInfo>> {
        let all: Option<&str> = None;
        self.sql_rows(&self.inner.sql.stream_read, &[&all], Ctx::default())
            .await?
            .iter()
            .map(stream_from_row)
            .collect()
    }

    async fn create_group_inner(
        &self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
        if_not_exists: bool,
    ) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        config.validate()?;
        let limit = config.max_in_flight.map(|n| n as i32);
        let rate = config.rate_limit.map(|r| r.rate());
        let burst = config.rate_limit.map(|r| r.burst_size() as i32);
        let key_rate = config.rate_limit_per_key.map(|r| r.rate());
        let key_burst = config.rate_limit_per_key.map(|r| r.burst_size() as i32);
        let key_limit = config.max_in_flight_per_key.map(|n| n as i32);
        self.sql_value(
            &self.inner.sql.group_create,
            &[
                &stream,
                &group,
                &config.start.as_sql(),
                &if_not_exists,
                &config.ordered,
                &limit,
                &rate,
                &burst,
                &key_rate,
                &key_burst,
                &config.fair_share,
                &key_limit,
            ],
            Ctx::group(stream, group),
        )
        .await
    }

    /// Creates a consumer group. Every group receives every message published after its creation
    /// (and, with [`GroupStart::Oldest`], every retained message). Fails with
    /// [`Error::GroupExists`] if it exists.
    pub async fn create_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<()> {
        self.create_group_with(stream, group, &GroupConfig::default().start(start))
            .await
    }

    /// Creates a consumer group with `config` (an ordered group, say). Fails with
    /// [`Error::GroupExists`] if it exists.
    pub async fn create_group_with(
        &self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
    ) -> Result<()> {
        self.create_group_inner(stream, group, config, false)
            .await
            .map(|_| ())
    }

    /// Creates the group unless it exists. Returns true if it was created.
    pub async fn ensure_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<bool> {
        self.ensure_group_with(stream, group, &GroupConfig::default().start(start))
            .await
    }

    /// Creates the group with `config` unless it exists. Returns true if it was created. An
    /// existing group whose `ordered` setting differs is an [`Error::InvalidConfig`]: ordering is
    /// fixed at creation.
    pub async fn ensure_group_with(
        &self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
    ) -> Result<bool> {
        self.create_group_inner(stream, group, config, true).await
    }

    /// Sets (`Some`) or removes (`None`) the group's concurrency limit
    /// ([`GroupConfig::max_in_flight`]). Deliveries already leased keep their leases; new claims
    /// wait for room. Fails with [`Error::GroupNotFound`] if the group does not exist.
    pub async fn set_max_in_flight(
        &self,
        stream: &str,
        group: &str,
        limit: Option<u32>,
    ) -> Result<()> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        GroupConfig::check_max_in_flight(limit)?;
        let limit = limit.map(|n| n as i32);
        self.update_group(
            &self.inner.sql.group_limit,
            &[&stream, &group, &limit],
            stream,
            group,
        )
        .await?;
        // A raised or removed limit makes room, and the pool's connections do not notify.
        self.poke(super::wake::Wake::Stream(stream.into()));
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) the group's per-key concurrency limit
    /// ([`GroupConfig::max_in_flight_per_key`]). Setting it on a group without one queues the
    /// group's pending keyed deliveries in their keys' lines (those leased now keep their
    /// leases, count first and are never held back); raising it lets waiting deliveries go at once; lowering it lets
    /// the deliveries beyond it finish; removing it releases every waiting delivery. It walks
    /// the group's pending deliveries: an administrative call, not for a hot path. A keyed
    /// publish that commits while the limit is being set on a group without one may escape it
    /// (its delivery is not queued behind its key). Fails with [`Error::GroupNotFound`] if the
    /// group does not exist, [`Error::InvalidConfig`] for 0, a value above `i32::MAX`, more
    /// than 1 on an ordered group, or any limit on a fair group.
    pub async fn set_max_in_flight_per_key(
        &self,
        stream: &str,
        group: &str,
        limit: Option<u32>,
    ) -> Result<()> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        crate::config::check_key_limit(false, limit)?;
        let limit = limit.map(|n| n as i32);
        self.update_group(
            &self.inner.sql.group_limit_per_key,
            &[&stream, &group, &limit],
            stream,
            group,
        )
        .await?;
        // A raised or removed limit lets waiting deliveries go.
        self.poke(super::wake::Wake::Stream(stream.into()));
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) the group's rate limit ([`GroupConfig::rate_limit`]).
    /// The new bucket starts full. Deliveries already leased keep their leases. Fails with
    /// [`Error::GroupNotFound`] if the group does not exist, [`Error::InvalidConfig`] for a
    /// rate or burst out of bounds ([`crate::RateLimit::validate`]).
    pub async fn set_rate_limit(
        &self,
        stream: &str,
        group: &str,
        limit: Option<crate::RateLimit>,
    ) -> Result<()> {
        self.set_rate(stream, group, limit, false).await
    }

    /// Sets (`Some`) or removes (`None`) the rate limit of each key of the group
    /// ([`GroupConfig::rate_limit_per_key`]); every key's bucket starts full again. Errors as
    /// [`PgBackend::set_rate_limit`].
    pub async fn set_rate_limit_per_key(
        &self,
        stream: &str,
        group: &str,
        limit: Option<crate::RateLimit>,
    ) -> Result<()> {
        self.set_rate(stream, group, limit, true).await
    }

    async fn set_rate(
        &self,
        stream: &str,
        group: &str,
        limit: Option<crate::RateLimit>,
        per_key: bool,
    ) -> Result<()> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        if let Some(l) = &limit {
            l.validate()?;
        }
        let rate = limit.map(|r| r.rate());
        let burst = limit.map(|r| r.burst_size() as i32);
        self.update_group(
            &self.inner.sql.group_rate,
            &[&stream, &group, &rate, &burst, &per_key],
            stream,
            group,
        )
        .await
    }

    /// Sets (`Some`) or resets to the default 1 (`None`) the weight of `key` in a fair group
    /// ([`GroupConfig::fair_share`]); `key` `None` is the messages without a key. While several
    /// keys have ready deliveries, each gets claims in proportion to its weight. The new weight
    /// applies to the key's messages published after it (those already queued keep their
    /// place). Fails with [`Error::InvalidKey`] for a key that breaks the key rule,
    /// [`Error::InvalidConfig`] for a weight out of bounds ([`crate::validate_weight`]) or a
    /// group that is not fair, [`Error::GroupNotFound`] if the group does not exist.
    pub async fn set_key_weight(
        &self,
        stream: &str,
        group: &str,
        key: Option<&str>,
        weight: Option<f64>,
    ) -> Result<()> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        if let Some(k) = key {
            crate::names::validate_key(k)?;
        }
        if let Some(w) = weight {
            crate::config::validate_weight(w)?;
        }
        self.update_group(
            &self.inner.sql.group_weight,
            &[&stream, &group, &key, &weight],
            stream,
            group,
        )
        .await
    }

    /// The keys of a fair group with a weight of their own (every other key weighs 1), heaviest
    /// first, at most `limit`: the `key_weights` view. The key `None` is the messages without a
    /// key.
    pub async fn key_weights(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<(Option<String>, f64)>> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let limit = limit.min(i64::MAX as usize) as i64;
        self.sql_rows(
            &self.inner.sql.key_weights,
            &[&stream, &group, &limit],
            Ctx::group(stream, group),
        )
        .await?
        .iter()
        .map(|r| {
            let key: String = r.try_get(0)?;
            Ok(((!key.is_empty()).then_some(key), r.try_get(1)?))
        })
        .collect()
    }

    /// Runs a statement that changes one group's settings and says whether the group was found.
    async fn update_group(
        &self,
        stmt: &Statement,
        params: &Params<'_>,
        stream: &str,
        group: &str,
    ) -> Result<()> {
        let found: bool = self
            .sql_value(stmt, params, Ctx::group(stream, group))
            .await?;
        if !found {
            return Err(Error::GroupNotFound {
                stream: stream.to_owned(),
                group: group.to_owned(),
            });
        }
        Ok(())
    }

    /// The keys of an ordered group that have pending deliveries, most pending first, at most
    /// `limit`: the `keys` view. It walks the group's keyed deliveries (an inspection call, not
    /// a hot path). Empty for a group that is not ordered.
    pub async fn keys(&self, stream: &str, group: &str, limit: usize) -> Result<Vec<KeyInfo>> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let limit = limit.min(i64::MAX as usize) as i64;
        self.sql_rows(
            &self.inner.sql.keys,
            &[&stream, &group, &limit],
            Ctx::group(stream, group),
        )
        .await?
        .iter()
        .map(|r| {
            Ok(KeyInfo {
                key: r.try_get(0)?,
                pending: r.try_get(1)?,
                waiting: r.try_get(2)?,
                head_state: r.try_get(3)?,
                resumes_at: r.try_get(4)?,
                consumer: r.try_get(5)?,
                oldest_age: secs(r.try_get::<_, Option<f64>>(6)?.unwrap_or_default()),
            })
        })
        .collect()
    }

    /// Deletes a group with its pending deliveries and dead letters. Returns false if it did not
    /// exist.
    pub async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        self.sql_value(
            &self.inner.sql.group_delete,
            &[&stream, &group],
            Ctx::default(),
        )
        .await
    }

    /// Lists the groups of a stream (all streams when `stream` is `None`).
    pub async fn groups(&self, stream: Option<&str>) -> Result<Vec<GroupInfo>> {
        if let Some(s) = stream {
            validate_name("stream", s)?;
        }
        self.sql_rows(&self.inner.sql.group_list, &[&stream], Ctx::default())
            .await?
            .iter()
            .map(|r| {
                Ok(GroupInfo {
                    stream: r.try_get(0)?,
                    name: r.try_get(1)?,
                    created_at: r.try_get(2)?,
                    ordered: r.try_get(3)?,
                    max_in_flight: r.try_get::<_, Option<i32>>(4)?.map(|n| n.max(0) as u32),
                    rate_limit: r
                        .try_get::<_, Option<f64>>(5)?
                        .and_then(|rate| crate::RateLimit::from_stored(rate, r.try_get(6).ok()?)),
                    rate_limit_per_key: r
                        .try_get::<_, Option<f64>>(7)?
                        .and_then(|rate| crate::RateLimit::from_stored(rate, r.try_get(8).ok()?)),
                    fair_share: r.try_get(9)?,
                    max_in_flight_per_key: r
                        .try_get::<_, Option<i32>>(10)?
                        .map(|n| n.max(0) as u32),
                })
            })
            .collect()
    }

    /// Stream metadata from a short-lived cache.
    pub(crate) async fn cached_stream(&self, name: &str) -> Result<StreamInfo> {
        self.cached_stream_within(name, STREAM_CACHE_TTL).await
    }

    /// Stream metadata from the cache if it was read less than `max_age` ago.
    pub(crate) async fn cached_stream_within(
        &self,
        name: &str,
        max_age: std::time::Duration,
    ) -> Result<StreamInfo> {
        if let Ok(cache) = self.inner.streams.lock() {
            if let Some((info, at)) = cache.get(name) {
                if at.elapsed() < max_age {
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
