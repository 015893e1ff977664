//! The vacuumer (scout leader only): every vacuum interval, reads the hot tables' statistics and
//! runs `VACUUM (SKIP_LOCKED)` on those that need it and that autovacuum leaves alone (the rule
//! is in `postgres/vacuum.rs`).
//!
//! A task of its own, so a long VACUUM never delays maintenance or wake-ups; it holds one pooled
//! connection while it runs. VACUUM cannot run in a transaction block or a function: it is sent
//! alone, as one simple-protocol statement (which a transaction-mode pooler also passes through
//! as one transaction of its own). SKIP_LOCKED skips a table another vacuum (autovacuum, a job)
//! or DDL holds rather than queueing behind it. Cancellation cancels a VACUUM in progress on the
//! server. A failed check returns the error; the supervisor retries after the interval.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{sleep_elected, wait_elected, Shared, Slept};
use crate::postgres::vacuum::{VacuumStatus, VacuumTracker};

/// Runs until `token` is cancelled.
pub(super) async fn run(shared: Arc<Shared>, token: CancellationToken) -> crate::Result<()> {
    let mut elected = shared.elected.subscribe();
    let mut tracker = VacuumTracker::default();
    // Tables already warned about as not ours to vacuum: once per table, not once per check.
    let mut warned = HashSet::new();
    loop {
        let Some(term) = wait_elected(&mut elected, &token).await else {
            return Ok(());
        };
        loop {
            if !check(&shared, &token, &mut tracker, &mut warned).await? {
                return Ok(());
            }
            let next = Instant::now() + shared.scout.vacuum.interval;
            match sleep_elected(&mut elected, term, next, &token).await {
                Slept::StillElected => {}
                Slept::TermEnded => break,
                Slept::Stop => return Ok(()),
            }
        }
    }
}

/// One check, and the vacuum it calls for. `Ok(false)` when cancelled on the way.
async fn check(
    shared: &Shared,
    token: &CancellationToken,
    tracker: &mut VacuumTracker,
    warned: &mut HashSet<String>,
) -> crate::Result<bool> {
    let client = shared.pool.get().await?;
    let rows = shared.sql.vacuum_tables.rows(&client, &[]).await?;
    let status = VacuumStatus::from_rows(&rows)?;
    let plan = tracker.plan(&status, &shared.scout.vacuum);
    for table in &plan.denied {
        if warned.insert(table.clone()) {
            let owner = status
                .tables
                .iter()
                .find(|t| &t.table == table)
                .map(|t| t.owner.as_str())
                .unwrap_or_default();
            tracing::warn!(
                namespace = %shared.namespace,
                table,
                role = %status.role,
                owner,
                "pgtide scout: a hot table needs a vacuum that this role may not run (VACUUM needs the table's owner); skipping it"
            );
        }
    }
    shared.scout_status.send_modify(|s| {
        s.last_vacuum_check_at = Some(Utc::now());
        s.vacuum_denied.clone_from(&plan.denied);
    });
    if plan.vacuum.is_empty() {
        return Ok(true);
    }
    // Names from the fixed list of hot tables, in the validated namespace.
    let tables: Vec<String> = plan
        .vacuum
        .iter()
        .map(|t| format!("\"{}\".\"{t}\"", shared.namespace))
        .collect();
    let sql = format!("VACUUM (SKIP_LOCKED) {}", tables.join(", "));
    let started = Instant::now();
    tokio::select! {
        biased;
        done = client.batch_execute(&sql) => done?,
        _ = token.cancelled() => {
            // Dropping the future would leave the VACUUM running on the server.
            if let Err(e) = client.cancel_token().cancel_query(shared.tls.clone()).await {
                tracing::debug!(error = %e, "pgtide scout: could not cancel a VACUUM while stopping");
            }
            return Ok(false);
        }
    }
    tracker.vacuumed(&plan.vacuum);
    tracing::debug!(
        namespace = %shared.namespace,
        tables = ?plan.vacuum,
        took = ?started.elapsed(),
        "pgtide scout: vacuumed"
    );
    shared.scout_status.send_modify(|s| {
        s.last_vacuum_at = Some(Utc::now());
        s.vacuumed_tables += plan.vacuum.len() as u64;
    });
    Ok(true)
}
