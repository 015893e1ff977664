//! Conformance for the Nats backend against the local server (`NATS_URL`, default `nats://127.0.0.1:4222`).

async fn fresh() -> (pgtide::NatsBackend, ()) {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let ns = crate::common::unique("t");
    (pgtide::NatsBackend::connect(&url, &ns).await.unwrap(), ())
}

conformance!(suite, crate::conformance::nats::fresh);
