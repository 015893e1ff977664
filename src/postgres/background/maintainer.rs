//! The maintainer (scout leader only): runs a maintenance pass (partitions ahead, retention,
//! dedupe window, counters) when this process becomes scout and then every maintenance interval,
//! as steps of one stream each (`_maintain_step`, one transaction each: a stream's claims wait at
//! most for that stream's partition DDL).
//!
//! It acts only while [`Shared::elected`] holds a term, and the statement itself is fenced by
//! that term in SQL, so a scout that lost its lease unnoticed still changes nothing. A failed
//! pass returns the error; the supervisor retries it after the maintenance interval (at most
//! 30 s).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{sleep_elected, wait_elected, Shared, Slept};
use crate::postgres::admin::MaintenanceStep;
use crate::postgres::{micros, MaintenanceReport};

/// Runs until `token` is cancelled.
pub(super) async fn run(shared: Arc<Shared>, token: CancellationToken) -> crate::Result<()> {
    let mut elected = shared.elected.subscribe();
    // Passes in a row that left a stream's work undone for a lock: each waits twice as long.
    let mut skipping = 0u32;
    loop {
        let Some(term) = wait_elected(&mut elected, &token).await else {
            return Ok(());
        };
        loop {
            let pass = maintain(&shared, term, lock_wait(skipping), &token).await?;
            if pass.streams_skipped > 0 {
                skipping = skipping.saturating_add(1);
                tracing::warn!(
                    streams = pass.streams_skipped,
                    waited_ms = lock_wait(skipping - 1).as_millis() as u64,
                    "pgtide scout: partition maintenance of some streams could not get their locks in time (a long transaction reading their messages?); retrying next pass with a longer wait"
                );
            } else {
                skipping = 0;
                shared
                    .scout_status
                    .send_modify(|s| s.last_maintenance_at = Some(Utc::now()));
            }
            let next = tokio::time::Instant::now() + shared.scout.maintenance_interval;
            match sleep_elected(&mut elected, term, next, &token).await {
                Slept::StillElected => {}
                Slept::TermEnded => break,
                Slept::Stop => return Ok(()),
            }
        }
    }
}

/// How long a pass waits for a stream's locks (`_maintain_stream`): 100 ms, doubled for every
/// pass in a row that had to leave a stream's work undone, up to 6.4 s. Claims of the stream wait
/// behind the request meanwhile, so the wait grows only while a stream keeps missing its turn.
fn lock_wait(skipping: u32) -> Duration {
    Duration::from_millis(100).saturating_mul(1 << skipping.min(6))
}

/// One pass: the fenced steps, each its own transaction and one stream's partition work, until a
/// step reports no stream (it did the rest of the pass), the term ends or `token` is cancelled.
async fn maintain(
    shared: &Shared,
    term: i64,
    lock_wait: Duration,
    token: &CancellationToken,
) -> crate::Result<MaintenanceReport> {
    let client = shared.pool.get().await?;
    let wait = micros(lock_wait);
    let mut after = -1i32;
    let mut pass = MaintenanceReport::default();
    while !token.is_cancelled() {
        // Fenced: runs only while this holder still has this term (no row otherwise).
        let rows = shared
            .sql
            .scout_maintain
            .rows(&client, &[&shared.holder, &term, &after, &wait])
            .await?;
        let Some(row) = rows.first() else {
            break;
        };
        let step = MaintenanceStep::from_row(row)?;
        pass.add(step.report);
        match step.stream {
            Some(stream) => after = stream,
            None => break,
        }
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_wait_doubles_while_streams_are_skipped_up_to_six_seconds() {
        assert_eq!(lock_wait(0), Duration::from_millis(100));
        assert_eq!(lock_wait(1), Duration::from_millis(200));
        assert_eq!(lock_wait(6), Duration::from_millis(6400));
        assert_eq!(lock_wait(u32::MAX), Duration::from_millis(6400));
    }
}
