//! The scout's vacuum of the hot tables (issue 11): where autovacuum is off for them, the scout
//! vacuums the ones that hold dead row versions (and only those); turned off, it never does; run
//! by a role that does not own them, it skips them without an error loop and says so, as does
//! `vacuum_status` (what `pgtide health` reads).
//!
//! Each test turns autovacuum off for its own namespace's hot tables, so the tests mean the same
//! on a server with autovacuum on. Table statistics reach `pg_stat_user_tables` about a second
//! after the transactions that changed them: the tests poll them with a timeout.

use std::time::Duration;

use pgtide::{PgBackend, StreamConfig};

use super::privileges::Role;
use crate::common::{json, namespace, wait_for, TestNs};

const LONG: Duration = Duration::from_secs(30);

/// Turns autovacuum off for the namespace's hot tables.
async fn autovacuum_off(ns: &TestNs) {
    let n = ns.namespace();
    ns.raw()
        .await
        .batch_execute(&format!(
            "ALTER TABLE \"{n}\".delivery_state SET (autovacuum_enabled = false);
             ALTER TABLE \"{n}\".counter_deltas SET (autovacuum_enabled = false);
             ALTER TABLE \"{n}\".dead_letter_state SET (autovacuum_enabled = false);"
        ))
        .await
        .unwrap();
}

/// Publishes and drains `n` messages on `s`/`g`: each leaves two dead row versions in
/// `delivery_state` (the claim rewrites the row, the ack deletes it). Through a handle of its
/// own, closed at the end: an exiting backend flushes its table statistics at once, where an
/// idle pooled one may keep them up to 10 s.
async fn churn(ns: &TestNs, n: usize) {
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let pg = PgBackend::builder(ns.url.clone())
        .namespace(ns.namespace())
        .pool_size(2)
        .build()
        .unwrap();
    let msgs: Vec<_> = (0..n).map(|i| json(serde_json::json!(i))).collect();
    for chunk in msgs.chunks(100) {
        pg.publish_batch("s", chunk).await.unwrap();
    }
    let c = pg.consumer("s", "g", "c").await.unwrap();
    let mut acked = 0;
    while acked < n {
        let ds = c.try_fetch(100).await.unwrap();
        assert!(!ds.is_empty(), "{acked} of {n} drained");
        c.ack_batch(&ds.iter().collect::<Vec<_>>()).await.unwrap();
        acked += ds.len();
    }
    drop(c);
    pg.shutdown().await;
}

/// `(n_dead_tup, last_vacuum is set)` of one table of the namespace.
async fn table_stats(ns: &TestNs, table: &str) -> (i64, bool) {
    let row = ns
        .raw()
        .await
        .query_one(
            "SELECT n_dead_tup, last_vacuum IS NOT NULL FROM pg_stat_user_tables
             WHERE schemaname = $1 AND relname = $2",
            &[&ns.namespace(), &table],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Waits until the statistics show at least `min` dead rows in `delivery_state`.
async fn dead_rows_reported(ns: &TestNs, min: i64) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let (dead, _) = table_stats(ns, "delivery_state").await;
        if dead >= min {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery_state shows {dead} dead rows, not {min}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn scout_of(ns: &TestNs, url: &str) -> pgtide::PgBackendBuilder {
    PgBackend::builder(url.to_owned())
        .namespace(ns.namespace())
        .pool_size(4)
        .scout_max_interval(Duration::from_millis(50))
        .vacuum_interval(Duration::from_millis(200))
        .vacuum_min_dead_rows(200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scout_vacuums_hot_tables_where_autovacuum_is_off() {
    let ns = namespace().await;
    autovacuum_off(&ns).await;
    churn(&ns, 300).await;
    dead_rows_reported(&ns, 400).await;
    assert!(
        !table_stats(&ns, "delivery_state").await.1,
        "never vacuumed"
    );

    let scout = scout_of(&ns, &ns.url).build().unwrap();
    scout.start_scout();
    let status = wait_for(&mut scout.watch_scout(), LONG, "a vacuum", |s| {
        s.vacuumed_tables > 0
    })
    .await;
    assert!(status.last_vacuum_at.is_some(), "{status:?}");
    assert!(status.vacuum_denied.is_empty(), "{status:?}");
    let (_, vacuumed) = table_stats(&ns, "delivery_state").await;
    assert!(vacuumed, "last_vacuum of delivery_state is set");
    // Only what needed it: the dead letters were never touched.
    assert_eq!(table_stats(&ns, "dead_letter_state").await, (0, false));
    let status = scout.scout_status();
    assert_eq!((status.restarts, status.last_error), (0, None));
    // The admin's view: autovacuum off is worth a warning, but nothing is neglected.
    let vs = ns.vacuum_status().await.unwrap();
    let ds = vs
        .tables
        .iter()
        .find(|t| t.table == "delivery_state")
        .expect("delivery_state is listed");
    assert!(
        !ds.autovacuum && ds.can_vacuum && ds.last_vacuum.is_some(),
        "{ds:?}"
    );
    let warnings = vs.warnings();
    assert!(
        warnings.iter().any(|w| w.contains("delivery_state")) && warnings.len() == 1,
        "{warnings:?}"
    );
    scout.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turned_off_the_scout_never_vacuums() {
    let ns = namespace().await;
    autovacuum_off(&ns).await;
    churn(&ns, 300).await;
    dead_rows_reported(&ns, 400).await;

    let scout = scout_of(&ns, &ns.url).scout_vacuum(false).build().unwrap();
    scout.start_scout();
    let mut watch = scout.watch_scout();
    wait_for(&mut watch, LONG, "leading and maintenance", |s| {
        s.is_leader && s.last_maintenance_at.is_some()
    })
    .await;
    // Twenty due checks at 50 ms: time for a few vacuum checks at 200 ms, had it been on.
    for _ in 0..20 {
        let last = watch.borrow_and_update().last_check_at;
        wait_for(&mut watch, LONG, "a due check", |s| s.last_check_at != last).await;
    }
    let status = scout.scout_status();
    assert_eq!(
        (status.last_vacuum_check_at, status.vacuumed_tables),
        (None, 0),
        "{status:?}"
    );
    assert!(
        !table_stats(&ns, "delivery_state").await.1,
        "never vacuumed"
    );
    scout.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scout_that_does_not_own_the_tables_skips_them_and_says_so() {
    let ns = namespace().await;
    autovacuum_off(&ns).await;
    let role = Role::create(&ns, "vacuum").await;
    ns.grant_runtime(&role.name).await.unwrap();
    churn(&ns, 300).await;
    dead_rows_reported(&ns, 400).await;

    let scout = scout_of(&ns, &role.url).build().unwrap();
    scout.start_scout();
    let mut watch = scout.watch_scout();
    wait_for(&mut watch, LONG, "the denied table reported", |s| {
        s.vacuum_denied.iter().any(|t| t == "delivery_state")
    })
    .await;
    // Further checks: still skipped, still no error and no restart (no error loop).
    for _ in 0..3 {
        let last = watch.borrow_and_update().last_vacuum_check_at;
        wait_for(&mut watch, LONG, "a vacuum check", |s| {
            s.last_vacuum_check_at != last
        })
        .await;
    }
    let status = scout.scout_status();
    assert_eq!(
        (status.vacuumed_tables, status.restarts, &status.last_error),
        (0, 0, &None),
        "{status:?}"
    );
    assert!(status.vacuum_denied.contains(&"delivery_state".to_owned()));
    assert!(
        !table_stats(&ns, "delivery_state").await.1,
        "never vacuumed"
    );

    // What `pgtide health` run as that role says.
    let vs = scout.vacuum_status().await.unwrap();
    assert_eq!(vs.role, role.name);
    let ds = vs
        .tables
        .iter()
        .find(|t| t.table == "delivery_state")
        .expect("delivery_state is listed");
    assert!(!ds.can_vacuum && !ds.autovacuum, "{ds:?}");
    let warnings = vs.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("may not vacuum") && w.contains("delivery_state")),
        "{warnings:?}"
    );
    // The owner may.
    let vs = ns.vacuum_status().await.unwrap();
    assert!(vs.tables.iter().all(|t| t.can_vacuum), "{vs:?}");
    scout.shutdown().await;
}
