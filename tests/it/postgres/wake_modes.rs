//! The opt-in in-transaction NOTIFY (`notify_in_transaction`): a publish alone in flight notifies
//! inside its own transaction (`sql/publish_wake.sql`); a publish among others, or one that finds
//! the advisory key taken, pokes the coalescing notifier. Either way a waiting consumer with a
//! 1 h fallback poll must wake at once: a lost wake-up shows as a fetch that times out.

use std::time::{Duration, Instant};

use pgtide::{PgBackend, PgConsumer};

use super::wakeups::{handle, until_waiting, waiting_side};
use crate::common::{json, namespace, TestNs, WAIT};

/// The advisory key every in-transaction notifier holds until its commit ends.
const WAKE_KEY: (i32, i32) = (1_885_828_196, 1);

/// Publishes `n` messages from a fresh handle, one per call, `concurrency` at a time, while the
/// consumer waits; returns how long the first wake-up took and the publisher (for its tasks).
async fn publish_while_waiting(
    ns: &TestNs,
    side: &PgBackend,
    c: &PgConsumer,
    n: usize,
    concurrency: usize,
) -> (Duration, PgBackend) {
    let publisher = handle(&ns.url, ns.namespace())
        .pool_size(concurrency)
        .notify_in_transaction(true)
        .build()
        .unwrap();
    let waiter = tokio::spawn({
        let c = c.clone();
        async move {
            let mut got = c.fetch(n, WAIT).await.unwrap().len();
            let at = Instant::now();
            // The rest (leased, never acked): every later commit must wake this consumer
            // again, since its fallback poll is an hour away.
            while got < n {
                let more = c.fetch(n - got, WAIT).await.unwrap().len();
                assert!(more > 0, "a wake-up was lost: {got} of {n} after {WAIT:?}");
                got += more;
            }
            at
        }
    });
    until_waiting(side, 1).await;
    let sent = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let publisher = publisher.clone();
        tasks.spawn(async move {
            for i in (worker..n).step_by(concurrency) {
                publisher
                    .publish("s", json(serde_json::json!(i)))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let at = waiter.await.unwrap();
    (at - sent, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_alone_notifies_in_its_transaction() {
    let ns = namespace().await;
    let (side, c) = waiting_side(&ns).await;
    // Another test's in-transaction publish may hold the key for a moment: then this publish
    // coalesces (and starts the publisher's notifier). One of a few tries must notify in its
    // transaction, which starts no background task in the publisher.
    let mut in_transaction = false;
    for _ in 0..20 {
        let (took, publisher) = publish_while_waiting(&ns, &side, &c, 1, 1).await;
        assert!(took < Duration::from_secs(1), "woke after {took:?}");
        if publisher.background_tasks() == 0 {
            in_transaction = true;
            break;
        }
    }
    assert!(in_transaction, "no publish notified inside its transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_finding_the_key_taken_hands_the_wake_up_to_the_notifier() {
    let ns = namespace().await;
    let (side, c) = waiting_side(&ns).await;
    let mut raw = ns.raw().await;
    let holder = raw.transaction().await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&WAKE_KEY.0, &WAKE_KEY.1],
        )
        .await
        .unwrap();
    let (took, publisher) = publish_while_waiting(&ns, &side, &c, 1, 1).await;
    assert!(took < Duration::from_secs(1), "woke after {took:?}");
    assert!(
        publisher.background_tasks() > 0,
        "the publish should have poked the coalescing notifier"
    );
    holder.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_publishers_lose_no_wake_up() {
    let ns = namespace().await;
    let (side, c) = waiting_side(&ns).await;
    for _ in 0..3 {
        let (took, _publisher) = publish_while_waiting(&ns, &side, &c, 64, 16).await;
        assert!(took < Duration::from_secs(1), "woke after {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_alone_notifies_and_wakes() {
    let ns = namespace().await;
    let (side, c) = waiting_side(&ns).await;
    let publisher = handle(&ns.url, ns.namespace())
        .notify_in_transaction(true)
        .build()
        .unwrap();
    let waiter = tokio::spawn({
        let c = c.clone();
        async move {
            let got = c.fetch(100, WAIT).await.unwrap();
            (got.len(), Instant::now())
        }
    });
    until_waiting(&side, 1).await;
    let sent = Instant::now();
    let batch: Vec<_> = (0..100).map(|i| json(serde_json::json!(i))).collect();
    publisher.publish_batch("s", &batch).await.unwrap();
    let (got, at) = waiter.await.unwrap();
    assert!(got >= 1);
    assert!(
        at - sent < Duration::from_secs(1),
        "woke after {:?}",
        at - sent
    );
}

/// A publish that starts a few milliseconds after the previous one ended is quiet too: it would
/// get a NOTIFY of its own from the coalescing notifier anyway (its least gap is 1 ms), so it
/// notifies in its transaction, as a steady trickle of publishes (say 500 a second) does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_a_few_milliseconds_after_the_last_is_quiet() {
    let ns = namespace().await;
    let (_side, c) = waiting_side(&ns).await;
    // Another test's in-transaction publish may hold the key for a moment: then a publish
    // coalesces and starts the notifier. One of a few tries must stay in its transactions.
    let mut quiet = false;
    for _ in 0..20 {
        let publisher = handle(&ns.url, ns.namespace()).build().unwrap();
        for i in 0..3 {
            publisher
                .publish("s", json(serde_json::json!(i)))
                .await
                .unwrap();
            // The gap under test, not a wait for an event.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        if publisher.background_tasks() == 0 {
            quiet = true;
            break;
        }
    }
    assert!(
        quiet,
        "publishes 3 ms apart went through the coalescing notifier"
    );
    // Nothing was lost on the way.
    let mut got = 0;
    while got < 3 {
        let more = c.fetch(100, WAIT).await.unwrap().len();
        assert!(more > 0, "a message was lost: {got} found");
        got += more;
    }
}

/// By default (no `notify_in_transaction`) a quiet publish, the first of its handle, notifies
/// in its own transaction and starts no notifier; publishes back to back after it coalesce
/// through the notifier; no wake-up is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_quiet_publish_notifies_in_its_transaction() {
    let ns = namespace().await;
    let (side, c) = waiting_side(&ns).await;
    // Another test's in-transaction publish may hold the key for a moment: then this publish
    // coalesces. One of a few tries must notify in its transaction.
    let mut in_transaction = false;
    for _ in 0..20 {
        let publisher = handle(&ns.url, ns.namespace()).build().unwrap();
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.fetch(1, WAIT).await.unwrap().len() }
        });
        until_waiting(&side, 1).await;
        publisher
            .publish("s", json(serde_json::json!(0)))
            .await
            .unwrap();
        assert_eq!(
            waiter.await.unwrap(),
            1,
            "the quiet publish woke the consumer"
        );
        if publisher.background_tasks() == 0 {
            in_transaction = true;
            // Back to back now: these coalesce, and every one is delivered.
            let waiter = tokio::spawn({
                let c = c.clone();
                async move {
                    let mut got = 0;
                    while got < 20 {
                        let more = c.fetch(20 - got, WAIT).await.unwrap().len();
                        assert!(more > 0, "a wake-up was lost: {got} of 20");
                        got += more;
                    }
                }
            });
            until_waiting(&side, 1).await;
            for i in 0..20 {
                publisher
                    .publish("s", json(serde_json::json!(i)))
                    .await
                    .unwrap();
            }
            waiter.await.unwrap();
            assert!(
                publisher.background_tasks() > 0,
                "back-to-back publishes poked the coalescing notifier"
            );
            break;
        }
    }
    assert!(
        in_transaction,
        "no quiet publish notified inside its transaction"
    );
}
