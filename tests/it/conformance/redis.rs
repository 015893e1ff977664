//! Conformance for the Redis backend against the local server (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`), plus Redis-specific checks: fencing, per-group retries, the
//! dead-letter stream format, wake-ups, purge and typed errors.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgtide::{
    Error, GroupStart, OutgoingMessage, Queue, QueueConsumer, RedisBackend, StreamConfig,
};

pub(crate) fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Deletes every key of the test's namespace when the test ends.
pub struct Cleanup(pub(crate) String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let pattern = format!("{}:*", self.0);
        // Drop cannot await: a plain blocking connection on a thread of its own.
        let _ = std::thread::spawn(move || -> redis::RedisResult<()> {
            let mut conn = redis::Client::open(url())?.get_connection()?;
            let keys: Vec<String> = redis::Commands::scan_match(&mut conn, &pattern)?
                .filter_map(Result::ok)
                .collect();
            if !keys.is_empty() {
                redis::cmd("DEL").arg(&keys).query::<i64>(&mut conn)?;
            }
            Ok(())
        })
        .join();
    }
}

pub(crate) async fn fresh() -> (RedisBackend, Cleanup) {
    let ns = crate::common::unique("t");
    let backend = RedisBackend::connect(&url(), &ns).await.unwrap();
    (backend, Cleanup(ns))
}

conformance!(suite, crate::conformance::redis::fresh);

fn msg(v: serde_json::Value) -> OutgoingMessage {
    OutgoingMessage::json(&v).unwrap()
}

async fn setup(q: &RedisBackend, stream: &str, config: StreamConfig, groups: &[&str]) {
    q.ensure_stream(stream, &config).await.unwrap();
    for g in groups {
        q.ensure_group(stream, g, GroupStart::New).await.unwrap();
    }
}

async fn fetch_one<C: QueueConsumer>(c: &C) -> pgtide::Delivery {
    let got = c.fetch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 1, "nothing delivered");
    got.into_iter().next().unwrap()
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn reclaim_by_the_same_consumer_is_fenced() {
    let (q, _g) = fresh().await;
    let config = StreamConfig::default().lease(Duration::from_millis(300));
    setup(&q, "fence", config, &["g"]).await;
    q.publish("fence", msg(serde_json::json!(1))).await.unwrap();
    let a = q.consumer("fence", "g", "a").await.unwrap();
    let b = q.consumer("fence", "g", "b").await.unwrap();
    let first = fetch_one(&a).await;
    // The fence compares the pending entry's owner and delivery count: the same consumer
    // re-claiming its own lapsed delivery also makes the older handle stale.
    let second = fetch_one(&a).await;
    assert_eq!((second.id(), second.attempt), (first.id(), 2));
    assert!(matches!(a.ack(&first).await, Err(Error::LeaseLost { .. })));
    // Any handle of the group may settle a live delivery; a settled one is lost afterwards.
    b.ack(&second).await.unwrap();
    assert!(matches!(a.ack(&second).await, Err(Error::LeaseLost { .. })));
    let s = q.stats("fence", "g").await.unwrap();
    assert_eq!(
        (s.ready, s.in_flight, s.delayed, s.dead),
        (0, 0, 0, 0),
        "{s:?}"
    );
}

#[tokio::test]
async fn nack_retries_only_that_group() {
    let (q, _g) = fresh().await;
    setup(&q, "retry", StreamConfig::default(), &["a", "b"]).await;
    let r = q.publish("retry", msg(serde_json::json!(1))).await.unwrap();
    let a = q.consumer("retry", "a", "c").await.unwrap();
    let b = q.consumer("retry", "b", "c").await.unwrap();
    let d = fetch_one(&a).await;
    a.nack(&d, Some(Duration::ZERO), Some("again"))
        .await
        .unwrap();
    let d = fetch_one(&a).await;
    assert_eq!((d.id(), d.attempt), (r.id, 2));
    a.nack(&d, Some(Duration::from_secs(60)), None)
        .await
        .unwrap();
    let s = q.stats("retry", "a").await.unwrap();
    assert_eq!((s.ready, s.delayed, s.in_flight), (0, 1, 0), "{s:?}");
    // Group b saw none of a's retries.
    let got = b.fetch(10, Duration::from_millis(300)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].id(), got[0].attempt), (r.id, 1));
    b.ack(&got[0]).await.unwrap();
    assert!(b
        .fetch(10, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn dead_letter_stream_format() {
    let (q, _g) = fresh().await;
    let config = StreamConfig::default()
        .lease(Duration::from_millis(200))
        .max_deliver(2);
    setup(&q, "dlq", config, &["g"]).await;
    let r = q
        .publish("dlq", msg(serde_json::json!({"x": 1})).header("h", "v"))
        .await
        .unwrap();
    let c = q.consumer("dlq", "g", "c").await.unwrap();
    let d = fetch_one(&c).await;
    c.nack(&d, Some(Duration::ZERO), Some("boom"))
        .await
        .unwrap();
    // The second (last) attempt's lease expires: the next fetch dead-letters it.
    let d = fetch_one(&c).await;
    assert_eq!(d.attempt, 2);
    assert!(c
        .fetch(1, Duration::from_millis(600))
        .await
        .unwrap()
        .is_empty());
    let dead = q.dead_letters("dlq", "g", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].attempts), (r.id, 2));
    assert_eq!(dead[0].reason, "max_deliver");
    assert_eq!(dead[0].error.as_deref(), Some("boom"));
    assert_eq!(dead[0].headers.get("h").map(String::as_str), Some("v"));
    // The raw entry, for readers outside pgtide.
    let key = format!("{}:{{dlq}}:g:g:dead", q.namespace());
    let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut raw().await)
        .await
        .unwrap();
    let f = &entries[0].1;
    let field = |k: &str| String::from_utf8(f[k].clone()).unwrap();
    assert_eq!(field("id"), r.id.to_string());
    assert_eq!(field("payload"), r#"{"x":1}"#);
    assert_eq!(field("json"), "1");
    assert_eq!(field("headers"), r#"{"h":"v"}"#);
    assert_eq!(field("attempts"), "2");
    assert_eq!(field("reason"), "max_deliver");
    assert_eq!(field("error"), "boom");
    assert!(field("dead_at").parse::<i64>().unwrap() > 0);
}

#[tokio::test]
async fn blocked_fetch_wakes_for_a_delayed_publish() {
    let (q, _g) = fresh().await;
    setup(&q, "wake", StreamConfig::default(), &["g"]).await;
    let c = q.consumer("wake", "g", "c").await.unwrap();
    let started = Instant::now();
    let waiter = tokio::spawn(async move { c.fetch(1, Duration::from_secs(25)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    q.publish(
        "wake",
        msg(serde_json::json!(1)).delay(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    // Without the wake-up it would come at the 25 s timeout (the lease is 30 s).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn oldest_start_purge_and_dedupe_reset() {
    let (q, _g) = fresh().await;
    setup(&q, "old", StreamConfig::default(), &[]).await;
    let first = q
        .publish_batch(
            "old",
            &[
                msg(serde_json::json!(1)).dedupe_key("k"),
                msg(serde_json::json!(2)).dedupe_key("k"),
                msg(serde_json::json!(3)),
            ],
        )
        .await
        .unwrap();
    assert!(!first[0].duplicate && first[1].duplicate && !first[2].duplicate);
    assert_eq!(first[0].id, first[1].id);
    assert!(q
        .ensure_group("old", "g", GroupStart::Oldest)
        .await
        .unwrap());
    assert!(q.ensure_group("old", "new", GroupStart::New).await.unwrap());
    let s = q.stats("old", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight), (2, 0), "{s:?}");
    assert!(s.oldest_ready_age.is_some());
    assert_eq!(q.stats("old", "new").await.unwrap().ready, 0);
    let c = q.consumer("old", "g", "c").await.unwrap();
    assert_eq!(c.try_fetch(10).await.unwrap().len(), 2);
    q.purge("old").await.unwrap();
    let s = q.stats("old", "g").await.unwrap();
    assert_eq!(
        (s.ready, s.in_flight, s.delayed, s.dead),
        (0, 0, 0, 0),
        "{s:?}"
    );
    assert!(c.try_fetch(10).await.unwrap().is_empty());
    // Purge forgets dedupe keys.
    let again = q
        .publish("old", msg(serde_json::json!(1)).dedupe_key("k"))
        .await
        .unwrap();
    assert!(!again.duplicate);
    assert_eq!(c.try_fetch(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn typed_errors() {
    let (q, _g) = fresh().await;
    setup(&q, "errs", StreamConfig::default().max_payload(8), &["g"]).await;
    let c = q.consumer("errs", "g", "c").await.unwrap();
    assert!(matches!(
        q.publish("errs", OutgoingMessage::bytes(vec![0u8; 9]))
            .await,
        Err(Error::PayloadTooLarge {
            size: 9,
            limit: 8,
            ..
        })
    ));
    assert!(q.delete_group("errs", "g").await.unwrap());
    assert!(!q.delete_group("errs", "g").await.unwrap());
    assert!(matches!(
        c.try_fetch(1).await,
        Err(Error::GroupNotFound { .. })
    ));
    assert!(matches!(
        q.stats("errs", "g").await,
        Err(Error::GroupNotFound { .. })
    ));
    assert!(q.delete_stream("errs").await.unwrap());
    assert!(!q.delete_stream("errs").await.unwrap());
    assert!(matches!(
        c.try_fetch(1).await,
        Err(Error::StreamNotFound(_))
    ));
    assert!(matches!(
        q.ensure_group("errs", "g", GroupStart::New).await,
        Err(Error::StreamNotFound(_))
    ));
    // Nothing listens on port 1: connection errors are retryable broker errors.
    let down = RedisBackend::connect("redis://127.0.0.1:1", "t").await;
    assert!(
        matches!(&down, Err(e @ Error::Broker { .. }) if e.is_retryable()),
        "{down:?}"
    );
}
