//! The metric names the README documents (cargo feature `metrics`): recorded by the library (a
//! worker in this process, with a Prometheus recorder) and served by the CLI without counting
//! an event twice.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pgtide::{CancellationToken, Outcome, StreamConfig, Worker};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{command, terminate};
use crate::common::{json, namespace, unique, WAIT};

/// The process-wide recorder (one per process; tests tell their series apart by stream name).
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("no other metrics recorder in the tests");
        handle
    })
}

/// The value of the series `name` whose labels include every one of `labels`.
fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_metrics_worker_records_library_metrics() {
    let handle = recorder();
    let ns = namespace().await;
    // Unique, because the labels do not carry the namespace.
    let stream = unique("m");
    let config = StreamConfig::default()
        .max_deliver(3)
        .backoff(pgtide::Backoff::schedule([Duration::from_millis(10)]));
    ns.stream_with_groups(&stream, config, &["g"]).await;
    for kind in ["ok", "flaky", "poison"] {
        ns.publish(&stream, json(serde_json::json!({ "kind": kind })))
            .await
            .unwrap();
    }

    let (calls_tx, mut calls) = tokio::sync::mpsc::unbounded_channel();
    let consumer = ns.consumer(&stream, "g", "w1").await.unwrap();
    let worker = Worker::new(consumer, move |d: pgtide::Delivery| {
        let calls = calls_tx.clone();
        async move {
            let kind = d.json::<serde_json::Value>().unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned();
            let outcome = match (kind.as_str(), d.attempt) {
                ("flaky", 1) => Err("boom".to_owned()),
                ("poison", _) => Ok(Outcome::DeadLetter {
                    reason: "poison".into(),
                }),
                _ => Ok(Outcome::Ack),
            };
            let _ = calls.send(());
            outcome
        }
    });
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    // ok, flaky twice, poison
    for _ in 0..4 {
        tokio::time::timeout(WAIT, calls.recv())
            .await
            .expect("the handler runs")
            .unwrap();
    }
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (2, 1, 1)
    );

    let body = handle.render();
    let group = [("stream", stream.as_str()), ("group", "g")];
    let of = |name: &str| value(&body, name, &group);
    assert_eq!(
        value(&body, "pgtide_published_total", &[("stream", &stream)]),
        Some(3.0),
        "{body}"
    );
    assert_eq!(of("pgtide_delivered_total"), Some(4.0), "{body}");
    assert_eq!(of("pgtide_redeliveries_total"), Some(1.0), "{body}");
    assert_eq!(of("pgtide_acked_total"), Some(2.0), "{body}");
    assert_eq!(of("pgtide_nacked_total"), Some(1.0), "{body}");
    assert_eq!(of("pgtide_dead_lettered_total"), Some(1.0), "{body}");
    assert!(
        of("pgtide_fetch_duration_seconds_count").unwrap_or(0.0) >= 1.0,
        "{body}"
    );
    for (outcome, n) in [("ack", 2.0), ("error", 1.0), ("dead_letter", 1.0)] {
        let labels = [
            ("stream", stream.as_str()),
            ("group", "g"),
            ("outcome", outcome),
        ];
        assert_eq!(
            value(&body, "pgtide_handler_duration_seconds_count", &labels),
            Some(n),
            "{outcome}: {body}"
        );
    }
}

/// `consume --metrics-listen` serves the library's delivery count and its own acks, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_metrics_consume_counts_each_delivery_once() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let msgs: Vec<_> = (0..25)
        .map(|i| json(serde_json::json!({ "i": i })))
        .collect();
    ns.publish_batch("s", &msgs).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut consumer = command(
        &ns,
        &[
            "consume",
            "s",
            "-g",
            "g",
            "--follow",
            "--batch",
            "10",
            "--metrics-listen",
            &addr,
        ],
    )
    .spawn()
    .unwrap();
    let mut out = BufReader::new(consumer.stdout.take().unwrap()).lines();
    let mut printed = HashSet::new();
    while printed.len() < 25 {
        let line = tokio::time::timeout(WAIT, out.next_line())
            .await
            .expect("the consumer prints")
            .unwrap()
            .expect("the consumer is running");
        printed.insert(line);
    }
    let scrape = || async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let group = [("stream", "s"), ("group", "g")];
    // Acks follow the printing: wait for the last one to be counted.
    let body = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(body) = scrape().await {
                if value(&body, "pgtide_acked_total", &group) == Some(25.0) {
                    return body;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the acks are counted");
    assert_eq!(
        value(&body, "pgtide_delivered_total", &group),
        Some(25.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "pgtide_redeliveries_total", &group).unwrap_or(0.0),
        0.0,
        "{body}"
    );
    assert!(
        body.contains("pgtide_fetch_duration_seconds_bucket{"),
        "histograms with buckets: {body}"
    );
    terminate(consumer.id().unwrap()).await;
    let status = tokio::time::timeout(WAIT, consumer.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiries_are_counted_apart_from_nacks() {
    let handle = recorder();
    let ns = namespace().await;
    let stream = unique("lease");
    ns.stream_with_groups(&stream, StreamConfig::default(), &["g"])
        .await;
    ns.publish_batch(
        &stream,
        &[json(serde_json::json!(1)), json(serde_json::json!(2))],
    )
    .await
    .unwrap();
    let short = ns
        .consumer(&stream, "g", "short")
        .await
        .unwrap()
        .with_lease(Duration::from_millis(200));
    let other = ns.consumer(&stream, "g", "other").await.unwrap();
    let first = short.try_fetch(2).await.unwrap();
    assert_eq!(first.len(), 2);
    // One is nacked (a retry, not an expiry); the other's lease is left to run out.
    short
        .nack(&first[0], Some(Duration::ZERO), None)
        .await
        .unwrap();
    let mut again = other.fetch(2, WAIT).await.unwrap();
    if again.len() < 2 {
        again.extend(other.fetch(1, WAIT).await.unwrap());
    }
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|d| d.attempt == 2));
    let body = handle.render();
    let labels = [("stream", stream.as_str()), ("group", "g")];
    assert_eq!(
        value(&body, "pgtide_lease_expiries_total", &labels),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "pgtide_redeliveries_total", &labels),
        Some(2.0)
    );
}

/// A worker held by a rate limit does not spin: each claim that comes back empty says when the
/// next token comes, and the fetch sleeps until then. Counted with the library's own claim
/// metric (one `pgtide_fetch_duration_seconds` sample per claim, empty ones included): a
/// consumer asking again at once would claim hundreds of times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_worker_claims_about_once_per_token() {
    let handle = recorder();
    let ns = namespace().await;
    let stream = unique("m");
    ns.create_stream(&stream, &StreamConfig::default())
        .await
        .unwrap();
    let limit = pgtide::RateLimit::per_second(4.0).burst(1);
    ns.create_group_with(
        &stream,
        "g",
        &pgtide::GroupConfig::default().rate_limit(limit),
    )
    .await
    .unwrap();
    let total = 12;
    for n in 0..total {
        ns.publish(&stream, json(serde_json::json!({ "n": n })))
            .await
            .unwrap();
    }
    let (calls_tx, mut calls) = tokio::sync::mpsc::unbounded_channel();
    let consumer = ns.consumer(&stream, "g", "w1").await.unwrap();
    let worker = Worker::new(consumer, move |_d: pgtide::Delivery| {
        let calls = calls_tx.clone();
        async move {
            let _ = calls.send(());
            Ok::<_, String>(Outcome::Ack)
        }
    })
    .concurrency(4);
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    for _ in 0..total {
        tokio::time::timeout(WAIT, calls.recv())
            .await
            .expect("the worker handles every message under the limit")
            .unwrap();
    }
    token.cancel();
    run.await.unwrap().unwrap();
    let body = handle.render();
    let labels = [("stream", stream.as_str()), ("group", "g")];
    let claims =
        value(&body, "pgtide_fetch_duration_seconds_count", &labels).expect("claims recorded");
    let delivered = value(&body, "pgtide_delivered_total", &labels).unwrap_or(0.0);
    assert_eq!(delivered, total as f64);
    // About one claim per token (11 after the burst, 4 a second: ~3 s), plus wake-ups from the
    // publishes and the worker's own settles; a spinning fetch would make hundreds.
    assert!(
        claims <= 60.0,
        "{claims} claims for {total} deliveries under {limit}: the fetch spins"
    );
}
