//! Conformance for the Amqp backend against the local server (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), plus RabbitMQ-specific cases (what the shared suite
//! in `cases.rs` already checks is not repeated here). Each test has its own
//! namespace, deleted from the server when the test ends.

use std::time::Duration;

use pgtide::{AmqpBackend, GroupStart, OutgoingMessage, Queue, QueueConsumer, StreamConfig};

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Deletes the test's namespace from the server on drop.
pub struct Cleanup {
    ns: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ns = self.ns.clone();
        // Drop cannot await: clean up on a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(b) = AmqpBackend::connect(&url(), &ns).await {
                    let _ = b.delete_namespace().await;
                }
            });
        })
        .join();
    }
}

pub(crate) async fn fresh() -> (AmqpBackend, Cleanup) {
    let ns = crate::common::unique("t");
    let backend = AmqpBackend::connect(&url(), &ns).await.unwrap();
    (backend, Cleanup { ns })
}

conformance!(suite, crate::conformance::amqp::fresh);

fn msg(i: i32) -> OutgoingMessage {
    OutgoingMessage::json(&i).unwrap()
}

async fn one<C: QueueConsumer>(c: &C) -> pgtide::Delivery {
    let mut got = c.fetch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 1, "nothing delivered");
    got.remove(0)
}

async fn many<C: QueueConsumer>(c: &C, n: usize) -> Vec<pgtide::Delivery> {
    let mut got = vec![];
    while got.len() < n {
        let more = c
            .fetch(n - got.len(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!more.is_empty(), "only {} of {n} delivered", got.len());
        got.extend(more);
    }
    got.sort_by_key(|d| d.id());
    got
}

async fn setup(q: &AmqpBackend, config: StreamConfig) {
    q.ensure_stream("s", &config).await.unwrap();
    q.ensure_group("s", "g", GroupStart::New).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_consumer_redelivers_with_next_attempt() {
    let (q, _cleanup) = fresh().await;
    setup(&q, StreamConfig::default()).await;
    let id = q.publish("s", msg(1)).await.unwrap().id;
    let a = q.consumer("s", "g", "a").await.unwrap();
    let first = one(&a).await;
    assert_eq!((first.id(), first.attempt), (id, 1));
    // The holder goes away (like a crashed process): its channel closes, the broker requeues.
    drop(first);
    drop(a);
    let b = q.consumer("s", "g", "b").await.unwrap();
    let second = one(&b).await;
    assert_eq!((second.id(), second.attempt), (id, 2));
    b.ack(&second).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_fetch_loses_nothing() {
    let (q, _cleanup) = fresh().await;
    setup(&q, StreamConfig::default()).await;
    let c = q.consumer("s", "g", "c").await.unwrap();
    // A fetch waiting on an empty queue is dropped, then a message arrives.
    let waiting = tokio::time::timeout(
        Duration::from_millis(300),
        c.fetch(5, Duration::from_secs(60)),
    )
    .await;
    assert!(waiting.is_err());
    let id = q.publish("s", msg(1)).await.unwrap().id;
    let d = one(&c).await;
    assert_eq!((d.id(), d.attempt), (id, 1));
    c.ack(&d).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_browsed_not_consumed() {
    let (q, _cleanup) = fresh().await;
    setup(&q, StreamConfig::default()).await;
    let ids: Vec<_> = q
        .publish_batch("s", &[msg(1), msg(2), msg(3)])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let c = q.consumer("s", "g", "c").await.unwrap();
    let first = many(&c, 3).await;
    let report = c
        .nack_batch(
            &first.iter().collect::<Vec<_>>(),
            Some(Duration::ZERO),
            Some("bad"),
        )
        .await
        .unwrap();
    assert_eq!(report.settled.len(), 3);
    let second = many(&c, 3).await;
    assert!(second.iter().all(|d| d.attempt == 2));
    let report = c
        .term_batch(&second.iter().collect::<Vec<_>>(), "gave up")
        .await
        .unwrap();
    assert_eq!(report.dead_lettered.len(), 3);
    for _ in 0..2 {
        let dead = q.dead_letters("s", "g", 10).await.unwrap();
        assert_eq!(dead.iter().map(|d| d.id).collect::<Vec<_>>(), ids);
        assert!(dead.iter().all(|d| d.reason == "gave up"
            && d.error.as_deref() == Some("bad")
            && d.attempts == 2));
    }
    assert_eq!(q.dead_letters("s", "g", 2).await.unwrap().len(), 2);
    assert_eq!(q.stats("s", "g").await.unwrap().dead, 3);
    q.purge("s").await.unwrap();
    assert_eq!(q.stats("s", "g").await.unwrap().dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_is_shared_between_handles() {
    let (q, _cleanup) = fresh().await;
    let config = StreamConfig::default()
        .lease(Duration::from_secs(7))
        .max_deliver(3);
    setup(&q, config).await;
    // Another process: learns config and groups from the broker.
    let other = AmqpBackend::connect(&url(), q.namespace()).await.unwrap();
    assert!(!other
        .ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap());
    assert!(!other.ensure_group("s", "g", GroupStart::New).await.unwrap());
    let c = other.consumer("s", "g", "c").await.unwrap();
    assert_eq!(c.lease().await, Some(Duration::from_secs(7)));
    assert!(other.ensure_group("s", "h", GroupStart::New).await.unwrap());
    q.consumer("s", "h", "c").await.unwrap();
    assert!(q.delete_group("s", "h").await.unwrap());
    assert!(!q.delete_group("s", "h").await.unwrap());
    assert!(matches!(
        other.consumer("s", "h", "c").await,
        Err(pgtide::Error::GroupNotFound { .. })
    ));
    assert!(other.delete_stream("s").await.unwrap());
    assert!(!q.delete_stream("s").await.unwrap());
    assert!(matches!(
        q.publish("s", msg(1)).await,
        Err(pgtide::Error::StreamNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_backend_dispatches_amqp_urls() {
    let ns = crate::common::unique("t");
    let _cleanup = Cleanup { ns: ns.clone() };
    let q = pgtide::AnyBackend::connect(&url(), &ns).await.unwrap();
    assert_eq!(q.kind(), "amqp");
    q.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("s", "g", GroupStart::New).await.unwrap();
    let id = q.publish("s", msg(7)).await.unwrap().id;
    let c = q.consumer("s", "g", "c").await.unwrap();
    let d = one(&c).await;
    assert_eq!((d.id(), d.json::<i32>().unwrap()), (id, 7));
    c.ack(&d).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_retryable_error() {
    let started = std::time::Instant::now();
    let err = AmqpBackend::connect("amqp://guest:guest@127.0.0.1:1/%2f", "t_down")
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumer_hands_back_what_its_doorbell_caught() {
    let (q, _cleanup) = fresh().await;
    setup(
        &q,
        StreamConfig::default().lease(Duration::from_millis(500)),
    )
    .await;
    let idle = q.consumer("s", "g", "idle").await.unwrap();
    // Leaves a doorbell registered on the empty queue, then never fetches again.
    assert!(idle
        .fetch(1, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    let id = q.publish("s", msg(1)).await.unwrap().id;
    let busy = q.consumer("s", "g", "busy").await.unwrap();
    let d = one(&busy).await;
    assert_eq!(
        (d.id(), d.attempt),
        (id, 1),
        "attempt unchanged by the hand-back"
    );
    busy.ack(&d).await.unwrap();
    drop(idle);
}

/// Whether the queue `name` exists on the server (a passive declare on a connection of its own).
async fn queue_exists(name: &str) -> bool {
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), passive, lapin::types::FieldTable::default())
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_last_stream_deletes_the_stream_log() {
    let (q, _cleanup) = fresh().await;
    let log = format!("{}~streams", q.namespace());
    q.ensure_stream("a", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_stream("b", &StreamConfig::default())
        .await
        .unwrap();
    assert!(queue_exists(&log).await);
    assert!(q.delete_stream("a").await.unwrap());
    assert!(queue_exists(&log).await, "{log} went while b exists");
    assert!(q.delete_stream("b").await.unwrap());
    assert!(!queue_exists(&log).await, "{log} left behind");
    // A stream created afterwards is logged again, so delete_namespace still finds it.
    q.ensure_stream("c", &StreamConfig::default())
        .await
        .unwrap();
    assert!(queue_exists(&log).await);
    q.delete_namespace().await.unwrap();
    assert!(!queue_exists(&log).await);
}
