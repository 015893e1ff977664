//! Conformance for the Amqp backend against the local server (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).

async fn fresh() -> (pgtide::AmqpBackend, ()) {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let ns = crate::common::unique("t");
    (pgtide::AmqpBackend::connect(&url, &ns).await.unwrap(), ())
}

conformance!(suite, crate::conformance::amqp::fresh);
