//! The maintainer (scout leader only): runs `maintain()` (partitions ahead, retention, dedupe
//! window, counters) when this process becomes scout and then every maintenance interval.
//!
//! It acts only while [`Shared::elected`] holds a term, and the statement itself is fenced by
//! that term in SQL, so a scout that lost its lease unnoticed still changes nothing. A failed
//! pass returns the error; the supervisor retries it after the maintenance interval (at most
//! 30 s).

use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{sleep_elected, wait_elected, Shared, Slept};
use crate::postgres::admin::MaintenanceStep;
use crate::postgres::MaintenanceReport;

/// Runs until `token` is cancelled.
pub(super) async fn run(shared: Arc<Shared>, token: CancellationToken) -> crate::Result<()> {
    let mut elected = shared.elected.subscribe();
    loop {
        let Some(term) = wait_elected(&mut elected, &token).await else {
            return Ok(());
        };
        loop {
            maintain(&shared, term).await?;
            shared
                .scout_status
                .send_modify(|s| s.last_maintenance_at = Some(Utc::now()));
            let next = tokio::time::Instant::now() + shared.scout.maintenance_interval;
            match sleep_elected(&mut elected, term, next, &token).await {
                Slept::StillElected => {}
                Slept::TermEnded => break,
                Slept::Stop => return Ok(()),
            }
        }
    }
}

/// One pass: the fenced steps, each its own transaction and one stream's partition work, until a
/// step reports no stream (it did the rest of the pass). A stream whose locks were not granted in
/// time is left to the next pass, with a warning.
async fn maintain(shared: &Shared, term: i64) -> crate::Result<()> {
    let client = shared.pool.get().await?;
    let mut after = -1i32;
    let mut pass = MaintenanceReport::default();
    loop {
        // Fenced: runs only while this holder still has this term (no row otherwise).
        let rows = shared
            .sql
            .scout_maintain
            .rows(&client, &[&shared.holder, &term, &after])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(());
        };
        let step = MaintenanceStep::from_row(row)?;
        pass.add(step.report);
        match step.stream {
            Some(stream) => after = stream,
            None => break,
        }
    }
    if pass.streams_skipped > 0 {
        tracing::warn!(
            streams = pass.streams_skipped,
            "pgtide scout: partition maintenance of some streams waited over 100 ms for a lock (a long transaction reading them?); retrying next pass"
        );
    }
    Ok(())
}
