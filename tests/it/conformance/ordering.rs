//! Conformance cases for ordering keys (issue 12), for every backend: per-key order in ordered
//! groups where [`pgtide::Capabilities::ordering_keys`] says so, a typed refusal where not.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtide::{
    Delivery, Error, GroupConfig, GroupStart, OutgoingMessage, Queue, QueueConsumer, StreamConfig,
};

use super::cases::fetch_n;

fn keyed(key: &str, n: u32) -> OutgoingMessage {
    OutgoingMessage::json(&serde_json::json!({"key": key, "n": n}))
        .unwrap()
        .key(key)
}

fn label(d: &Delivery) -> String {
    let v: serde_json::Value = d.message.json().unwrap();
    format!("{}{}", v["key"].as_str().unwrap_or("-"), v["n"])
}

fn labels(ds: &[Delivery]) -> Vec<String> {
    let mut out: Vec<String> = ds.iter().map(label).collect();
    out.sort();
    out
}

/// Everything ready in the group now (one short fetch after another until one comes back empty).
async fn drain_ready<C: QueueConsumer>(c: &C) -> Vec<Delivery> {
    let mut out = vec![];
    loop {
        let got = c.fetch(100, Duration::from_millis(300)).await.unwrap();
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

/// One key's messages go one at a time in publish order; a retried head holds back only its
/// key; a dead-lettered head lets the next of its key go; unkeyed messages and unordered groups
/// are not held back at all.
pub async fn ordered_group_delivers_each_key_in_order<Q: Queue>(q: Q) {
    let config = StreamConfig::default().max_deliver(5);
    q.ensure_stream("ord", &config).await.unwrap();
    let ordered = GroupConfig::default().ordered(true);
    if !q.capabilities().ordering_keys {
        let refused = q.ensure_group_with("ord", "o", &ordered).await;
        assert!(
            matches!(refused, Err(Error::Unsupported { .. })),
            "{refused:?}"
        );
        // Keyed messages are still accepted (the key is dropped where it is not carried).
        q.ensure_group("ord", "u", GroupStart::New).await.unwrap();
        q.publish("ord", keyed("a", 1)).await.unwrap();
        let c = q.consumer("ord", "u", "c").await.unwrap();
        assert_eq!(fetch_n(&c, 1).await.len(), 1);
        return;
    }
    assert!(q.ensure_group_with("ord", "o", &ordered).await.unwrap());
    assert!(!q.ensure_group_with("ord", "o", &ordered).await.unwrap());
    q.ensure_group("ord", "u", GroupStart::New).await.unwrap();
    // Ordering is fixed at creation: asking for the other setting is an error, not a no-op.
    let flipped = q
        .ensure_group_with("ord", "u", &GroupConfig::default().ordered(true))
        .await;
    assert!(
        matches!(flipped, Err(Error::InvalidConfig(_))),
        "{flipped:?}"
    );
    let bad = q.publish("ord", keyed("a\nb", 1)).await;
    assert!(matches!(bad, Err(Error::InvalidKey(_))), "{bad:?}");

    let mut batch = vec![keyed("a", 1), keyed("b", 1), keyed("a", 2)];
    batch.push(OutgoingMessage::json(&serde_json::json!({"n": 0})).unwrap());
    q.publish_batch("ord", &batch).await.unwrap();
    q.publish("ord", keyed("a", 3)).await.unwrap();
    q.publish("ord", keyed("b", 2)).await.unwrap();

    let u = q.consumer("ord", "u", "u1").await.unwrap();
    assert_eq!(fetch_n(&u, 6).await.len(), 6, "unordered groups get all");

    let c1 = q.consumer("ord", "o", "c1").await.unwrap();
    let c2 = q.consumer("ord", "o", "c2").await.unwrap();
    let heads = fetch_n(&c1, 3).await;
    assert_eq!(labels(&heads), ["-0", "a1", "b1"], "heads only");
    let a1 = heads.iter().find(|d| label(d) == "a1").unwrap();
    assert_eq!(a1.message.key.as_deref(), Some("a"));
    assert!(
        drain_ready(&c2).await.is_empty(),
        "nothing else of a key in flight"
    );
    let stats = q.stats("ord", "o").await.unwrap();
    assert_eq!(stats.in_flight, 3);

    // a1 fails: a waits (its head retries), b goes on.
    let b1 = heads.iter().find(|d| label(d) == "b1").unwrap();
    let x = heads.iter().find(|d| label(d) == "-0").unwrap();
    q.consumer("ord", "o", "c1")
        .await
        .unwrap()
        .nack(a1, Some(Duration::from_millis(300)), Some("boom"))
        .await
        .unwrap();
    c1.ack_batch(&[b1, x]).await.unwrap();
    let next = fetch_n(&c2, 1).await;
    assert_eq!(labels(&next), ["b2"]);
    let retried = fetch_n(&c2, 1).await;
    assert_eq!(
        labels(&retried),
        ["a1"],
        "the retried head comes back first"
    );
    assert_eq!(retried[0].attempt, 2);
    assert!(drain_ready(&c1).await.is_empty(), "a2 waits for a1");
    c2.ack(&retried[0]).await.unwrap();
    let a2 = fetch_n(&c1, 1).await;
    assert_eq!(labels(&a2), ["a2"]);
    // A dead-lettered head lets the next of its key go.
    c1.term(&a2[0], "poison").await.unwrap();
    let a3 = fetch_n(&c2, 1).await;
    assert_eq!(labels(&a3), ["a3"]);
    c2.ack_batch(&[&a3[0], &next[0]]).await.unwrap();
    let stats = q.stats("ord", "o").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight, stats.dead),
        (0, 0, 1),
        "{stats:?}"
    );
}

/// Many consumers over many keys with failures: every key's messages are handled in publish
/// order, each once, and never two of one key at the same time. `handles` stand for separate
/// processes (separate connection pools on Postgres).
pub async fn ordered_keys_under_load<Q: Queue>(
    handles: &[Q],
    messages: u32,
    keys: u32,
    consumers: usize,
) {
    let q = &handles[0];
    q.ensure_stream("load", &StreamConfig::default().max_deliver(1000))
        .await
        .unwrap();
    q.ensure_group_with("load", "o", &GroupConfig::default().ordered(true))
        .await
        .unwrap();
    let per_key = messages / keys;
    let in_flight: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handled: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
    let faults: Arc<Mutex<Vec<String>>> = Arc::default();

    let mut tasks = vec![];
    for i in 0..consumers {
        let c = handles[i % handles.len()]
            .consumer("load", "o", &format!("c{i}"))
            .await
            .unwrap();
        let (in_flight, handled, faults) = (in_flight.clone(), handled.clone(), faults.clone());
        let total = (per_key * keys) as usize;
        tasks.push(tokio::spawn(async move {
            loop {
                if handled
                    .lock()
                    .unwrap()
                    .values()
                    .map(Vec::len)
                    .sum::<usize>()
                    >= total
                {
                    return;
                }
                let batch = c.fetch(8, Duration::from_millis(200)).await.unwrap();
                for d in &batch {
                    let key = d.message.key.clone().unwrap_or_default();
                    let n = d.message.json::<serde_json::Value>().unwrap()["n"]
                        .as_u64()
                        .unwrap() as u32;
                    if let Some(other) = in_flight.lock().unwrap().insert(key.clone(), n) {
                        faults
                            .lock()
                            .unwrap()
                            .push(format!("{key}: {n} while {other} in flight"));
                    }
                    let expected = handled
                        .lock()
                        .unwrap()
                        .get(&key)
                        .map_or(0, |v| v.len() as u32);
                    if n != expected {
                        faults
                            .lock()
                            .unwrap()
                            .push(format!("{key}: got {n}, expected {expected}"));
                    }
                    tokio::task::yield_now().await;
                    let fail = rand::random::<f64>() < 0.1;
                    // Unmarked before the settle: once it commits the next of the key may go.
                    in_flight.lock().unwrap().remove(&key);
                    if fail {
                        let delay = Duration::from_millis(rand::random::<u64>() % 20);
                        c.nack(d, Some(delay), Some("random failure"))
                            .await
                            .unwrap();
                    } else {
                        handled.lock().unwrap().entry(key).or_default().push(n);
                        c.ack(d).await.unwrap();
                    }
                }
            }
        }));
    }
    // Published while consumers run, in batches that mix keys, from two publishers on
    // disjoint keys.
    let mut publishers = vec![];
    for p in 0..2u32 {
        let q = handles[p as usize % handles.len()].clone();
        publishers.push(tokio::spawn(async move {
            for n in 0..per_key {
                let batch: Vec<OutgoingMessage> = (0..keys)
                    .filter(|k| k % 2 == p)
                    .map(|k| keyed(&format!("k{k}"), n))
                    .collect();
                q.publish_batch("load", &batch).await.unwrap();
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(300), all)
        .await
        .expect("the consumers did not drain the stream in time");
    let faults = faults.lock().unwrap().clone();
    assert!(
        faults.is_empty(),
        "{} faults, first: {:?}",
        faults.len(),
        &faults[..faults.len().min(5)]
    );
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled.len(), keys as usize);
    let want: Vec<u32> = (0..per_key).collect();
    let keys_seen: HashSet<&String> = handled.keys().collect();
    assert_eq!(keys_seen.len(), keys as usize);
    for (key, got) in handled.iter() {
        assert_eq!(got, &want, "key {key} handled out of order or twice");
    }
    let stats = q.stats("load", "o").await.unwrap();
    assert_eq!((stats.ready, stats.in_flight, stats.dead), (0, 0, 0));
}

/// A group's concurrency limit: claims never lease past it, across consumers; an ack makes
/// room. Backends without `concurrency_limits` refuse such a group.
pub async fn max_in_flight_caps_the_group<Q: Queue>(q: Q) {
    q.ensure_stream("capped", &StreamConfig::default())
        .await
        .unwrap();
    let config = GroupConfig::default().max_in_flight(3);
    if !q.capabilities().concurrency_limits {
        let refused = q.ensure_group_with("capped", "g", &config).await;
        assert!(
            matches!(refused, Err(Error::Unsupported { .. })),
            "{refused:?}"
        );
        return;
    }
    let zero = q
        .ensure_group_with("capped", "z", &GroupConfig::default().max_in_flight(0))
        .await;
    assert!(matches!(zero, Err(Error::InvalidConfig(_))), "{zero:?}");
    q.ensure_group_with("capped", "g", &config).await.unwrap();
    let msgs: Vec<OutgoingMessage> = (0..10)
        .map(|n| OutgoingMessage::json(&serde_json::json!({ "n": n })).unwrap())
        .collect();
    q.publish_batch("capped", &msgs).await.unwrap();
    let c1 = q.consumer("capped", "g", "c1").await.unwrap();
    let c2 = q.consumer("capped", "g", "c2").await.unwrap();
    let first = c1.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 3, "the limit caps one fetch");
    assert!(
        c2.try_fetch(10).await.unwrap().is_empty(),
        "and every other consumer"
    );
    c1.ack(&first[0]).await.unwrap();
    let more = c2.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(more.len(), 1, "an ack makes room for one");
    let stats = q.stats("capped", "g").await.unwrap();
    assert_eq!((stats.in_flight, stats.ready), (3, 6));
}

/// Consumers on several handles (standing for processes) fetch greedily and hold deliveries for
/// a moment; `sample` reports how many are leased right now (from the database where there is
/// one). Neither the consumers' own count nor any sample ever exceeds the limit, and the limit is
/// reached (the test is not vacuous).
pub async fn max_in_flight_holds_under_load<Q: Queue, F, Fut>(
    handles: &[Q],
    limit: u32,
    messages: usize,
    sample: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let q = &handles[0];
    q.ensure_stream("load-cap", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group_with(
        "load-cap",
        "g",
        &GroupConfig::default().max_in_flight(limit),
    )
    .await
    .unwrap();
    let msgs: Vec<OutgoingMessage> = (0..messages)
        .map(|n| OutgoingMessage::json(&serde_json::json!({ "n": n })).unwrap())
        .collect();
    q.publish_batch("load-cap", &msgs).await.unwrap();
    let held = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = vec![];
    for (i, h) in handles.iter().enumerate() {
        let c = h.consumer("load-cap", "g", &format!("c{i}")).await.unwrap();
        let (held, peak, acked) = (held.clone(), peak.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::SeqCst;
            while acked.load(SeqCst) < messages {
                let batch = c.fetch(10, Duration::from_millis(100)).await.unwrap();
                let now = held.fetch_add(batch.len() as i64, SeqCst) + batch.len() as i64;
                peak.fetch_max(now, SeqCst);
                for d in &batch {
                    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 5)).await;
                    // Uncounted before the ack commits: the room it makes is not yet taken.
                    held.fetch_sub(1, SeqCst);
                    c.ack(d).await.unwrap();
                    acked.fetch_add(1, SeqCst);
                }
            }
        }));
    }
    let mut max_sampled = 0;
    let all = futures_util::future::join_all(tasks);
    tokio::pin!(all);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        tokio::select! {
            done = &mut all => {
                for r in done {
                    r.unwrap();
                }
                break;
            }
            n = sample() => {
                assert!(n <= i64::from(limit), "{n} leased with max_in_flight = {limit}");
                max_sampled = max_sampled.max(n);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumers did not finish"
        );
    }
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak <= i64::from(limit), "consumers held {peak}");
    assert_eq!(peak, i64::from(limit), "the limit was never reached");
    assert!(max_sampled > 0, "no sample saw a lease");
}

/// A handler's `PauseKey`: one key of ten is paused for 2 s on its first message; the other nine
/// keys drain meanwhile, nothing of the paused key is handled before the pause ends, then its
/// messages go in order, and the pause did not count as an attempt (where the backend has its
/// own pause).
pub async fn pause_key_holds_one_key_while_others_drain<Q: Queue>(q: Q) {
    q.ensure_stream("pause", &StreamConfig::default())
        .await
        .unwrap();
    if !q.capabilities().ordering_keys {
        // No ordered groups: a pause is a nack with the delay (the attempt counts).
        q.ensure_group("pause", "g", GroupStart::New).await.unwrap();
        q.publish("pause", keyed("k0", 0)).await.unwrap();
        let c = q.consumer("pause", "g", "c").await.unwrap();
        let got = fetch_n(&c, 1).await;
        let until = chrono::Utc::now() + chrono::Duration::milliseconds(500);
        let report = c.pause_batch(&[&got[0]], until).await.unwrap();
        assert_eq!(report.settled, [got[0].id()]);
        assert!(c.try_fetch(1).await.unwrap().is_empty(), "paused");
        let again = fetch_n(&c, 1).await;
        assert!(chrono::Utc::now() + chrono::Duration::milliseconds(50) >= until);
        assert_eq!(again[0].attempt, 2);
        return;
    }
    q.ensure_group_with("pause", "o", &GroupConfig::default().ordered(true))
        .await
        .unwrap();
    let per_key = 5u32;
    let mut batch = vec![];
    for n in 0..per_key {
        for k in 0..10 {
            batch.push(keyed(&format!("k{k}"), n));
        }
    }
    q.publish_batch("pause", &batch).await.unwrap();
    // (key, n, attempt, when handled)
    type Log = Arc<Mutex<Vec<(String, u32, u32, tokio::time::Instant)>>>;
    let log: Log = Arc::default();
    let paused_until: Arc<Mutex<Option<tokio::time::Instant>>> = Arc::default();
    let c = q.consumer("pause", "o", "w").await.unwrap();
    let worker = pgtide::Worker::new(c, {
        let (log, paused_until) = (log.clone(), paused_until.clone());
        move |d: Delivery| {
            let (log, paused_until) = (log.clone(), paused_until.clone());
            async move {
                let v: serde_json::Value = d.json().map_err(|e| e.to_string())?;
                let key = v["key"].as_str().unwrap_or_default().to_owned();
                let n = v["n"].as_u64().unwrap_or_default() as u32;
                let now = tokio::time::Instant::now();
                let first_pause = key == "k0" && n == 0 && paused_until.lock().unwrap().is_none();
                log.lock().unwrap().push((key, n, d.attempt, now));
                if first_pause {
                    *paused_until.lock().unwrap() = Some(now + Duration::from_secs(2));
                    return Ok::<_, String>(pgtide::Outcome::PauseKey {
                        until: chrono::Utc::now() + chrono::Duration::seconds(2),
                    });
                }
                Ok(pgtide::Outcome::Ack)
            }
        }
    })
    .concurrency(4);
    let token = pgtide::CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    let total = 10 * per_key as usize + 1;
    crate::common::eventually(Duration::from_secs(30), "every message handled", || {
        log.lock().unwrap().len() >= total
    })
    .await;
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.paused, 1, "{report:?}");
    let log = log.lock().unwrap().clone();
    let until = paused_until.lock().unwrap().expect("k0 was paused");
    let pause_started = until - Duration::from_secs(2);
    let others_done = log
        .iter()
        .filter(|(k, ..)| k != "k0")
        .map(|(.., at)| *at)
        .max()
        .unwrap();
    assert!(
        others_done < until,
        "the other keys drained during the pause ({:?} after it began)",
        others_done - pause_started
    );
    let k0: Vec<(u32, u32, tokio::time::Instant)> = log
        .iter()
        .filter(|(k, ..)| k == "k0")
        .map(|(_, n, a, at)| (*n, *a, *at))
        .collect();
    assert_eq!(
        k0.iter().map(|(n, ..)| *n).collect::<Vec<_>>(),
        [0, 0, 1, 2, 3, 4],
        "k0 in order, its head twice"
    );
    // The clock is the database's for the pause and ours here: allow a little skew.
    let resumed = k0[1].2;
    assert!(
        resumed + Duration::from_millis(100) >= until,
        "k0 resumed {:?} early",
        until - resumed
    );
    if q.capabilities().ordering_keys {
        assert_eq!(k0[1].1, 1, "the pause did not count as an attempt");
    }
}
