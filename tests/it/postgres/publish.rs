use std::time::Duration;

use pgtide::{Error, OutgoingMessage, PgBackend, StreamConfig};
use sqlx::Connection;

use crate::common::{json, namespace, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_transaction_publishes_only_on_commit() {
    let ns = namespace().await;
    ns.stream_with_groups("orders", StreamConfig::default(), &["billing"])
        .await;
    let consumer = ns.consumer("orders", "billing", "c1").await.unwrap();

    let mut raw = ns.raw().await;
    let tx = raw.transaction().await.unwrap();
    ns.publish_in(&tx, "orders", &[json(serde_json::json!({"n": 1}))])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        consumer.try_fetch(10).await.unwrap().is_empty(),
        "rolled-back publish was delivered"
    );
    assert_eq!(ns.stats("orders", "billing").await.unwrap().ready, 0);

    let tx = raw.transaction().await.unwrap();
    let receipts = ns
        .publish_in(&tx, "orders", &[json(serde_json::json!({"n": 2}))])
        .await
        .unwrap();
    // Not visible before commit.
    assert!(consumer.try_fetch(10).await.unwrap().is_empty());
    tx.commit().await.unwrap();
    let got = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), receipts[0].id);
    assert_eq!(
        got[0].json::<serde_json::Value>().unwrap(),
        serde_json::json!({"n": 2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_transaction_publishes_only_on_commit() {
    let ns = namespace().await;
    ns.stream_with_groups("orders", StreamConfig::default(), &["billing"])
        .await;
    let consumer = ns.consumer("orders", "billing", "c1").await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&ns.url).await.unwrap();

    let mut tx = conn.begin().await.unwrap();
    ns.publish_sqlx(
        &mut tx,
        "orders",
        &[json(serde_json::json!({"n": 1})).dedupe_key("k1")],
    )
    .await
    .unwrap();
    ns.publish_sqlx(&mut tx, "orders", &[json(serde_json::json!({"n": 2}))])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        consumer.try_fetch(10).await.unwrap().is_empty(),
        "rolled-back publish was delivered"
    );

    let mut tx = conn.begin().await.unwrap();
    let r = ns
        .publish_sqlx(
            &mut tx,
            "orders",
            &[
                json(serde_json::json!({"n": 3})).dedupe_key("k1"),
                json(serde_json::json!({"n": 4})),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(!r[0].duplicate, "the rolled-back dedupe key must not count");
    let got = consumer.fetch(10, WAIT).await.unwrap();
    let mut ids: Vec<_> = got.iter().map(|d| d.id()).collect();
    ids.sort();
    let mut want = vec![r[0].id, r[1].id];
    want.sort();
    assert_eq!(ids, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_publish_keeps_order_headers_and_payload_kinds() {
    let ns = namespace().await;
    ns.stream_with_groups("events", StreamConfig::default(), &["g"])
        .await;
    let msgs: Vec<OutgoingMessage> = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                json(serde_json::json!({"i": i})).header("i", i.to_string())
            } else {
                OutgoingMessage::bytes(vec![i as u8, 0xff])
            }
        })
        .collect();
    let receipts = ns.publish_batch("events", &msgs).await.unwrap();
    assert_eq!(receipts.len(), 100);
    assert!(
        receipts.windows(2).all(|w| w[0].id < w[1].id),
        "ids are time-ordered"
    );
    let consumer = ns.consumer("events", "g", "c").await.unwrap();
    let got = consumer.try_fetch(1000).await.unwrap();
    assert_eq!(got.len(), 100);
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.id(), receipts[i].id);
        if i % 2 == 0 {
            assert!(d.is_json);
            assert_eq!(d.json::<serde_json::Value>().unwrap()["i"], i);
            assert_eq!(
                d.headers.get("i").map(String::as_str),
                Some(i.to_string().as_str())
            );
        } else {
            assert!(!d.is_json);
            assert_eq!(&d.payload[..], &[i as u8, 0xff]);
        }
        assert_eq!(d.attempt, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_returns_the_original_id() {
    let ns = namespace().await;
    ns.stream_with_groups("orders", StreamConfig::default(), &["g"])
        .await;
    let a = ns
        .publish(
            "orders",
            json(serde_json::json!({"v": 1})).dedupe_key("order-7"),
        )
        .await
        .unwrap();
    let b = ns
        .publish(
            "orders",
            json(serde_json::json!({"v": 2})).dedupe_key("order-7"),
        )
        .await
        .unwrap();
    let c = ns
        .publish(
            "orders",
            json(serde_json::json!({"v": 3})).dedupe_key("order-8"),
        )
        .await
        .unwrap();
    assert!(!a.duplicate);
    assert!(b.duplicate);
    assert_eq!(a.id, b.id);
    assert!(!c.duplicate);
    // Concurrent publishes of one key: exactly one wins.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let pg = ns.pg.clone();
            tokio::spawn(async move {
                pg.publish(
                    "orders",
                    json(serde_json::json!({"race": i})).dedupe_key("race"),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut fresh = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        ids.insert(r.id);
        fresh += usize::from(!r.duplicate);
    }
    assert_eq!(fresh, 1);
    assert_eq!(ids.len(), 1);
    let got = ns
        .consumer("orders", "g", "c")
        .await
        .unwrap()
        .try_fetch(100)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[0].json::<serde_json::Value>().unwrap(),
        serde_json::json!({"v": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_keys_expire_with_the_window() {
    let ns = namespace().await;
    ns.stream_with_groups(
        "s",
        StreamConfig::default().dedupe_window(Duration::from_secs(3600)),
        &["g"],
    )
    .await;
    let a = ns
        .publish("s", json(serde_json::json!(1)).dedupe_key("k"))
        .await
        .unwrap();
    assert!(
        ns.publish("s", json(serde_json::json!(2)).dedupe_key("k"))
            .await
            .unwrap()
            .duplicate
    );
    // Maintenance two hours from now forgets the key.
    let report = ns
        .maintain_at(chrono::Utc::now() + chrono::Duration::hours(2))
        .await
        .unwrap();
    assert_eq!(report.dedupe_removed, 1);
    let b = ns
        .publish("s", json(serde_json::json!(3)).dedupe_key("k"))
        .await
        .unwrap();
    assert!(!b.duplicate);
    assert_ne!(a.id, b.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_for_their_time() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let consumer = ns.consumer("s", "g", "c").await.unwrap();
    let published = std::time::Instant::now();
    let r = ns
        .publish(
            "s",
            json(serde_json::json!("later")).delay(Duration::from_millis(700)),
        )
        .await
        .unwrap();
    ns.publish("s", json(serde_json::json!("now")))
        .await
        .unwrap();
    let first = consumer.try_fetch(10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].json::<String>().unwrap(), "now");
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.delayed, s.in_flight), (1, 1));
    let later = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].id(), r.id);
    assert!(
        published.elapsed() >= Duration::from_millis(650),
        "delivered too early: {:?}",
        published.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_moves_a_message_ahead() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    for i in 0..5 {
        ns.publish("s", json(serde_json::json!(i))).await.unwrap();
    }
    let urgent = ns
        .publish("s", json(serde_json::json!("urgent")).priority(60))
        .await
        .unwrap();
    let got = ns
        .consumer("s", "g", "c")
        .await
        .unwrap()
        .try_fetch(1)
        .await
        .unwrap();
    assert_eq!(got[0].id(), urgent.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_writes_nothing() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default().max_payload(1024), &["g"])
        .await;
    let too_big = OutgoingMessage::bytes(vec![0u8; 1025]);
    let err = ns
        .publish_batch("s", &[json(serde_json::json!(1)), too_big])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::PayloadTooLarge {
                size: 1025,
                limit: 1024,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_retryable());
    let err = ns
        .publish("missing", json(serde_json::json!(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::StreamNotFound(ref s) if s == "missing"),
        "{err}"
    );
    for bad in [
        "",
        "Orders",
        "a b",
        "x;drop table y",
        "ü",
        "-lead",
        &"a".repeat(65),
    ] {
        let err = ns
            .publish(bad, json(serde_json::json!(1)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidName { kind: "stream", .. }),
            "{bad}: {err}"
        );
        assert!(matches!(
            ns.create_stream(bad, &StreamConfig::default()).await,
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            ns.create_group("s", bad, pgtide::GroupStart::New).await,
            Err(Error::InvalidName { .. })
        ));
    }
    assert!(OutgoingMessage::json_text("{not json").is_err());
    let err = ns
        .create_stream("z", &StreamConfig::default().max_deliver(0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    assert!(
        ns.consumer("s", "g", "c")
            .await
            .unwrap()
            .try_fetch(10)
            .await
            .unwrap()
            .is_empty(),
        "nothing half-written"
    );
    let names: Vec<String> = ns
        .streams()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["s".to_owned()]);
    // Payload limit enforced by the SQL surface too.
    let raw = ns.raw().await;
    let err = raw
        .query_one(
            &format!("SELECT \"{}\".publish_bytes('s', $1)", ns.namespace()),
            &[&vec![0u8; 2000]],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "PT004");
}

/// The payload limit a publisher cached never refuses what the stream now accepts, nor lets in
/// what it now refuses: another handle raising or lowering `max_payload` takes effect at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_payload_limit_follows_changes_made_elsewhere() {
    let ns = crate::common::namespace().await;
    let config = StreamConfig::default().max_payload(100);
    ns.create_stream("s", &config).await.unwrap();
    let small = OutgoingMessage::bytes(vec![1u8; 50]);
    let big = OutgoingMessage::bytes(vec![1u8; 500]);
    ns.publish("s", small.clone()).await.unwrap(); // caches the limit of 100
    let other = PgBackend::builder(ns.url.clone())
        .namespace(ns.namespace())
        .build()
        .unwrap();
    other
        .update_stream("s", &config.clone().max_payload(1000))
        .await
        .unwrap();
    ns.publish("s", big.clone()).await.unwrap();
    other
        .update_stream("s", &config.max_payload(10))
        .await
        .unwrap();
    let err = ns.publish("s", small).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err:?}");
    other.shutdown().await;
}
