//! Event-driven delivery: notifications, listener reconnects, scout election, poll-only mode,
//! and the background services' supervision (restart, step-down, shutdown).
//!
//! Tests wait on the handle's events (`watch_listener`, `watch_scout`, `watch_waiting_fetches`)
//! with a timeout, never on a fixed sleep.

use std::time::{Duration, Instant};

use pgtide::{PgBackend, PgConsumer, StreamConfig};

use crate::common::{json, namespace, wait_for, TestNs, WAIT};

pub(super) const HOUR: Duration = Duration::from_secs(3600);

pub(super) fn handle(url: &str, ns: &str) -> pgtide::PgBackendBuilder {
    PgBackend::builder(url).namespace(ns).pool_size(4)
}

/// Waits until `n` fetches of `pg` are blocked waiting for a wake-up: a publish after this
/// can only reach them through a notification (or their poll interval).
pub(super) async fn until_waiting(pg: &PgBackend, n: usize) {
    wait_for(
        &mut pg.watch_waiting_fetches(),
        WAIT,
        "a waiting fetch",
        |w| *w >= n,
    )
    .await;
}

/// A consumer side with a 1 h fallback poll whose listener is connected.
pub(super) async fn waiting_side(ns: &TestNs) -> (PgBackend, PgConsumer) {
    waiting_side_with(ns, |b| b).await
}

/// [`waiting_side`] with more builder settings.
pub(super) async fn waiting_side_with(
    ns: &TestNs,
    tweak: impl FnOnce(pgtide::PgBackendBuilder) -> pgtide::PgBackendBuilder,
) -> (PgBackend, PgConsumer) {
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let side = tweak(handle(&ns.url, ns.namespace()).poll_interval(HOUR))
        .build()
        .unwrap();
    let c = side.consumer("s", "g", "c").await.unwrap();
    listening(&side, &c, Duration::from_millis(1)).await;
    (side, c)
}

/// Starts `side`'s listener with a first fetch of `c` (which must find nothing, waiting up to
/// `timeout`), and waits until the listener is connected.
pub(super) async fn listening(side: &PgBackend, c: &PgConsumer, timeout: Duration) {
    assert!(c.fetch(1, timeout).await.unwrap().is_empty());
    wait_for(&mut side.watch_listener(), WAIT, "listener", |s| {
        s.connected
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_wakes_a_waiting_consumer_without_polling() {
    let ns = namespace().await;
    let (consumer_side, c) = waiting_side(&ns).await;

    // 1. From another handle's pool (coalescing notifier).
    let waiter = tokio::spawn({
        let c = c.clone();
        async move {
            let got = c.fetch(1, WAIT).await.unwrap();
            (got, Instant::now())
        }
    });
    until_waiting(&consumer_side, 1).await;
    let sent = Instant::now();
    ns.publish("s", json(serde_json::json!(1))).await.unwrap();
    let (got, at) = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(at - sent < Duration::from_secs(1), "took {:?}", at - sent);

    // 2. From plain SQL (the INSERT trigger).
    let waiter = tokio::spawn({
        let c = c.clone();
        async move {
            let got = c.fetch(1, WAIT).await.unwrap();
            (got, Instant::now())
        }
    });
    until_waiting(&consumer_side, 1).await;
    let raw = ns.raw().await;
    let sent = Instant::now();
    raw.execute(
        &format!("SELECT \"{}\".publish('s', '2')", ns.namespace()),
        &[],
    )
    .await
    .unwrap();
    let (got, at) = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(at - sent < Duration::from_secs(1), "took {:?}", at - sent);
    assert!(consumer_side
        .listener_status()
        .last_notification_at
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_its_backend_is_killed_and_misses_nothing() {
    let ns = namespace().await;
    let (side, c) = waiting_side(&ns).await;
    let mut listener = side.watch_listener();
    let raw = ns.raw().await;
    let channel = format!("pgtide.{}", ns.namespace());
    let killed: i64 = raw
        .query_one(
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_stat_activity a
             JOIN LATERAL (SELECT a.pid) l ON true
             WHERE a.application_name = 'pgtide-listener' AND a.pid IN (
                 SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN \"' || $1 || '\"%')",
            &[&channel],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    // Published while the listener is down: no notification reaches it.
    ns.publish("s", json(serde_json::json!("during outage")))
        .await
        .unwrap();
    let got = c.fetch(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1, "the catch-up fetch after reconnect found it");
    let status = wait_for(&mut listener, WAIT, "reconnect", |s| {
        s.reconnects >= 1 && s.connected
    })
    .await;
    // The supervisor saw the session fail, recorded why, and restarted it.
    assert!(status.restarts >= 1, "{status:?}");
    assert!(status.last_error.is_some(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_only_mode_delivers_everything() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let side = handle(&ns.url, ns.namespace())
        .notifications(false)
        .poll_interval(Duration::from_millis(50))
        .scout_max_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let c = side.consumer("s", "g", "c").await.unwrap();
    let raw = ns.raw().await;
    let mut want = 0;
    for i in 0..50 {
        raw.execute(
            &format!("SELECT \"{}\".publish('s', $1)", ns.namespace()),
            &[&serde_json::json!(i)],
        )
        .await
        .unwrap();
        want += 1;
    }
    side.publish(
        "s",
        json(serde_json::json!("delayed")).delay(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    want += 1;
    let mut got = 0;
    let deadline = Instant::now() + WAIT;
    while got < want {
        assert!(Instant::now() < deadline, "only {got} of {want}");
        let batch = c.fetch(10, Duration::from_secs(1)).await.unwrap();
        got += batch.len();
        c.ack_batch(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }
    assert_eq!(got, want);
    assert!(
        !side.listener_status().connected,
        "poll-only mode opens no LISTEN connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scout_failover_after_a_crash_and_delayed_messages_still_fire() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let ttl = Duration::from_millis(1000);
    let a = handle(&ns.url, ns.namespace())
        .scout_ttl(ttl)
        .poll_interval(HOUR)
        .build()
        .unwrap();
    let b = handle(&ns.url, ns.namespace())
        .scout_ttl(ttl)
        .poll_interval(HOUR)
        .build()
        .unwrap();
    a.start_scout();
    wait_for(&mut a.watch_scout(), WAIT, "a leads", |s| s.is_leader).await;
    b.start_scout();
    let c = b.consumer("s", "g", "c").await.unwrap();
    assert!(c
        .fetch(1, Duration::from_millis(1))
        .await
        .unwrap()
        .is_empty());
    assert!(!b.scout_status().is_leader);

    // Crash: no resign, no flush.
    a.abort_background();
    let crashed = Instant::now();
    wait_for(
        &mut b.watch_scout(),
        ttl * 2 + Duration::from_millis(500),
        "b takes over",
        |s| s.is_leader,
    )
    .await;
    assert!(
        crashed.elapsed() <= ttl * 2 + Duration::from_millis(500),
        "failover took {:?}",
        crashed.elapsed()
    );
    let raw = ns.raw().await;
    let row = raw
        .query_one(
            &format!(
                "SELECT holder, term, active FROM \"{}\".scout",
                ns.namespace()
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), b.scout_status().holder_id);
    assert_eq!(row.get::<_, i64>(1), 2);
    assert!(row.get::<_, bool>(2));

    // The new scout fires delayed messages (the consumer never polls: interval is an hour).
    let published = Instant::now();
    a.publish(
        "s",
        json(serde_json::json!("later")).delay(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let got = c.fetch(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    let late = published.elapsed();
    assert!(
        late >= Duration::from_millis(290) && late < Duration::from_secs(2),
        "delivered after {late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_resign_hands_over_at_once() {
    let ns = namespace().await;
    let ttl = Duration::from_secs(30);
    let a = handle(&ns.url, ns.namespace())
        .scout_ttl(ttl)
        .build()
        .unwrap();
    let b = handle(&ns.url, ns.namespace())
        .scout_ttl(ttl)
        .build()
        .unwrap();
    a.start_scout();
    wait_for(&mut a.watch_scout(), WAIT, "a leads", |s| s.is_leader).await;
    b.start_scout();
    wait_for(&mut b.watch_listener(), WAIT, "b listening", |s| {
        s.connected
    })
    .await;
    let started = Instant::now();
    a.shutdown().await;
    wait_for(
        &mut b.watch_scout(),
        Duration::from_secs(5),
        "b takes over",
        |s| s.is_leader,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "handover took {:?} (TTL is 30 s)",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_wake_waiting_consumers() {
    let ns = namespace().await;
    ns.stream_with_groups(
        "s",
        StreamConfig::default().lease(Duration::from_millis(300)),
        &["g"],
    )
    .await;
    let side = handle(&ns.url, ns.namespace())
        .poll_interval(HOUR)
        .build()
        .unwrap();
    side.publish("s", json(serde_json::json!(1))).await.unwrap();
    let a = side.consumer("s", "g", "a").await.unwrap();
    let b = side.consumer("s", "g", "b").await.unwrap();
    let first = a.fetch(1, WAIT).await.unwrap();
    assert_eq!(first[0].attempt, 1);
    let started = Instant::now();
    let second = b.fetch(1, WAIT).await.unwrap();
    assert_eq!(second[0].attempt, 2);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "woken after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scout_steps_down_when_renewals_fail_and_leads_again_after() {
    let ns = namespace().await;
    let ttl = Duration::from_millis(1000);
    let a = handle(&ns.url, ns.namespace())
        .scout_ttl(ttl)
        .scout_max_interval(Duration::from_millis(20))
        .maintenance_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    a.start_scout();
    let mut scout = a.watch_scout();
    let leading = wait_for(&mut scout, WAIT, "a leads and works", |s| {
        s.is_leader && s.last_check_at.is_some() && s.last_maintenance_at.is_some()
    })
    .await;
    let first_term = leading.term.unwrap();

    // Every lease query fails from now on (the renewal function and the fenced maintenance read
    // a table that is no longer there), as with a revoked privilege or a broken schema.
    let raw = ns.raw().await;
    let table = format!("\"{}\".scout_lease", ns.namespace());
    raw.batch_execute(&format!("ALTER TABLE {table} RENAME TO scout_lease_away"))
        .await
        .unwrap();
    // Stepping down comes first; the supervisor records the failure just after.
    let stepped_down = wait_for(&mut scout, WAIT, "a steps down", |s| {
        !s.is_leader && s.restarts >= 1
    })
    .await;
    assert!(stepped_down.term.is_none(), "{stepped_down:?}");
    assert!(stepped_down.failed_renewals >= 2, "{stepped_down:?}");
    assert!(
        stepped_down.restarts >= 1,
        "failed tasks are restarted: {stepped_down:?}"
    );
    assert!(
        stepped_down.last_error.is_some(),
        "the failure is recorded: {stepped_down:?}"
    );

    // No longer the scout: no due checks, no maintenance. (Due checks ran every 20 ms and
    // maintenance every 100 ms while it led, so half a second without either is telling.)
    let (checked, maintained) = (stepped_down.last_check_at, stepped_down.last_maintenance_at);
    let idle = tokio::time::timeout(Duration::from_millis(500), async {
        scout
            .wait_for(|s| {
                s.is_leader || s.last_check_at != checked || s.last_maintenance_at != maintained
            })
            .await
            .map(|s| s.clone())
    })
    .await;
    assert!(
        idle.is_err(),
        "acted as scout after stepping down: {idle:?}"
    );

    // Repaired: it wins the lease again once the old one expired, under a new term, and works.
    let away = format!("\"{}\".scout_lease_away", ns.namespace());
    raw.batch_execute(&format!("ALTER TABLE {away} RENAME TO scout_lease"))
        .await
        .unwrap();
    let again = wait_for(&mut scout, WAIT, "a leads again and works", |s| {
        s.is_leader && s.last_check_at != checked && s.last_maintenance_at != maintained
    })
    .await;
    assert!(again.term.unwrap() > first_term, "{again:?}");
    assert_eq!(again.failed_renewals, 0);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_task_and_resigns() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let pg = handle(&ns.url, ns.namespace()).build().unwrap();
    assert_eq!(pg.background_tasks(), 0, "nothing runs before first use");
    // Every service: the scout, the listener, the notifier (a publish pokes it).
    let c = pg.consumer("s", "g", "c").await.unwrap();
    assert!(c
        .fetch(1, Duration::from_millis(1))
        .await
        .unwrap()
        .is_empty());
    pg.publish("s", json(serde_json::json!(1))).await.unwrap();
    wait_for(&mut pg.watch_scout(), WAIT, "leads", |s| s.is_leader).await;
    wait_for(&mut pg.watch_listener(), WAIT, "listening", |s| s.connected).await;
    assert!(pg.background_tasks() >= 5, "{}", pg.background_tasks());

    tokio::time::timeout(WAIT, pg.shutdown())
        .await
        .expect("shutdown returns");
    assert_eq!(pg.background_tasks(), 0);
    assert!(!pg.listener_status().connected);
    assert!(!pg.scout_status().is_leader);
    let raw = ns.raw().await;
    let row = raw
        .query_one(
            &format!("SELECT holder, active FROM \"{}\".scout", ns.namespace()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None, "resigned");
    assert!(!row.get::<_, bool>(1));

    // Stopped for good: use does not start anything again, and the handle still works.
    pg.start_scout();
    pg.publish("s", json(serde_json::json!(2))).await.unwrap();
    assert_eq!(pg.background_tasks(), 0);
    assert_eq!(c.try_fetch(10).await.unwrap().len(), 2);
    let channel = format!("pgtide.{}", ns.namespace());
    // The server ends the listener's backend a moment after the socket closes.
    tokio::time::timeout(WAIT, async {
        loop {
            let listening: i64 = raw
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = 'pgtide-listener'
                       AND query = 'LISTEN \"' || $1 || '\"'",
                    &[&channel],
                )
                .await
                .unwrap()
                .get(0);
            if listening == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the listener's connection is closed");
}
