//! The memory backend's runtime limit setters (issue 12): the same calls and checks as
//! [`pgtide::PgBackend`]'s, taking effect on the next claim and waking waiting consumers.

use std::time::Duration;

use pgtide::{
    Error, GroupConfig, GroupStart, MemoryBackend, OutgoingMessage, Queue, QueueConsumer,
    RateLimit, StreamConfig,
};

fn msgs(n: u32, key: Option<&str>) -> Vec<OutgoingMessage> {
    (0..n)
        .map(|i| {
            let m = OutgoingMessage::json(&serde_json::json!({ "n": i })).unwrap();
            match key {
                Some(k) => m.key(k),
                None => m,
            }
        })
        .collect()
}

async fn setup(q: &MemoryBackend, group: &str) {
    q.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("s", group, GroupStart::New).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_set_max_in_flight_caps_and_releases_at_run_time() {
    let q = MemoryBackend::new();
    setup(&q, "g").await;
    q.publish_batch("s", &msgs(10, None)).await.unwrap();
    q.set_max_in_flight("s", "g", Some(2)).await.unwrap();
    let c = q.consumer("s", "g", "c").await.unwrap();
    assert_eq!(c.try_fetch(10).await.unwrap().len(), 2);
    assert!(c.try_fetch(10).await.unwrap().is_empty(), "full");
    // A consumer waiting on the full group is woken by the removal.
    let waiting = {
        let c = c.clone();
        tokio::spawn(async move { c.fetch(10, Duration::from_secs(60)).await.unwrap() })
    };
    tokio::task::yield_now().await;
    q.set_max_in_flight("s", "g", None).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting consumer was not woken")
        .unwrap();
    assert_eq!(got.len(), 8);
    for bad in [Some(0), Some(u32::MAX)] {
        let refused = q.set_max_in_flight("s", "g", bad).await;
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{refused:?}"
        );
    }
    let missing = q.set_max_in_flight("s", "nope", Some(1)).await;
    assert!(
        matches!(missing, Err(Error::GroupNotFound { .. })),
        "{missing:?}"
    );
    let bad_name = q.set_max_in_flight("s", "no pe", Some(1)).await;
    assert!(
        matches!(bad_name, Err(Error::InvalidName { .. })),
        "{bad_name:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_set_max_in_flight_per_key_at_run_time() {
    let q = MemoryBackend::new();
    setup(&q, "g").await;
    q.ensure_group_with("s", "o", &GroupConfig::default().ordered(true))
        .await
        .unwrap();
    q.publish_batch("s", &msgs(4, Some("a"))).await.unwrap();
    q.publish_batch("s", &msgs(2, None)).await.unwrap();
    q.set_max_in_flight_per_key("s", "g", Some(1))
        .await
        .unwrap();
    let c = q.consumer("s", "g", "c").await.unwrap();
    let first = c.try_fetch(10).await.unwrap();
    assert_eq!(first.len(), 3, "one of key a, both unkeyed: {first:?}");
    assert!(c.try_fetch(10).await.unwrap().is_empty(), "key a is full");
    // Raised: two more of key a at once (one is still held).
    q.set_max_in_flight_per_key("s", "g", Some(3))
        .await
        .unwrap();
    assert_eq!(c.try_fetch(10).await.unwrap().len(), 2);
    // An ack wakes a consumer waiting on the full key.
    let waiting = {
        let c = c.clone();
        tokio::spawn(async move { c.fetch(10, Duration::from_secs(60)).await.unwrap() })
    };
    tokio::task::yield_now().await;
    let held = first
        .iter()
        .find(|d| d.message.key.as_deref() == Some("a"))
        .unwrap();
    c.ack(held).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting consumer was not woken")
        .unwrap();
    assert_eq!(got.len(), 1);
    for bad in [Some(0), Some(u32::MAX)] {
        let refused = q.set_max_in_flight_per_key("s", "g", bad).await;
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{refused:?}"
        );
    }
    let refused = q.set_max_in_flight_per_key("s", "o", Some(2)).await;
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "{refused:?}"
    );
    q.set_max_in_flight_per_key("s", "o", Some(1))
        .await
        .unwrap();
    let missing = q.set_max_in_flight_per_key("s", "nope", None).await;
    assert!(
        matches!(missing, Err(Error::GroupNotFound { .. })),
        "{missing:?}"
    );
    q.set_max_in_flight_per_key("s", "g", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_set_rate_limits_at_run_time() {
    let q = MemoryBackend::new();
    setup(&q, "g").await;
    setup(&q, "k").await;
    q.publish_batch("s", &msgs(10, None)).await.unwrap();
    q.publish_batch("s", &msgs(3, Some("a"))).await.unwrap();
    q.set_rate_limit("s", "g", Some(RateLimit::per_minute(1.0).burst(2)))
        .await
        .unwrap();
    let c = q.consumer("s", "g", "c").await.unwrap();
    assert_eq!(
        c.try_fetch(20).await.unwrap().len(),
        2,
        "a full bucket of 2"
    );
    assert!(
        c.try_fetch(20).await.unwrap().is_empty(),
        "then one a minute"
    );
    q.set_rate_limit("s", "g", None).await.unwrap();
    assert_eq!(
        c.try_fetch(20).await.unwrap().len(),
        11,
        "no limit: the rest"
    );

    q.set_rate_limit_per_key("s", "k", Some(RateLimit::per_minute(1.0)))
        .await
        .unwrap();
    let k = q.consumer("s", "k", "c").await.unwrap();
    let got = k.try_fetch(20).await.unwrap();
    assert_eq!(got.len(), 11, "one of key a, every unkeyed message");
    assert!(k.try_fetch(20).await.unwrap().is_empty(), "key a waits");
    q.set_rate_limit_per_key("s", "k", None).await.unwrap();

    for bad in [RateLimit::per_second(0.0), RateLimit::per_second(f64::NAN)] {
        let refused = q.set_rate_limit("s", "g", Some(bad)).await;
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{refused:?}"
        );
        let refused = q.set_rate_limit_per_key("s", "g", Some(bad)).await;
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{refused:?}"
        );
    }
    let missing = q.set_rate_limit("s", "nope", None).await;
    assert!(
        matches!(missing, Err(Error::GroupNotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_key_limit_combines_with_max_in_flight() {
    let q = MemoryBackend::new();
    q.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group_with(
        "s",
        "g",
        &GroupConfig::default()
            .max_in_flight(3)
            .max_in_flight_per_key(2),
    )
    .await
    .unwrap();
    q.publish_batch("s", &msgs(5, Some("a"))).await.unwrap();
    q.publish_batch("s", &msgs(5, Some("b"))).await.unwrap();
    let c = q.consumer("s", "g", "c").await.unwrap();
    let got = c.try_fetch(10).await.unwrap();
    assert_eq!(got.len(), 3, "the group's room");
    let a = got
        .iter()
        .filter(|d| d.message.key.as_deref() == Some("a"))
        .count();
    assert_eq!(a, 2, "two of key a, then one of b");
    assert!(c.try_fetch(10).await.unwrap().is_empty());
}
