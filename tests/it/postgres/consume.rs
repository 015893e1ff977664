use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pgtide::{Backoff, Error, GroupStart, OutgoingMessage, StreamConfig};
use tokio::sync::Mutex;

use crate::common::{json, namespace, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn competing_consumers_never_share_a_delivery() {
    let ns = namespace().await;
    ns.stream_with_groups("jobs", StreamConfig::default(), &["workers"])
        .await;
    const N: usize = 2000;
    let msgs: Vec<OutgoingMessage> = (0..N).map(|i| json(serde_json::json!({"i": i}))).collect();
    for chunk in msgs.chunks(500) {
        ns.publish_batch("jobs", chunk).await.unwrap();
    }
    // id -> number of times acked successfully
    let acked: Arc<Mutex<HashMap<uuid::Uuid, usize>>> = Arc::default();
    // id -> consumers currently holding it
    let holding: Arc<Mutex<HashMap<uuid::Uuid, String>>> = Arc::default();
    let mut tasks = vec![];
    for c in 0..8 {
        let consumer = ns
            .consumer("jobs", "workers", &format!("c{c}"))
            .await
            .unwrap();
        let (acked, holding) = (acked.clone(), holding.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let batch = consumer.try_fetch(7).await.unwrap();
                if batch.is_empty() {
                    return;
                }
                {
                    let mut h = holding.lock().await;
                    for d in &batch {
                        if let Some(other) = h.insert(d.id(), consumer.name().to_owned()) {
                            panic!("{} held by {other} and {}", d.id(), consumer.name());
                        }
                    }
                }
                tokio::task::yield_now().await;
                {
                    let mut h = holding.lock().await;
                    for d in &batch {
                        h.remove(&d.id());
                    }
                }
                let refs: Vec<_> = batch.iter().collect();
                let report = consumer.ack_batch(&refs).await.unwrap();
                assert!(report.lost.is_empty());
                let mut a = acked.lock().await;
                for id in report.settled {
                    *a.entry(id).or_default() += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().await;
    assert_eq!(acked.len(), N, "every message acked");
    assert!(
        acked.values().all(|&n| n == 1),
        "every message acked exactly once"
    );
    let s = ns.stats("jobs", "workers").await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (0, 0, 0, 0));
}

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
async fn lease_expiry_redelivers_with_next_attempt_and_fences_the_old_holder() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let r = ns.publish("s", json(serde_json::json!("x"))).await.unwrap();
    let slow = ns
        .consumer("s", "g", "slow")
        .await
        .unwrap()
        .with_lease(Duration::from_millis(300));
    let fast = ns.consumer("s", "g", "fast").await.unwrap();

    let first = slow.try_fetch(1).await.unwrap().remove(0);
    assert_eq!((first.id(), first.attempt), (r.id, 1));
    assert!(
        fast.try_fetch(1).await.unwrap().is_empty(),
        "leased delivery must be invisible"
    );

    let second = fast.fetch(1, WAIT).await.unwrap().remove(0);
    assert_eq!((second.id(), second.attempt), (r.id, 2));

    // The first holder's lease lapsed and the delivery was claimed again: every settle is refused.
    assert!(matches!(slow.ack(&first).await, Err(Error::LeaseLost { id }) if id == r.id));
    assert!(matches!(
        slow.nack(&first, None, None).await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        slow.term(&first, "x").await,
        Err(Error::LeaseLost { .. })
    ));
    let mut stale = first.clone();
    assert!(matches!(
        slow.in_progress(&mut stale, None).await,
        Err(Error::LeaseLost { .. })
    ));
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!(
        (s.in_flight, s.dead),
        (1, 0),
        "fenced settles changed nothing"
    );

    fast.ack(&second).await.unwrap();
    assert!(
        matches!(fast.ack(&second).await, Err(Error::LeaseLost { .. })),
        "double ack is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_keeps_the_lease() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    ns.publish("s", json(serde_json::json!("x"))).await.unwrap();
    let a = ns
        .consumer("s", "g", "a")
        .await
        .unwrap()
        .with_lease(Duration::from_millis(400));
    let b = ns.consumer("s", "g", "b").await.unwrap();
    let mut d = a.try_fetch(1).await.unwrap().remove(0);
    let before = d.lease_expires_at;
    a.in_progress(&mut d, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(d.lease_expires_at > before + chrono::Duration::seconds(30));
    // Well past the original 400 ms lease, nobody else gets it.
    assert!(b
        .fetch(1, Duration::from_millis(1200))
        .await
        .unwrap()
        .is_empty());
    a.ack(&d).await.unwrap();
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
async fn expired_lease_on_last_attempt_dead_letters() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default().max_deliver(1), &["g"])
        .await;
    let r = ns.publish("s", json(serde_json::json!(1))).await.unwrap();
    let c = ns
        .consumer("s", "g", "c")
        .await
        .unwrap()
        .with_lease(Duration::from_millis(100));
    let d = c.try_fetch(1).await.unwrap().remove(0);
    assert_eq!(d.attempt, 1);
    // Wait for the lease to lapse: the next claim buries it instead of delivering attempt 2.
    let deadline = std::time::Instant::now() + WAIT;
    while ns.dead_letters("s", "g", 10).await.unwrap().is_empty() {
        assert!(
            c.try_fetch(1).await.unwrap().is_empty(),
            "attempt beyond max_deliver delivered"
        );
        assert!(std::time::Instant::now() < deadline, "never dead-lettered");
        tokio::task::yield_now().await;
    }
    let dead = ns.dead_letters("s", "g", 10).await.unwrap();
    assert_eq!((dead[0].id, dead[0].reason.as_str()), (r.id, "max_deliver"));
    assert_eq!(dead[0].error.as_deref(), Some("lease expired on attempt 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_makes_deliveries_visible_at_once_without_counting() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    ns.publish("s", json(serde_json::json!(1))).await.unwrap();
    let c = ns.consumer("s", "g", "c").await.unwrap();
    let d = c.try_fetch(1).await.unwrap();
    let report = c
        .release_batch(&d.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(report.settled.len(), 1);
    let again = c.try_fetch(1).await.unwrap();
    assert_eq!(again[0].attempt, 1);
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
    ns.create_group("s", "late-new", GroupStart::New)
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
    assert_eq!(
        ns.consumer("s", "late-new", "c")
            .await
            .unwrap()
            .try_fetch(100)
            .await
            .unwrap()
            .len(),
        1
    );
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
