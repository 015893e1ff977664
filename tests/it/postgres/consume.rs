//! Postgres-only consuming behaviour: the all-groups stats listing, replay and purge of dead
//! letters, acks inside the handler's transaction, `create_group`, claim order and
//! `fetch_until`. What every backend promises is checked once in `conformance/cases.rs`.

use std::collections::HashMap;
use std::time::Duration;

use pgtide::{Backoff, Error, GroupStart, StreamConfig};

use crate::common::{json, namespace, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_three_groups_settled_independently() {
    let ns = namespace().await;
    ns.stream_with_groups(
        "orders",
        StreamConfig::default(),
        &["billing", "shipping", "audit"],
    )
    .await;
    let receipts = ns
        .publish_batch(
            "orders",
            &(0..10)
                .map(|i| json(serde_json::json!(i)))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let billing = ns.consumer("orders", "billing", "b").await.unwrap();
    let shipping = ns.consumer("orders", "shipping", "s").await.unwrap();
    let audit = ns.consumer("orders", "audit", "a").await.unwrap();

    let b = billing.try_fetch(100).await.unwrap();
    assert_eq!(b.len(), 10);
    billing
        .ack_batch(&b.iter().collect::<Vec<_>>())
        .await
        .unwrap();

    let s = shipping.try_fetch(100).await.unwrap();
    assert_eq!(
        s.iter().map(|d| d.id()).collect::<Vec<_>>(),
        receipts.iter().map(|r| r.id).collect::<Vec<_>>()
    );
    shipping
        .nack_batch(
            &s.iter().collect::<Vec<_>>(),
            Some(Duration::from_secs(3600)),
            Some("later"),
        )
        .await
        .unwrap();

    let a = audit.try_fetch(3).await.unwrap();
    assert_eq!(a.len(), 3);
    audit.term(&a[0], "not interesting").await.unwrap();

    let stats: HashMap<String, pgtide::GroupStats> = ns
        .stats_all()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.group.clone().unwrap(), s))
        .collect();
    let row = |g: &str| {
        let s = &stats[g];
        (s.ready, s.delayed, s.in_flight, s.dead)
    };
    assert_eq!(row("billing"), (0, 0, 0, 0));
    assert_eq!(row("shipping"), (0, 10, 0, 0));
    assert_eq!(row("audit"), (7, 0, 2, 1));
    assert!(stats["audit"].oldest_ready_age.is_some());
    assert!(billing.try_fetch(100).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_retries_with_backoff_then_dead_letters_after_max_deliver() {
    let ns = namespace().await;
    let config = StreamConfig::default()
        .max_deliver(3)
        .backoff(Backoff::schedule([
            Duration::from_millis(50),
            Duration::from_millis(100),
        ]));
    ns.stream_with_groups("s", config, &["g"]).await;
    let r = ns
        .publish("s", json(serde_json::json!({"poison": true})))
        .await
        .unwrap();
    let c = ns.consumer("s", "g", "c").await.unwrap();
    for attempt in 1..=3u32 {
        let d = c.fetch(1, WAIT).await.unwrap().remove(0);
        assert_eq!((d.id(), d.attempt), (r.id, attempt));
        let report = c
            .nack_batch(&[&d], None, Some(&format!("boom {attempt}")))
            .await
            .unwrap();
        if attempt < 3 {
            assert_eq!(report.settled, vec![r.id]);
        } else {
            assert_eq!(report.dead_lettered, vec![r.id]);
        }
    }
    assert!(c
        .fetch(1, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    let dead = ns.dead_letters("s", "g", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].id, dead[0].attempts, dead[0].reason.as_str()),
        (r.id, 3, "max_deliver")
    );
    assert_eq!(dead[0].error.as_deref(), Some("boom 3"));
    assert_eq!(dead[0].payload.as_deref(), Some(&br#"{"poison":true}"#[..]));
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.dead), (0, 1));

    // Replay puts it back with a fresh attempt count.
    assert_eq!(ns.replay_dead("s", "g", None).await.unwrap(), 1);
    let d = c.fetch(1, WAIT).await.unwrap().remove(0);
    assert_eq!((d.id(), d.attempt), (r.id, 1));
    c.term(&d, "manual").await.unwrap();
    let dead = ns.dead_letters("s", "g", 10).await.unwrap();
    assert_eq!(dead[0].reason, "manual");
    assert_eq!(ns.purge_dead("s", "g", Some(&[r.id])).await.unwrap(), 1);
    assert_eq!(ns.stats("s", "g").await.unwrap().dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_effects_ack_in_the_handlers_transaction() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    ns.publish("s", json(serde_json::json!({"amount": 5})))
        .await
        .unwrap();
    let c = ns.consumer("s", "g", "c").await.unwrap();
    let mut raw = ns.raw().await;
    let table = format!("\"{}\".ledger", ns.namespace());
    raw.batch_execute(&format!(
        "CREATE TABLE {table} (id uuid primary key, amount int)"
    ))
    .await
    .unwrap();

    // First try: effect written, ack in the same transaction, then rolled back -> neither happened.
    let d = c.try_fetch(1).await.unwrap().remove(0);
    let tx = raw.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {table} VALUES ($1, 5)"), &[&d.id()])
        .await
        .unwrap();
    c.ack_in(&tx, &d).await.unwrap();
    tx.rollback().await.unwrap();
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!(s.in_flight, 1, "ack rolled back with the effect");
    // Second: commit -> both.
    let tx = raw.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {table} VALUES ($1, 5)"), &[&d.id()])
        .await
        .unwrap();
    c.ack_in(&tx, &d).await.unwrap();
    tx.commit().await.unwrap();
    let n: i64 = raw
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_starting_at_oldest_sees_retained_messages() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["early"])
        .await;
    ns.publish_batch(
        "s",
        &(0..5)
            .map(|i| json(serde_json::json!(i)))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    ns.create_group("s", "late-old", GroupStart::Oldest)
        .await
        .unwrap();
    assert!(!ns
        .ensure_group("s", "late-old", GroupStart::Oldest)
        .await
        .unwrap());
    assert!(matches!(
        ns.create_group("s", "late-old", GroupStart::New).await,
        Err(Error::GroupExists { .. })
    ));
    ns.publish("s", json(serde_json::json!(5))).await.unwrap();
    let old = ns
        .consumer("s", "late-old", "c")
        .await
        .unwrap()
        .try_fetch(100)
        .await
        .unwrap();
    assert_eq!(
        old.iter()
            .map(|d| d.json::<i32>().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
}

/// A handle from before a dead letter and its replay carries the same attempt number as the next
/// claim (replay starts again at zero); the lease token tells them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_handle_after_dead_letter_and_replay_is_fenced() {
    let ns = namespace().await;
    ns.stream_with_groups(
        "s",
        StreamConfig::default()
            .max_deliver(1)
            .lease(Duration::from_millis(200)),
        &["g"],
    )
    .await;
    let id = ns
        .publish("s", json(serde_json::json!(1)))
        .await
        .unwrap()
        .id;
    let a = ns.consumer("s", "g", "a").await.unwrap();
    let b = ns.consumer("s", "g", "b").await.unwrap();
    let stale = a.fetch(1, WAIT).await.unwrap().remove(0);
    assert_eq!(stale.attempt, 1);
    // The lease of the last allowed attempt lapses: the next claim dead-letters it.
    let deadline = std::time::Instant::now() + WAIT;
    while ns.stats("s", "g").await.unwrap().dead == 0 {
        assert!(std::time::Instant::now() < deadline, "never dead-lettered");
        assert!(b.try_fetch(1).await.unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ns.replay_dead("s", "g", Some(&[id])).await.unwrap(), 1);
    let fresh = b.fetch(1, WAIT).await.unwrap().remove(0);
    assert_eq!((fresh.id(), fresh.attempt), (id, stale.attempt));
    for (what, result) in [
        ("ack", a.ack(&stale).await),
        ("nack", a.nack(&stale, None, None).await),
        ("term", a.term(&stale, "stale").await),
    ] {
        assert!(
            matches!(result, Err(Error::LeaseLost { id: lost }) if lost == id),
            "stale {what} after replay: {result:?}"
        );
    }
    let released = a.release_batch(&[&stale]).await.unwrap();
    assert_eq!(released.lost, vec![id]);
    let mut raw = ns.raw().await;
    let tx = raw.transaction().await.unwrap();
    assert!(matches!(
        a.ack_in(&tx, &stale).await,
        Err(Error::LeaseLost { .. })
    ));
    drop(tx);
    // The new holder is untouched.
    b.ack(&fresh).await.unwrap();
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.dead), (0, 0, 0));
}

/// `fetch_until`, what `pgtide consume` stops on a signal with: a cancelled token ends the wait
/// at once with nothing claimed, and a token cancelled before the fetch claims nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_until_stops_waiting_when_cancelled() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let c = ns.consumer("s", "g", "c").await.unwrap();
    let stop = pgtide::CancellationToken::new();
    let waiting = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move { c.fetch_until(10, Duration::from_secs(3600), &stop).await })
    };
    let mut blocked = ns.watch_waiting_fetches();
    tokio::time::timeout(WAIT, blocked.wait_for(|n| *n >= 1))
        .await
        .expect("the fetch waits")
        .unwrap();
    stop.cancel();
    let got = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the fetch stopped waiting")
        .unwrap()
        .unwrap();
    assert!(got.is_empty());

    ns.publish("s", json(serde_json::json!(1))).await.unwrap();
    assert!(c.fetch_until(10, WAIT, &stop).await.unwrap().is_empty());
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!(
        (s.ready, s.in_flight),
        (1, 0),
        "a stopped fetch claimed: {s:?}"
    );
    let running = pgtide::CancellationToken::new();
    let got = c.fetch_until(10, WAIT, &running).await.unwrap();
    assert_eq!(got.len(), 1);
    c.ack(&got[0]).await.unwrap();
}
