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

/// Repeats the fenced pass while one stops at its partition budget (a namespace of many streams
/// whose partitions come due together), each pass its own transaction so its locks stay few.
async fn maintain(shared: &Shared, term: i64) -> crate::Result<()> {
    let client = shared.pool.get().await?;
    loop {
        // Fenced: runs only while this holder still has this term (no row otherwise).
        let rows = shared
            .sql
            .scout_maintain
            .rows(&client, &[&shared.holder, &term])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(());
        };
        if !MaintenanceReport::from_row(row)?.budget_used() {
            return Ok(());
        }
    }
}
