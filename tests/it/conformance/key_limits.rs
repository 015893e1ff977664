//! Conformance cases for the per-key concurrency limit (`max_in_flight_per_key`, issue 12):
//! every backend with [`pgtide::Capabilities::concurrency_limits`] keeps each key at or under
//! its limit while the other keys drain; the others refuse such a group with `Unsupported`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtide::{Delivery, Error, GroupConfig, OutgoingMessage, Queue, QueueConsumer, StreamConfig};

use super::cases::fetch_n;

fn keyed(key: &str, n: u32) -> OutgoingMessage {
    OutgoingMessage::json(&serde_json::json!({"key": key, "n": n}))
        .unwrap()
        .key(key)
}

/// The key a delivery's payload names (`-` for a message published without one).
fn key_of(d: &Delivery) -> String {
    let v: serde_json::Value = d.message.json().unwrap();
    v["key"].as_str().unwrap_or("-").to_owned()
}

fn count_keys(ds: &[Delivery]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for d in ds {
        *out.entry(key_of(d)).or_default() += 1;
    }
    out
}

/// `max_in_flight_per_key = 2`: one fetch takes two of each key and every unkeyed message;
/// nothing more of a full key comes while its two are held, whatever the other keys do; an ack
/// or a term makes room for one more of its key, a nack or a release keeps the key at two;
/// the key drains two at a time. Bad limits are `InvalidConfig`.
pub async fn max_in_flight_per_key_caps_each_key<Q: Queue>(q: Q) {
    q.ensure_stream("perkey", &StreamConfig::default().max_deliver(10))
        .await
        .unwrap();
    let config = GroupConfig::default().max_in_flight_per_key(2);
    if !q.capabilities().concurrency_limits {
        let refused = q.ensure_group_with("perkey", "g", &config).await;
        assert!(
            matches!(refused, Err(Error::Unsupported { .. })),
            "{refused:?}"
        );
        return;
    }
    for bad in [
        GroupConfig::default().max_in_flight_per_key(0),
        GroupConfig::default().max_in_flight_per_key(u32::MAX),
        GroupConfig::default()
            .ordered(true)
            .max_in_flight_per_key(2),
    ] {
        let refused = q.ensure_group_with("perkey", "bad", &bad).await;
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{bad:?}: {refused:?}"
        );
    }
    // An ordered group already means one per key: 1 goes with it.
    q.ensure_group_with(
        "perkey",
        "ordered-one",
        &GroupConfig::default()
            .ordered(true)
            .max_in_flight_per_key(1),
    )
    .await
    .unwrap();
    q.ensure_group_with("perkey", "g", &config).await.unwrap();

    let mut msgs = vec![];
    for n in 0..6 {
        msgs.push(keyed("a", n));
        msgs.push(keyed("b", n));
    }
    msgs.push(OutgoingMessage::json(&serde_json::json!({"n": 100})).unwrap());
    msgs.push(OutgoingMessage::json(&serde_json::json!({"n": 101})).unwrap());
    q.publish_batch("perkey", &msgs).await.unwrap();
    let c1 = q.consumer("perkey", "g", "c1").await.unwrap();
    let c2 = q.consumer("perkey", "g", "c2").await.unwrap();

    let first = fetch_n(&c1, 6).await;
    let counts = count_keys(&first);
    assert_eq!(counts.get("a"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&2), "{counts:?}");
    assert_eq!(
        counts.get("-"),
        Some(&2),
        "unkeyed messages are not limited"
    );
    assert!(
        c2.try_fetch(20).await.unwrap().is_empty(),
        "both keys are full for every consumer"
    );
    let (held_a, rest): (Vec<Delivery>, Vec<Delivery>) =
        first.into_iter().partition(|d| key_of(d) == "a");

    // Key b drains (two at a time) while a's two are held; nothing more of a comes.
    c1.ack_batch(&refs(&rest)).await.unwrap();
    let mut b_seen = 2;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while b_seen < 6 {
        assert!(std::time::Instant::now() < deadline, "key b did not drain");
        let got = c2.fetch(20, Duration::from_secs(1)).await.unwrap();
        let counts = count_keys(&got);
        assert!(!counts.contains_key("a"), "a third of key a: {counts:?}");
        assert!(
            counts.get("b").copied().unwrap_or(0) <= 2,
            "more than two of key b: {counts:?}"
        );
        b_seen += counts.get("b").copied().unwrap_or(0);
        c2.ack_batch(&refs(&got)).await.unwrap();
    }
    assert_eq!(b_seen, 6);

    // A nack (due at once) or a release keeps key a at two: what comes back is one of a.
    let report = c1
        .nack_batch(&[&held_a[0]], Some(Duration::ZERO), Some("retry"))
        .await
        .unwrap();
    assert_eq!(report.settled, [held_a[0].id()]);
    let again = fetch_n(&c2, 1).await;
    assert_eq!(count_keys(&again).get("a"), Some(&1));
    assert!(
        c1.try_fetch(20).await.unwrap().is_empty(),
        "key a is full again"
    );
    c1.release_batch(&[&held_a[1]]).await.unwrap();
    let back = fetch_n(&c1, 1).await;
    assert_eq!(count_keys(&back).get("a"), Some(&1));
    assert!(
        c2.try_fetch(20).await.unwrap().is_empty(),
        "key a is full again"
    );

    // A term makes room for one more; then the key drains, never more than two held.
    c2.term(&again[0], "bad").await.unwrap();
    let mut held: Vec<Delivery> = back;
    let mut done = 1; // the termed one
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while done < 6 {
        assert!(std::time::Instant::now() < deadline, "key a did not drain");
        let got = c2.fetch(20, Duration::from_secs(1)).await.unwrap();
        held.extend(got);
        assert!(held.len() <= 2, "{} of key a held at once", held.len());
        if let Some(d) = held.first().cloned() {
            c1.ack(&d).await.unwrap();
            held.remove(0);
            done += 1;
        }
    }
    assert!(held.is_empty(), "{held:?}");
    assert!(c1.try_fetch(20).await.unwrap().is_empty());
    let stats = q.stats("perkey", "g").await.unwrap();
    assert_eq!(
        (stats.ready, stats.delayed, stats.in_flight, stats.dead),
        (0, 0, 0, 1)
    );
}

fn refs(ds: &[Delivery]) -> Vec<&Delivery> {
    ds.iter().collect()
}

/// Consumers on several handles (standing for processes) fetch greedily and hold their
/// deliveries for a moment. `sample` reports the most deliveries of one key leased right now
/// (from the database where there is one). Neither the consumers' own count per key nor any
/// sample ever exceeds the limit, the limit is reached (the test is not vacuous), and every
/// message is handled once.
pub async fn max_in_flight_per_key_holds_under_load<Q: Queue + Clone + 'static, F, Fut>(
    handles: &[Q],
    limit: u32,
    keys: u32,
    per_key: u32,
    sample: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let q = &handles[0];
    q.ensure_stream("load-key-cap", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group_with(
        "load-key-cap",
        "g",
        &GroupConfig::default().max_in_flight_per_key(limit),
    )
    .await
    .unwrap();
    // Key by key, in small batches from another handle while the consumers run: claims meet
    // several deliveries of one key (so a full key is met), and publishers queue behind keys
    // whose heads are being settled at the same time.
    let msgs: Vec<OutgoingMessage> = (0..keys)
        .flat_map(|k| (0..per_key).map(move |n| keyed(&format!("k{k}"), n)))
        .collect();
    let publisher = handles[handles.len() - 1].clone();
    let publishing = tokio::spawn(async move {
        for chunk in msgs.chunks(20) {
            publisher
                .publish_batch("load-key-cap", chunk)
                .await
                .unwrap();
        }
    });
    let total = (keys * per_key) as usize;
    let held: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let peak = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = vec![];
    for (i, h) in handles.iter().enumerate() {
        for j in 0..2 {
            let c = h
                .consumer("load-key-cap", "g", &format!("c{i}-{j}"))
                .await
                .unwrap();
            let (held, peak, acked) = (held.clone(), peak.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                use std::sync::atomic::Ordering::SeqCst;
                while acked.load(SeqCst) < total {
                    let batch = c.fetch(10, Duration::from_millis(100)).await.unwrap();
                    {
                        let mut held = held.lock().unwrap();
                        for d in &batch {
                            let n = held.entry(key_of(d)).or_default();
                            *n += 1;
                            peak.fetch_max(*n, SeqCst);
                        }
                    }
                    for d in &batch {
                        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 5)).await;
                        // Uncounted before the ack commits: the room it makes is not yet taken.
                        *held.lock().unwrap().entry(key_of(d)).or_default() -= 1;
                        c.ack(d).await.unwrap();
                        acked.fetch_add(1, SeqCst);
                    }
                }
            }));
        }
    }
    let mut max_sampled = 0;
    let all = futures_util::future::join_all(tasks);
    tokio::pin!(all);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        tokio::select! {
            done = &mut all => {
                for r in done {
                    r.unwrap();
                }
                break;
            }
            n = sample() => {
                assert!(n <= i64::from(limit), "{n} of one key leased with max_in_flight_per_key = {limit}");
                max_sampled = max_sampled.max(n);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumers did not finish"
        );
    }
    publishing.await.unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak <= i64::from(limit), "consumers held {peak} of one key");
    assert_eq!(peak, i64::from(limit), "the limit was never reached");
    assert!(max_sampled > 0, "no sample saw a lease");
    assert_eq!(
        acked.load(std::sync::atomic::Ordering::SeqCst),
        total,
        "every message handled once"
    );
    let stats = q.stats("load-key-cap", "g").await.unwrap();
    assert_eq!((stats.ready, stats.in_flight, stats.dead), (0, 0, 0));
}
