//! Conformance cases for weighted fair share between keys (issue 12, feature 5), for every
//! backend: shares by weight where [`pgtide::Capabilities::fair_share`] says so, a typed refusal
//! where not.
//!
//! Shares are counted over the deliveries a single consumer receives, in order, up to the last
//! delivery of the small key: a count of what the engine chose, not of time, so a slow machine
//! changes nothing.

use std::time::{Duration, Instant};

use pgtide::{Error, GroupConfig, OutgoingMessage, Queue, QueueConsumer, StreamConfig};

fn keyed(key: &str, n: usize) -> OutgoingMessage {
    OutgoingMessage::json(&serde_json::json!({ "n": n }))
        .unwrap()
        .key(key)
}

/// Publishes `n` messages of `key` in batches of at most 5 000.
async fn publish_many<Q: Queue>(q: &Q, stream: &str, key: &str, n: usize) {
    let msgs: Vec<OutgoingMessage> = (0..n).map(|i| keyed(key, i)).collect();
    for chunk in msgs.chunks(5_000) {
        q.publish_batch(stream, chunk).await.unwrap();
    }
}

/// Fetches batches of `batch` (acking each with the next fetch) until `small` messages of key
/// `b` have come; returns how many of each key came up to the last `b` (in delivery order).
pub async fn shares_while_b_has_work<C: QueueConsumer>(
    c: &C,
    small: usize,
    batch: usize,
) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut a, mut b) = (0, 0);
    let mut held = c.fetch(batch, Duration::from_secs(10)).await.unwrap();
    while b < small {
        assert!(Instant::now() < deadline, "only {b} of {small} of b came");
        assert!(
            !held.is_empty(),
            "the group ran dry before b's {small} came"
        );
        for d in &held {
            match d.message.key.as_deref() {
                Some("b") => {
                    b += 1;
                    if b == small {
                        break;
                    }
                }
                _ => a += 1,
            }
        }
        let done: Vec<_> = held.iter().collect();
        let (_, next) = c.ack_and_fetch(&done, batch).await.unwrap();
        held = next;
    }
    (a, b)
}

fn assert_share(a: usize, b: usize, want: f64, what: &str) {
    let share = b as f64 / (a + b) as f64;
    assert!(
        (share - want).abs() <= 0.10,
        "{what}: b got {b} of {} deliveries while it had work ({:.1} %, want {:.0} % ± 10 %)",
        a + b,
        share * 100.0,
        want * 100.0
    );
}

/// Key `a` with a large backlog published first, key `b` with a small one after it, one
/// consumer fetching batches of 10: while `b` has work it gets half the deliveries with equal
/// weights and three quarters with weights 1:3. Backends without `fair_share` refuse fair
/// groups and weights.
pub async fn fair_share_splits_by_weight<Q: Queue>(q: Q) {
    fair_share_case(&q, 2_000, 200, 10).await;
}

/// The case behind `fair_share_splits_by_weight`, with its sizes: two fair groups on one stream,
/// one with equal weights and one where `b` weighs 3.
pub async fn fair_share_case<Q: Queue>(q: &Q, large: usize, small: usize, batch: usize) {
    q.ensure_stream("fair", &StreamConfig::default())
        .await
        .unwrap();
    let fair = GroupConfig::default().fair_share(true);
    if !q.capabilities().fair_share {
        let refused = q.ensure_group_with("fair", "g", &fair).await;
        assert!(
            matches!(refused, Err(Error::Unsupported { .. })),
            "{refused:?}"
        );
        let refused = q.set_key_weight("fair", "g", Some("b"), Some(3.0)).await;
        assert!(
            matches!(refused, Err(Error::Unsupported { .. })),
            "{refused:?}"
        );
        return;
    }
    let both = fair.clone().ordered(true);
    let refused = q.ensure_group_with("fair", "both", &both).await;
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "{refused:?}"
    );
    assert!(q.ensure_group_with("fair", "even", &fair).await.unwrap());
    assert!(q.ensure_group_with("fair", "heavy", &fair).await.unwrap());
    assert!(!q.ensure_group_with("fair", "heavy", &fair).await.unwrap());
    let refused = q
        .ensure_group_with("fair", "heavy", &GroupConfig::default())
        .await;
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "fair share is fixed at creation: {refused:?}"
    );
    // The weight rule at this door too.
    for bad in [0.0, -1.0, 0.001, 1000.5, f64::NAN, f64::INFINITY] {
        let refused = q
            .set_key_weight("fair", "heavy", Some("b"), Some(bad))
            .await;
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{bad}: {refused:?}"
        );
    }
    let refused = q.set_key_weight("fair", "heavy", Some(""), Some(2.0)).await;
    assert!(matches!(refused, Err(Error::InvalidKey(_))), "{refused:?}");
    q.ensure_group_with("fair", "plain", &GroupConfig::default())
        .await
        .unwrap();
    let refused = q
        .set_key_weight("fair", "plain", Some("b"), Some(2.0))
        .await;
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "weights need a fair group: {refused:?}"
    );
    let refused = q.set_key_weight("fair", "nope", Some("b"), Some(2.0)).await;
    assert!(
        matches!(refused, Err(Error::GroupNotFound { .. })),
        "{refused:?}"
    );
    q.set_key_weight("fair", "heavy", Some("b"), Some(3.0))
        .await
        .unwrap();
    q.delete_group("fair", "plain").await.unwrap();

    publish_many(q, "fair", "a", large).await;
    publish_many(q, "fair", "b", small).await;

    let c = q.consumer("fair", "even", "c").await.unwrap();
    let (a, b) = shares_while_b_has_work(&c, small, batch).await;
    assert_share(a, b, 0.5, "equal weights");
    let c = q.consumer("fair", "heavy", "c").await.unwrap();
    let (a, b) = shares_while_b_has_work(&c, small, batch).await;
    assert_share(a, b, 0.75, "weights 1:3");
}

/// Work-conserving: with one key alone, a fair group hands out everything at once, batch after
/// batch, with no wait on virtual time; messages without a key are one more key.
pub async fn fair_share_is_work_conserving<Q: Queue>(q: Q) {
    if !q.capabilities().fair_share {
        return;
    }
    q.ensure_stream("alone", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group_with("alone", "g", &GroupConfig::default().fair_share(true))
        .await
        .unwrap();
    publish_many(&q, "alone", "a", 300).await;
    let c = q.consumer("alone", "g", "c").await.unwrap();
    for round in 0..3 {
        let got = c.try_fetch(100).await.unwrap();
        assert_eq!(got.len(), 100, "round {round}: a full batch at once");
        c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
    }
    let unkeyed: Vec<OutgoingMessage> = (0..50)
        .map(|n| OutgoingMessage::json(&serde_json::json!({ "n": n })).unwrap())
        .collect();
    q.publish_batch("alone", &unkeyed).await.unwrap();
    let got = c.try_fetch(100).await.unwrap();
    assert_eq!(got.len(), 50, "unkeyed messages, all at once");
    assert!(got.iter().all(|d| d.message.key.is_none()));
    c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
}

/// A retried delivery of a fair group comes back right after its backoff, ahead of a large
/// virtual backlog (no starvation); so does a delayed publish.
pub async fn fair_share_retry_is_not_starved<Q: Queue>(q: Q) {
    if !q.capabilities().fair_share {
        return;
    }
    q.ensure_stream("retry", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group_with("retry", "g", &GroupConfig::default().fair_share(true))
        .await
        .unwrap();
    q.publish("retry", keyed("x", 0)).await.unwrap();
    publish_many(&q, "retry", "a", 2_000).await;
    let c = q.consumer("retry", "g", "c").await.unwrap();
    let first = c.try_fetch(1).await.unwrap();
    assert_eq!(first.len(), 1);
    let delay = Duration::from_millis(300);
    c.nack(&first[0], Some(delay), Some("again")).await.unwrap();
    let delayed = q
        .publish("retry", keyed("late", 0).delay(delay))
        .await
        .unwrap();
    // Wait for the due time itself (the event this case is about), as the queue sees it: both
    // stop counting as delayed.
    let deadline = std::time::Instant::now() + crate::common::WAIT;
    while q.stats("retry", "g").await.unwrap().delayed > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the retry and the delayed publish never came due"
        );
        tokio::task::yield_now().await;
    }
    let mut seen_retry = false;
    let mut seen_delayed = false;
    for _ in 0..3 {
        let got = c.try_fetch(10).await.unwrap();
        seen_retry |= got.iter().any(|d| d.id() == first[0].id());
        seen_delayed |= got.iter().any(|d| d.id() == delayed.id);
        c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
        if seen_retry && seen_delayed {
            break;
        }
    }
    assert!(
        seen_retry,
        "the retried delivery waits behind the backlog of 2 000"
    );
    assert!(
        seen_delayed,
        "the delayed publish waits behind the backlog of 2 000"
    );
}

/// Keys of the next `n` deliveries (acked as they come).
async fn next_keys<C: QueueConsumer>(c: &C, n: usize) -> Vec<String> {
    let got = c.fetch(n, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), n, "{n} ready");
    c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
    got.iter()
        .map(|d| d.message.key.clone().unwrap_or_default())
        .collect()
}

/// A key that was idle earns no credit: it joins at the group's virtual time, level with the
/// keys that kept working, not ahead of them by what it did not use; and after the group
/// drained, a key that worked a lot is not behind a new one.
pub async fn fair_share_gives_no_credit_for_idleness<Q: Queue>(q: Q) {
    if !q.capabilities().fair_share {
        return;
    }
    q.ensure_stream("idle", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group_with("idle", "g", &GroupConfig::default().fair_share(true))
        .await
        .unwrap();
    let c = q.consumer("idle", "g", "c").await.unwrap();
    // b works once, then idles while a's backlog is half served.
    publish_many(&q, "idle", "b", 1).await;
    assert_eq!(next_keys(&c, 1).await, ["b"]);
    publish_many(&q, "idle", "a", 200).await;
    for _ in 0..10 {
        next_keys(&c, 10).await;
    }
    publish_many(&q, "idle", "b", 10).await;
    let next = next_keys(&c, 10).await;
    let b = next.iter().filter(|k| *k == "b").count();
    assert!(
        (4..=6).contains(&b),
        "b after idling gets its share, not a catch-up: {next:?}"
    );
    // Drain; then a new key and a busy one start level.
    loop {
        let got = c.try_fetch(100).await.unwrap();
        if got.is_empty() {
            break;
        }
        c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
    }
    publish_many(&q, "idle", "c", 10).await;
    publish_many(&q, "idle", "a", 10).await;
    let next = next_keys(&c, 10).await;
    let a = next.iter().filter(|k| *k == "a").count();
    assert!(
        (4..=6).contains(&a),
        "after a drain a busy key starts level with a new one: {next:?}"
    );
}
