//! The CLI through PgBouncer in transaction mode (the same pooler the library's tests start, in
//! front of the test database): the URL parameter `pgtide_statements=unnamed` makes `publish`
//! and `consume` (poll-only) work there; without it the pooler refuses the connection.

use pgtide_testing::Server;
use crate::{command, fresh_namespace, pgtide, run_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publishes_and_consumes_through_pgbouncer() {
    let ns = fresh_namespace().await;
    // Migrations need a session: they run on the direct URL.
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "s"]).await.ok();
    pgtide(&ns, &["group", "create", "s", "g"]).await.ok();
    let config: tokio_postgres::Config = ns.url.parse().unwrap();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("postgres").to_owned();
    let bouncer = Server::pgbouncer(port, &[]);
    let pooled = format!("{}?pgtide_statements=unnamed", bouncer.url(&db));
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
