//! Conformance cases for rate limits (issue 12.3), for every backend: enforced where
//! [`pgtide::Capabilities::rate_limits`] says so, a typed refusal where not.
//!
//! The checks bound what a rate limit forbids (more deliveries in a span than the burst plus
//! the rate allows), which a slow machine can only make easier to pass; they never require
//! the test itself to be fast.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgtide::{Error, GroupConfig, OutgoingMessage, Queue, QueueConsumer, RateLimit, StreamConfig};

/// Time allowed for a case to drain (far above what the limits need).
const WAIT: Duration = Duration::from_secs(30);

fn keyed(key: &str, n: u32) -> OutgoingMessage {
    OutgoingMessage::json(&serde_json::json!({"key": key, "n": n}))
        .unwrap()
        .key(key)
}

/// Fails if the deliveries received (`at`, sorted) came faster than the bucket allows. The
/// first `k` receipts were all claimed between `start` (taken before the first claim) and the
/// `k`-th receipt, whatever the delays between a claim and its receipt, so there can be at most
/// `burst + rate * span` of them (plus one for the token being refilled at the edge).
fn assert_within_rate(start: Instant, at: &[Instant], rate: f64, burst: usize, what: &str) {
    for (i, t) in at.iter().enumerate() {
        let span = t.duration_since(start).as_secs_f64();
        let allowed = burst as f64 + rate * span + 1.0;
        assert!(
            (i + 1) as f64 <= allowed,
            "{what}: {} deliveries within {span:.3} s of the first claim, a limit of {rate}/s with burst {burst} allows {allowed:.1}",
            i + 1
        );
    }
}

/// The bad limits every backend refuses with a typed error before anything is created.
async fn refuses_bad_limits<Q: Queue>(q: &Q, stream: &str) {
    for bad in [
        RateLimit::per_second(0.0),
        RateLimit::per_second(-1.0),
        RateLimit::per_second(f64::NAN),
        RateLimit::per_second(f64::INFINITY),
        RateLimit::per_second(2_000_000.0),
        RateLimit::per_second(10.0).burst(0),
    ] {
        for config in [
            GroupConfig::default().rate_limit(bad),
            GroupConfig::default().rate_limit_per_key(bad),
        ] {
            let refused = q.ensure_group_with(stream, "bad", &config).await;
            assert!(
                matches!(
                    refused,
                    Err(Error::InvalidConfig(_) | Error::Unsupported { .. })
                ),
                "{bad:?}: {refused:?}"
            );
        }
    }
}

/// A group rate of 20/s with a burst of 5, two consumers fetching greedily: never more than
/// the bucket allows since the first claim, and a consumer waiting on an empty bucket is woken by its
/// next token (no notification announces tokens). Backends without `rate_limits` refuse.
pub async fn rate_limit_holds_the_group<Q: Queue>(q: Q) {
    q.ensure_stream("rated", &StreamConfig::default())
        .await
        .unwrap();
    refuses_bad_limits(&q, "rated").await;
    let config = GroupConfig::default().rate_limit(RateLimit::per_second(20.0).burst(5));
    if !q.capabilities().rate_limits {
        let refused = q.ensure_group_with("rated", "g", &config).await;
        assert!(
            matches!(refused, Err(Error::Unsupported { .. })),
            "{refused:?}"
        );
        return;
    }
    q.ensure_group_with("rated", "g", &config).await.unwrap();
    let total = 40;
    let msgs: Vec<OutgoingMessage> = (0..total)
        .map(|n| OutgoingMessage::json(&serde_json::json!({ "n": n })).unwrap())
        .collect();
    q.publish_batch("rated", &msgs).await.unwrap();
    let first = q.consumer("rated", "g", "c0").await.unwrap();
    let start = Instant::now();
    let burst = first.try_fetch(100).await.unwrap();
    assert_eq!(burst.len(), 5, "a full bucket gives its burst, no more");
    let mut at: Vec<Instant> = vec![Instant::now(); burst.len()];
    first
        .ack_batch(&burst.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    let mut tasks = vec![];
    for c in 0..2 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let consumer = q.consumer("rated", "g", &format!("c{c}")).await.unwrap();
            let mut got = vec![];
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                // The wait is long: only a token (or another consumer's leftovers) ends it early.
                let batch = consumer.fetch(100, Duration::from_secs(3)).await.unwrap();
                if batch.is_empty() {
                    break;
                }
                let now = Instant::now();
                got.extend(batch.iter().map(|_| now));
                consumer
                    .ack_batch(&batch.iter().collect::<Vec<_>>())
                    .await
                    .unwrap();
            }
            got
        }));
    }
    for t in tasks {
        at.extend(t.await.unwrap());
    }
    at.sort();
    assert_eq!(at.len(), total as usize, "every message delivered once");
    // 35 after the burst at 20/s: at least 1.75 s less the slack of one token.
    let spent = at[at.len() - 1].duration_since(start);
    assert!(
        spent >= Duration::from_millis(1_650),
        "40 deliveries under 20/s (burst 5) took only {spent:?}"
    );
    assert_within_rate(start, &at, 20.0, 5, "group rate");
    let stats = q.stats("rated", "g").await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (0, 0));
}

/// A per-key rate of 2/s (burst 1): a key with a run of six messages published first is held to
/// its rate while eight other keys, published after it, all go in the first claims.
pub async fn rate_limit_per_key_holds_one_key_while_others_drain<Q: Queue>(q: Q) {
    q.ensure_stream("keyrated", &StreamConfig::default())
        .await
        .unwrap();
    let config = GroupConfig::default().rate_limit_per_key(RateLimit::per_second(2.0).burst(1));
    if !q.capabilities().rate_limits {
        let refused = q.ensure_group_with("keyrated", "g", &config).await;
        assert!(
            matches!(refused, Err(Error::Unsupported { .. })),
            "{refused:?}"
        );
        return;
    }
    q.ensure_group_with("keyrated", "g", &config).await.unwrap();
    let mut msgs: Vec<OutgoingMessage> = (0..6).map(|n| keyed("slow", n)).collect();
    msgs.extend((0..8).map(|k| keyed(&format!("k{k}"), 0)));
    // Unkeyed messages are not limited by a per-key rate.
    msgs.extend((0..3).map(|n| OutgoingMessage::json(&serde_json::json!({ "n": n })).unwrap()));
    q.publish_batch("keyrated", &msgs).await.unwrap();
    let c = q.consumer("keyrated", "g", "c").await.unwrap();
    let start = Instant::now();
    // (key, when) in the order handled.
    let mut handled: Vec<(String, Instant)> = vec![];
    let deadline = Instant::now() + WAIT;
    while handled.len() < msgs.len() && Instant::now() < deadline {
        let batch = c.fetch(100, Duration::from_secs(3)).await.unwrap();
        let now = Instant::now();
        for d in &batch {
            handled.push((d.message.key.clone().unwrap_or_default(), now));
        }
        c.ack_batch(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }
    assert_eq!(handled.len(), msgs.len(), "every message delivered once");
    let slow: Vec<usize> = (0..handled.len())
        .filter(|&i| handled[i].0 == "slow")
        .collect();
    assert_eq!(slow.len(), 6);
    let others_done = (0..handled.len())
        .filter(|&i| handled[i].0 != "slow")
        .max()
        .unwrap();
    assert!(
        others_done < slow[1],
        "the other keys waited for the slow one: {:?}",
        handled.iter().map(|h| &h.0).collect::<Vec<_>>()
    );
    let slow_at: Vec<Instant> = slow.iter().map(|&i| handled[i].1).collect();
    assert_within_rate(start, &slow_at, 2.0, 1, "per-key rate");
    // Its first token at once, five more at 2/s: at least 2.5 s after the first claim.
    let spent = slow_at[5].duration_since(start);
    assert!(
        spent >= Duration::from_millis(2_400),
        "six of one key under 2/s (burst 1) took only {spent:?}"
    );
    let per_key: HashMap<&str, usize> = handled.iter().fold(HashMap::new(), |mut m, h| {
        *m.entry(h.0.as_str()).or_default() += 1;
        m
    });
    assert_eq!(per_key.len(), 10, "slow, eight keys and the unkeyed");
}

/// Issue 12.3: a group rate held across processes. `consumers` consumers spread over `handles`
/// (standing for processes: nothing shared but the server) fetch greedily from a backlog larger
/// than the window needs; the claim times come from the server (lease end less the lease), and
/// the deliveries claimed in the `window` after the first claim must be the rate's within 10 %
/// (plus the burst on top).
pub async fn rate_limit_holds_under_load<Q: Queue>(
    handles: &[Q],
    consumers: usize,
    rate: f64,
    burst: u32,
    window: Duration,
) {
    let q = &handles[0];
    let lease = Duration::from_secs(60);
    q.ensure_stream("load-rate", &StreamConfig::default().lease(lease))
        .await
        .unwrap();
    let config = GroupConfig::default().rate_limit(RateLimit::per_second(rate).burst(burst));
    q.ensure_group_with("load-rate", "g", &config)
        .await
        .unwrap();
    let expected = rate * window.as_secs_f64();
    let backlog = (expected * 1.5) as usize + burst as usize;
    let msgs: Vec<OutgoingMessage> = (0..backlog)
        .map(|n| OutgoingMessage::json(&serde_json::json!({ "n": n })).unwrap())
        .collect();
    for chunk in msgs.chunks(500) {
        q.publish_batch("load-rate", chunk).await.unwrap();
    }
    let stop = tokio_util::sync::CancellationToken::new();
    // Each consumer reports its claim times, so that the test stops as soon as claims span the
    // window, however late the first one came.
    let (claims_tx, mut claims_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = vec![];
    for c in 0..consumers {
        let q = handles[c % handles.len()].clone();
        let stop = stop.clone();
        let claims_tx = claims_tx.clone();
        tasks.push(tokio::spawn(async move {
            let consumer = q
                .consumer("load-rate", "g", &format!("c{c}"))
                .await
                .unwrap();
            let mut claimed_at = vec![];
            while !stop.is_cancelled() {
                let batch = consumer.fetch(20, Duration::from_secs(1)).await.unwrap();
                for d in &batch {
                    let at = d.lease_expires_at - chrono::Duration::from_std(lease).unwrap();
                    claimed_at.push(at);
                    let _ = claims_tx.send(at);
                }
                consumer
                    .ack_batch(&batch.iter().collect::<Vec<_>>())
                    .await
                    .unwrap();
            }
            claimed_at
        }));
    }
    drop(claims_tx);
    let spanned = tokio::time::timeout(window + WAIT, async {
        let first = claims_rx.recv().await?;
        let end = first + chrono::Duration::from_std(window).ok()?;
        while claims_rx.recv().await? < end {}
        Some(())
    })
    .await;
    assert!(
        matches!(spanned, Ok(Some(()))),
        "claims never spanned the {window:?} window"
    );
    stop.cancel();
    let mut at = vec![];
    for t in tasks {
        at.extend(t.await.unwrap());
    }
    at.sort();
    assert!(!at.is_empty(), "nothing was delivered");
    let end = at[0] + chrono::Duration::from_std(window).unwrap();
    let in_window = at.iter().filter(|t| **t < end).count() as f64;
    assert!(
        in_window >= expected * 0.9 && in_window <= expected * 1.1 + f64::from(burst),
        "{in_window} deliveries claimed in {window:?} under {rate}/s (burst {burst}): want {:.0}..={:.0}",
        expected * 0.9,
        expected * 1.1 + f64::from(burst)
    );
    assert!(
        (at.len() as f64) < backlog as f64,
        "the backlog ran out: the window was not held at the limit"
    );
}
