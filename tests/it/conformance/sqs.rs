//! Conformance for the SQS backend against moto's server, one server per test (started on a
//! free loopback port by `pgtide-testing`, stopped when the test ends), plus SQS-specific
//! cases (what the shared suite in `cases.rs` already checks is not repeated here).

use std::time::{Duration, Instant};

use pgtide::{
    GroupStart, OutgoingMessage, Queue, QueueConsumer, SqsBackend, SqsOptions, StreamConfig,
};
use pgtide_testing::Server;

async fn fresh() -> (SqsBackend, Server) {
    let server = Server::sqs();
    let ns = crate::common::unique("t");
    let backend = SqsBackend::connect(&server.sqs_url(), &ns).await.unwrap();
    (backend, server)
}

conformance!(suite, crate::conformance::sqs::fresh);

fn msg(i: i32) -> OutgoingMessage {
    OutgoingMessage::json(&i).unwrap()
}

async fn one<C: QueueConsumer>(c: &C) -> pgtide::Delivery {
    let mut got = c.fetch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 1, "nothing delivered");
    got.remove(0)
}

async fn setup(q: &SqsBackend, config: StreamConfig) {
    q.ensure_stream("s", &config).await.unwrap();
    q.ensure_group("s", "g", GroupStart::New).await.unwrap();
}

/// The raw SQS client of a test server, to look behind the backend.
async fn raw(server: &Server) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .endpoint_url(format!("http://127.0.0.1:{}", server.port))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_backend_dispatches_sqs_urls() {
    let server = Server::sqs();
    let q = pgtide::AnyBackend::connect(&server.sqs_url(), "t_any")
        .await
        .unwrap();
    assert_eq!(q.kind(), "sqs");
    q.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("s", "g", GroupStart::New).await.unwrap();
    let id = q.publish("s", msg(7)).await.unwrap().id;
    let c = q.consumer("s", "g", "c").await.unwrap();
    let mut got = c.fetch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 1);
    let d = got.remove(0);
    assert_eq!((d.id(), d.json::<i32>().unwrap()), (id, 7));
    c.ack(&d).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_is_shared_between_handles() {
    let (q, server) = fresh().await;
    let config = StreamConfig::default()
        .lease(Duration::from_secs(7))
        .max_deliver(3)
        .backoff(pgtide::Backoff::schedule([Duration::from_millis(1500)]).jitter(0.5));
    setup(&q, config).await;
    // Another process: learns config and groups from the registry queue's tags.
    let other = SqsBackend::connect(&server.sqs_url(), q.namespace())
        .await
        .unwrap();
    assert!(!other
        .ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap());
    assert!(!other.ensure_group("s", "g", GroupStart::New).await.unwrap());
    let c = other.consumer("s", "g", "c").await.unwrap();
    assert_eq!(c.lease().await, Some(Duration::from_secs(7)));
    assert!(other.ensure_group("s", "h", GroupStart::New).await.unwrap());
    // q's cache predates h; a fresh handle with no cache publishes to both groups.
    let third = SqsBackend::connect(&server.sqs_url(), q.namespace())
        .await
        .unwrap();
    let id = third.publish("s", msg(1)).await.unwrap().id;
    for group in ["g", "h"] {
        let d = one(&q.consumer("s", group, "c").await.unwrap()).await;
        assert_eq!(d.id(), id, "{group}");
    }
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

/// A delay longer than SQS's native one comes early and is sent again with the rest of it;
/// the attempt count is not touched by the early receive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_past_the_native_limit_are_emulated() {
    let server = Server::sqs();
    let options = SqsOptions::default().max_native_delay(Duration::from_secs(1));
    let q = SqsBackend::connect_with(&server.sqs_url(), "t_delay", options)
        .await
        .unwrap();
    setup(&q, StreamConfig::default()).await;
    let c = q.consumer("s", "g", "c").await.unwrap();
    let published = Instant::now();
    let id = q
        .publish("s", msg(1).delay(Duration::from_millis(2500)))
        .await
        .unwrap()
        .id;
    let d = one(&c).await;
    assert!(
        published.elapsed() >= Duration::from_millis(2450),
        "delivered after {:?}",
        published.elapsed()
    );
    assert_eq!((d.id(), d.attempt), (id, 1));
    c.ack(&d).await.unwrap();
}

/// A nack delay past SQS's 12 h visibility limit re-sends the message with its due time:
/// it is kept (counted as delayed), not delivered now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_past_the_visibility_limit_is_kept_delayed() {
    let (q, _server) = fresh().await;
    setup(&q, StreamConfig::default()).await;
    q.publish("s", msg(1)).await.unwrap();
    let c = q.consumer("s", "g", "c").await.unwrap();
    let d = one(&c).await;
    c.nack(&d, Some(Duration::from_secs(13 * 3600)), Some("later"))
        .await
        .unwrap();
    assert!(c
        .fetch(1, Duration::from_millis(1200))
        .await
        .unwrap()
        .is_empty());
    let s = q.stats("s", "g").await.unwrap();
    assert_eq!(
        (s.ready, s.delayed, s.in_flight, s.dead),
        (0, 1, 0, 0),
        "{s:?}"
    );
}

/// A message that something else sent into a group's queue (no pgtide attribute) is delivered
/// with its SQS id and body, not stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_are_delivered() {
    let (q, server) = fresh().await;
    setup(&q, StreamConfig::default()).await;
    let client = raw(&server).await;
    let url = client
        .get_queue_url()
        .queue_name(format!("{}-g-s_s_g", q.namespace()))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let sent = client
        .send_message()
        .queue_url(&url)
        .message_body("hello from elsewhere")
        .send()
        .await
        .unwrap();
    let c = q.consumer("s", "g", "c").await.unwrap();
    let d = one(&c).await;
    assert_eq!(d.id().to_string(), sent.message_id.unwrap());
    assert_eq!(&d.payload[..], b"hello from elsewhere");
    assert!(d.headers.is_empty());
    c.ack(&d).await.unwrap();
}

/// Payloads that are not SQS text (binary, empty) and headers with characters SQS refuses in
/// attributes round-trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_payload_and_header_round_trips() {
    let (q, _server) = fresh().await;
    setup(&q, StreamConfig::default()).await;
    let payloads: [&[u8]; 3] = [b"\xff\x00\x01", b"", "\u{FFFE}x".as_bytes()];
    let mut ids = vec![];
    for p in payloads {
        let m = OutgoingMessage::bytes(p.to_vec()).header("h", "\u{FFFF}\u{1}ü");
        ids.push(q.publish("s", m).await.unwrap().id);
    }
    let c = q.consumer("s", "g", "c").await.unwrap();
    let mut got = vec![];
    while got.len() < 3 {
        let more = c.fetch(3, Duration::from_secs(5)).await.unwrap();
        assert!(!more.is_empty());
        got.extend(more);
    }
    for (p, id) in payloads.iter().zip(&ids) {
        let d = got.iter().find(|d| d.id() == *id).unwrap();
        assert_eq!(&d.payload[..], *p);
        assert_eq!(d.headers["h"], "\u{FFFF}\u{1}ü");
    }
    let too_big = OutgoingMessage::bytes(vec![0u8; 900_000]);
    assert!(matches!(
        q.publish("s", too_big).await,
        Err(pgtide::Error::PayloadTooLarge { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_retryable_error() {
    let started = Instant::now();
    let err = SqsBackend::connect("sqs://test:test@127.0.0.1:1?region=us-east-1", "t_down")
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let err = SqsBackend::connect("sqs://127.0.0.1:1", "t_down")
        .await
        .unwrap_err();
    assert!(matches!(err, pgtide::Error::InvalidConfig(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_limits_are_refused_up_front() {
    let (q, _server) = fresh().await;
    let long_lease = StreamConfig::default().lease(Duration::from_secs(13 * 3600));
    assert!(matches!(
        q.ensure_stream("s", &long_lease).await,
        Err(pgtide::Error::InvalidConfig(_))
    ));
    setup(&q, StreamConfig::default()).await;
    assert!(matches!(
        q.publish("s", msg(1).dedupe_key("k")).await,
        Err(pgtide::Error::Unsupported { .. })
    ));
    assert!(matches!(
        q.ensure_group("s", "old", GroupStart::Oldest).await,
        Err(pgtide::Error::Unsupported { .. })
    ));
}

/// A group whose queue is gone while the group is still registered: the publish reaches the
/// other group, then fails with a retryable error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_fan_out_is_reported() {
    let (q, server) = fresh().await;
    setup(&q, StreamConfig::default()).await;
    q.ensure_group("s", "h", GroupStart::New).await.unwrap();
    let client = raw(&server).await;
    let url = client
        .get_queue_url()
        .queue_name(format!("{}-g-s_s_h", q.namespace()))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    client.delete_queue().queue_url(url).send().await.unwrap();
    let err = q.publish("s", msg(1)).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("published to 1 of 2 groups"),
        "{err}"
    );
    let d = one(&q.consumer("s", "g", "c").await.unwrap()).await;
    assert_eq!(d.json::<i32>().unwrap(), 1);
    // Deleting the broken group repairs the stream: publishes succeed again.
    assert!(q.delete_group("s", "h").await.unwrap());
    q.publish("s", msg(2)).await.unwrap();
}

/// The outbox relay runs unchanged with SQS as the sink: a Postgres outbox drained into SQS,
/// each message once, with its source id (SQS has no dedupe, so none is asked for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_into_sqs() {
    let ns = crate::common::namespace().await;
    ns.stream_with_groups("outbox", StreamConfig::default(), &["relay"])
        .await;
    let (sink, _server) = fresh().await;
    setup(&sink, StreamConfig::default()).await;
    let ids: Vec<String> = ns
        .publish_batch("outbox", &(0..10).map(msg).collect::<Vec<_>>())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    let outbox = ns.consumer("outbox", "relay", "relay-1").await.unwrap();
    let token = pgtide::CancellationToken::new();
    let relay = tokio::spawn(pgtide::Relay::new(outbox, sink.clone(), "s").run(token.clone()));
    let c = sink.consumer("s", "g", "c").await.unwrap();
    let mut sources = vec![];
    let deadline = Instant::now() + Duration::from_secs(15);
    while sources.len() < ids.len() {
        assert!(Instant::now() < deadline, "relayed {} of 10", sources.len());
        let batch = c.fetch(10, Duration::from_secs(1)).await.unwrap();
        c.ack_batch(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
        sources.extend(
            batch
                .iter()
                .filter_map(|d| d.headers.get(pgtide::SOURCE_ID_HEADER).cloned()),
        );
    }
    token.cancel();
    let report = relay.await.unwrap().unwrap();
    assert_eq!(report.relayed, 10);
    sources.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(sources, want);
}
