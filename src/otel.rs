//! W3C trace context across the queue (cargo feature `otel`): a publish writes the current
//! tracing span's OpenTelemetry context into the message's `traceparent` and `tracestate`
//! headers, and the worker makes that context the parent of its `pgtide.handle` span, so one
//! trace runs from the publisher's span to the handler's on every backend. The relay copies
//! headers, so the trace also crosses a relay.
//!
//! The context comes from `tracing-opentelemetry` (the application installs its layer); the
//! encoding is `opentelemetry_sdk`'s `TraceContextPropagator`. A message that already carries a
//! `traceparent` (set by the caller, or copied by the relay) keeps it. Without an OpenTelemetry
//! layer the current span has no valid context and nothing is written. Without the feature these
//! functions do nothing.

use std::borrow::Cow;

use crate::queue::{Headers, OutgoingMessage, TRACEPARENT_HEADER};

/// The messages with the current span's trace context in their headers, borrowed unchanged when
/// there is nothing to add.
pub(crate) fn traced(msgs: &[OutgoingMessage]) -> Cow<'_, [OutgoingMessage]> {
    match current_context() {
        Some(ctx)
            if msgs
                .iter()
                .any(|m| !m.headers.contains_key(TRACEPARENT_HEADER)) =>
        {
            Cow::Owned(msgs.iter().cloned().map(|m| with(m, &ctx)).collect())
        }
        _ => Cow::Borrowed(msgs),
    }
}

/// One message with the current span's trace context (see [`traced`]).
#[cfg(any(
    feature = "nats",
    feature = "redis",
    feature = "amqp",
    feature = "sqs",
    feature = "kafka"
))]
pub(crate) fn traced_one(msg: OutgoingMessage) -> OutgoingMessage {
    match current_context() {
        Some(ctx) => with(msg, &ctx),
        None => msg,
    }
}

fn with(mut m: OutgoingMessage, ctx: &Headers) -> OutgoingMessage {
    if !m.headers.contains_key(TRACEPARENT_HEADER) {
        for (k, v) in ctx {
            m.headers.insert(k.clone(), v.clone());
        }
    }
    m
}

/// The current span's context as `traceparent` (and `tracestate`) headers, if it has a valid one.
#[cfg(feature = "otel")]
fn current_context() -> Option<Headers> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = Headers::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&cx, &mut Carrier(&mut headers));
    headers.contains_key(TRACEPARENT_HEADER).then_some(headers)
}

#[cfg(not(feature = "otel"))]
fn current_context() -> Option<Headers> {
    None
}

/// Makes the trace context in `headers` (if any, and valid) the parent of `span`, which must not
/// have been entered yet.
#[cfg(feature = "otel")]
pub(crate) fn set_parent(span: &tracing::Span, headers: &Headers) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if !headers.contains_key(TRACEPARENT_HEADER) {
        return;
    }
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Read(headers));
    if cx.span().span_context().is_valid() {
        // Fails only when the span is disabled or has no OpenTelemetry layer: nothing to link.
        let _ = span.set_parent(cx);
    }
}

#[cfg(not(feature = "otel"))]
pub(crate) fn set_parent(_span: &tracing::Span, _headers: &Headers) {}

/// Headers as a propagator's carrier (opentelemetry implements it for `HashMap` only).
#[cfg(feature = "otel")]
struct Carrier<'a>(&'a mut Headers);

#[cfg(feature = "otel")]
impl opentelemetry::propagation::Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Headers read by a propagator.
#[cfg(feature = "otel")]
struct Read<'a>(&'a Headers);

#[cfg(feature = "otel")]
impl opentelemetry::propagation::Extractor for Read<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}
