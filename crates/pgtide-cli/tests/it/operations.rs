//! Operations: `--print-sql` against `migrate`, a restricted runtime role, `health` with and
//! without a scout, and SIGTERM to a following consumer.

use std::collections::HashSet;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{command, fresh_namespace, pgtide, run_with, terminate, url_as};
use crate::common::{json, namespace, unique, TestNs, WAIT};

/// Everything a namespace consists of, with its name taken out so two namespaces compare.
async fn schema_objects(ns: &TestNs) -> Vec<String> {
    let raw = ns.raw().await;
    let rows = raw
        .query(
            "SELECT 'rel ' || c.relname || ' ' || c.relkind::text FROM pg_class c WHERE c.relnamespace = $1::text::regnamespace
             UNION ALL
             SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              WHERE c.relnamespace = $1::text::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
             UNION ALL
             SELECT 'idx ' || indexdef FROM pg_indexes WHERE schemaname = $1::text
             UNION ALL
             SELECT 'fn ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') definer=' || p.prosecdef
                    || ' ' || md5(replace(pg_get_functiondef(p.oid), $1::text, '<ns>'))
               FROM pg_proc p WHERE p.pronamespace = $1::text::regnamespace
             UNION ALL
             SELECT 'trigger ' || t.tgname || ' ' || pg_get_triggerdef(t.oid) FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid WHERE c.relnamespace = $1::text::regnamespace AND NOT t.tgisinternal
             UNION ALL
             SELECT 'view ' || viewname || ' ' || md5(replace(definition, $1::text, '<ns>')) FROM pg_views WHERE schemaname = $1::text",
            &[&ns.namespace()],
        )
        .await
        .unwrap();
    let name = ns.namespace();
    let mut objects: Vec<String> = rows
        .iter()
        .map(|r| r.get::<_, String>(0).replace(name, "<ns>"))
        .collect();
    objects.sort();
    objects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_print_sql_applied_by_psql_matches_migrate() {
    let by_migrate = fresh_namespace().await;
    pgtide(&by_migrate, &["migrate"]).await.ok();
    let by_psql = fresh_namespace().await;
    let script = pgtide(&by_psql, &["migrate", "--print-sql"])
        .await
        .ok()
        .stdout;
    let psql = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &by_psql.url,
            "-f",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut psql) = psql else {
        eprintln!("psql not found: skipping");
        return;
    };
    let mut stdin = psql.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, script.as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = psql.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (a, b) = (
        schema_objects(&by_migrate).await,
        schema_objects(&by_psql).await,
    );
    assert!(a.len() > 50, "{a:?}");
    let only_a: Vec<_> = a.iter().filter(|x| !b.contains(x)).collect();
    let only_b: Vec<_> = b.iter().filter(|x| !a.contains(x)).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "only in migrate: {only_a:#?}\nonly in --print-sql: {only_b:#?}"
    );
    // The bookkeeping rows make the hand-installed namespace current for the library.
    assert!(by_psql.is_migrated().await.unwrap());
    pgtide(&by_psql, &["migrate"]).await.ok();
}

/// Drops a role created by a test (after its namespace is gone: declare it first).
/// Drops a test role (and what it owns) at the end of a test.
pub(crate) struct RoleGuard {
    pub(crate) url: String,
    pub(crate) role: String,
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        let role = &self.role;
        crate::common::execute_detached(
            &self.url,
            &format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_restricted_role_can_publish_and_consume_but_not_create_tables_or_replay() {
    let url = crate::common::database_url().await;
    let role = unique("role");
    let _role = RoleGuard {
        url: url.clone(),
        role: role.clone(),
    };
    let ns = namespace().await;
    ns.raw()
        .await
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
        .await
        .unwrap();
    pgtide(&ns, &["grant", &role]).await.ok();
    let missing = pgtide(&ns, &["grant", "no_such_role_here"]).await;
    assert_eq!(missing.code, 2, "{missing:?}");

    let as_role = |args: &'static [&'static str]| {
        let mut c = command(&ns, args);
        c.env("DATABASE_URL", url_as(&url, &role));
        run_with(c, None)
    };
    // Streams and groups through SECURITY DEFINER functions, and every hot path through them:
    // the role holds no table privilege.
    as_role(&["stream", "create", "jobs", "--max-deliver", "1"])
        .await
        .ok();
    as_role(&["group", "create", "jobs", "workers"]).await.ok();
    let id = as_role(&[
        "publish",
        "jobs",
        "--data",
        "{\"job\":1}",
        "--dedupe-key",
        "j1",
    ])
    .await
    .ok()
    .stdout;
    as_role(&["publish", "jobs", "--data", "{\"job\":2}", "--delay", "1h"])
        .await
        .ok();
    let got = as_role(&["consume", "jobs", "-g", "workers", "--wait", "5s"])
        .await
        .ok();
    assert!(got.stdout.contains(id.trim()), "{got:?}");
    as_role(&["publish", "jobs", "--data", "{\"job\":3}"])
        .await
        .ok();
    let nacked = as_role(&["consume", "jobs", "-g", "workers", "--nack"])
        .await
        .ok();
    assert!(nacked.stdout.contains("\"job\":3"), "{nacked:?}");
    // Replay, reset and trim are the owner's: the runtime role is told so.
    for args in [
        &["dead", "replay", "jobs", "--all"][..],
        &["group", "reset", "jobs", "workers", "--from", "beginning"],
        &["trim", "jobs", "--max-len", "1"],
    ] {
        let mut c = command(&ns, args);
        c.env("DATABASE_URL", url_as(&url, &role));
        let r = run_with(c, None).await;
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("permission denied") && r.stderr.contains("pgtide grant"),
            "{args:?}: {r:?}"
        );
    }
    pgtide(&ns, &["dead", "replay", "jobs", "--all"]).await.ok();
    as_role(&["consume", "jobs", "-g", "workers"]).await.ok();
    pgtide(
        &ns,
        &["group", "reset", "jobs", "workers", "--from", "beginning"],
    )
    .await
    .ok();
    pgtide(&ns, &["trim", "jobs", "--max-len", "1"]).await.ok();
    // Reset queued job 1 and 3 again; trim kept the newest (job 3) and dropped the delayed one.
    let stats = as_role(&["stats", "--json"]).await.ok().json();
    let g = &stats["groups"][0];
    assert_eq!(
        (&g["ready"], &g["delayed"]),
        (&serde_json::json!(1), &serde_json::json!(0)),
        "{stats}"
    );
    let health = as_role(&["health"]).await;
    assert!(health.stdout.contains("ok    migrations"), "{health:?}");
    // No DDL of its own: neither tables nor an upgrade.
    let (client, conn) = tokio_postgres::connect(&url_as(&url, &role), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let err = client
        .batch_execute(&format!("CREATE TABLE \"{}\".mine (i int)", ns.namespace()))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    assert_eq!(as_role(&["migrate"]).await.code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_health_fails_without_a_scout_and_passes_with_one() {
    let ns = namespace().await;
    let r = pgtide(&ns, &["health"]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stdout.contains("FAIL  scout"), "{r:?}");
    let r = pgtide(&ns, &["health", "--json"]).await;
    assert_eq!(
        (r.code, &r.json()["healthy"]),
        (4, &serde_json::json!(false))
    );

    let mut c = command(&ns, &["scout", "--ttl", "2s"]);
    c.env("PGTIDE_LOG", "info");
    let mut scout = c.spawn().unwrap();
    let mut log = BufReader::new(scout.stderr.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("pgtide scout: leading") {
                return;
            }
        }
        panic!("scout exited before leading");
    })
    .await
    .expect("the scout took the lease");
    let r = pgtide(&ns, &["health"]).await;
    assert_eq!(r.code, 0, "{r:?}");

    // Lag: a ready message older than --max-lag fails the check.
    ns.create_stream("s", &Default::default()).await.unwrap();
    ns.create_group("s", "g", Default::default()).await.unwrap();
    ns.publish("s", json(serde_json::json!({}))).await.unwrap();
    let r = pgtide(&ns, &["health", "--max-lag", "1h"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = pgtide(&ns, &["health", "--max-lag", "1ms"]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stdout.contains("s/g lags"), "{r:?}");

    // SIGTERM: the scout resigns, so health fails again at once.
    terminate(scout.id().unwrap()).await;
    let status = tokio::time::timeout(WAIT, scout.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let r = pgtide(&ns, &["health"]).await;
    assert_eq!(r.code, 4, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sigterm_to_following_consumer_exits_cleanly_and_loses_nothing() {
    let ns = namespace().await;
    ns.create_stream("s", &Default::default()).await.unwrap();
    ns.create_group("s", "g", Default::default()).await.unwrap();
    let msgs: Vec<_> = (0..3000)
        .map(|i| json(serde_json::json!({ "i": i })))
        .collect();
    let mut all = HashSet::new();
    for chunk in msgs.chunks(500) {
        all.extend(
            ns.publish_batch("s", chunk)
                .await
                .unwrap()
                .iter()
                .map(|r| r.id),
        );
    }

    let mut consumer = command(
        &ns,
        &["consume", "s", "-g", "g", "--follow", "--batch", "10"],
    )
    .spawn()
    .unwrap();
    let mut out = BufReader::new(consumer.stdout.take().unwrap()).lines();
    let mut printed = HashSet::new();
    // Signal in the middle of the run, while it is claiming and acking.
    while printed.len() < 200 {
        let line = tokio::time::timeout(WAIT, out.next_line())
            .await
            .expect("the consumer prints")
            .unwrap()
            .expect("the consumer is running");
        let d: serde_json::Value = serde_json::from_str(&line).unwrap();
        printed.insert(d["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
    }
    terminate(consumer.id().unwrap()).await;
    while let Some(line) = tokio::time::timeout(WAIT, out.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        let d: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(printed.insert(d["id"].as_str().unwrap().parse().unwrap()));
    }
    let status = tokio::time::timeout(WAIT, consumer.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(printed.len() < all.len(), "the signal came before the end");

    // Every printed delivery was acknowledged, nothing is left leased, the rest is ready.
    let stats = ns.stats("s", "g").await.unwrap();
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    assert_eq!(stats.ready as usize, all.len() - printed.len(), "{stats:?}");
    let rest = ns.consumer("s", "g", "after").await.unwrap();
    let mut remaining = HashSet::new();
    loop {
        let batch = rest.try_fetch(1000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for d in &batch {
            assert_eq!(d.attempt, 1, "a released delivery keeps its attempt count");
            remaining.insert(d.id());
        }
        rest.ack_batch(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }
    assert!(printed.is_disjoint(&remaining));
    assert_eq!(printed.len() + remaining.len(), all.len());
}

async fn next_json(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> serde_json::Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("the process is running");
    serde_json::from_str(&line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_stats_watch_reports_rates_and_stops_on_sigterm() {
    let ns = namespace().await;
    ns.create_stream("s", &Default::default()).await.unwrap();
    ns.create_group("s", "g", Default::default()).await.unwrap();
    let mut watch = command(&ns, &["stats", "--json", "--watch", "100ms"])
        .spawn()
        .unwrap();
    let mut out = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = next_json(&mut out).await;
    assert_eq!(first["groups"][0]["group"], "g");
    assert!(first["groups"][0].get("publish_rate").is_none(), "{first}");
    ns.publish("s", json(serde_json::json!({}))).await.unwrap();
    // The next samples carry rates, and soon the new message.
    let mut seen_ready = false;
    for _ in 0..50 {
        let sample = next_json(&mut out).await;
        let g = &sample["groups"][0];
        assert!(g["publish_rate"].is_number(), "{sample}");
        assert!(g["settle_rate"].is_number(), "{sample}");
        if g["ready"] == 1 {
            seen_ready = true;
            break;
        }
    }
    assert!(seen_ready);
    terminate(watch.id().unwrap()).await;
    let status = tokio::time::timeout(WAIT, watch.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_scout_serves_prometheus_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ns = namespace().await;
    ns.create_stream("s", &Default::default()).await.unwrap();
    ns.create_group("s", "g", Default::default()).await.unwrap();
    ns.publish("s", json(serde_json::json!({}))).await.unwrap();
    // A free port: bind, read it, release it for the scout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut scout = command(
        &ns,
        &[
            "scout",
            "--metrics-listen",
            &addr,
            "--stats-interval",
            "100ms",
        ],
    )
    .spawn()
    .unwrap();
    let scrape = || async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let body = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(body) = scrape().await {
                if body.contains("pgtide_group_ready{") {
                    return body;
                }
            }
            if let Ok(Some(status)) = scout.try_wait() {
                panic!("the scout exited ({status}); is the binary built with `metrics`?");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the gauges are served");
    assert!(
        body.contains(r#"pgtide_group_ready{stream="s",group="g"} 1"#),
        "{body}"
    );
    assert!(body.contains("pgtide_group_lag_seconds"), "{body}");
    assert!(body.contains("pgtide_acked_total"), "{body}");
    terminate(scout.id().unwrap()).await;
    let status = tokio::time::timeout(WAIT, scout.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_read_only_role_reads_stats_and_cannot_publish_then_is_revoked() {
    let url = crate::common::database_url().await;
    let role = unique("role");
    let _role = RoleGuard {
        url: url.clone(),
        role: role.clone(),
    };
    let ns = namespace().await;
    ns.raw()
        .await
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
        .await
        .unwrap();
    ns.create_stream("s", &Default::default()).await.unwrap();
    ns.create_group("s", "g", Default::default()).await.unwrap();
    ns.publish("s", json(serde_json::json!({"n": 1})))
        .await
        .unwrap();
    // A runtime grant first; --read-only then downgrades it.
    pgtide(&ns, &["grant", &role]).await.ok();
    let granted = pgtide(&ns, &["grant", &role, "--read-only"]).await.ok();
    assert!(granted.stdout.contains("read-only"), "{granted:?}");
    // Twice is fine.
    pgtide(&ns, &["grant", &role, "--read-only"]).await.ok();

    let as_role = |args: &'static [&'static str]| {
        let mut c = command(&ns, args);
        c.env("DATABASE_URL", url_as(&url, &role));
        run_with(c, None)
    };
    let stats = as_role(&["stats", "--json"]).await.ok().json();
    assert_eq!(stats["groups"][0]["ready"], serde_json::json!(1), "{stats}");
    as_role(&["stream", "list"]).await.ok();
    let health = as_role(&["health"]).await;
    assert!(health.stdout.contains("ok    migrations"), "{health:?}");
    for args in [
        &["publish", "s", "--data", "{}"][..],
        &["consume", "s", "-g", "g"],
        &["stream", "create", "t"],
    ] {
        let r = as_role(args).await;
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(r.stderr.contains("permission denied"), "{args:?}: {r:?}");
    }
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight), (1, 0), "nothing was claimed: {s:?}");

    let revoked = pgtide(&ns, &["grant", &role, "--revoke"]).await.ok();
    assert!(revoked.stdout.contains("revoked"), "{revoked:?}");
    let r = as_role(&["stats"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("permission denied"), "{r:?}");
    // The flags exclude each other.
    assert_eq!(
        pgtide(&ns, &["grant", &role, "--read-only", "--revoke"])
            .await
            .code,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_health_warns_when_autovacuum_is_off_for_the_hot_tables() {
    let ns = namespace().await;
    ns.raw()
        .await
        .batch_execute(&format!(
            "ALTER TABLE \"{}\".delivery_state SET (autovacuum_enabled = false)",
            ns.namespace()
        ))
        .await
        .unwrap();
    let r = pgtide(&ns, &["health"]).await;
    // No scout runs: that fails; the vacuum line only warns.
    assert!(r.stdout.contains("FAIL  scout"), "{r:?}");
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("WARN  vacuum"))
        .unwrap_or_else(|| panic!("no vacuum warning: {r:?}"));
    assert!(
        line.contains("autovacuum is off") && line.contains("delivery_state"),
        "{line}"
    );
    let r = pgtide(&ns, &["health", "--json"]).await;
    let checks = r.json()["checks"].clone();
    let vacuum = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "vacuum")
        .cloned()
        .unwrap_or_else(|| panic!("{checks}"));
    assert_eq!(
        (&vacuum["ok"], &vacuum["warning"]),
        (&serde_json::json!(true), &serde_json::json!(true)),
        "{vacuum}"
    );
}
