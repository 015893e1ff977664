//! TLS and passwords against a cluster that accepts only `hostssl … scram-sha-256`
//! (`pgtide_testing::TlsCluster`): every `sslmode`, certificate checks that fail with one clear
//! error, the password file, and the whole publish → worker → ack path over TLS.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pgtide::{
    CancellationToken, ConnectProblem, Delivery, Error, Outcome, PgBackend, StreamConfig, Worker,
};
use pgtide_testing::TlsCluster;

use crate::common::{eventually, json, unique, WAIT};

async fn connect(url: &str) -> pgtide::Result<PgBackend> {
    PgBackend::connect(url).await
}

/// The problem of a refused connection; its texts never show `secret`.
fn problem(result: pgtide::Result<PgBackend>, secret: &str) -> (ConnectProblem, String) {
    let e = match result {
        Ok(_) => panic!("connected"),
        Err(e) => e,
    };
    let (shown, debug) = (e.to_string(), format!("{e:?}"));
    assert!(!shown.contains(secret), "password in Display: {shown}");
    assert!(!debug.contains(secret), "password in Debug: {debug}");
    assert!(!e.is_retryable(), "{shown}");
    println!("{shown}");
    match e {
        Error::Connect { problem, .. } => (problem, shown),
        other => panic!("not a connect error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_certificates_and_passwords_follow_libpq() {
    let server = tokio::task::spawn_blocking(TlsCluster::start)
        .await
        .unwrap();
    let pw = server.password.clone();
    let ca = server.ca.display().to_string();
    let other_ca = server.other_ca.display().to_string();

    // Encrypted without checks, encrypted by default (prefer), and fully checked by IP and name.
    for params in [
        "sslmode=require".to_owned(),
        String::new(),
        format!("sslmode=verify-full&sslrootcert={ca}"),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
    ] {
        for host in ["127.0.0.1", "localhost"] {
            let url = server.url(host, &params);
            let pg = connect(&url)
                .await
                .unwrap_or_else(|e| panic!("{params} {host}: {e}"));
            assert!(!pg.url().contains(&pw), "{}", pg.url());
            assert!(!format!("{pg:?}").contains(&pw));
            let builder = format!("{:?}", PgBackend::builder(&url));
            assert!(!builder.contains(&pw), "{builder}");
        }
    }

    // A certificate from another CA: refused whether asked for (verify-*) or implied by a root
    // certificate with `require`, as libpq does.
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = server.url(
            "127.0.0.1",
            &format!("sslmode={mode}&sslrootcert={other_ca}"),
        );
        let (p, text) = problem(connect(&url).await, &pw);
        assert_eq!(p, ConnectProblem::CertificateUntrusted, "{mode}: {text}");
        assert!(text.contains("sslrootcert"), "{text}");
    }
    // verify-full without a root certificate trusts the system's roots, which did not sign it.
    let url = server.url("127.0.0.1", "sslmode=verify-full");
    let (p, _) = problem(connect(&url).await, &pw);
    assert_eq!(p, ConnectProblem::CertificateUntrusted);

    // The right CA but another name: `hostaddr` reaches the server while the certificate is
    // checked against `host`.
    let url = format!(
        "postgres://app:{pw}@db.invalid:{}/app?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}",
        server.cluster.port
    );
    let (p, text) = problem(connect(&url).await, &pw);
    assert_eq!(p, ConnectProblem::HostNameMismatch, "{text}");
    assert!(text.contains("verify-ca"), "{text}");
    // verify-ca does not check the name.
    connect(&url.replace("verify-full", "verify-ca"))
        .await
        .unwrap();

    // Plaintext: the server refuses it, and pgtide says what to change.
    let url = server.url("127.0.0.1", "sslmode=disable");
    let (p, text) = problem(connect(&url).await, &pw);
    assert_eq!(p, ConnectProblem::TlsRequired, "{text}");
    assert!(text.contains("sslmode=require"), "{text}");

    // A wrong password; no password at all.
    let wrong = format!("Wrong{pw}");
    let url = server
        .url("127.0.0.1", "sslmode=require")
        .replace(&pw, &wrong);
    let (p, _) = problem(connect(&url).await, &wrong);
    assert_eq!(p, ConnectProblem::PasswordRejected);
    let url = server.url_without_password("127.0.0.1", "sslmode=require");
    let (p, _) = problem(connect(&url).await, &pw);
    assert_eq!(p, ConnectProblem::PasswordMissing);

    // The password file: used when private, ignored (as libpq does) when others can read it.
    // Each test runs in a process of its own under nextest; no other test reads PGPASSFILE.
    let file = server.pki.path("pgpass");
    std::fs::write(
        &file,
        format!("# test\n127.0.0.1:{}:app:app:{pw}\n", server.cluster.port),
    )
    .unwrap();
    set_mode(&file, 0o600);
    std::env::set_var("PGPASSFILE", &file);
    let pg = connect(&url).await.unwrap();
    pg.migrate().await.unwrap();
    set_mode(&file, 0o644);
    let (p, _) = problem(connect(&url).await, &pw);
    assert_eq!(p, ConnectProblem::PasswordMissing);
    std::env::remove_var("PGPASSFILE");
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_worker_and_ack_run_over_verified_tls() {
    let server = tokio::task::spawn_blocking(TlsCluster::start)
        .await
        .unwrap();
    let url = server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", server.ca.display()),
    );
    let pg = PgBackend::builder(&url)
        .namespace(unique("tls"))
        .build()
        .unwrap();
    pg.migrate().await.unwrap();
    pg.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    pg.create_group("s", "g", pgtide::GroupStart::New)
        .await
        .unwrap();

    let acked = Arc::new(AtomicUsize::new(0));
    let worker = Worker::new(pg.consumer("s", "g", "w").await.unwrap(), {
        let acked = acked.clone();
        move |_d: Delivery| {
            let acked = acked.clone();
            async move {
                acked.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(Outcome::Ack)
            }
        }
    });
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    // The wake-ups arrive over the listener's own TLS connection.
    let mut listener = pg.watch_listener();
    tokio::time::timeout(WAIT, listener.wait_for(|s| s.connected))
        .await
        .expect("listener connected over TLS")
        .unwrap();
    let n = 50;
    for i in 0..n {
        pg.publish("s", json(serde_json::json!(i))).await.unwrap();
    }
    eventually(WAIT, "all acked", || acked.load(Ordering::SeqCst) >= n).await;
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, n as u64);
    let stats = pg.stats("s", "g").await.unwrap();
    assert_eq!(stats.ready + stats.in_flight, 0, "{stats:?}");
    pg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_on_a_server_without_tls_says_so_and_prefer_falls_back() {
    let cluster = tokio::task::spawn_blocking(|| pgtide_testing::Cluster::start(&["ssl = off"]))
        .await
        .unwrap();
    let url = format!("{}?sslmode=require", cluster.url());
    let (p, text) = problem(connect(&url).await, "\u{0}");
    assert_eq!(p, ConnectProblem::TlsUnsupported, "{text}");
    let pg = connect(&url.replace("require", "prefer")).await.unwrap();
    pg.migrate().await.unwrap();
}
