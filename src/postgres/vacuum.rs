//! Vacuum of the namespace's hot tables: what PostgreSQL's statistics say about them
//! ([`PgBackend::vacuum_status`], read by `pgtide health`), and the rule by which the scout
//! vacuums them when nothing else does (`background/vacuumer.rs`).
//!
//! Claims rewrite delivery rows, acks and retention delete them, counters are inserted and rolled
//! up: the hot tables leave dead row versions at the rate messages flow, and each claim walks the
//! ones still in the claim index. Autovacuum removes them on a normal cluster; where it is off
//! (for the server or per table) or slow to get to them, the scout does it.
//!
//! **The rule.** A table *needs* a vacuum when its dead row versions reach both
//! [`VacuumConfig::min_dead_rows`] and a tenth ([`DEAD_FRACTION`]) of its live rows (so that a
//! big backlog is not rescanned for a few dead rows). Where autovacuum is off for the table the
//! scout vacuums it at the first check that finds it in need (checks run every
//! [`VacuumConfig::interval`]). Where autovacuum is on, the scout leaves it alone as long as
//! autovacuum keeps up, that is, as long as the table has not needed a vacuum for
//! [`AUTOVACUUM_GRACE_NAPTIMES`] autovacuum naptimes in a row without any vacuum running on it;
//! past that (workers busy elsewhere, a scale factor too high for a queue), it steps in.
//!
//! **Who may.** VACUUM needs the table's owner (or a member of its role), a superuser or the
//! database owner (and the MAINTAIN privilege from PostgreSQL 17). A table the role may not vacuum
//! is skipped, never attempted; the scout logs it once and reports it in
//! [`ScoutStatus::vacuum_denied`](crate::ScoutStatus::vacuum_denied).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use super::PgBackend;
use crate::error::{Ctx, Result};

/// The namespace's tables whose rows are updated or deleted at message rate. The append-only
/// message partitions are not among them: retention drops them whole.
pub(crate) const HOT_TABLES: [&str; 8] = [
    "counter_deltas",
    "dead_letter_state",
    "dedupe",
    "delivery_state",
    "fair_keys",
    "group_counters",
    "rate_buckets",
    "scout_lease",
];

/// Fraction of a table's live rows its dead rows must also reach before the scout vacuums it.
pub(crate) const DEAD_FRACTION: f64 = 0.1;

/// With autovacuum on for a table, how many autovacuum naptimes it may need a vacuum without one
/// before the scout steps in. Autovacuum visits each database once per naptime (1 min by
/// default), so three leave it two chances.
pub(crate) const AUTOVACUUM_GRACE_NAPTIMES: u32 = 3;

/// Dead row versions from which [`VacuumStatus::warnings`] calls a table neglected (and a fifth
/// of its live rows, autovacuum's own default scale factor).
pub(crate) const NEGLECTED_DEAD_ROWS: i64 = 100_000;

/// How long a table over [`NEGLECTED_DEAD_ROWS`] may go without any vacuum before
/// [`VacuumStatus::warnings`] calls it neglected: longer than the scout's grace after a default
/// autovacuum naptime, so a working scout or autovacuum never trips it.
pub(crate) const NEGLECTED_AFTER: Duration = Duration::from_secs(300);

/// The scout's vacuum settings (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct VacuumConfig {
    /// Whether the scout vacuums at all.
    pub enabled: bool,
    /// How often the scout looks at the hot tables' statistics.
    pub interval: Duration,
    /// Dead row versions a table must hold before the scout vacuums it.
    pub min_dead_rows: u64,
}

impl Default for VacuumConfig {
    fn default() -> Self {
        VacuumConfig {
            enabled: true,
            interval: Duration::from_secs(10),
            min_dead_rows: 10_000,
        }
    }
}

/// One hot table of the namespace as PostgreSQL's cumulative statistics see it (they lag the
/// truth by about a second).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HotTable {
    /// The table's name in the namespace, e.g. `delivery_state`.
    pub table: String,
    /// Dead row versions (`pg_stat_user_tables.n_dead_tup`).
    pub dead_rows: i64,
    /// Live rows (`n_live_tup`).
    pub live_rows: i64,
    /// The last manual VACUUM (the scout's included).
    pub last_vacuum: Option<DateTime<Utc>>,
    /// The last vacuum by autovacuum.
    pub last_autovacuum: Option<DateTime<Utc>>,
    /// Whether autovacuum may vacuum it: on for the server, statistics collected, and not turned
    /// off for the table (`autovacuum_enabled = false`).
    pub autovacuum: bool,
    /// Whether the role of this handle may VACUUM it.
    pub can_vacuum: bool,
    /// The table's owner.
    pub owner: String,
}

impl HotTable {
    /// The later of the last manual and automatic vacuum.
    pub fn vacuumed_at(&self) -> Option<DateTime<Utc>> {
        self.last_vacuum.max(self.last_autovacuum)
    }

    /// Whether its dead rows reach `min_dead_rows` and [`DEAD_FRACTION`] of its live rows.
    fn needs_vacuum(&self, min_dead_rows: u64) -> bool {
        let min = i64::try_from(min_dead_rows).unwrap_or(i64::MAX);
        self.dead_rows >= min && self.dead_rows as f64 >= DEAD_FRACTION * self.live_rows as f64
    }
}

/// The namespace's hot tables and the server's autovacuum settings
/// ([`PgBackend::vacuum_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VacuumStatus {
    /// Whether autovacuum runs on the server (`autovacuum` and `track_counts` on).
    pub server_autovacuum: bool,
    /// `autovacuum_naptime`: how often autovacuum visits each database.
    pub autovacuum_naptime: Duration,
    /// The role of this handle's connections.
    pub role: String,
    /// The server's clock when the statistics were read.
    pub at: DateTime<Utc>,
    /// The hot tables, by name (none when the namespace is not installed).
    pub tables: Vec<HotTable>,
}

impl VacuumStatus {
    pub(crate) fn from_rows(rows: &[Row]) -> Result<VacuumStatus> {
        let mut status = VacuumStatus {
            server_autovacuum: false,
            autovacuum_naptime: Duration::from_secs(60),
            role: String::new(),
            at: Utc::now(),
            tables: vec![],
        };
        for row in rows {
            status.server_autovacuum = row.try_get(8)?;
            let naptime: Option<i32> = row.try_get(9)?;
            if let Some(secs) = naptime.and_then(|s| u64::try_from(s).ok()) {
                status.autovacuum_naptime = Duration::from_secs(secs);
            }
            status.role = row.try_get(10)?;
            status.at = row.try_get(11)?;
            let Some(table) = row.try_get::<_, Option<String>>(0)? else {
                continue;
            };
            status.tables.push(HotTable {
                table,
                dead_rows: row.try_get(1)?,
                live_rows: row.try_get(2)?,
                last_vacuum: row.try_get(3)?,
                last_autovacuum: row.try_get(4)?,
                autovacuum: row.try_get(5)?,
                can_vacuum: row.try_get(6)?,
                owner: row.try_get(7)?,
            });
        }
        Ok(status)
    }

    /// What an operator should hear about vacuum, one sentence each; empty when autovacuum is
    /// on for every hot table and none is neglected. Said: autovacuum off for the server or for
    /// hot tables (and, when this handle's role may not vacuum them, that a scout of this role
    /// will not either); and any hot table holding at least 100 000 dead row versions and a fifth
    /// of its live rows that no vacuum touched for 5 minutes (nothing is vacuuming it).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = vec![];
        let off: Vec<&HotTable> = self.tables.iter().filter(|t| !t.autovacuum).collect();
        if !off.is_empty() {
            let listed = names(&off);
            let mut w = if self.server_autovacuum {
                format!("autovacuum is off for {listed}: the scout vacuums them when its role may")
            } else {
                format!("autovacuum is off on this server: the scout vacuums {listed} when its role may")
            };
            let denied: Vec<&HotTable> = off.iter().copied().filter(|t| !t.can_vacuum).collect();
            if !denied.is_empty() {
                w.push_str(&format!(
                    "; role {:?} may not vacuum {} (owner {:?}): run the scout as the owner, vacuum from a job, or turn autovacuum on",
                    self.role,
                    names(&denied),
                    denied[0].owner
                ));
            }
            warnings.push(w);
        }
        for t in &self.tables {
            let many = t.dead_rows >= NEGLECTED_DEAD_ROWS
                && t.dead_rows as f64 >= 0.2 * t.live_rows as f64;
            let stale = t.vacuumed_at().map_or(true, |at| {
                self.at
                    .signed_duration_since(at)
                    .to_std()
                    .unwrap_or_default()
                    > NEGLECTED_AFTER
            });
            if many && stale {
                let last = match t.vacuumed_at() {
                    Some(at) => format!("last vacuumed at {}", at.format("%Y-%m-%dT%H:%M:%SZ")),
                    None => "never vacuumed".to_owned(),
                };
                warnings.push(format!(
                    "{} holds {} dead row versions ({} live), {last}: nothing vacuums it; claims slow down until something does (owner {:?})",
                    t.table, t.dead_rows, t.live_rows, t.owner
                ));
            }
        }
        warnings
    }
}

fn names(tables: &[&HotTable]) -> String {
    tables
        .iter()
        .map(|t| t.table.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one check decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct VacuumPlan {
    /// Tables to vacuum now.
    pub vacuum: Vec<&'static str>,
    /// Tables that need it but the role may not vacuum.
    pub denied: Vec<String>,
}

/// The scout's memory between checks: since when each table (with autovacuum on) has needed a
/// vacuum, by the server's clock.
#[derive(Debug, Default)]
pub(crate) struct VacuumTracker {
    needed_since: HashMap<String, DateTime<Utc>>,
}

impl VacuumTracker {
    /// Applies the rule of the module docs to one reading of the statistics.
    pub(crate) fn plan(&mut self, status: &VacuumStatus, config: &VacuumConfig) -> VacuumPlan {
        let grace = status.autovacuum_naptime * AUTOVACUUM_GRACE_NAPTIMES;
        let mut plan = VacuumPlan::default();
        for t in &status.tables {
            // Only names of our own list reach the VACUUM statement.
            let Some(name) = HOT_TABLES.iter().copied().find(|n| *n == t.table) else {
                continue;
            };
            if !t.needs_vacuum(config.min_dead_rows) {
                self.needed_since.remove(name);
                continue;
            }
            let due = if t.autovacuum {
                // Autovacuum keeps up while some vacuum ran within the grace of the need arising.
                let since = *self
                    .needed_since
                    .entry(name.to_owned())
                    .or_insert(status.at);
                let start = t.vacuumed_at().map_or(since, |v| v.max(since));
                status
                    .at
                    .signed_duration_since(start)
                    .to_std()
                    .unwrap_or_default()
                    >= grace
            } else {
                true
            };
            if !due {
                continue;
            }
            if t.can_vacuum {
                plan.vacuum.push(name);
            } else {
                plan.denied.push(name.to_owned());
            }
        }
        plan
    }

    /// Forgets what a vacuum of `tables` just settled.
    pub(crate) fn vacuumed(&mut self, tables: &[&str]) {
        for t in tables {
            self.needed_since.remove(*t);
        }
    }
}

impl PgBackend {
    /// The namespace's hot tables (delivery state, counters, dead letters, dedupe keys,
    /// flow-control and fair-share state, the scout lease) as PostgreSQL's statistics see them,
    /// with the server's autovacuum settings; [`VacuumStatus::warnings`] says what needs
    /// attention. Reads catalogs only, so any role can call it (`docs/production.md`, Vacuum).
    pub async fn vacuum_status(&self) -> Result<VacuumStatus> {
        let rows = self
            .sql_rows(&self.inner.sql.vacuum_tables, &[], Ctx::default())
            .await?;
        VacuumStatus::from_rows(&rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, dead: i64, live: i64, autovacuum: bool) -> HotTable {
        HotTable {
            table: name.to_owned(),
            dead_rows: dead,
            live_rows: live,
            last_vacuum: None,
            last_autovacuum: None,
            autovacuum,
            can_vacuum: true,
            owner: "app".to_owned(),
        }
    }

    fn status(at: DateTime<Utc>, tables: Vec<HotTable>) -> VacuumStatus {
        VacuumStatus {
            server_autovacuum: true,
            autovacuum_naptime: Duration::from_secs(60),
            role: "app".to_owned(),
            at,
            tables,
        }
    }

    fn config() -> VacuumConfig {
        VacuumConfig::default()
    }

    #[test]
    fn autovacuum_off_vacuums_at_the_first_check_over_both_thresholds() {
        let now = Utc::now();
        let mut tracker = VacuumTracker::default();
        let s = status(
            now,
            vec![
                table("delivery_state", 10_000, 50_000, false),
                // Under the absolute threshold.
                table("counter_deltas", 9_999, 0, false),
                // Under a tenth of its live rows.
                table("dead_letter_state", 20_000, 200_001, false),
                // Not a hot table: never vacuumed, whatever it holds.
                table("messages_s1", 1_000_000, 0, false),
            ],
        );
        assert_eq!(
            tracker.plan(&s, &config()),
            VacuumPlan {
                vacuum: vec!["delivery_state"],
                denied: vec![]
            }
        );
    }

    #[test]
    fn autovacuum_on_and_keeping_up_leaves_the_table_alone() {
        let t0 = Utc::now();
        let mut tracker = VacuumTracker::default();
        let mut t = table("delivery_state", 500_000, 100, true);
        for minute in 0..10 {
            let at = t0 + chrono::Duration::minutes(minute);
            // Autovacuum ran a minute ago, every minute.
            t.last_autovacuum = Some(at - chrono::Duration::seconds(59));
            let plan = tracker.plan(&status(at, vec![t.clone()]), &config());
            assert_eq!(plan, VacuumPlan::default(), "minute {minute}");
        }
    }

    #[test]
    fn autovacuum_on_but_not_getting_there_is_helped_after_three_naptimes() {
        let t0 = Utc::now();
        let mut tracker = VacuumTracker::default();
        let mut t = table("delivery_state", 500_000, 100, true);
        t.last_autovacuum = Some(t0 - chrono::Duration::hours(1));
        let at = |secs| t0 + chrono::Duration::seconds(secs);
        assert!(tracker
            .plan(&status(at(0), vec![t.clone()]), &config())
            .vacuum
            .is_empty());
        assert!(tracker
            .plan(&status(at(179), vec![t.clone()]), &config())
            .vacuum
            .is_empty());
        assert_eq!(
            tracker
                .plan(&status(at(180), vec![t.clone()]), &config())
                .vacuum,
            vec!["delivery_state"]
        );
        // A vacuum in between restarts the grace.
        tracker.vacuumed(&["delivery_state"]);
        t.last_vacuum = Some(at(180));
        assert!(tracker
            .plan(&status(at(200), vec![t.clone()]), &config())
            .vacuum
            .is_empty());
        // Falling under the threshold forgets the need.
        let mut low = t.clone();
        low.dead_rows = 10;
        tracker.plan(&status(at(300), vec![low]), &config());
        assert!(tracker
            .plan(&status(at(400), vec![t]), &config())
            .vacuum
            .is_empty());
    }

    #[test]
    fn a_table_the_role_may_not_vacuum_is_denied_not_planned() {
        let mut t = table("delivery_state", 50_000, 0, false);
        t.can_vacuum = false;
        let plan = VacuumTracker::default().plan(&status(Utc::now(), vec![t]), &config());
        assert_eq!(
            plan,
            VacuumPlan {
                vacuum: vec![],
                denied: vec!["delivery_state".to_owned()]
            }
        );
    }

    #[test]
    fn warnings_name_autovacuum_off_the_role_and_neglected_tables() {
        let now = Utc::now();
        assert!(status(now, vec![table("delivery_state", 0, 0, true)])
            .warnings()
            .is_empty());

        let mut off = status(now, vec![table("delivery_state", 0, 0, false)]);
        off.server_autovacuum = false;
        let w = off.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("off on this server"), "{w:?}");

        let mut denied = table("delivery_state", 150_000, 1_000, false);
        denied.can_vacuum = false;
        let w = status(now, vec![denied]).warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("autovacuum is off for delivery_state"),
            "{w:?}"
        );
        assert!(w[0].contains("may not vacuum delivery_state"), "{w:?}");
        assert!(w[1].contains("nothing vacuums it"), "{w:?}");

        // Recently vacuumed: not neglected, whatever it holds now.
        let mut recent = table("delivery_state", 150_000, 1_000, true);
        recent.last_vacuum = Some(now - chrono::Duration::seconds(10));
        assert!(status(now, vec![recent]).warnings().is_empty());
    }
}
