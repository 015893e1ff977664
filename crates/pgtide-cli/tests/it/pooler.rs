//! The CLI through PgBouncer in transaction mode (the same pooler the library's tests start, in
//! front of the test database): the URL parameter `pgtide_statements=unnamed` makes `publish`
//! and `consume` (poll-only) work there; without it the pooler refuses the connection. With
//! `--listen-url` set to the direct URL, `migrate` runs through it and consumers are woken by
//! NOTIFY again.

use std::time::{Duration, Instant};

use pgtide_testing::Server;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

use crate::common::TestNs;
use crate::{command, fresh_namespace, pgtide, run_with, terminate};

/// A PgBouncer in front of the test database, its URL in unnamed mode, and the database name.
fn bouncer(ns: &TestNs) -> (Server, String, String) {
    let config: tokio_postgres::Config = ns.url.parse().unwrap();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("postgres").to_owned();
    let bouncer = Server::pgbouncer(port, &[]);
    let pooled = format!("{}?pgtide_statements=unnamed", bouncer.url(&db));
    (bouncer, pooled, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publishes_and_consumes_through_pgbouncer() {
    let ns = fresh_namespace().await;
    // Migrations need a session: they run on the direct URL.
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "s"]).await.ok();
    pgtide(&ns, &["group", "create", "s", "g"]).await.ok();
    let (bouncer, pooled, db) = bouncer(&ns);
    let through = |args: &[&str], url: &str| {
        let mut c = command(&ns, args);
        c.env("DATABASE_URL", url);
        c
    };

    let mut ids = vec![];
    for i in 0..3 {
        let data = format!(r#"{{"n":{i}}}"#);
        let out = run_with(through(&["publish", "s", "--data", &data], &pooled), None)
            .await
            .ok();
        ids.push(out.stdout.trim().to_owned());
    }
    let consumed = run_with(
        through(
            &["consume", "s", "-g", "g", "-n", "3", "--wait", "20s"],
            &pooled,
        ),
        None,
    )
    .await
    .ok();
    assert_eq!(consumed.lines().len(), 3, "{consumed:?}");
    for id in &ids {
        assert!(
            consumed.stdout.contains(id.as_str()),
            "{id} not consumed: {consumed:?}"
        );
    }

    // Prepared mode sends startup options, which PgBouncer 1.18 refuses.
    let refused = run_with(
        through(&["publish", "s", "--data", "{}"], &bouncer.url(&db)),
        None,
    )
    .await;
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("unsupported startup parameter"),
        "{refused:?}"
    );
}

/// The next line `consume` prints, within a minute.
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("no delivery within 60 s")
        .unwrap()
        .expect("consume ended")
}

/// With `--listen-url` (here `PGTIDE_LISTEN_URL`) direct: `migrate` works given only the pooler
/// URL, and a following consumer is woken by NOTIFY. Notifications being on, the fallback poll is
/// 30 s: every message arriving within seconds of its publish can only be the wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_listen_url_migrates_and_wakes_consumers_through_pgbouncer() {
    let ns = fresh_namespace().await;
    let (_bouncer, pooled, _) = bouncer(&ns);
    let through = |args: &[&str]| {
        let mut c = command(&ns, args);
        c.env("DATABASE_URL", &pooled)
            .env("PGTIDE_LISTEN_URL", &ns.url);
        c
    };

    // Without --listen-url, migrate through the pooler fails (it needs a session): the flag is
    // what makes the next run work.
    let mut alone = command(&ns, &["migrate"]);
    alone.env("DATABASE_URL", &pooled);
    let refused = run_with(alone, None).await;
    assert_ne!(refused.code, 0, "{refused:?}");
    let migrated = run_with(through(&["migrate"]), None).await.ok();
    assert!(ns.pg.is_migrated().await.unwrap(), "{migrated:?}");
    run_with(through(&["stream", "create", "s"]), None)
        .await
        .ok();
    run_with(through(&["group", "create", "s", "g"]), None)
        .await
        .ok();

    let mut consumer = through(&["consume", "s", "-g", "g", "--follow"])
        .spawn()
        .expect("pgtide binary");
    let mut lines = BufReader::new(consumer.stdout.take().unwrap()).lines();
    let publish = |i: usize| {
        let data = format!(r#"{{"n":{i}}}"#);
        let c = through(&["publish", "s", "--data", &data]);
        async move { run_with(c, None).await.ok().stdout.trim().to_owned() }
    };

    // The first one may be published before the consumer listens: its first fetch finds it.
    let id = publish(0).await;
    assert!(next_line(&mut lines).await.contains(&id));
    // The consumer holds a LISTEN session of its own on the database: through --listen-url,
    // since the pooler would refuse one.
    let (client, conn) = tokio_postgres::connect(&ns.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // The listener connects beside the first fetch, which may have found the first message
    // before it listened: wait for its session (no event announces it).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listeners: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = format('LISTEN %I', $1::text)",
                &[&format!("pgtide.{}", ns.namespace())],
            )
            .await
            .unwrap()
            .get(0);
        if listeners == 1 {
            break;
        }
        assert!(
            listeners == 0 && Instant::now() < deadline,
            "{listeners} LISTEN sessions: the consumer does not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 1..=3 {
        let sent = Instant::now();
        let id = publish(i).await;
        let line = next_line(&mut lines).await;
        let latency = sent.elapsed();
        assert!(line.contains(&id), "{id} expected, got {line}");
        assert!(
            latency < Duration::from_secs(10),
            "message {i} took {latency:?}: not woken by NOTIFY (the poll is 30 s)"
        );
    }
    terminate(consumer.id().unwrap()).await;
    let status = tokio::time::timeout(Duration::from_secs(30), consumer.wait())
        .await
        .expect("consume did not stop on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A `--listen-url` that cannot be reached fails `migrate` with a message naming it, its
/// password replaced by `***`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_listen_url_errors_name_it_without_its_password() {
    let ns = fresh_namespace().await;
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let listen = format!("postgres://app:S3cretPw@127.0.0.1:{port}/app");
    let out = pgtide(&ns, &["migrate", "--listen-url", &listen]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(!out.stderr.contains("S3cretPw"), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "--listen-url/PGTIDE_LISTEN_URL (postgres://app:***@127.0.0.1:{port}/app)"
        )),
        "{out:?}"
    );
}
