//! Conformance for the Redis backend against the local server (`REDIS_URL`, default `redis://127.0.0.1:6379`).

async fn fresh() -> (pgtide::RedisBackend, ()) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let ns = crate::common::unique("t");
    (pgtide::RedisBackend::connect(&url, &ns).await.unwrap(), ())
}

conformance!(suite, crate::conformance::redis::fresh);
