//! Many streams in one namespace: provisioning hundreds in one transaction, a lock table too
//! small for that (a typed error that says what to do), and maintenance in bounded passes.

use std::time::Duration;

use pgtide::{Error, PgBackend, StreamConfig};
use pgtide_testing::Cluster;

use crate::common::{namespace, raw_client, unique};

async fn count(raw: &impl tokio_postgres::GenericClient, sql: &str) -> i64 {
    raw.query_one(sql, &[]).await.unwrap().get(0)
}

/// 400 streams in one SQL transaction on a server with the default lock table (64 x 100):
/// creating a stream locks six relations, not the thirty it did with its time partitions (it
/// failed at about 330). Maintenance then prepares their partitions in passes of at most 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_streams_in_one_transaction_then_bounded_maintenance() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let mut raw = ns.raw().await;
    let tx = raw.transaction().await.unwrap();
    let created = count(
        &tx,
        &format!("SELECT count(*) FILTER (WHERE \"{n}\".create_stream('s' || i)) FROM generate_series(1, 400) i"),
    )
    .await;
    assert_eq!(created, 400);
    tx.commit().await.unwrap();
    // Publishing before any partition exists works: the default partition holds the message.
    ns.publish("s400", crate::common::json(serde_json::json!(1)))
        .await
        .unwrap();
    assert_eq!(
        count(&raw, &format!("SELECT count(*) FROM \"{n}\".partitions")).await,
        0
    );

    // One SQL pass stops at its budget ...
    let row = raw
        .query_one(&format!("SELECT * FROM \"{n}\".maintain()"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 64);
    // ... and the Rust call repeats passes until the work is done: four per stream.
    let report = ns.maintain().await.unwrap();
    assert_eq!(report.partitions_created, 400 * 4 - 64, "{report:?}");
    assert_eq!(
        count(&raw, &format!("SELECT count(*) FROM \"{n}\".partitions")).await,
        1600
    );
    // The message caught by the default partition moved into its own partition.
    assert_eq!(
        count(
            &raw,
            &format!("SELECT count(*) FROM \"{n}\".messages_s400_default")
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &raw,
            &format!("SELECT count(*) FROM \"{n}\".messages WHERE stream_id = 400")
        )
        .await,
        1
    );
    // Nothing left: a pass with nothing to do creates and drops nothing.
    assert_eq!(ns.maintain().await.unwrap().partitions_created, 0);
    // Past retention every stream's partitions expire at once: dropped in passes too, and the
    // partitions of the new "now" created.
    let later = chrono::Utc::now() + chrono::Duration::days(30);
    let report = ns.maintain_at(later).await.unwrap();
    assert_eq!(report.partitions_dropped, 1600, "{report:?}");
    assert_eq!(report.partitions_created, 1600, "{report:?}");
    // A namespace this size cannot go in one DROP SCHEMA ... CASCADE with the default lock
    // table (it locks every relation): its streams go first, one transaction each.
    for i in 1..=400 {
        assert!(ns.delete_stream(&format!("s{i}")).await.unwrap());
    }
}

/// The Rust API and the CLI create a stream with the partitions of now and the next interval
/// (`ensure_partitions` runs in its own transaction right after `create_stream`); an existing
/// stream gets missing ones back; maintain() adds the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_stream_prepares_partitions() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    ns.ensure_stream("a", &StreamConfig::default())
        .await
        .unwrap();
    let parts = format!("SELECT count(*) FROM \"{n}\".partitions");
    assert_eq!(count(&raw, &parts).await, 2, "now and the next interval");
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('b'); SELECT \"{n}\".ensure_partitions('a')"
    ))
    .await
    .unwrap();
    assert_eq!(count(&raw, &parts).await, 2, "SQL create_stream: none yet");
    assert!(!ns
        .ensure_stream("b", &StreamConfig::default())
        .await
        .unwrap());
    assert_eq!(count(&raw, &parts).await, 4);
    // maintain() adds the two after each.
    assert_eq!(ns.maintain().await.unwrap().partitions_created, 4);
    assert_eq!(count(&raw, &parts).await, 8);
    let code =
        crate::common::sqlstate(&raw, &format!("SELECT \"{n}\".ensure_partitions('nope')")).await;
    assert_eq!(code, "PT002");
}

/// On a server whose lock table is small, creating too many streams in one transaction fails
/// with PT010 (a typed [`Error::LockTableFull`]) whose hint says what to do, and the streams
/// created in separate transactions all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_streams_in_one_transaction_is_a_typed_error() {
    let cluster = tokio::task::spawn_blocking(|| {
        // 600 lock-table slots: far too few for 500 streams in one transaction, enough for a
        // maintenance pass (64 partitions) of the test's call and one of the scout at once.
        Cluster::start(&["max_locks_per_transaction = 10", "max_connections = 60"])
    })
    .await
    .unwrap();
    let url = cluster.url();
    let ns = unique("locks");
    let pg = PgBackend::builder(url.clone())
        .namespace(ns.clone())
        .pool_size(2)
        .build()
        .unwrap();
    pg.migrate().await.unwrap();
    let mut raw = raw_client(&url).await;
    let per_tx: i32 = raw
        .query_one(&format!("SELECT \"{ns}\".streams_per_transaction()"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(per_tx, 10 * 60 / 8 / 2);
    let tx = raw.transaction().await.unwrap();
    let err = tx
        .query_one(
            &format!(
                "SELECT count(\"{ns}\".create_stream('s' || i)) FROM generate_series(1, 500) i"
            ),
            &[],
        )
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "PT010", "{db:?}");
    assert!(
        db.message().contains("lock table is full"),
        "{}",
        db.message()
    );
    let hint = db.hint().unwrap_or_default();
    assert!(
        hint.contains("separate transactions") && hint.contains("max_locks_per_transaction"),
        "{hint}"
    );
    let typed = Error::from(err);
    assert!(matches!(typed, Error::LockTableFull(_)), "{typed:?}");
    assert!(!typed.is_retryable());
    tx.rollback().await.unwrap();
    // One stream per transaction (what the Rust API does) fits any number.
    for i in 0..60 {
        pg.create_stream(&format!("s{i}"), &StreamConfig::default())
            .await
            .unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(120), pg.maintain())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report.partitions_created,
        60 * 2,
        "two with each stream, two by maintain"
    );
    pg.shutdown().await;
}

/// A claim locks its own stream's partitions, not every stream's: under a generic plan the
/// message lookup (stream id as a parameter) made PostgreSQL 15 lock all partitions of all
/// streams before pruning at run time — thousands of locks per claim with many streams, which
/// filled the lock table of the whole server. `_claim` reads the messages through the stream's own
/// lookup function (`_lookup_s<id>`, whose statement names the stream as a constant, so even its
/// generic plan holds only that stream's partitions); this session forces generic plans, so the
/// test fails if the lookup ever takes the stream as a parameter again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_lock_their_own_stream_not_every_stream() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s' || i) FROM generate_series(1, 60) i;
         SELECT \"{n}\".create_group('s1', 'g');"
    ))
    .await
    .unwrap();
    // Every stream with its time partitions, as in steady state.
    ns.maintain().await.unwrap();
    let partitions = count(&raw, &format!("SELECT count(*) FROM \"{n}\".partitions")).await;
    assert!(partitions >= 120, "{partitions} partitions");
    for i in 0..40 {
        raw.execute(
            &format!("SELECT \"{n}\".publish('s1', $1::text::jsonb)"),
            &[&i.to_string()],
        )
        .await
        .unwrap();
    }
    raw.batch_execute("SET plan_cache_mode = force_generic_plan; BEGIN")
        .await
        .unwrap();
    let mut claimed = 0;
    // More calls than the plan cache's five custom plans before it may go generic.
    for _ in 0..8 {
        claimed += count(
            &raw,
            &format!("SELECT count(*) FROM \"{n}\".read('s1', 'g', 'c', n => 2)"),
        )
        .await;
    }
    let locks = count(
        &raw,
        "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'relation'",
    )
    .await;
    raw.batch_execute("COMMIT").await.unwrap();
    assert_eq!(claimed, 16);
    assert!(
        locks < partitions / 2,
        "one session's claims hold {locks} relation locks with {partitions} partitions in the namespace"
    );
}

/// Partition maintenance never holds up a stream's claims for long. Creating a partition locks
/// the stream's default partition (ACCESS EXCLUSIVE, to scan it for rows of the new range), and
/// every claim of the stream reads its partitions. Maintenance used to do every stream's DDL in
/// one transaction (claims of the first streams waited for the whole pass: a 0.3–0.8 s claim in
/// the bench's latency case) and to wait for its locks however long (claims queued behind the
/// request while any transaction read the stream). Now each stream's work is its own
/// transaction, and a lock not granted within 100 ms puts that stream off to the next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_skips_a_stream_it_cannot_lock_and_locks_one_stream_at_a_time() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    for s in ["a", "b"] {
        ns.ensure_stream(s, &StreamConfig::default()).await.unwrap();
        ns.ensure_group(s, "g", pgtide::GroupStart::New)
            .await
            .unwrap();
        ns.publish(s, crate::common::json(serde_json::json!(1)))
            .await
            .unwrap();
    }
    let id = |s: &'static str| {
        let (raw, n) = (&raw, &n);
        async move {
            raw.query_one(&format!("SELECT \"{n}\".stream_id($1)"), &[&s])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }
    };
    let (a, b) = (id("a").await, id("b").await);
    // A long transaction reading stream b (a report, pg_dump): its lock on b's default
    // partition conflicts with creating b's partitions.
    let reader = ns.raw().await;
    reader
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE \"{n}\".messages_s{b}_default IN ACCESS SHARE MODE"
        ))
        .await
        .unwrap();
    // One step, one stream (the scout and the Rust API run each step in its own transaction):
    // a's two partitions ahead; then b, put off instead of waited for; then the rest.
    let step = |after: i32| {
        let (raw, n) = (&raw, &n);
        async move {
            let sql = format!(
                "SELECT stream_id, partitions_created, partitions_skipped FROM \"{n}\"._maintain_step(now(), $1)"
            );
            let r = tokio::time::timeout(Duration::from_secs(60), raw.query_one(&sql, &[&after]))
                .await
                .expect("the step waited for the reader")
                .unwrap();
            (
                r.get::<_, Option<i32>>(0),
                r.get::<_, i32>(1),
                r.get::<_, i32>(2),
            )
        }
    };
    assert_eq!(step(-1).await, (Some(a), 2, 0));
    assert_eq!(step(a).await, (Some(b), 0, 1));
    assert_eq!(step(b).await, (None, 0, 0));
    // The Rust pass (and the scout's) the same way, and it does not wait for the reader.
    let report = tokio::time::timeout(Duration::from_secs(60), ns.maintain())
        .await
        .expect("maintenance waited for the reader")
        .unwrap();
    assert_eq!(report.partitions_created, 0, "{report:?}");
    assert_eq!(report.streams_skipped, 1, "{report:?}");
    // So a claim of b is never queued behind a maintenance lock request for long.
    for s in ["a", "b"] {
        let c = ns.consumer(s, "g", "c").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), c.try_fetch(10))
            .await
            .expect("the claim waited for maintenance")
            .unwrap();
        assert_eq!(got.len(), 1, "stream {s}");
    }
    // SQL maintain() (one transaction for the pass) skips b too.
    let row = raw
        .query_one(&format!("SELECT * FROM \"{n}\".maintain()"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 0);
    reader.batch_execute("COMMIT").await.unwrap();
    // The reader gone, the next pass does b's work.
    let report = ns.maintain().await.unwrap();
    assert_eq!(report.partitions_created, 2, "{report:?}");
    assert_eq!(report.streams_skipped, 0, "{report:?}");
    let parts = count(&raw, &format!("SELECT count(*) FROM \"{n}\".partitions")).await;
    assert_eq!(parts, 8, "four slots per stream");
}
