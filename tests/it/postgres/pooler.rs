//! pgtide behind PgBouncer 1.18 in transaction mode, started by each test in front of a cluster
//! of its own, with 2 server connections shared by a larger pgtide pool and round-robin
//! assignment (see `Server::pgbouncer`): unnamed statements make every path work there, prepared
//! ones do not, and `listen_url` keeps NOTIFY wake-ups through a direct session.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtide::{
    CancellationToken, Delivery, GroupStart, Outcome, PgBackend, StatementMode, StreamConfig,
    Worker,
};
use sqlx::Connection;

use crate::common::{eventually, json, unique, WAIT};
use pgtide_testing::{Cluster, Server};

/// A cluster and a PgBouncer in front of it; the pooler goes first on drop.
struct Pooled {
    bouncer: Server,
    cluster: Cluster,
}

impl Pooled {
    fn start(settings: &[&str]) -> Pooled {
        let cluster = Cluster::start(&[]);
        let bouncer = Server::pgbouncer(cluster.port, settings);
        Pooled { bouncer, cluster }
    }

    /// The pooler's URL for the cluster's `postgres` database.
    fn pooled_url(&self) -> String {
        self.bouncer.url("postgres")
    }

    /// Installs a namespace of its own through a direct connection.
    async fn migrated_namespace(&self) -> String {
        let ns = unique("pool");
        PgBackend::builder(self.cluster.url())
            .namespace(&ns)
            .build()
            .unwrap()
            .migrate()
            .await
            .unwrap();
        ns
    }
}

/// A raw tokio-postgres connection (the application's own) through `url`.
async fn app_client(url: &str) -> tokio_postgres::Client {
    crate::common::raw_client(url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unnamed_statements_run_every_path_behind_pgbouncer() {
    let pooled = Pooled::start(&[]);
    let ns = pooled.migrated_namespace().await;
    // Poll-only: no listen_url, so unnamed mode turns notifications off by default.
    let pg = PgBackend::builder(format!("{}?pgtide_statements=unnamed", pooled.pooled_url()))
        .namespace(&ns)
        .pool_size(8)
        .poll_interval(Duration::from_millis(50))
        .scout_max_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    assert_eq!(pg.statement_mode(), StatementMode::Unnamed);
    assert!(pg.is_migrated().await.unwrap());
    assert_eq!(
        pg.migration_version().await.unwrap(),
        Some(PgBackend::latest_migration())
    );
    pg.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    pg.create_group("s", "g", GroupStart::New).await.unwrap();
    assert!(!pg.ensure_group("s", "g", GroupStart::New).await.unwrap());

    // Concurrent publishes: 8 client connections over 2 server connections.
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8i64 {
        let pg = pg.clone();
        tasks.spawn(async move {
            for i in 0..20i64 {
                pg.publish("s", json(serde_json::json!(t * 100 + i)))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let batch: Vec<_> = (1000..1040i64)
        .map(|i| json(serde_json::json!(i)))
        .collect();
    pg.publish_batch("s", &batch).await.unwrap();
    let first = pg
        .publish("s", json(serde_json::json!(2000)).dedupe_key("k"))
        .await
        .unwrap();
    let again = pg
        .publish("s", json(serde_json::json!(2000)).dedupe_key("k"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);

    // The application's own tokio-postgres transaction, through the pooler.
    let mut app = app_client(&pooled.pooled_url()).await;
    let tx = app.transaction().await.unwrap();
    pg.publish_in(&tx, "s", &[json(serde_json::json!(-1))])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = app.transaction().await.unwrap();
    pg.publish_in(
        &tx,
        "s",
        &[
            json(serde_json::json!(3000)),
            json(serde_json::json!(3001)).dedupe_key("k2"),
        ],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // The application's sqlx transaction, through the pooler. sqlx sends `extra_float_digits`
    // at startup, which PgBouncer refuses unless told to ignore it: the application turns it
    // off (or the pooler lists it in `ignore_startup_parameters`).
    let options = sqlx::postgres::PgConnectOptions::from_str(&pooled.pooled_url())
        .unwrap()
        .extra_float_digits(None);
    let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    pg.publish_sqlx(&mut tx, "s", &[json(serde_json::json!(-2))])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    for i in 0..3i64 {
        let mut tx = conn.begin().await.unwrap();
        pg.publish_sqlx(
            &mut tx,
            "s",
            &[
                json(serde_json::json!(4000 + 2 * i)),
                json(serde_json::json!(4001 + 2 * i)).dedupe_key(format!("sqlx{i}")),
            ],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let expected = 160 + 40 + 1 + 2 + 6;
    let stats = pg.stats("s", "g").await.unwrap();
    assert_eq!(stats.ready, expected);

    // The worker drains it in poll-only mode; the scout runs through the pooler too.
    let seen: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let consumer = pg.consumer("s", "g", "w").await.unwrap();
    let worker = Worker::new(consumer, {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                let i: i64 = d.json().map_err(|e| e.to_string())?;
                seen.lock().unwrap().insert(i);
                Ok::<_, String>(Outcome::Ack)
            }
        }
    })
    .concurrency(8);
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    eventually(
        Duration::from_secs(60),
        "the worker handled everything",
        || seen.lock().unwrap().len() == expected as usize,
    )
    .await;
    let mut scout = pg.watch_scout();
    tokio::time::timeout(WAIT, scout.wait_for(|s| s.is_leader))
        .await
        .expect("the scout is elected through the pooler")
        .unwrap();
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, expected as u64);
    assert!(seen.lock().unwrap().iter().all(|i| *i >= 0), "rolled back");

    // Every settle, one by one.
    let consumer = pg.consumer("s", "g", "c").await.unwrap();
    pg.publish_batch(
        "s",
        &(0..3)
            .map(|i| json(serde_json::json!(i)))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let mut got = consumer.fetch(3, WAIT).await.unwrap();
    assert_eq!(got.len(), 3);
    consumer.in_progress(&mut got[0], None).await.unwrap();
    consumer.ack(&got[0]).await.unwrap();
    consumer
        .nack(&got[1], Some(Duration::ZERO), Some("again"))
        .await
        .unwrap();
    consumer.term(&got[2], "bad").await.unwrap();
    let again = consumer.fetch(1, WAIT).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id(), got[1].id());
    consumer.release_batch(&[&again[0]]).await.unwrap();
    let again = consumer.fetch(1, WAIT).await.unwrap();
    // Settled inside the application's sqlx transaction, through the pooler.
    let mut tx = conn.begin().await.unwrap();
    consumer.ack_sqlx(&mut tx, &again[0]).await.unwrap();
    tx.commit().await.unwrap();
    let dead = pg.dead_letters("s", "g", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, got[2].id());
    let stats = pg.stats("s", "g").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight, stats.delayed, stats.dead),
        (0, 0, 0, 1)
    );
    assert!(!pg.stats_all().await.unwrap().is_empty());
    pg.maintain().await.unwrap();
    pg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_fail_behind_pgbouncer() {
    // PgBouncer refuses the pool's startup `options` outright…
    let pooled = Pooled::start(&[]);
    let ns = pooled.migrated_namespace().await;
    let pg = PgBackend::builder(pooled.pooled_url())
        .namespace(&ns)
        .build()
        .unwrap();
    let err = pg.stats_all().await.unwrap_err();
    assert!(
        format!("{err:?}").contains("unsupported startup parameter"),
        "{err:?}"
    );
    drop(pooled);

    // …and once told to ignore them, prepared statements break as soon as two transactions of
    // one client connection land on different server connections.
    let pooled = Pooled::start(&["ignore_startup_parameters = options"]);
    let ns = pooled.migrated_namespace().await;
    let pg = PgBackend::builder(pooled.pooled_url())
        .namespace(&ns)
        .pool_size(4)
        .build()
        .unwrap();
    pg.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..4i64 {
        let pg = pg.clone();
        tasks.spawn(async move {
            let mut errors = vec![];
            for i in 0..20i64 {
                if let Err(e) = pg.publish("s", json(serde_json::json!(t * 100 + i))).await {
                    errors.push(format!("{e:?}"));
                }
            }
            errors
        });
    }
    let mut errors = vec![];
    while let Some(r) = tasks.join_next().await {
        errors.extend(r.unwrap());
    }
    assert!(
        !errors.is_empty(),
        "prepared statements worked behind the pooler"
    );
    println!(
        "{} of 80 publishes failed, e.g. {}",
        errors.len(),
        errors[0]
    );
    for e in &errors {
        assert!(e.contains("prepared statement"), "unexpected error: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_url_keeps_notify_wakeups_behind_pgbouncer() {
    let pooled = Pooled::start(&[]);
    let pg = PgBackend::builder(pooled.pooled_url())
        .statement_mode(StatementMode::Unnamed)
        .listen_url(pooled.cluster.url())
        .namespace(unique("pool"))
        // The fallback poll would take an hour: a fetch that returns proves a NOTIFY woke it.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    // Migrations run through the direct URL (they need a session for their lock).
    pg.migrate().await.unwrap();
    pg.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    pg.create_group("s", "g", GroupStart::New).await.unwrap();
    let consumer = pg.consumer("s", "g", "c").await.unwrap();
    let mut waiting = pg.watch_waiting_fetches();
    let fetch = tokio::spawn({
        let consumer = consumer.clone();
        async move { consumer.fetch(1, Duration::from_secs(120)).await }
    });
    tokio::time::timeout(WAIT, waiting.wait_for(|n| *n > 0))
        .await
        .expect("the consumer waits")
        .unwrap();
    let mut listener = pg.watch_listener();
    tokio::time::timeout(WAIT, listener.wait_for(|s| s.connected))
        .await
        .expect("the listener connects through the direct URL")
        .unwrap();
    let receipt = pg.publish("s", json(serde_json::json!(1))).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("woken long before the fallback poll")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), receipt.id);
    consumer.ack(&got[0]).await.unwrap();
    pg.shutdown().await;
}

#[tokio::test]
async fn declared_parameter_types_match_the_server() {
    // Unnamed mode sends the declared types (src/postgres/statements.rs) instead of asking the
    // server: they must be what the server infers from the SQL, for every statement.
    let ns = crate::common::namespace().await;
    assert_eq!(
        ns.check_statement_types().await.unwrap(),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_publishes_keep_the_notify_trigger_quiet() {
    // Behind the pooler the pool cannot set `pgtide.notify = off` at startup; its publishes turn
    // it off per transaction instead. A direct LISTEN session sees the SQL publisher's NOTIFY
    // (the trigger on the application's connection) but none for the engine's publishes before
    // it: notifications arrive in commit order, so the first one tells.
    let pooled = Pooled::start(&[]);
    let ns = pooled.migrated_namespace().await;
    let pg = PgBackend::builder(pooled.pooled_url())
        .statement_mode(StatementMode::Unnamed)
        .namespace(&ns)
        .build()
        .unwrap();
    for stream in ["quiet", "loud"] {
        pg.create_stream(stream, &StreamConfig::default())
            .await
            .unwrap();
        pg.create_group(stream, "g", GroupStart::New).await.unwrap();
    }
    let (listener, mut conn) =
        tokio_postgres::connect(&pooled.cluster.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN \"pgtide.{ns}\""))
        .await
        .unwrap();
    // Both streams have a waiter registered (this session): the trigger, were it on, would
    // notify them (an unregistered stream's SQL publish sends no NOTIFY, see registrar.rs).
    for stream in ["quiet", "loud"] {
        listener
            .execute(
                &format!("SELECT \"{ns}\"._wake_register($1, 'test', pg_backend_pid(), '0')"),
                &[&stream],
            )
            .await
            .unwrap();
    }
    pg.publish("quiet", json(serde_json::json!(1)))
        .await
        .unwrap();
    pg.publish_batch(
        "quiet",
        &[json(serde_json::json!(2)), json(serde_json::json!(3))],
    )
    .await
    .unwrap();
    let app = app_client(&pooled.pooled_url()).await;
    app.execute(
        &format!("SELECT \"{ns}\".publish('loud', '{{}}'::jsonb)"),
        &[],
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the SQL publish notifies")
        .unwrap();
    assert_eq!(first, "loud");
    assert_eq!(pg.stats("quiet", "g").await.unwrap().ready, 3);
}
