//! TLS to the brokers: servers of the test's own that speak TLS only, with a certificate signed
//! by a CA the test made. The full path (publish → fetch → ack) runs over `tls://` / `rediss://`
//! with that CA given by the `tls_ca` URL parameter, and a client trusting another CA (or only
//! the system roots) fails with one non-retryable error that names the certificate.

use std::collections::HashSet;
use std::time::Duration;

use pgtide::{AnyBackend, Error, GroupStart, OutgoingMessage, Queue, QueueConsumer, StreamConfig};

use crate::common::unique;
use pgtide_testing::{Pki, Server};

/// Publishes `n` messages, fetches and acks them all, and checks every id came back once.
async fn round_trip(backend: &AnyBackend, n: usize) {
    backend
        .ensure_stream("orders", &StreamConfig::default())
        .await
        .unwrap();
    backend
        .ensure_group("orders", "billing", GroupStart::New)
        .await
        .unwrap();
    let mut published = HashSet::new();
    for i in 0..n {
        let receipt = backend
            .publish(
                "orders",
                OutgoingMessage::json(&serde_json::json!({ "i": i })).unwrap(),
            )
            .await
            .unwrap();
        published.insert(receipt.id);
    }
    let consumer = backend.consumer("orders", "billing", "c1").await.unwrap();
    let mut acked = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} came back",
            acked.len()
        );
        for d in consumer.fetch(n, Duration::from_secs(1)).await.unwrap() {
            consumer.ack(&d).await.unwrap();
            assert!(acked.insert(d.id()), "{} delivered twice", d.id());
        }
    }
    assert_eq!(acked, published);
    assert!(consumer.try_fetch(10).await.unwrap().is_empty());
}

/// The error of a client that refused the server's certificate.
fn assert_refused(result: pgtide::Result<AnyBackend>, backend: &str) {
    let e = match result {
        Ok(_) => panic!("{backend}: a certificate from an unknown CA was accepted"),
        Err(e) => e,
    };
    assert!(
        matches!(&e, Error::Broker { backend: b, retryable: false, .. } if *b == backend),
        "{backend}: {e:?}"
    );
    assert!(!e.is_retryable());
    let text = e.to_string();
    assert!(text.contains("TLS handshake failed"), "{text}");
    assert!(text.contains("certificate"), "{text}");
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_a_private_ca() {
    let pki = Pki::new();
    let certs = pki.localhost();
    let server = Server::nats_tls(&certs);
    let ca = certs.ca.display().to_string();

    let url = format!("tls://127.0.0.1:{}?tls_ca={ca}", server.port);
    let nats = AnyBackend::connect(&url, &unique("tls")).await.unwrap();
    assert_eq!(nats.kind(), "nats");
    round_trip(&nats, 50).await;

    // The other spelling, with the CA given by the options instead of the URL.
    let options = pgtide::NatsOptions::default().tls_ca(certs.ca.clone());
    let url = format!("nats+tls://127.0.0.1:{}", server.port);
    let nats = pgtide::NatsBackend::connect_with(&url, &unique("tls"), options)
        .await
        .unwrap();
    round_trip(&AnyBackend::Nats(nats), 5).await;

    // Another CA, and the system roots alone: refused, with one clear error.
    let other = Pki::new();
    let url = format!(
        "tls://127.0.0.1:{}?tls_ca={}",
        server.port,
        other.ca("other-ca").display()
    );
    assert_refused(AnyBackend::connect(&url, "tls").await, "nats");
    let url = format!("tls://127.0.0.1:{}", server.port);
    assert_refused(AnyBackend::connect(&url, "tls").await, "nats");

    // A CA path that does not exist is a configuration error, found before connecting.
    let url = format!("tls://127.0.0.1:{}?tls_ca=/nonexistent/ca.pem", server.port);
    let e = AnyBackend::connect(&url, "tls").await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e:?}");
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_private_ca() {
    let pki = Pki::new();
    let certs = pki.localhost();
    let server = Server::redis_tls(&certs);

    let url = format!(
        "rediss://127.0.0.1:{}/0?tls_ca={}",
        server.port,
        certs.ca.display()
    );
    let redis = AnyBackend::connect(&url, &unique("tls")).await.unwrap();
    assert_eq!(redis.kind(), "redis");
    round_trip(&redis, 50).await;

    let other = Pki::new();
    let url = format!(
        "rediss://127.0.0.1:{}/0?tls_ca={}",
        server.port,
        other.ca("other-ca").display()
    );
    assert_refused(AnyBackend::connect(&url, "tls").await, "redis");
}
