//! The scout: one leader per namespace, elected by a lease row with fencing (holder + term
//! compare-and-swap, TTL, renewal at a third of the TTL, resign with a NOTIFY on shutdown).
//!
//! The leader wakes the streams whose delayed deliveries or expired leases came due: it sleeps
//! until the earliest due time it knows (from the index, or from `@<ms>` notifications of new
//! delayed work), bounded by `max_interval`, rather than polling blindly. It also runs the
//! maintenance pass (partitions ahead, retention, dedupe window, counters).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::statements::Statements;
use super::wake::{Notifier, Wake};

/// Scout settings.
#[derive(Debug, Clone)]
pub(crate) struct ScoutConfig {
    pub ttl: Duration,
    pub max_interval: Duration,
    pub maintenance_interval: Duration,
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
}

pub(crate) struct Scout {
    pub pool: Pool,
    pub ns: String,
    pub sql: Arc<Statements>,
    pub config: ScoutConfig,
    pub bus: broadcast::Sender<Wake>,
    pub notifier: Arc<Notifier>,
    pub status: Arc<Mutex<ScoutStatus>>,
    pub holder: String,
}

type DbResult<T> = Result<T, crate::Error>;

impl Scout {
    fn set(&self, f: impl FnOnce(&mut ScoutStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    async fn acquire(&self, term: i64) -> DbResult<Option<i64>> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                &self.sql.scout_acquire,
                &[&self.holder, &term, &super::micros(self.config.ttl)],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn resign(&self, term: i64) -> DbResult<()> {
        let client = self.pool.get().await?;
        client
            .execute(&self.sql.scout_resign, &[&self.holder, &term])
            .await?;
        Ok(())
    }

    /// Streams that came due since `since`, the next due time and the database's now.
    async fn due(
        &self,
        since: DateTime<Utc>,
    ) -> DbResult<(Vec<String>, Option<DateTime<Utc>>, DateTime<Utc>)> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(&self.sql.scout_due).await?;
        let row = client.query_one(&stmt, &[&since]).await?;
        Ok((
            row.try_get::<_, Option<Vec<String>>>(0)?
                .unwrap_or_default(),
            row.try_get(1)?,
            row.try_get(2)?,
        ))
    }

    async fn maintain(&self, term: i64) -> DbResult<()> {
        let client = self.pool.get().await?;
        // Fenced: runs only while this holder still has this term.
        client
            .query(&self.sql.scout_maintain, &[&self.holder, &term])
            .await?;
        Ok(())
    }

    /// The candidate loop: never returns before `token` is cancelled; errors are logged and
    /// retried with backoff.
    pub(crate) async fn run(self, token: CancellationToken) {
        let mut wakes = self.bus.subscribe();
        let mut term: Option<i64> = None;
        let renew_every = self.config.ttl / 3;
        let mut next_renew = Instant::now();
        let mut next_check = Instant::now();
        let mut next_maintenance = Instant::now();
        let mut since: DateTime<Utc> = DateTime::<Utc>::UNIX_EPOCH;
        let mut failures = 0u32;
        loop {
            let now = Instant::now();
            // Lease: acquire or renew.
            if now >= next_renew {
                match self.acquire(term.unwrap_or(0)).await {
                    Ok(Some(t)) => {
                        if term != Some(t) {
                            tracing::info!(holder = %self.holder, term = t, namespace = %self.ns, "pgtide scout: leading");
                            since = DateTime::<Utc>::UNIX_EPOCH;
                            next_check = Instant::now();
                            next_maintenance = Instant::now();
                        }
                        term = Some(t);
                        failures = 0;
                        self.set(|s| {
                            s.is_leader = true;
                            s.term = Some(t);
                        });
                        next_renew = Instant::now() + renew_every;
                    }
                    Ok(None) => {
                        if term.is_some() {
                            tracing::warn!(holder = %self.holder, "pgtide scout: lost the lease");
                        }
                        term = None;
                        self.set(|s| {
                            s.is_leader = false;
                            s.term = None;
                        });
                        next_renew = Instant::now() + renew_every;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "pgtide scout: lease query failed");
                        next_renew = Instant::now() + backoff(failures);
                    }
                }
            }
            if let Some(t) = term {
                if Instant::now() >= next_check {
                    match self.due(since).await {
                        Ok((streams, next_due, checked_at)) => {
                            for s in streams {
                                self.notifier.poke(Wake::Stream(Arc::from(s)));
                            }
                            since = checked_at;
                            self.set(|s| s.last_check_at = Some(checked_at));
                            let mut wait = self.config.max_interval;
                            if let Some(due) = next_due {
                                let until = (due - checked_at).to_std().unwrap_or_default();
                                wait = wait.min(until + Duration::from_millis(1));
                            }
                            next_check = Instant::now() + wait;
                        }
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(error = %e, "pgtide scout: due check failed");
                            next_check = Instant::now() + backoff(failures);
                        }
                    }
                }
                if Instant::now() >= next_maintenance {
                    match self.maintain(t).await {
                        Ok(()) => {
                            self.set(|s| s.last_maintenance_at = Some(Utc::now()));
                            next_maintenance = Instant::now() + self.config.maintenance_interval;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "pgtide scout: maintenance failed");
                            next_maintenance = Instant::now()
                                + self
                                    .config
                                    .maintenance_interval
                                    .min(Duration::from_secs(30));
                        }
                    }
                }
            }
            let deadline = if term.is_some() {
                next_renew.min(next_check).min(next_maintenance)
            } else {
                next_renew
            };
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => {}
                wake = wakes.recv() => match wake {
                    Ok(Wake::ScoutResigned) if term.is_none() => next_renew = Instant::now(),
                    Ok(Wake::Due(ms)) if term.is_some() => {
                        let now_ms = Utc::now().timestamp_millis();
                        let at = Instant::now() + Duration::from_millis(ms.saturating_sub(now_ms).max(0) as u64);
                        next_check = next_check.min(at);
                    }
                    Ok(Wake::All) | Err(broadcast::error::RecvError::Lagged(_)) if term.is_some() => next_check = Instant::now(),
                    Err(broadcast::error::RecvError::Closed) => break,
                    _ => {}
                },
            }
        }
        if let Some(t) = term {
            if let Err(e) = self.resign(t).await {
                tracing::warn!(error = %e, "pgtide scout: resign failed; the lease will expire");
            }
        }
        self.set(|s| {
            s.is_leader = false;
            s.term = None;
        });
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}
