//! Event-driven delivery: notifications, listener reconnects, scout election, poll-only mode.

use std::time::{Duration, Instant};

use pgtide::{PgBackend, StreamConfig};

use crate::common::{eventually, json, namespace, WAIT};

const HOUR: Duration = Duration::from_secs(3600);

fn handle(url: &str, ns: &str) -> pgtide::PgBackendBuilder {
    PgBackend::builder(url).namespace(ns).pool_size(4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_wakes_a_waiting_consumer_without_polling() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let consumer_side = handle(&ns.url, ns.namespace())
        .poll_interval(HOUR)
        .build()
        .unwrap();
    let c = consumer_side.consumer("s", "g", "c").await.unwrap();
    // Warm up: the listener is connected once the first wait has subscribed.
    assert!(c
        .fetch(1, Duration::from_millis(1))
        .await
        .unwrap()
        .is_empty());
    eventually(WAIT, "listener", || {
        consumer_side.listener_status().connected
    })
    .await;

    // 1. From another handle's pool (coalescing notifier).
    let waiter = tokio::spawn({
        let c = c.clone();
        async move {
            let got = c.fetch(1, WAIT).await.unwrap();
            (got, Instant::now())
        }
    });
    // Give the waiter time to make its first (empty) claim and block: there is no event for
    // "now waiting". If the publish still came first the fetch would find it at once, which
    // proves less but cannot fail wrongly.
    tokio::time::sleep(Duration::from_millis(50)).await;
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
    // Give the waiter time to make its first (empty) claim and block: there is no event for
    // "now waiting". If the publish still came first the fetch would find it at once, which
    // proves less but cannot fail wrongly.
    tokio::time::sleep(Duration::from_millis(50)).await;
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
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let side = handle(&ns.url, ns.namespace())
        .poll_interval(HOUR)
        .build()
        .unwrap();
    let c = side.consumer("s", "g", "c").await.unwrap();
    assert!(c
        .fetch(1, Duration::from_millis(1))
        .await
        .unwrap()
        .is_empty());
    eventually(WAIT, "listener", || side.listener_status().connected).await;
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
    eventually(WAIT, "reconnect", || {
        side.listener_status().reconnects >= 1 && side.listener_status().connected
    })
    .await;
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
    eventually(WAIT, "a leads", || a.scout_status().is_leader).await;
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
    eventually(ttl * 2 + Duration::from_millis(500), "b takes over", || {
        b.scout_status().is_leader
    })
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
    eventually(WAIT, "a leads", || a.scout_status().is_leader).await;
    b.start_scout();
    eventually(WAIT, "b listening", || b.listener_status().connected).await;
    let started = Instant::now();
    a.shutdown().await;
    eventually(Duration::from_secs(5), "b takes over", || {
        b.scout_status().is_leader
    })
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
