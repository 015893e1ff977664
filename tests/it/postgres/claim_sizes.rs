//! The worker's claims against real Postgres: claims grow towards the prefetch while handlers
//! keep up, never pass it, and stay small when handlers are slow (so that nothing claimed waits
//! past its lease); once little is ready, acks are settled beside the claims, so a slow ack never
//! holds up the claim of the next message.
//!
//! `Recorded` wraps a real `PgConsumer` and forwards every call unchanged; it writes down how
//! many deliveries each claim asked for and got, and can hold every ack at a gate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtide::{
    Delivery, Outcome, PgConsumer, QueueConsumer, Result, SettleReport, StreamConfig, Worker,
};

use crate::common::{eventually, json, namespace, WAIT};

/// One claim: how many the worker asked for, how many came back.
type Claim = (usize, usize);

#[derive(Clone)]
struct Recorded {
    inner: PgConsumer,
    claims: Arc<Mutex<Vec<Claim>>>,
    /// Acks (alone or riding with a claim) wait here for a permit; `None`: they go at once.
    gate: Option<Arc<Gate>>,
}

/// Holds acks until opened (closed: no permits), counting those that arrived.
struct Gate {
    open: tokio::sync::Semaphore,
    arrived: AtomicUsize,
}

impl Recorded {
    fn new(inner: PgConsumer) -> Self {
        Recorded {
            inner,
            claims: Arc::default(),
            gate: None,
        }
    }
    fn note(&self, asked: usize, got: usize) {
        self.claims.lock().unwrap().push((asked, got));
    }
    fn claims(&self) -> Vec<Claim> {
        self.claims.lock().unwrap().clone()
    }
    async fn pass_gate(&self, acks: usize) {
        if let (Some(gate), true) = (&self.gate, acks > 0) {
            gate.arrived.fetch_add(1, Ordering::SeqCst);
            drop(gate.open.acquire().await.unwrap());
        }
    }
}

impl QueueConsumer for Recorded {
    fn stream(&self) -> &str {
        self.inner.stream()
    }
    fn group(&self) -> &str {
        self.inner.group()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn settles_wake_fetches(&self) -> bool {
        self.inner.settles_wake_fetches()
    }
    async fn lease(&self) -> Option<Duration> {
        self.inner.lease().await
    }
    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        let got = self.inner.try_fetch(max).await?;
        self.note(max, got.len());
        Ok(got)
    }
    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let got = self.inner.fetch(max, timeout).await?;
        self.note(max, got.len());
        Ok(got)
    }
    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        self.pass_gate(ds.len()).await;
        self.inner.ack_batch(ds).await
    }
    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        self.inner.nack_batch(ds, delay, error).await
    }
    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        self.inner.term_batch(ds, reason).await
    }
    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        self.inner.in_progress(d, lease).await
    }
    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        self.inner.release_batch(ds).await
    }
    async fn ack_and_fetch(
        &self,
        done: &[&Delivery],
        max: usize,
    ) -> Result<(SettleReport, Vec<Delivery>)> {
        self.pass_gate(done.len()).await;
        let (report, got) = self.inner.ack_and_fetch(done, max).await?;
        self.note(max, got.len());
        Ok((report, got))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_handlers_grow_claims_up_to_the_prefetch_and_no_further() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let n = 600usize;
    ns.publish_batch(
        "s",
        &(0..n)
            .map(|i| json(serde_json::json!(i)))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let consumer = Recorded::new(ns.consumer("s", "g", "w").await.unwrap());
    let handled = Arc::new(Mutex::new(0usize));
    let worker = Worker::new(consumer.clone(), {
        let handled = handled.clone();
        move |_d: Delivery| {
            *handled.lock().unwrap() += 1;
            async { Ok::<_, String>(Outcome::Ack) }
        }
    })
    .concurrency(4)
    .prefetch(40);
    let token = pgtide::CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    eventually(WAIT, "all handled", || *handled.lock().unwrap() >= n).await;
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, n as u64);
    let claims = consumer.claims();
    assert!(
        claims
            .iter()
            .all(|&(asked, got)| asked <= 40 && got <= asked),
        "a claim passed the prefetch: {claims:?}"
    );
    assert_eq!(claims[0].0, 4, "the first claim takes the free slots");
    assert!(
        claims.iter().any(|&(asked, got)| asked == 40 && got == 40),
        "claims never grew to the prefetch with a no-op handler: {claims:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_keep_claims_within_half_a_lease() {
    let ns = namespace().await;
    // Handlers of 300 ms, two at a time, lease 1 s: the running handlers get through about
    // 2 x 500 / 300 = 3 deliveries in half a lease, so a claim takes the free slots plus 3.
    ns.stream_with_groups(
        "s",
        StreamConfig::default().lease(Duration::from_secs(1)),
        &["g"],
    )
    .await;
    let n = 24;
    ns.publish_batch(
        "s",
        &(0..n)
            .map(|i| json(serde_json::json!(i)))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let consumer = Recorded::new(ns.consumer("s", "g", "w").await.unwrap());
    let handled = Arc::new(Mutex::new(0usize));
    let worker = Worker::new(consumer.clone(), {
        let handled = handled.clone();
        move |_d: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                *handled.lock().unwrap() += 1;
                Ok::<_, String>(Outcome::Ack)
            }
        }
    })
    .concurrency(2)
    .prefetch(64);
    let token = pgtide::CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    eventually(WAIT * 3, "all handled", || {
        *handled.lock().unwrap() >= n as usize
    })
    .await;
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.lease_lost, 0, "{report:?}");
    assert_eq!(report.retried, 0, "no lease lapsed: {report:?}");
    let claims = consumer.claims();
    assert!(
        claims.iter().all(|&(asked, _)| asked <= 2 + 3),
        "a slow worker claimed more than starts within half a lease: {claims:?}"
    );
}

/// At a trickle, a message published while the previous message's ack is still settling reaches
/// its handler at once: the ack does not ride with the claim, nor hold up the wait for work.
/// (Before, the worker sent it with its next claim, or settled it inline while it waited, and a
/// slow ack commit delayed the next message's claim by as much.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_ack_does_not_hold_up_the_next_claim() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let gate = Arc::new(Gate {
        open: tokio::sync::Semaphore::new(0),
        arrived: AtomicUsize::new(0),
    });
    let consumer = Recorded {
        gate: Some(gate.clone()),
        ..Recorded::new(ns.consumer("s", "g", "w").await.unwrap())
    };
    let handled = Arc::new(Mutex::new(vec![]));
    let worker = Worker::new(consumer.clone(), {
        let handled = handled.clone();
        move |d: Delivery| {
            handled.lock().unwrap().push(d.id());
            async { Ok::<_, String>(Outcome::Ack) }
        }
    })
    .concurrency(4);
    let token = pgtide::CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));

    let first = ns.publish("s", json(serde_json::json!(1))).await.unwrap();
    eventually(WAIT, "the first message handled", || {
        handled.lock().unwrap().contains(&first.id)
    })
    .await;
    eventually(WAIT, "its ack held at the gate", || {
        gate.arrived.load(Ordering::SeqCst) >= 1
    })
    .await;
    let second = ns.publish("s", json(serde_json::json!(2))).await.unwrap();
    eventually(
        WAIT,
        "the second message handled while the first ack waits",
        || handled.lock().unwrap().contains(&second.id),
    )
    .await;
    assert_eq!(
        ns.stats("s", "g").await.unwrap().in_flight,
        2,
        "both messages stay leased while the gate holds their acks"
    );

    gate.open.add_permits(tokio::sync::Semaphore::MAX_PERMITS);
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 2, "{report:?}");
}
