//! Operations used by the CLI and by operators' own tooling: grants for a runtime role, group
//! reset (replay from a point), trim, releasing a consumer's leases, and cheap inspection (scout
//! holder, publish counts, one dead letter).
//!
//! Each goes through a function of the namespace (`sql/functions/operations.sql`), so psql users
//! get the same behaviour. None of them walks a group's backlog except reset and trim, which are
//! admin operations that touch what they change.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::wake::Wake;
use super::{micros, PgBackend};
use crate::error::Ctx;
use crate::names::validate_name;
use crate::{Error, Result};

/// The scout lease as the database records it ([`PgBackend::scout_lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScoutLease {
    /// The id of the process holding the lease.
    pub holder: String,
    /// The lease's term: it grows each time another process (or the same one, after losing it)
    /// takes the lease, and fences the scout's work.
    pub term: i64,
    /// When the holder acquired the lease (unknown on a lease taken before it was recorded).
    pub since: Option<DateTime<Utc>>,
    /// When the lease expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// Role names are passed as bind parameters and quoted with `%I` by the grant functions; this
/// only rejects what PostgreSQL could never have created.
fn check_role(role: &str) -> Result<()> {
    if role.is_empty() || role.len() > 63 || role.contains('\0') {
        return Err(Error::InvalidConfig(format!(
            "role name {role:?} is invalid: use 1-63 bytes"
        )));
    }
    Ok(())
}

/// The grant functions' errors about the role, as typed errors.
fn role_error(e: tokio_postgres::Error, role: &str) -> Error {
    match e.code().map(|c| c.code()) {
        Some("PT007") => Error::InvalidConfig(format!(
            "role {role:?} does not exist: create it first (CREATE ROLE \"{role}\" LOGIN)"
        )),
        _ => e.into(),
    }
}

impl PgBackend {
    /// Grants `role` exactly what running needs in this namespace: USAGE on the schema (no
    /// CREATE), SELECT on the views and EXECUTE on the functions that publish, fetch, settle,
    /// run the scout and maintenance, read stats and create streams and groups. It gets no
    /// privilege on any table or sequence: every function that touches a table runs as the
    /// namespace owner (`SECURITY DEFINER`, pinned `search_path`) and checks its arguments, so the
    /// role cannot forge messages, rewrite deliveries or take the scout lease by hand. Deleting,
    /// purging, trimming, resetting and replaying stay the owner's.
    ///
    /// Idempotent; a role granted read-only before is upgraded. `migrate()` keeps the grant
    /// current across releases. Run it as the namespace owner.
    ///
    /// Fails with [`Error::InvalidConfig`] if the role does not exist or owns the namespace.
    pub async fn grant_runtime(&self, role: &str) -> Result<()> {
        self.grant_role(role, false).await
    }

    /// Grants `role` what dashboards and inspection need, nothing else: USAGE on the schema,
    /// SELECT on the views (`stream_stats`, `deliveries`, `dead_letters`, `messages_view`,
    /// `scout`) and EXECUTE on the read-only functions (stats, group stats, publish counts, stream
    /// and group lookups). It cannot publish, fetch or settle. A role granted the runtime
    /// privileges before is downgraded to exactly these. Run it as the namespace owner.
    ///
    /// Fails with [`Error::InvalidConfig`] if the role does not exist or owns the namespace.
    pub async fn grant_read_only(&self, role: &str) -> Result<()> {
        self.grant_role(role, true).await
    }

    /// Takes back everything `role` holds in this namespace (schema USAGE included). Returns
    /// whether it had been granted with [`PgBackend::grant_runtime`] or
    /// [`PgBackend::grant_read_only`]. Run it as the namespace owner.
    pub async fn revoke_runtime(&self, role: &str) -> Result<bool> {
        check_role(role)?;
        let client = self.client().await?;
        let row = self
            .inner
            .sql
            .revoke_runtime
            .one(&client, &[&role])
            .await
            .map_err(|e| role_error(e, role))?;
        Ok(row.try_get(0)?)
    }

    async fn grant_role(&self, role: &str, read_only: bool) -> Result<()> {
        check_role(role)?;
        let client = self.client().await?;
        self.inner
            .sql
            .grant_runtime
            .execute(&client, &[&role, &read_only])
            .await
            .map_err(|e| role_error(e, role))?;
        Ok(())
    }

    /// Replays a group from a point in time: deliveries of messages published before `from` are
    /// dropped from the group (skipped), and every retained message published at or after it that
    /// is not pending in the group is queued again, dead letters included. `None` replays every
    /// retained message. Deliveries already pending keep their state (delay, attempts, lease).
    ///
    /// Returns `(skipped, queued)`. Consumers of the group are woken.
    pub async fn reset_group(
        &self,
        stream: &str,
        group: &str,
        from: Option<DateTime<Utc>>,
    ) -> Result<(u64, u64)> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        if let Some(at) = from {
            crate::limits::check_time("replay point", at)?;
        }
        let row = self
            .sql_row(
                &self.inner.sql.group_reset,
                &[&stream, &group, &from],
                Ctx::group(stream, group),
            )
            .await?;
        let (skipped, queued): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        // What came back is ready; what was skipped while leased left room in a capped group.
        if queued > 0 || skipped > 0 {
            self.poke(Wake::Stream(stream.into()));
        }
        Ok((skipped.max(0) as u64, queued.max(0) as u64))
    }

    /// Removes the stream's oldest messages with their deliveries and dead letters in every
    /// group: those published more than `max_age` ago, and those beyond the newest `max_len`.
    /// Whole partitions are dropped, the rest deleted. Returns how many messages were removed.
    ///
    /// Fails with [`Error::InvalidConfig`] when both limits are `None`.
    pub async fn trim_stream(
        &self,
        stream: &str,
        max_age: Option<Duration>,
        max_len: Option<u64>,
    ) -> Result<u64> {
        validate_name("stream", stream)?;
        if max_age.is_none() && max_len.is_none() {
            return Err(Error::InvalidConfig(
                "trim needs a maximum age or a maximum length".to_owned(),
            ));
        }
        if let Some(age) = max_age {
            crate::limits::check_duration("max_age", age, true)?;
        }
        let max_len = max_len.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let n: i64 = self
            .sql_value(
                &self.inner.sql.stream_trim,
                &[&stream, &max_age.map(micros), &max_len],
                Ctx::stream(stream),
            )
            .await?;
        // Deliveries removed while leased left room in a capped group.
        if n > 0 {
            self.poke(Wake::Stream(stream.into()));
        }
        Ok(n.max(0) as u64)
    }

    /// Hands back every delivery still leased to the consumer named `consumer` in the group:
    /// visible again at once, the attempt not counted. Returns how many were released.
    ///
    /// For a process that stops without knowing exactly what an interrupted fetch claimed. It
    /// assumes the consumer name is used by this process alone: another process's deliveries
    /// under the same name would be released too (and redelivered).
    pub async fn release_consumer(&self, stream: &str, group: &str, consumer: &str) -> Result<u64> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", consumer)?;
        let n: i64 = self
            .sql_value(
                &self.inner.sql.consumer_release,
                &[&stream, &group, &consumer],
                Ctx::group(stream, group),
            )
            .await?;
        if n > 0 {
            self.poke(Wake::Stream(stream.into()));
        }
        Ok(n.max(0) as u64)
    }

    /// Wakes the consumers of `stream` in every process (one coalesced NOTIFY after the
    /// pending ones), e.g. after replaying dead letters or changing delivery state in plain SQL.
    /// Does nothing in poll-only mode. Needs a tokio runtime; [`PgBackend::shutdown`] flushes it.
    pub fn wake(&self, stream: &str) {
        self.poke(Wake::Stream(stream.into()));
    }

    /// The id of the process holding the scout lease, or `None` when no scout holds it (none
    /// running, or the last one died and its lease expired).
    pub async fn scout_holder(&self) -> Result<Option<String>> {
        match self
            .sql_row_opt(&self.inner.sql.scout_holder, &[], Ctx::default())
            .await?
        {
            Some(row) => Ok(row.try_get(0)?),
            None => Ok(None),
        }
    }

    /// The scout lease when a scout holds it: holder, term and times (from the `scout` view, so a
    /// read-only role can see it), or `None` when no scout holds it.
    pub async fn scout_lease(&self) -> Result<Option<ScoutLease>> {
        match self
            .sql_row_opt(&self.inner.sql.scout_lease, &[], Ctx::default())
            .await?
        {
            Some(row) => Ok(Some(ScoutLease {
                holder: row.try_get(0)?,
                term: row.try_get(1)?,
                since: row.try_get(2)?,
                expires_at: row.try_get(3)?,
            })),
            None => Ok(None),
        }
    }

    /// Messages inserted per stream, `(stream, count)` by name, from PostgreSQL's cumulative
    /// table statistics: no scan, but approximate (backends flush them about once a second, a
    /// statistics reset or a dropped partition lowers them). Sample it twice for a publish rate.
    pub async fn publish_counts(&self) -> Result<Vec<(String, i64)>> {
        self.sql_rows(&self.inner.sql.publish_counts, &[], Ctx::default())
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}
