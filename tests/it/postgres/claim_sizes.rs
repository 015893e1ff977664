//! The worker's adaptive claim sizes against real Postgres: claims grow towards the prefetch
//! while handlers keep up, never pass it, and stay small when handlers are slow (so that nothing
//! claimed waits past its lease).
//!
//! `Recorded` wraps a real `PgConsumer` and forwards every call unchanged; it only writes down
//! how many deliveries each claim asked for and got.

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
}

impl Recorded {
    fn note(&self, asked: usize, got: usize) {
        self.claims.lock().unwrap().push((asked, got));
    }
    fn claims(&self) -> Vec<Claim> {
        self.claims.lock().unwrap().clone()
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
    let consumer = Recorded {
        inner: ns.consumer("s", "g", "w").await.unwrap(),
        claims: Arc::default(),
    };
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
    let consumer = Recorded {
        inner: ns.consumer("s", "g", "w").await.unwrap(),
        claims: Arc::default(),
    };
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
