//! Administration beyond the registry: inspection (stats, dead letters), dead-letter replay and
//! purge, and maintenance.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::PgBackend;
use crate::error::{Ctx, Result};
use crate::names::validate_name;
use crate::queue::{headers_from_json, DeadLetter, GroupStats};

/// What one maintenance pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MaintenanceReport {
    /// Partitions created ahead.
    pub partitions_created: i32,
    /// Partitions dropped by retention.
    pub partitions_dropped: i32,
    /// Expired dedupe keys removed.
    pub dedupe_removed: i32,
    /// Streams whose partition work (or part of it) was put off to the next pass because a lock
    /// it needs was not granted within 100 ms (a long transaction reading the stream's messages,
    /// a VACUUM of its default partition): waiting would hold up every claim of the stream
    /// behind the request. The scout waits twice as long on each pass that still skips some,
    /// up to 6.4 s.
    pub streams_skipped: i32,
}

/// One step of a maintenance pass (`_maintain_step`): one stream's partition work, or, with no
/// stream, the rest of the pass.
pub(crate) struct MaintenanceStep {
    /// The stream whose partitions this step worked on; `None`: the pass is done.
    pub(crate) stream: Option<i32>,
    pub(crate) report: MaintenanceReport,
}

impl MaintenanceStep {
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> Result<MaintenanceStep> {
        Ok(MaintenanceStep {
            stream: row.try_get(0)?,
            report: MaintenanceReport {
                partitions_created: row.try_get(1)?,
                partitions_dropped: row.try_get(2)?,
                streams_skipped: row.try_get(3)?,
                dedupe_removed: row.try_get(4)?,
            },
        })
    }
}

impl MaintenanceReport {
    pub(crate) fn add(&mut self, step: MaintenanceReport) {
        self.partitions_created = self
            .partitions_created
            .saturating_add(step.partitions_created);
        self.partitions_dropped = self
            .partitions_dropped
            .saturating_add(step.partitions_dropped);
        self.dedupe_removed = self.dedupe_removed.saturating_add(step.dedupe_removed);
        self.streams_skipped = self.streams_skipped.saturating_add(step.streams_skipped);
    }
}

impl PgBackend {
    /// Depth of every group of every stream in the namespace (a stream without groups has one
    /// row with `group: None`).
    pub async fn stats_all(&self) -> Result<Vec<GroupStats>> {
        let client = self.client().await?;
        let rows = self.inner.sql.stats.rows(&client, &[]).await?;
        rows.iter()
            .map(|r| {
                Ok(GroupStats {
                    stream: r.try_get(0)?,
                    group: r.try_get(1)?,
                    ready: r.try_get(2)?,
                    delayed: r.try_get(3)?,
                    in_flight: r.try_get(4)?,
                    dead: r.try_get(5)?,
                    oldest_ready_age: r
                        .try_get::<_, Option<f64>>(6)?
                        .map(|s| Duration::from_secs_f64(s.max(0.0))),
                })
            })
            .collect()
    }

    /// Depth of one group. Reads only that group's rows; [`crate::Error::StreamNotFound`] when the
    /// stream is missing, [`crate::Error::GroupNotFound`] when the group is.
    pub async fn stats(&self, stream: &str, group: &str) -> Result<GroupStats> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let r = self
            .sql_row(
                &self.inner.sql.group_stats,
                &[&stream, &group],
                Ctx::group(stream, group),
            )
            .await?;
        Ok(GroupStats {
            stream: stream.to_owned(),
            group: Some(group.to_owned()),
            ready: r.try_get(0)?,
            delayed: r.try_get(1)?,
            in_flight: r.try_get(2)?,
            dead: r.try_get(3)?,
            oldest_ready_age: r
                .try_get::<_, Option<f64>>(4)?
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    /// Maintenance: creates partitions ahead, drops partitions past retention, removes expired
    /// dedupe keys and folds counters. The scout runs this; it is safe to call by hand.
    ///
    /// Each stream's partition work runs in a transaction of its own (`_maintain_step`), so a
    /// stream's claims wait at most for that stream's DDL and the server's lock table never fills,
    /// however many streams come due at once. A stream whose locks are not granted within 100 ms
    /// is counted in [`MaintenanceReport::streams_skipped`] and left to the next pass.
    pub async fn maintain(&self) -> Result<MaintenanceReport> {
        self.maintain_at(Utc::now()).await
    }

    /// [`PgBackend::maintain`] as if the time were `at` (for retention tests and backfills).
    pub async fn maintain_at(&self, at: DateTime<Utc>) -> Result<MaintenanceReport> {
        let mut total = MaintenanceReport::default();
        let mut after = -1i32;
        loop {
            let row = self
                .sql_row(&self.inner.sql.maintain, &[&at, &after], Ctx::default())
                .await?;
            let step = MaintenanceStep::from_row(&row)?;
            total.add(step.report);
            match step.stream {
                Some(stream) => after = stream,
                None => return Ok(total),
            }
        }
    }

    /// Dead letters of a group, oldest first, at most `limit`.
    pub async fn dead_letters(
        &self,
        stream: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.read_dead(stream, group, None, limit).await
    }

    /// One dead letter of a group, or `None` if the message is not dead in that group.
    pub async fn dead_letter(
        &self,
        stream: &str,
        group: &str,
        id: Uuid,
    ) -> Result<Option<DeadLetter>> {
        Ok(self.read_dead(stream, group, Some(id), 1).await?.pop())
    }

    async fn read_dead(
        &self,
        stream: &str,
        group: &str,
        id: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let limit = limit.min(i64::MAX as usize) as i64;
        self.sql_rows(
            &self.inner.sql.dead_letters,
            &[&stream, &group, &id, &limit],
            Ctx::default(),
        )
        .await?
        .iter()
        .map(|r| {
            Ok(DeadLetter {
                stream: stream.to_owned(),
                group: group.to_owned(),
                id: r.try_get(0)?,
                attempts: r.try_get::<_, i32>(1)?.max(0) as u32,
                reason: r.try_get(2)?,
                error: r.try_get(3)?,
                dead_at: r.try_get(4)?,
                payload: r.try_get(5)?,
                // A dead letter whose headers cannot be decoded (reason `malformed`) is still listed.
                headers: headers_from_json(r.try_get(6).unwrap_or(None)),
            })
        })
        .collect()
    }

    /// Puts dead letters back into their group with a fresh attempt count: the given ids, or all
    /// of the group's when `ids` is `None`. Returns how many were replayed.
    pub async fn replay_dead(
        &self,
        stream: &str,
        group: &str,
        ids: Option<&[Uuid]>,
    ) -> Result<u64> {
        let n = self
            .dead_op(&self.inner.sql.dead_replay, stream, group, ids)
            .await?;
        if n > 0 {
            // Replayed deliveries are ready now: wake consumers in every process.
            self.wake(stream);
        }
        Ok(n)
    }

    /// Deletes dead letters: the given ids, or all of the group's when `ids` is `None`.
    pub async fn purge_dead(&self, stream: &str, group: &str, ids: Option<&[Uuid]>) -> Result<u64> {
        self.dead_op(&self.inner.sql.dead_purge, stream, group, ids)
            .await
    }

    async fn dead_op(
        &self,
        sql: &super::statements::Statement,
        stream: &str,
        group: &str,
        ids: Option<&[Uuid]>,
    ) -> Result<u64> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        let ids: Option<Vec<Uuid>> = ids.map(|i| i.to_vec());
        let n: i64 = self
            .sql_value(sql, &[&stream, &group, &ids], Ctx::group(stream, group))
            .await?;
        Ok(n.max(0) as u64)
    }
}
