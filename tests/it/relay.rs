//! The outbox relay and the tee, on real Postgres with the memory backend as the other side.

use std::time::Duration;

use pgtide::{
    CancellationToken, GroupStart, MemoryBackend, OutgoingMessage, Queue, QueueConsumer, Relay,
    StreamConfig, Tee, TeeMode, SOURCE_ID_HEADER,
};

use crate::common::{json, namespace, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_forwards_committed_messages_once() {
    let ns = namespace().await;
    ns.stream_with_groups("outbox.orders", StreamConfig::default(), &["relay"])
        .await;
    let sink = MemoryBackend::new();
    sink.ensure_stream("orders", &StreamConfig::default())
        .await
        .unwrap();
    sink.ensure_group("orders", "billing", GroupStart::New)
        .await
        .unwrap();

    // The application publishes into its outbox inside its own transactions; one rolls back.
    let mut raw = ns.raw().await;
    let mut committed = vec![];
    for i in 0..30 {
        let tx = raw.transaction().await.unwrap();
        let r = ns
            .publish_in(
                &tx,
                "outbox.orders",
                &[json(serde_json::json!({"order": i})).header("k", "v")],
            )
            .await
            .unwrap();
        if i == 7 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            committed.push(r[0].id);
        }
    }
    // A copy of the first message already reached the sink (a relay that crashed before its ack).
    sink.publish(
        "orders",
        OutgoingMessage::bytes("x").dedupe_key(committed[0].to_string()),
    )
    .await
    .unwrap();

    let outbox = ns
        .consumer("outbox.orders", "relay", "relay-1")
        .await
        .unwrap();
    let token = CancellationToken::new();
    let relay = tokio::spawn(
        Relay::new(outbox, sink.clone(), "orders")
            .batch(8)
            .run(token.clone()),
    );

    let billing = sink.consumer("orders", "billing", "b").await.unwrap();
    let mut got = vec![];
    let deadline = std::time::Instant::now() + WAIT;
    while got.len() < committed.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "relayed {} of {}",
            got.len(),
            committed.len()
        );
        let batch = billing
            .fetch(100, Duration::from_millis(200))
            .await
            .unwrap();
        billing
            .ack_batch(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
        got.extend(batch);
    }
    token.cancel();
    let report = relay.await.unwrap().unwrap();
    assert_eq!(report.relayed, committed.len() as u64);
    assert_eq!(
        report.duplicates, 1,
        "the earlier copy absorbed the relay of message 0"
    );
    // Every committed message arrived once (the pre-existing copy stands for message 0).
    let mut sources: Vec<String> = got
        .iter()
        .filter_map(|d| d.headers.get(SOURCE_ID_HEADER).cloned())
        .collect();
    sources.sort();
    let mut want: Vec<String> = committed[1..].iter().map(|id| id.to_string()).collect();
    want.sort();
    assert_eq!(sources, want);
    assert!(got
        .iter()
        .filter(|d| d.headers.contains_key(SOURCE_ID_HEADER))
        .all(|d| d.is_json && d.headers["k"] == "v"));
    assert_eq!(
        ns.stats("outbox.orders", "relay").await.unwrap().ready,
        0,
        "outbox drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tee_writes_to_both_and_reads_from_the_primary() {
    let ns = namespace().await;
    let secondary = MemoryBackend::new();
    let tee = Tee::new(ns.pg.clone(), secondary.clone(), TeeMode::Strict);
    assert!(tee
        .ensure_stream("events", &StreamConfig::default())
        .await
        .unwrap());
    assert!(tee
        .ensure_group("events", "g", GroupStart::New)
        .await
        .unwrap());
    let receipts = tee
        .publish_batch(
            "events",
            &(0..5)
                .map(|i| json(serde_json::json!(i)))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let dup = tee
        .publish("events", json(serde_json::json!("d")).dedupe_key("k"))
        .await
        .unwrap();
    let again = tee
        .publish("events", json(serde_json::json!("d")).dedupe_key("k"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(dup.id, again.id);

    let primary = tee.consumer("events", "g", "c").await.unwrap();
    assert_eq!(primary.try_fetch(100).await.unwrap().len(), 6);
    let copy = secondary.consumer("events", "g", "c").await.unwrap();
    let copies = copy.try_fetch(100).await.unwrap();
    assert_eq!(
        copies.len(),
        6,
        "the duplicate publish was not copied twice"
    );
    let sources: std::collections::HashSet<String> = copies
        .iter()
        .map(|d| d.headers[SOURCE_ID_HEADER].clone())
        .collect();
    assert!(receipts.iter().all(|r| sources.contains(&r.id.to_string())));

    // A failing secondary fails the call in strict mode, not in best-effort mode.
    secondary.delete_stream("events").await.unwrap();
    assert!(tee
        .publish("events", json(serde_json::json!(1)))
        .await
        .is_err());
    let lenient = Tee::new(ns.pg.clone(), secondary, TeeMode::BestEffort);
    lenient
        .publish("events", json(serde_json::json!(2)))
        .await
        .unwrap();
}

/// `Queue::migrate` on a tee installs a new Postgres namespace on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tee_migrates_both_sides() {
    let url = crate::common::database_url().await;
    let ns = crate::common::unique("tee");
    let pg = pgtide::PgBackend::builder(url.clone())
        .namespace(ns.clone())
        .build()
        .unwrap();
    let tee = Tee::new(MemoryBackend::new(), pg.clone(), TeeMode::Strict);
    tee.migrate().await.unwrap();
    let migrated = pg.is_migrated().await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let _ = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{ns}\" CASCADE"))
        .await;
    assert!(migrated.unwrap());
}

/// The relay and the tee unchanged on Kafka (a tansu broker of the test's own).
#[cfg(feature = "kafka")]
mod kafka {
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    use pgtide::{
        CancellationToken, GroupStart, KafkaBackend, Queue, QueueConsumer, Relay, StreamConfig,
        Tee, TeeMode, SOURCE_ID_HEADER,
    };
    use pgtide_testing::Server;

    use crate::common::{json, namespace, unique};

    async fn kafka(server: &Server) -> KafkaBackend {
        let q = KafkaBackend::connect(&server.kafka_url(), &unique("t"))
            .await
            .unwrap();
        q.ensure_stream("orders", &StreamConfig::default())
            .await
            .unwrap();
        q.ensure_group("orders", "billing", GroupStart::New)
            .await
            .unwrap();
        q
    }

    /// Fetches and acks until `n` deliveries came, returning their source ids.
    async fn sources<C: QueueConsumer>(c: &C, n: usize) -> Vec<String> {
        let mut out = vec![];
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < n {
            assert!(Instant::now() < deadline, "got {} of {n}", out.len());
            let batch = c
                .fetch(n - out.len(), Duration::from_secs(1))
                .await
                .unwrap();
            c.ack_batch(&batch.iter().collect::<Vec<_>>())
                .await
                .unwrap();
            out.extend(
                batch
                    .iter()
                    .map(|d| d.headers.get(SOURCE_ID_HEADER).cloned().unwrap_or_default()),
            );
        }
        out
    }

    /// A Postgres outbox drained into Kafka: each committed message once, with its source id
    /// and headers (Kafka has no dedupe, so the relay asks for none); rolled back ones never.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox_relay_into_kafka() {
        let ns = namespace().await;
        ns.stream_with_groups("outbox", StreamConfig::default(), &["relay"])
            .await;
        let server = Server::kafka();
        let sink = kafka(&server).await;
        let mut raw = ns.raw().await;
        let mut committed = vec![];
        for i in 0..20 {
            let tx = raw.transaction().await.unwrap();
            let r = ns
                .publish_in(
                    &tx,
                    "outbox",
                    &[json(serde_json::json!({"order": i})).header("k", "v")],
                )
                .await
                .unwrap();
            if i % 7 == 3 {
                tx.rollback().await.unwrap();
            } else {
                tx.commit().await.unwrap();
                committed.push(r[0].id.to_string());
            }
        }
        let outbox = ns.consumer("outbox", "relay", "relay-1").await.unwrap();
        let token = CancellationToken::new();
        let relay = tokio::spawn(
            Relay::new(outbox, sink.clone(), "orders")
                .batch(8)
                .run(token.clone()),
        );
        let billing = sink.consumer("orders", "billing", "b").await.unwrap();
        let mut got = sources(&billing, committed.len()).await;
        token.cancel();
        let report = relay.await.unwrap().unwrap();
        assert_eq!(report.relayed, committed.len() as u64);
        assert_eq!(report.duplicates, 0);
        got.sort();
        committed.sort();
        assert_eq!(got, committed);
        assert!(billing
            .fetch(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(ns.stats("outbox", "relay").await.unwrap().ready, 0);
    }

    /// A tee from Postgres to Kafka: admin calls and publishes reach both, reads come from
    /// Postgres, a publish Postgres dedupes is not copied again, and a Kafka stream deleted
    /// behind the tee's back fails a strict publish (not a best-effort one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tee_from_postgres_to_kafka() {
        let ns = namespace().await;
        let server = Server::kafka();
        let secondary = KafkaBackend::connect(&server.kafka_url(), &unique("t"))
            .await
            .unwrap();
        let tee = Tee::new(ns.pg.clone(), secondary.clone(), TeeMode::Strict);
        assert!(tee
            .ensure_stream("events", &StreamConfig::default())
            .await
            .unwrap());
        assert!(tee
            .ensure_group("events", "g", GroupStart::New)
            .await
            .unwrap());
        let receipts = tee
            .publish_batch(
                "events",
                &(0..5)
                    .map(|i| json(serde_json::json!(i)))
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        let first = tee
            .publish("events", json(serde_json::json!("d")).dedupe_key("k"))
            .await
            .unwrap();
        let again = tee
            .publish("events", json(serde_json::json!("d")).dedupe_key("k"))
            .await
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(first.id, again.id);

        let primary = tee.consumer("events", "g", "c").await.unwrap();
        assert_eq!(primary.try_fetch(100).await.unwrap().len(), 6);
        let copy = secondary.consumer("events", "g", "c").await.unwrap();
        let copies: HashSet<String> = sources(&copy, 6).await.into_iter().collect();
        let mut want: HashSet<String> = receipts.iter().map(|r| r.id.to_string()).collect();
        want.insert(first.id.to_string());
        assert_eq!(copies, want);
        assert!(
            copy.fetch(10, Duration::from_millis(300))
                .await
                .unwrap()
                .is_empty(),
            "the deduped publish was not copied twice"
        );

        assert!(secondary.delete_stream("events").await.unwrap());
        assert!(tee
            .publish("events", json(serde_json::json!(1)))
            .await
            .is_err());
        let lenient = Tee::new(ns.pg.clone(), secondary, TeeMode::BestEffort);
        lenient
            .publish("events", json(serde_json::json!(2)))
            .await
            .unwrap();
    }
}
