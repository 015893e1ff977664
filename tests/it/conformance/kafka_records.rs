//! Kafka record-level promises, each against a tansu broker of its own: an ordering key is the
//! record key (read back from the topic with a plain librdkafka consumer) and keeps one key's
//! records in order; the not-yet-due records a group holds in memory stay under
//! `KafkaOptions::max_held` without losing or reordering any.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use pgtide::{
    GroupStart, KafkaBackend, KafkaOptions, OutgoingMessage, Queue, QueueConsumer, StreamConfig,
};
use pgtide_testing::Server;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const KEYS: usize = 8;
const PER_KEY: usize = 12;

fn keyed(key: usize, n: usize) -> OutgoingMessage {
    OutgoingMessage::json(&serde_json::json!({"key": key, "n": n}))
        .unwrap()
        .key(format!("key-{key}"))
}

/// `(key, n)` of a payload written by [`keyed`].
fn key_n(payload: &[u8]) -> (usize, usize) {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    (
        v["key"].as_u64().unwrap() as usize,
        v["n"].as_u64().unwrap() as usize,
    )
}

/// Reads every record of `topic` (`partitions` partitions) from the start with a plain
/// librdkafka consumer: `(partition, record key, payload)` in each partition's order.
fn read_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    want: usize,
) -> Vec<(i32, Option<Vec<u8>>, Vec<u8>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", crate::common::unique("raw"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = vec![];
    while out.len() < want {
        assert!(
            Instant::now() < deadline,
            "read {} of {want} records",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            out.push((
                m.partition(),
                m.key().map(<[u8]>::to_vec),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out
}

/// An ordering key becomes the Kafka record key: one key's records land in one partition in
/// publish order (the keys spread over the partitions), and a group's consumer gets each key's
/// records in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_key_is_the_record_key_and_keeps_order() {
    let server = Server::kafka();
    let ns = crate::common::unique("t");
    let url = format!("{}&partitions=3", server.kafka_url());
    let q = KafkaBackend::connect(&url, &ns).await.unwrap();
    q.ensure_stream("keyed", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("keyed", "g", GroupStart::New).await.unwrap();
    // Keys interleaved, in batches and one by one.
    let all: Vec<OutgoingMessage> = (0..PER_KEY)
        .flat_map(|n| (0..KEYS).map(move |k| keyed(k, n)))
        .collect();
    let (batched, single) = all.split_at(all.len() / 2);
    for chunk in batched.chunks(10) {
        q.publish_batch("keyed", chunk).await.unwrap();
    }
    for m in single {
        q.publish("keyed", m.clone()).await.unwrap();
    }

    // On the broker: the key is the record key, one partition per key, in publish order.
    let bootstrap = url["kafka://".len()..]
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let topic = format!("PGTIDE.{ns}.keyed");
    let records =
        tokio::task::spawn_blocking(move || read_topic(&bootstrap, &topic, 3, KEYS * PER_KEY))
            .await
            .unwrap();
    let mut partition_of: HashMap<usize, i32> = HashMap::new();
    let mut seen: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (partition, key, payload) in &records {
        let (k, n) = key_n(payload);
        assert_eq!(
            key.as_deref(),
            Some(format!("key-{k}").as_bytes()),
            "record key of {k}/{n}"
        );
        assert_eq!(
            *partition_of.entry(k).or_insert(*partition),
            *partition,
            "key {k} in two partitions"
        );
        seen.entry(k).or_default().push(n);
    }
    for (k, ns) in &seen {
        assert_eq!(
            *ns,
            (0..PER_KEY).collect::<Vec<_>>(),
            "key {k} on the broker"
        );
    }
    assert!(
        partition_of.values().collect::<HashSet<_>>().len() > 1,
        "the keys spread over the partitions: {partition_of:?}"
    );

    // Through a group: each key's records in publish order.
    let c = q.consumer("keyed", "g", "c").await.unwrap();
    let mut got: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut total = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while total < KEYS * PER_KEY {
        assert!(Instant::now() < deadline, "fetched {total}");
        let ds = c.fetch(50, Duration::from_secs(1)).await.unwrap();
        for d in &ds {
            let (k, n) = key_n(&d.payload);
            got.entry(k).or_default().push(n);
        }
        total += ds.len();
        c.ack_batch(&ds.iter().collect::<Vec<_>>()).await.unwrap();
    }
    assert_eq!(got, seen, "each key in publish order through the group");
}

/// With `max_held(10)`, 60 delayed messages (due one after the other over 1.5 s, 4 s from now)
/// and 5 ready ones published after them: the ready ones are fetched while the delayed ones
/// wait (the main topic is not held up), the group holds 10 and never more, and every delayed
/// message arrives once (none lost or repeated by the pauses and rewinds), not before it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_records_stay_under_the_cap_and_none_is_lost() {
    const CAP: usize = 10;
    const DELAYED: usize = 60;
    let server = Server::kafka();
    let q = KafkaBackend::connect_with(
        &server.kafka_url(),
        &crate::common::unique("t"),
        KafkaOptions::default().max_held(CAP),
    )
    .await
    .unwrap();
    q.ensure_stream("capped", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("capped", "g", GroupStart::New)
        .await
        .unwrap();
    let c = q.consumer("capped", "g", "c").await.unwrap();
    assert_eq!(q.held_records("capped", "g"), Some(0));
    // One message through first, so the group has joined and reads before the clock starts.
    let first = q
        .publish("capped", OutgoingMessage::bytes("first"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let d = loop {
        assert!(Instant::now() < deadline, "the group never read");
        if let Some(d) = c.fetch(1, Duration::from_secs(1)).await.unwrap().pop() {
            break d;
        }
    };
    assert_eq!(d.id(), first.id);
    c.ack(&d).await.unwrap();

    let base = chrono::Utc::now() + chrono::Duration::seconds(4);
    let due: Vec<_> = (0..DELAYED)
        .map(|i| base + chrono::Duration::milliseconds(25 * i as i64))
        .collect();
    let delayed: Vec<OutgoingMessage> = due
        .iter()
        .enumerate()
        .map(|(i, at)| {
            OutgoingMessage::json(&serde_json::json!({"delayed": i}))
                .unwrap()
                .deliver_at(*at)
        })
        .collect();
    let delayed_ids: Vec<_> = q
        .publish_batch("capped", &delayed)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let ready: Vec<OutgoingMessage> = (0..5)
        .map(|i| OutgoingMessage::json(&serde_json::json!({"ready": i})).unwrap())
        .collect();
    let ready_ids: Vec<_> = q
        .publish_batch("capped", &ready)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();

    let mut most_held = 0;
    let watch = |q: &KafkaBackend, most_held: &mut usize| {
        let held = q.held_records("capped", "g").unwrap();
        assert!(held <= CAP, "{held} records held, over the cap of {CAP}");
        *most_held = (*most_held).max(held);
    };

    // The ready messages, before any delayed one is due.
    let mut got = vec![];
    while got.len() < ready_ids.len() {
        assert!(
            chrono::Utc::now() < base,
            "the ready messages waited for the delayed ones"
        );
        let ds = c.fetch(10, Duration::from_millis(100)).await.unwrap();
        watch(&q, &mut most_held);
        c.ack_batch(&ds.iter().collect::<Vec<_>>()).await.unwrap();
        got.extend(ds.iter().map(|d| d.id()));
    }
    assert_eq!(got, ready_ids);
    // The cap is reached while nothing is due (the reader paused at it).
    let until_due = (base - chrono::Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    crate::common::eventually(
        until_due,
        "the cap reached before the first was due",
        || {
            watch(&q, &mut most_held);
            most_held == CAP
        },
    )
    .await;

    // Every delayed message, once, not early.
    let mut delivered = vec![];
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.len() < DELAYED {
        assert!(
            Instant::now() < deadline,
            "{} of {DELAYED} delayed messages delivered",
            delivered.len()
        );
        let ds = c.fetch(10, Duration::from_millis(200)).await.unwrap();
        let now = chrono::Utc::now();
        watch(&q, &mut most_held);
        for d in &ds {
            let i = d.json::<serde_json::Value>().unwrap()["delayed"]
                .as_u64()
                .unwrap() as usize;
            assert!(now >= due[i], "message {i} delivered before it was due");
            assert_eq!(d.attempt, 1);
            delivered.push(d.id());
        }
        c.ack_batch(&ds.iter().collect::<Vec<_>>()).await.unwrap();
    }
    assert_eq!(
        delivered.iter().collect::<HashSet<_>>(),
        delayed_ids.iter().collect::<HashSet<_>>()
    );
    assert_eq!(delivered.len(), DELAYED, "each once");
    assert!(c
        .fetch(10, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(q.held_records("capped", "g"), Some(0));
    assert_eq!(q.held_records("capped", "other"), None);
}

/// Out-of-range options are typed errors before connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_out_of_range_are_refused() {
    for options in [
        KafkaOptions::default().max_held(0),
        KafkaOptions::default().max_held(10_000_001),
        KafkaOptions::default().fetch_wait(Duration::ZERO),
        KafkaOptions::default().fetch_wait(Duration::from_secs(11)),
    ] {
        let r = KafkaBackend::connect_with("kafka://127.0.0.1:1", "t", options.clone()).await;
        assert!(
            matches!(r, Err(pgtide::Error::InvalidConfig(_))),
            "{options:?}: {r:?}"
        );
    }
}
