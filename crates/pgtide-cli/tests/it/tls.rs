//! The CLI over TLS with a password, configured the libpq way: `PGSSLMODE`/`PGSSLROOTCERT`,
//! and `PGHOST`/`PGPORT`/`PGUSER`/`PGDATABASE` plus a password file instead of a URL, against a
//! cluster that accepts only `hostssl … scram-sha-256` (`pgtide_testing::TlsCluster`).

use pgtide_testing::TlsCluster;

use super::{run_with, Run};
use crate::common::unique;

/// `pgtide args...` with only the libpq variables (no DATABASE_URL) and `extra`.
async fn libpq(server: &TlsCluster, ns: &str, extra: &[(&str, &str)], args: &[&str]) -> Run {
    let mut c = super::bare_command(ns);
    c.args(args)
        .env("PGHOST", "localhost")
        .env("PGPORT", server.cluster.port.to_string())
        .env("PGUSER", "app")
        .env("PGDATABASE", "app")
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &server.ca)
        .env("PGPASSFILE", server.pki.path("pgpass"))
        .env_remove("PGPASSWORD");
    for (k, v) in extra {
        c.env(k, v);
    }
    run_with(c, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_migrates_publishes_and_consumes_over_verified_tls_from_the_libpq_environment() {
    let server = tokio::task::spawn_blocking(TlsCluster::start)
        .await
        .unwrap();
    let pgpass = server.pki.path("pgpass");
    std::fs::write(
        &pgpass,
        format!("localhost:*:app:app:{}\n", server.password),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let ns = unique("tls");
    let pg = |args: &'static [&'static str]| {
        let (server, ns) = (&server, ns.clone());
        async move { libpq(server, &ns, &[], args).await }
    };
    pg(&["migrate"]).await.ok();
    pg(&["stream", "create", "orders"]).await.ok();
    pg(&["group", "create", "orders", "billing", "--from", "oldest"])
        .await
        .ok();
    for i in 0..3 {
        let data = format!("{{\"n\":{i}}}");
        let r = libpq(&server, &ns, &[], &["publish", "orders", "--data", &data]).await;
        r.ok();
    }
    let consumed = pg(&[
        "consume", "orders", "-g", "billing", "-n", "3", "--wait", "10s",
    ])
    .await
    .ok();
    assert_eq!(consumed.lines().len(), 3, "{consumed:?}");

    // The same over a URL whose password is given, with PGSSLMODE=disable: the server refuses
    // plaintext, and the CLI says what to change without showing the password.
    let url = server.url("127.0.0.1", "");
    let refused = libpq(
        &server,
        &ns,
        &[("DATABASE_URL", &url), ("PGSSLMODE", "disable")],
        &["stats", "orders"],
    )
    .await;
    println!("{}", refused.stderr);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(refused.stderr.contains("sslmode=require"), "{refused:?}");
    assert!(!refused.stderr.contains(&server.password), "{refused:?}");
    assert!(!refused.stdout.contains(&server.password), "{refused:?}");

    // A root certificate from another CA: one clear line.
    let other = server.other_ca.display().to_string();
    let untrusted = libpq(
        &server,
        &ns,
        &[("PGSSLROOTCERT", &other)],
        &["stats", "orders"],
    )
    .await;
    println!("{}", untrusted.stderr);
    assert_ne!(untrusted.code, 0, "{untrusted:?}");
    assert!(
        untrusted.stderr.contains("not signed by a trusted CA"),
        "{untrusted:?}"
    );
}
