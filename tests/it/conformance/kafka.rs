//! Conformance for the Kafka backend, each test against a tansu broker of its own (in-memory
//! storage, started through `pgtide_testing::Server::kafka`), plus Kafka-specific checks: the
//! contiguous-prefix commit of out-of-order acks, fencing across handles, typed errors.

use std::collections::HashSet;
use std::time::Duration;

use pgtide::{
    Error, GroupStart, KafkaBackend, OutgoingMessage, Queue, QueueConsumer, StreamConfig,
};
use pgtide_testing::Server;

pub(crate) async fn fresh() -> (KafkaBackend, Server) {
    let server = Server::kafka();
    let namespace = crate::common::unique("t");
    let backend = KafkaBackend::connect(&server.kafka_url(), &namespace)
        .await
        .unwrap();
    (backend, server)
}

conformance!(suite, crate::conformance::kafka::fresh);

fn msg(v: serde_json::Value) -> OutgoingMessage {
    OutgoingMessage::json(&v).unwrap()
}

async fn fetch_n<C: QueueConsumer>(c: &C, n: usize) -> Vec<pgtide::Delivery> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut out = vec![];
    while out.len() < n && std::time::Instant::now() < deadline {
        out.extend(
            c.fetch(n - out.len(), Duration::from_secs(1))
                .await
                .unwrap(),
        );
    }
    out
}

/// Acks out of order: the committed offset is the first unacked record, so a new handle (a
/// restarted process) gets the unacked record and everything after it, and nothing before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_commit_the_contiguous_prefix() {
    let (q, server) = fresh().await;
    q.ensure_stream("log", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("log", "g", GroupStart::New).await.unwrap();
    let ids: Vec<_> = q
        .publish_batch(
            "log",
            &(0..4)
                .map(|i| msg(serde_json::json!(i)))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let c = q.consumer("log", "g", "c").await.unwrap();
    let got = fetch_n(&c, 4).await;
    assert_eq!(
        got.iter().map(|d| d.id()).collect::<Vec<_>>(),
        ids,
        "log order"
    );
    // Acks 0, 2 and 3; 1 stays leased.
    c.ack_batch(&[&got[0], &got[2], &got[3]]).await.unwrap();
    q.close().await.unwrap();
    // The process ends: its Kafka consumer leaves the group.
    let namespace = q.namespace().to_owned();
    drop((c, got));
    drop(q);

    let again = KafkaBackend::connect(&server.kafka_url(), &namespace)
        .await
        .unwrap();
    let c2 = again.consumer("log", "g", "c").await.unwrap();
    // The old member left without telling the broker (see `Closer`): its partition moves after
    // the session timeout (6 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut redelivered = vec![];
    while redelivered.len() < 3 && std::time::Instant::now() < deadline {
        redelivered.extend(
            c2.fetch(3 - redelivered.len(), Duration::from_secs(1))
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        redelivered.iter().map(|d| d.id()).collect::<Vec<_>>(),
        ids[1..].to_vec(),
        "from the first unacked record on"
    );
    assert!(c2
        .fetch(1, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
}

/// A delivery claimed before its group was deleted and created again cannot be settled through
/// the new group's consumers: claims belong to the runtime that made them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_a_replaced_group_are_lost() {
    let (q, _server) = fresh().await;
    q.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("s", "g", GroupStart::New).await.unwrap();
    q.publish("s", msg(serde_json::json!(1))).await.unwrap();
    let c = q.consumer("s", "g", "c").await.unwrap();
    let d = fetch_n(&c, 1).await.remove(0);
    assert!(q.delete_group("s", "g").await.unwrap());
    assert!(q.ensure_group("s", "g", GroupStart::Oldest).await.unwrap());
    let c2 = q.consumer("s", "g", "c").await.unwrap();
    assert!(matches!(c2.ack(&d).await, Err(Error::LeaseLost { .. })));
    // The new group starts from the oldest record: it gets the message as a first attempt.
    let again = fetch_n(&c2, 1).await;
    assert_eq!((again[0].id(), again[0].attempt), (d.id(), 1));
    c2.ack(&again[0]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_errors() {
    let (q, _server) = fresh().await;
    q.ensure_stream("errs", &StreamConfig::default().max_payload(8))
        .await
        .unwrap();
    q.ensure_group("errs", "g", GroupStart::New).await.unwrap();
    assert!(matches!(
        q.publish("errs", OutgoingMessage::bytes(vec![0u8; 9]))
            .await,
        Err(Error::PayloadTooLarge {
            size: 9,
            limit: 8,
            ..
        })
    ));
    let c = q.consumer("errs", "g", "c").await.unwrap();
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
    // Created again: empty, and the old consumer handle stays stale.
    assert!(q
        .ensure_group("errs", "g", GroupStart::Oldest)
        .await
        .unwrap());
    assert!(matches!(
        c.try_fetch(1).await,
        Err(Error::GroupNotFound { .. })
    ));
    assert!(q.delete_stream("errs").await.unwrap());
    assert!(!q.delete_stream("errs").await.unwrap());
    assert!(matches!(
        q.ensure_group("errs", "g", GroupStart::New).await,
        Err(Error::StreamNotFound(_))
    ));
    for bad in ["postgres://x", "kafka://", "kafka://h:1?partitions=0"] {
        let r = KafkaBackend::connect(bad, "t").await;
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "{bad}: {r:?}");
    }
    // TLS and SASL are refused before connecting (nothing listens on port 1), through the
    // backend and through `AnyBackend`.
    for bad in ["kafkas://127.0.0.1:1", "kafka://u:p@127.0.0.1:1"] {
        let r = KafkaBackend::connect(bad, "t").await;
        assert!(
            matches!(
                r,
                Err(Error::Unsupported {
                    backend: "kafka",
                    ..
                })
            ),
            "{bad}: {r:?}"
        );
        let r = pgtide::AnyBackend::connect(bad, "t").await;
        assert!(
            matches!(
                r,
                Err(Error::Unsupported {
                    backend: "kafka",
                    ..
                })
            ),
            "{bad}: {r:?}"
        );
    }
    // Nothing listens on port 1: a retryable broker error.
    let down = pgtide::KafkaBackend::connect_with(
        "kafka://127.0.0.1:1",
        "t",
        pgtide::KafkaOptions::default().request_timeout(Duration::from_secs(2)),
    )
    .await;
    assert!(
        matches!(&down, Err(e @ Error::Broker { .. }) if e.is_retryable()),
        "{down:?}"
    );
}

/// Messages of two groups, with retries in one, never leak into the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_in_their_group() {
    let (q, _server) = fresh().await;
    q.ensure_stream("r", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("r", "a", GroupStart::New).await.unwrap();
    q.ensure_group("r", "b", GroupStart::New).await.unwrap();
    let id = q.publish("r", msg(serde_json::json!(1))).await.unwrap().id;
    let a = q.consumer("r", "a", "c").await.unwrap();
    let b = q.consumer("r", "b", "c").await.unwrap();
    let d = fetch_n(&a, 1).await.remove(0);
    a.nack(&d, Some(Duration::ZERO), Some("again"))
        .await
        .unwrap();
    let d = fetch_n(&a, 1).await.remove(0);
    assert_eq!((d.id(), d.attempt), (id, 2));
    a.ack(&d).await.unwrap();
    let got = fetch_n(&b, 1).await;
    assert_eq!((got[0].id(), got[0].attempt), (id, 1));
    b.ack(&got[0]).await.unwrap();
    let left: HashSet<_> = b
        .fetch(10, Duration::from_millis(500))
        .await
        .unwrap()
        .iter()
        .map(|d| d.id())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
