//! The scout elector: one leader per namespace, elected by a lease row with fencing (holder +
//! term compare-and-swap, TTL, renewal at a third of the TTL, resign with a NOTIFY on shutdown).
//!
//! Invariant: this process acts as scout (the due-waker and the maintainer run) only while
//! [`Shared::elected`] holds a term, and that term is cleared before the lease can have run out:
//! the elector steps down after [`MAX_FAILED_RENEWALS`] failed renewals in a row, or when its
//! own clock says the lease expired while a renewal was still running (a locked lease row blocks
//! the UPDATE rather than failing it). Once stepped down it only wins the lease again after it
//! expired, under a new term.
//!
//! The lease state lives in [`Shared`], outside the task, so a restarted elector renews the term
//! it holds instead of forgetting it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{lock, Shared, Wake};

/// Renewals that may fail in a row before the scout steps down.
pub(super) const MAX_FAILED_RENEWALS: u32 = 2;

/// Scout settings.
#[derive(Debug, Clone)]
pub(crate) struct ScoutConfig {
    pub ttl: Duration,
    pub max_interval: Duration,
    pub maintenance_interval: Duration,
    pub vacuum: crate::postgres::vacuum::VacuumConfig,
}

/// What this process knows about the scout role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScoutStatus {
    /// This process's candidate id.
    pub holder_id: String,
    /// Whether this process is the scout now.
    pub is_leader: bool,
    /// The term held, when leader.
    pub term: Option<i64>,
    /// When the last due check ran (leader only).
    pub last_check_at: Option<DateTime<Utc>>,
    /// When maintenance last ran (leader only).
    pub last_maintenance_at: Option<DateTime<Utc>>,
    /// When the scout last read the hot tables' statistics to decide on a vacuum (leader only;
    /// never when the scout's vacuum is turned off).
    pub last_vacuum_check_at: Option<DateTime<Utc>>,
    /// When this process last vacuumed hot tables as scout.
    pub last_vacuum_at: Option<DateTime<Utc>>,
    /// How many hot tables this process vacuumed as scout (a table counts once per VACUUM).
    pub vacuumed_tables: u64,
    /// Hot tables that needed a vacuum at the last check which this process's role may not
    /// vacuum (not their owner): the scout skips them, and they stay unvacuumed unless
    /// autovacuum or a job of the owner does it.
    pub vacuum_denied: Vec<String>,
    /// Lease queries that failed in a row; the scout steps down after two.
    pub failed_renewals: u32,
    /// How many times a scout task (elector, due-waker, maintainer, vacuumer) failed and was restarted.
    pub restarts: u64,
    /// The last failure of a scout task, when there was one.
    pub last_error: Option<String>,
}

/// The lease as this process holds it.
#[derive(Debug, Default)]
pub(super) struct LeaseState {
    term: Option<i64>,
    /// Local deadline of the lease: when the last successful renewal was sent, plus the TTL.
    valid_until: Option<Instant>,
    failures: u32,
}

/// Runs the candidate until `token` is cancelled, then resigns. Returns the error of a failed
/// lease query (after stepping down when that was one failure too many).
pub(super) async fn run(shared: Arc<Shared>, token: CancellationToken) -> crate::Result<()> {
    let renew_every = shared.scout.ttl / 3;
    let mut wakes = shared.bus.subscribe();
    loop {
        if token.is_cancelled() {
            resign_if_held(&shared).await;
            return Ok(());
        }
        let held = lock(&shared.lease).term;
        let sent = Instant::now();
        let outcome = {
            let acquire = acquire(&shared, held.unwrap_or(0));
            tokio::pin!(acquire);
            loop {
                let valid_until = lock(&shared.lease).valid_until;
                tokio::select! {
                    biased;
                    r = &mut acquire => break r,
                    _ = tokio::time::sleep_until(valid_until.unwrap_or(sent)), if valid_until.is_some() => {
                        step_down(&shared, "the lease ran out while its renewal was still running");
                    }
                }
            }
        };
        match outcome {
            Ok(Some(term)) => {
                if held != Some(term) {
                    tracing::info!(holder = %shared.holder, term, namespace = %shared.namespace, "pgtide scout: leading");
                }
                {
                    let mut lease = lock(&shared.lease);
                    lease.term = Some(term);
                    lease.valid_until = Some(sent + shared.scout.ttl);
                    lease.failures = 0;
                }
                shared.scout_status.send_modify(|s| {
                    s.is_leader = true;
                    s.term = Some(term);
                    s.failed_renewals = 0;
                });
                shared.elected.send_if_modified(|t| {
                    let changed = *t != Some(term);
                    *t = Some(term);
                    changed
                });
            }
            Ok(None) => {
                if lock(&shared.lease).term.is_some() {
                    step_down(&shared, "another holder has the lease");
                }
                lock(&shared.lease).failures = 0;
                shared.scout_status.send_modify(|s| s.failed_renewals = 0);
            }
            Err(e) => {
                let (failures, expired) = {
                    let mut lease = lock(&shared.lease);
                    lease.failures += 1;
                    let expired = lease.valid_until.is_some_and(|v| Instant::now() >= v);
                    (lease.failures, expired)
                };
                shared
                    .scout_status
                    .send_modify(|s| s.failed_renewals = failures);
                if failures >= MAX_FAILED_RENEWALS || expired {
                    step_down(&shared, "lease renewals failed");
                }
                return Err(e);
            }
        }
        let next = Instant::now() + renew_every;
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                _ = tokio::time::sleep_until(next) => break,
                wake = wakes.recv() => match wake {
                    // The scout resigned: a candidate takes over at once rather than at expiry.
                    Ok(Wake::ScoutResigned) if lock(&shared.lease).term.is_none() => break,
                    Err(broadcast::error::RecvError::Closed) => break,
                    _ => {}
                },
            }
        }
    }
}

/// Stops acting as scout: the due-waker and the maintainer stop at once. The lease row is left
/// to expire; this process wins it again only under a new term.
fn step_down(shared: &Shared, why: &str) {
    let was = {
        let mut lease = lock(&shared.lease);
        lease.valid_until = None;
        lease.term.take()
    };
    if let Some(term) = was {
        tracing::warn!(holder = %shared.holder, term, namespace = %shared.namespace, why, "pgtide scout: stepping down");
    }
    shared.elected.send_if_modified(|t| t.take().is_some());
    shared.scout_status.send_modify(|s| {
        s.is_leader = false;
        s.term = None;
    });
}

/// Gives the lease back (if held) so that another process takes over at once.
pub(super) async fn resign_if_held(shared: &Shared) {
    let term = lock(&shared.lease).term;
    step_down_quietly(shared);
    if let Some(term) = term {
        if let Err(e) = resign(shared, term).await {
            tracing::warn!(error = %e, "pgtide scout: resign failed; the lease will expire");
        }
    }
}

/// Forgets the lease without a word, as a crash would (and as a clean resign does first).
pub(super) fn step_down_quietly(shared: &Shared) {
    {
        let mut lease = lock(&shared.lease);
        lease.term = None;
        lease.valid_until = None;
    }
    shared.elected.send_if_modified(|t| t.take().is_some());
    shared.scout_status.send_modify(|s| {
        s.is_leader = false;
        s.term = None;
    });
}

async fn acquire(shared: &Shared, term: i64) -> crate::Result<Option<i64>> {
    let client = shared.pool.get().await?;
    let row = shared
        .sql
        .scout_acquire
        .one(
            &client,
            &[
                &shared.holder,
                &term,
                &crate::postgres::micros(shared.scout.ttl),
            ],
        )
        .await?;
    Ok(row.try_get(0)?)
}

async fn resign(shared: &Shared, term: i64) -> crate::Result<()> {
    let client = shared.pool.get().await?;
    shared
        .sql
        .scout_resign
        .execute(&client, &[&shared.holder, &term])
        .await?;
    Ok(())
}
