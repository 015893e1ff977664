//! OpenTelemetry (feature `otel`): a publish inside a traced span writes `traceparent`, and the
//! worker's `pgtide.handle` span continues that trace, with the publisher's span as its parent,
//! on every backend, through the relay, and from a publisher in another process (this test
//! binary started again, as the fault tests do). Spans go to an in-memory exporter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use pgtide::{
    CancellationToken, Delivery, GroupStart, Outcome, OutgoingMessage, Queue, Relay, StreamConfig,
    Worker,
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(15);

/// A subscriber with the OpenTelemetry layer for this thread (the tests run on a current-thread
/// runtime, so every task of the test sees it), exporting to memory.
struct Traces {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

fn traces() -> Traces {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("pgtide-test")));
    Traces {
        exporter,
        _provider: provider,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

impl Traces {
    fn finished(&self, name: &str) -> Vec<SpanData> {
        self.exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }
}

/// Publishes one message inside a span `publisher`; returns its trace and span ids.
async fn publish_traced<Q: Queue>(q: &Q, stream: &str) -> (TraceId, SpanId) {
    let span = tracing::info_span!("publisher");
    let sc = span.context().span().span_context().clone();
    assert!(sc.is_valid(), "the OpenTelemetry layer is installed");
    q.publish(stream, OutgoingMessage::json(&1).unwrap())
        .instrument(span)
        .await
        .unwrap();
    (sc.trace_id(), sc.span_id())
}

/// Runs a worker on `q`'s `stream` until it handled one delivery; returns that delivery.
async fn handle_one<Q: Queue>(q: &Q, stream: &str) -> Delivery {
    let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let c = q.consumer(stream, "g", "w").await.unwrap();
    let worker = Worker::new(c, {
        let got = got.clone();
        move |d: Delivery| {
            got.lock().unwrap().push(d);
            async { Ok::<_, String>(Outcome::Ack) }
        }
    });
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    crate::common::eventually(WAIT, "the handler to run", || {
        !got.lock().unwrap().is_empty()
    })
    .await;
    token.cancel();
    run.await.unwrap().unwrap();
    let d = got.lock().unwrap().remove(0);
    d
}

async fn one_trace<Q: Queue>(q: Q) {
    let t = traces();
    q.ensure_stream("traced", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("traced", "g", GroupStart::New)
        .await
        .unwrap();
    let (trace_id, span_id) = publish_traced(&q, "traced").await;
    let d = handle_one(&q, "traced").await;
    let tp = &d.headers[pgtide::TRACEPARENT_HEADER];
    assert!(tp.contains(&trace_id.to_string()), "{tp}");
    let handle = t.finished("pgtide.handle");
    assert_eq!(handle.len(), 1);
    assert_eq!(handle[0].span_context.trace_id(), trace_id);
    assert_eq!(handle[0].parent_span_id, span_id);
    assert_eq!(t.finished("publisher").len(), 1);
    q.delete_stream("traced").await.unwrap();
}

#[tokio::test]
async fn one_trace_memory() {
    one_trace(pgtide::MemoryBackend::new()).await;
}

#[tokio::test]
async fn one_trace_postgres() {
    let ns = crate::common::namespace().await;
    one_trace(ns.pg.clone()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn one_trace_redis() {
    let (q, _cleanup) = crate::conformance::redis::fresh().await;
    one_trace(q).await;
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn one_trace_nats() {
    let (q, _cleanup) = crate::conformance::nats::fresh().await;
    one_trace(q).await;
}

#[cfg(feature = "amqp")]
#[tokio::test]
async fn one_trace_amqp() {
    let (q, _cleanup) = crate::conformance::amqp::fresh().await;
    one_trace(q).await;
}

/// Through the relay (memory outbox to Postgres): the copy keeps the publisher's context, even
/// though the relay publishes it from a span of its own.
#[tokio::test]
async fn one_trace_through_the_relay() {
    let t = traces();
    let ns = crate::common::namespace().await;
    let source = pgtide::MemoryBackend::new();
    source
        .ensure_stream("outbox", &StreamConfig::default())
        .await
        .unwrap();
    source
        .ensure_group("outbox", "relay", GroupStart::New)
        .await
        .unwrap();
    let sink = ns.pg.clone();
    sink.ensure_stream("traced", &StreamConfig::default())
        .await
        .unwrap();
    sink.ensure_group("traced", "g", GroupStart::New)
        .await
        .unwrap();
    let (trace_id, span_id) = publish_traced(&source, "outbox").await;
    let token = CancellationToken::new();
    let relay = tokio::spawn(
        Relay::new(
            source.consumer("outbox", "relay", "r").await.unwrap(),
            sink.clone(),
            "traced",
        )
        .run(token.clone())
        .instrument(tracing::info_span!("relay")),
    );
    let d = handle_one(&sink, "traced").await;
    token.cancel();
    relay.await.unwrap().unwrap();
    assert!(d.headers.contains_key(pgtide::SOURCE_ID_HEADER));
    let handle = t.finished("pgtide.handle");
    assert_eq!(handle.len(), 1);
    assert_eq!(handle[0].span_context.trace_id(), trace_id);
    assert_eq!(handle[0].parent_span_id, span_id);
}

/// Across processes: a publisher process (this binary again, [`publisher_child`]) publishes
/// inside a span of its own tracer, and reports that span's ids on stdout; this process's worker
/// handles the message, and its `pgtide.handle` span is in the publisher's trace, as a child of
/// the publisher's span. Nothing but the message's headers links the two processes.
async fn one_trace_across_processes<Q: Queue>(q: Q, url: &str, namespace: &str) {
    let t = traces();
    q.ensure_stream("traced", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("traced", "g", GroupStart::New)
        .await
        .unwrap();
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "otel::publisher_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("PGTIDE_OTEL_URL", url)
        .env("PGTIDE_OTEL_NAMESPACE", namespace)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let out = tokio::time::timeout(WAIT * 4, child.wait_with_output())
        .await
        .expect("the publisher process finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "publisher process: {stdout}");
    let (trace_id, span_id, child_pid) = stdout
        .lines()
        .find_map(|l| {
            // libtest may print its own words before it on the line.
            let mut w = l.split_once("PUBLISHED ")?.1.split(' ');
            let trace = TraceId::from_hex(w.next()?).ok()?;
            let span = SpanId::from_hex(w.next()?).ok()?;
            Some((trace, span, w.next()?.parse::<u32>().ok()?))
        })
        .unwrap_or_else(|| panic!("no PUBLISHED line from the publisher process: {stdout}"));
    assert_eq!(child_pid, pid, "published by the other process");
    assert_ne!(child_pid, std::process::id());
    assert!(
        t.exporter.get_finished_spans().unwrap().is_empty(),
        "this process has traced nothing yet"
    );

    let d = handle_one(&q, "traced").await;
    assert!(d.headers[pgtide::TRACEPARENT_HEADER].contains(&trace_id.to_string()));
    let handle = t.finished("pgtide.handle");
    assert_eq!(handle.len(), 1);
    assert_eq!(handle[0].span_context.trace_id(), trace_id);
    assert_eq!(handle[0].parent_span_id, span_id);
    assert!(
        handle[0].parent_span_is_remote,
        "the parent came from the headers"
    );
    q.delete_stream("traced").await.unwrap();
}

#[tokio::test]
async fn one_trace_across_processes_postgres() {
    let ns = crate::common::namespace().await;
    let namespace = ns.namespace().to_owned();
    one_trace_across_processes(ns.pg.clone(), &ns.url, &namespace).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn one_trace_across_processes_redis() {
    let (q, cleanup) = crate::conformance::redis::fresh().await;
    let namespace = cleanup.0.clone();
    one_trace_across_processes(q, &crate::conformance::redis::url(), &namespace).await;
}

/// Entry point of the publisher process of [`one_trace_across_processes`] (does nothing when run
/// as an ordinary test): one publish to `traced` inside a span `publisher` of its own tracer,
/// then `PUBLISHED <trace id> <span id> <pid>` on stdout.
#[test]
#[ignore = "started by the cross-process trace tests as a child process"]
fn publisher_child() {
    let (Ok(url), Ok(namespace)) = (
        std::env::var("PGTIDE_OTEL_URL"),
        std::env::var("PGTIDE_OTEL_NAMESPACE"),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let t = traces();
        let q = if url.starts_with("postgres") {
            pgtide::AnyBackend::Postgres(
                pgtide::PgBackend::builder(url)
                    .namespace(namespace)
                    .pool_size(1)
                    .build()
                    .unwrap(),
            )
        } else {
            pgtide::AnyBackend::connect(&url, &namespace).await.unwrap()
        };
        let (trace_id, span_id) = publish_traced(&q, "traced").await;
        q.close().await.unwrap();
        // The span really was recorded by this process's tracer.
        assert_eq!(t.finished("publisher").len(), 1);
        println!("PUBLISHED {trace_id} {span_id} {}", std::process::id());
    });
}
