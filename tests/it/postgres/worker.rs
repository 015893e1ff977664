//! The worker runtime against real Postgres.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtide::{Backoff, CancellationToken, Delivery, Outcome, StreamConfig, Worker, WorkerHook};

use crate::common::{eventually, json, namespace, WAIT};

#[derive(Default)]
struct Count(AtomicUsize, AtomicUsize);
impl WorkerHook for Count {
    fn before(&self, _: &Delivery) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn after(&self, _: &Delivery, _: &pgtide::HandlerResult, _: Duration) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_handles_everything_and_survives_panics() {
    let ns = namespace().await;
    let config = StreamConfig::default().backoff(Backoff::schedule([Duration::from_millis(20)]));
    ns.stream_with_groups("s", config, &["g"]).await;
    let n = 300;
    ns.publish_batch(
        "s",
        &(0..n)
            .map(|i| json(serde_json::json!(i)))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();

    let seen: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let hooks = Arc::new(Count::default());
    let consumer = ns.consumer("s", "g", "w").await.unwrap();
    let worker = Worker::new(consumer, {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                let i: i64 = d.json().map_err(|e| e.to_string())?;
                if i % 50 == 0 && d.attempt == 1 {
                    panic!("poison on first attempt: {i}");
                }
                if i % 30 == 0 && d.attempt == 1 {
                    return Err(format!("transient failure for {i}"));
                }
                seen.lock().unwrap().insert(i);
                Ok(Outcome::Ack)
            }
        }
    })
    .concurrency(16)
    .hook(hooks.clone());
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    // Six handlers panic, and each panic prints a symbolized backtrace of this large debug
    // binary when RUST_BACKTRACE is set (this machine sets it): seconds each on a loaded machine, on the
    // worker's threads. Wait well past that.
    eventually(WAIT * 6, "all handled", || {
        seen.lock().unwrap().len() == n as usize
    })
    .await;
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.panicked, 6);
    assert_eq!(report.retried, 6 + 8);
    assert_eq!(report.acked, n as u64);
    assert_eq!(
        hooks.0.load(Ordering::SeqCst),
        hooks.1.load(Ordering::SeqCst)
    );
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (0, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_dead_letters_and_retries_on_request() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default().max_deliver(2), &["g"])
        .await;
    ns.publish("s", json(serde_json::json!("bad")))
        .await
        .unwrap();
    ns.publish("s", json(serde_json::json!("flaky")))
        .await
        .unwrap();
    let consumer = ns.consumer("s", "g", "w").await.unwrap();
    let worker = Worker::new(consumer, |d: Delivery| async move {
        let kind: String = d.json().map_err(|e| e.to_string())?;
        Ok::<_, String>(match kind.as_str() {
            "bad" => Outcome::DeadLetter {
                reason: "unprocessable".into(),
            },
            _ => Outcome::Retry {
                after: Some(Duration::from_millis(10)),
            },
        })
    });
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    let pg = ns.pg.clone();
    tokio::time::timeout(WAIT, async {
        while pg.stats("s", "g").await.unwrap().dead < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both dead-lettered");
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.dead_lettered, 2);
    let dead = ns.dead_letters("s", "g", 10).await.unwrap();
    let reasons: HashSet<_> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons, HashSet::from(["unprocessable", "max_deliver"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handlers_keep_their_lease() {
    let ns = namespace().await;
    ns.stream_with_groups(
        "s",
        StreamConfig::default().lease(Duration::from_millis(300)),
        &["g"],
    )
    .await;
    ns.publish("s", json(serde_json::json!(1))).await.unwrap();
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = Worker::new(ns.consumer("s", "g", "w").await.unwrap(), {
        let attempts = attempts.clone();
        move |d: Delivery| {
            let attempts = attempts.clone();
            async move {
                attempts.lock().unwrap().push(d.attempt);
                tokio::time::sleep(Duration::from_millis(1000)).await;
                Ok::<_, String>(Outcome::Ack)
            }
        }
    })
    .concurrency(4);
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    eventually(WAIT, "handler started", || {
        !attempts.lock().unwrap().is_empty()
    })
    .await;
    // A second consumer polls the group the whole time: it must never get the delivery.
    let other = ns.consumer("s", "g", "other").await.unwrap();
    let stolen = other.fetch(1, Duration::from_millis(1300)).await.unwrap();
    assert!(stolen.is_empty(), "lease lapsed while the handler ran");
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 1);
    assert_eq!(*attempts.lock().unwrap(), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_retries_aborted_deliveries_at_once_counting_the_attempt() {
    let ns = namespace().await;
    ns.stream_with_groups(
        "s",
        StreamConfig::default().lease(Duration::from_secs(3600)),
        &["g"],
    )
    .await;
    ns.publish_batch(
        "s",
        &(0..5)
            .map(|i| json(serde_json::json!(i)))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let worker = Worker::new(ns.consumer("s", "g", "w").await.unwrap(), {
        let started = started.clone();
        move |_d: Delivery| {
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                std::future::pending::<()>().await;
                Ok::<_, String>(Outcome::Ack)
            }
        }
    })
    .concurrency(8)
    .shutdown_grace(Duration::from_millis(100));
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    eventually(WAIT, "handlers started", || {
        started.load(Ordering::SeqCst) == 5
    })
    .await;
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.retried, report.released), (5, 0));
    // Visible again at once (the lease was an hour); the payloads reached a handler, so the
    // aborted attempt counts (a message that hangs every handler still reaches max_deliver).
    let again = ns
        .consumer("s", "g", "next")
        .await
        .unwrap()
        .try_fetch(10)
        .await
        .unwrap();
    assert_eq!(again.len(), 5);
    assert!(again.iter().all(|d| d.attempt == 2), "{again:?}");
}
