use std::time::Duration;

use pgtide::{AnyBackend, Error, GroupStart, PgBackend, Queue, QueueConsumer, StreamConfig};

use crate::common::{database_url, json, namespace, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_concurrent_migrations_install_once() {
    let url = database_url().await;
    let ns = unique("mig");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let pg = PgBackend::builder(url.clone())
                .namespace(ns.clone())
                .build()
                .unwrap();
            tokio::spawn(async move { pg.migrate().await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let pg = PgBackend::builder(url.clone())
        .namespace(ns.clone())
        .build()
        .unwrap();
    assert!(pg.is_migrated().await.unwrap());
    pg.migrate().await.unwrap();
    pg.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    // Bookkeeping lives inside the namespace, never in the application's schema.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let n: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM \"{ns}\"._sqlx_migrations WHERE success"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, PgBackend::latest_migration());
    client
        .batch_execute(&format!("DROP SCHEMA \"{ns}\" CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_namespace_says_so() {
    let url = database_url().await;
    let pg = PgBackend::builder(url)
        .namespace(unique("none"))
        .build()
        .unwrap();
    assert!(!pg.is_migrated().await.unwrap());
    let err = pg
        .create_stream("s", &StreamConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotMigrated(n) if n == pg.namespace()),
        "{err}"
    );
    assert!(matches!(
        PgBackend::builder("postgres://x@127.0.0.1/db")
            .namespace("Bad-Name")
            .build(),
        Err(Error::InvalidNamespace(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_groups_lifecycle() {
    let ns = namespace().await;
    let config = StreamConfig::default()
        .lease(Duration::from_secs(5))
        .max_deliver(9);
    assert!(ns.ensure_stream("a.b-c_d", &config.clone()).await.unwrap());
    assert!(!ns
        .ensure_stream("a.b-c_d", &StreamConfig::default())
        .await
        .unwrap());
    assert!(matches!(
        ns.create_stream("a.b-c_d", &StreamConfig::default()).await,
        Err(Error::StreamExists(_))
    ));
    let info = ns.stream("a.b-c_d").await.unwrap().unwrap();
    assert_eq!(info.config, config, "ensure keeps the first configuration");
    ns.update_stream("a.b-c_d", &config.clone().max_deliver(2))
        .await
        .unwrap();
    assert_eq!(
        ns.stream("a.b-c_d")
            .await
            .unwrap()
            .unwrap()
            .config
            .max_deliver,
        2
    );

    assert!(matches!(
        ns.create_group("nope", "g", GroupStart::New).await,
        Err(Error::StreamNotFound(ref s)) if s == "nope"
    ));
    assert!(ns
        .ensure_group("a.b-c_d", "g1", GroupStart::New)
        .await
        .unwrap());
    ns.create_group("a.b-c_d", "g2", GroupStart::New)
        .await
        .unwrap();
    assert_eq!(ns.groups(Some("a.b-c_d")).await.unwrap().len(), 2);
    assert!(matches!(
        ns.consumer("a.b-c_d", "g3", "c").await,
        Err(Error::GroupNotFound { ref group, .. }) if group == "g3"
    ));

    ns.publish("a.b-c_d", json(serde_json::json!(1)))
        .await
        .unwrap();
    assert!(ns.delete_group("a.b-c_d", "g1").await.unwrap());
    assert!(!ns.delete_group("a.b-c_d", "g1").await.unwrap());
    assert_eq!(ns.stats_all().await.unwrap().len(), 1);
    assert!(ns.delete_stream("a.b-c_d").await.unwrap());
    assert!(!ns.delete_stream("a.b-c_d").await.unwrap());
    assert!(ns.streams().await.unwrap().is_empty());
    assert!(matches!(
        ns.publish("a.b-c_d", json(serde_json::json!(1))).await,
        Err(Error::StreamNotFound(_))
    ));
    // Recreated under the same name: a fresh, empty stream.
    ns.create_stream("a.b-c_d", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group("a.b-c_d", "g1", GroupStart::Oldest)
        .await
        .unwrap();
    assert!(ns
        .consumer("a.b-c_d", "g1", "c")
        .await
        .unwrap()
        .try_fetch(10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_partitions_with_their_deliveries() {
    let ns = namespace().await;
    let config = StreamConfig::default()
        .retention(Duration::from_secs(3600))
        .partition_interval(Duration::from_secs(600));
    ns.stream_with_groups("s", config, &["g"]).await;
    ns.publish_batch(
        "s",
        &(0..20)
            .map(|i| json(serde_json::json!(i)))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let raw = ns.raw().await;
    let parts: i64 = raw
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".partitions", ns.namespace()),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        parts, 2,
        "created with the stream: now and the next interval"
    );

    // Nothing is old yet.
    let now = chrono::Utc::now();
    assert_eq!(ns.maintain_at(now).await.unwrap().partitions_dropped, 0);
    // Two hours later the partition holding the messages is past retention.
    let later = now + chrono::Duration::hours(2);
    let report = ns.maintain_at(later).await.unwrap();
    assert!(report.partitions_dropped >= 1, "{report:?}");
    assert!(report.partitions_created >= 1, "{report:?}");
    let msgs: i64 = raw
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".messages", ns.namespace()),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(msgs, 0, "messages dropped with their partition");
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!(s.ready, 0, "expired deliveries are gone too");
    assert!(ns
        .consumer("s", "g", "c")
        .await
        .unwrap()
        .try_fetch(10)
        .await
        .unwrap()
        .is_empty());
    // Publishing still works (partitions exist ahead, and the default partition catches the rest).
    ns.publish("s", json(serde_json::json!("after")))
        .await
        .unwrap();
    assert_eq!(
        ns.consumer("s", "g", "c")
            .await
            .unwrap()
            .try_fetch(10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_outside_prepared_partitions_are_kept_and_moved() {
    let ns = namespace().await;
    ns.stream_with_groups(
        "s",
        StreamConfig::default().partition_interval(Duration::from_secs(60)),
        &["g"],
    )
    .await;
    // A message stamped ten minutes ahead lands in the default partition ...
    let raw = ns.raw().await;
    let n = ns.namespace();
    let id: uuid::Uuid = raw
        .query_one(
            &format!("SELECT message_id FROM \"{n}\"._publish('s', \"{n}\".uuid_v7(now() + interval '10 minutes'), '\\x01', false, NULL, NULL, NULL)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let in_default: i64 = raw
        .query_one(
            &format!("SELECT count(*) FROM \"{n}\".messages_s1_default"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_default, 1);
    // ... and maintenance moves it into its own partition when it creates that range.
    ns.maintain_at(chrono::Utc::now() + chrono::Duration::minutes(8))
        .await
        .unwrap();
    let in_default: i64 = raw
        .query_one(
            &format!("SELECT count(*) FROM \"{n}\".messages_s1_default"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_default, 0);
    let got = ns
        .consumer("s", "g", "c")
        .await
        .unwrap()
        .try_fetch(10)
        .await
        .unwrap();
    assert_eq!(got[0].id(), id);
}

/// The trait path alone (a URL and a namespace) installs a new namespace and then works; before
/// `migrate`, the error names the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_backend_migrates_a_new_namespace() {
    let ns = unique("any");
    let queue = AnyBackend::connect(&database_url().await, &ns)
        .await
        .unwrap();
    let err = queue
        .ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::NotMigrated(n) if *n == ns), "{err}");
    assert!(err.to_string().contains(&ns), "{err}");
    queue.migrate().await.unwrap();
    queue.migrate().await.unwrap();
    assert!(queue
        .ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap());
    queue.ensure_group("s", "g", GroupStart::New).await.unwrap();
    let id = queue
        .publish("s", json(serde_json::json!(1)))
        .await
        .unwrap()
        .id;
    let consumer = queue.consumer("s", "g", "c").await.unwrap();
    let got = consumer.fetch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.iter().map(|d| d.id()).collect::<Vec<_>>(), [id]);
    consumer.ack(&got[0]).await.unwrap();
    let AnyBackend::Postgres(pg) = &queue else {
        panic!("postgres:// gave {}", queue.kind())
    };
    pg.shutdown().await;
    let (client, conn) = tokio_postgres::connect(&database_url().await, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA \"{ns}\" CASCADE"))
        .await
        .unwrap();
}

/// Every stream has its own message lookup for `_claim` (`_lookup_s<stream id>`), created with
/// the stream, runnable by no one but the namespace's functions, and dropped with the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stream_has_its_lookup_until_it_is_deleted() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    for s in ["a", "b"] {
        ns.create_stream(s, &StreamConfig::default()).await.unwrap();
        ns.create_group(s, "g", GroupStart::New).await.unwrap();
        ns.publish(s, json(serde_json::json!({ "s": s })))
            .await
            .unwrap();
    }
    // (stream, lookup function, whether PUBLIC may run it)
    let lookups = || async {
        raw.query(
            &format!(
                "SELECT s.name, p.proname::text,
                        EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                                WHERE a.grantee = 0)
                   FROM \"{n}\".streams s
                   LEFT JOIN pg_proc p
                     ON p.pronamespace = $1::text::regnamespace AND p.proname = '_lookup_s' || s.id
                  ORDER BY s.name"
            ),
            &[&n],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, Option<String>>(1).is_some(),
                r.get::<_, Option<bool>>(2),
            )
        })
        .collect::<Vec<_>>()
    };
    assert_eq!(
        lookups().await,
        [
            ("a".to_owned(), true, Some(false)),
            ("b".to_owned(), true, Some(false))
        ]
    );
    // Claims read the payload through it.
    let got = ns
        .consumer("b", "g", "c")
        .await
        .unwrap()
        .try_fetch(10)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&got[0].message.payload).unwrap(),
        serde_json::json!({ "s": "b" })
    );

    assert!(ns.delete_stream("a").await.unwrap());
    assert_eq!(lookups().await, [("b".to_owned(), true, Some(false))]);
    let left: i64 = raw
        .query_one(
            "SELECT count(*) FROM pg_proc
              WHERE pronamespace = $1::text::regnamespace AND proname ~ '^_lookup_s[0-9]+$'",
            &[&n],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1, "delete_stream left its lookup function behind");
}
