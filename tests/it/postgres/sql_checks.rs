//! The SQL surface checks its arguments with the Rust API's rules: every bad argument of a public
//! function raises PT001 (with a hint) and claims, settles or writes nothing. Also the partition
//! lock (maintain racing maintain and trim) and the one-group stats path.

use std::time::Duration;

use pgtide::{Error, OutgoingMessage, StreamConfig};

use crate::common::namespace;

/// Runs `sql` and asserts it fails with PT001 and a hint.
async fn rejects(raw: &tokio_postgres::Client, sql: &str) {
    let err = raw
        .batch_execute(sql)
        .await
        .expect_err(&format!("accepted: {sql}"));
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: not a database error: {err}"));
    assert_eq!(db.code().code(), "PT001", "{sql}: {}", db.message());
    assert!(db.hint().is_some(), "{sql}: no hint");
}

async fn one_i64(raw: &tokio_postgres::Client, sql: &str) -> i64 {
    raw.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_argument_is_pt001_and_changes_nothing() {
    let ns = namespace().await;
    let raw = ns.raw().await;
    let n = ns.namespace().to_owned();
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group("s", "g", Default::default()).await.unwrap();
    for i in 0..3 {
        ns.publish(
            "s",
            OutgoingMessage::json(&serde_json::json!({ "i": i })).unwrap(),
        )
        .await
        .unwrap();
    }
    let long = "a".repeat(100_000);
    let id = "ARRAY['00000000-0000-0000-0000-000000000001']::uuid[]";
    let calls = [
        // read: names (consumer too), batch size
        format!("SELECT * FROM \"{n}\".read('s', 'g', '')"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', NULL)"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', '{long}')"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', 'a''b')"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', 'c', n => NULL)"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', 'c', n => -5)"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', 'c', n => 0)"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', 'c', n => 10001)"),
        format!("SELECT * FROM \"{n}\".read(NULL, 'g', 'c')"),
        format!("SELECT * FROM \"{n}\".read('s', 'G', 'c')"),
        // settles: names, ids, tokens
        format!("SELECT \"{n}\".ack('s', 'g', NULL)"),
        format!("SELECT \"{n}\".ack('s', 'g', ARRAY[NULL]::uuid[])"),
        format!("SELECT \"{n}\".ack('s', 'g', {id}, ARRAY[1, 2]::bigint[])"),
        format!("SELECT \"{n}\".ack('s', 'g', {id}, ARRAY[NULL]::bigint[])"),
        format!("SELECT \"{n}\".ack('', 'g', {id})"),
        format!("SELECT \"{n}\".nack('s', 'g', NULL)"),
        format!("SELECT \"{n}\".nack('s', NULL, {id})"),
        format!("SELECT \"{n}\".term('s', 'g', NULL)"),
        format!("SELECT \"{n}\".term('s', 'g', {id}, tokens => ARRAY[]::bigint[])"),
        format!("SELECT \"{n}\".in_progress('s', 'g', NULL)"),
        format!("SELECT \"{n}\".extend('s', 'g', {id}, tokens => ARRAY[1, 2]::bigint[])"),
        format!("SELECT \"{n}\".replay_dead('s', 'g x')"),
        format!("SELECT \"{n}\".purge_dead(NULL, 'g')"),
        format!("SELECT \"{n}\".release_consumer('s', 'g', NULL)"),
        format!("SELECT \"{n}\".release_consumer('s', 'g', '')"),
        // publish
        format!("SELECT \"{n}\".publish('s', NULL)"),
        format!("SELECT \"{n}\".publish('s', '1', headers => '[1]')"),
        format!("SELECT \"{n}\".publish('s', '1', priority => NULL)"),
        format!("SELECT \"{n}\".publish('S', '1')"),
        format!("SELECT \"{n}\".publish_bytes('s', NULL)"),
        format!("SELECT \"{n}\".publish_bytes(NULL, '\\x01')"),
        // registry and operations
        format!("SELECT \"{n}\".create_stream('t', max_deliver => 0)"),
        format!("SELECT \"{n}\".create_stream('t', max_deliver => NULL)"),
        format!("SELECT \"{n}\".create_stream('t', max_payload => 0)"),
        format!("SELECT \"{n}\".create_stream('t', max_payload => NULL)"),
        format!("SELECT \"{n}\".create_stream('t', backoff => '{{}}')"),
        format!("SELECT \"{n}\".create_stream('t', backoff => NULL)"),
        format!("SELECT \"{n}\".create_stream('t', backoff => '{{1s,NULL}}')"),
        format!("SELECT \"{n}\".create_stream('t', backoff_jitter => 2)"),
        format!("SELECT \"{n}\".create_stream('t', backoff_jitter => NULL)"),
        format!("SELECT \"{n}\".create_stream('t', if_not_exists => NULL)"),
        format!("SELECT \"{n}\".create_stream(NULL)"),
        format!("SELECT \"{n}\".create_group(NULL, 'h')"),
        format!("SELECT \"{n}\".create_group('s', 'h', start => NULL)"),
        format!("SELECT \"{n}\".create_group('s', 'h', if_not_exists => NULL)"),
        format!("SELECT \"{n}\".delete_stream('')"),
        format!("SELECT \"{n}\".delete_group('s', '')"),
        format!("SELECT \"{n}\".purge_stream(NULL)"),
        format!("SELECT * FROM \"{n}\".reset_group('s', NULL)"),
        format!("SELECT \"{n}\".trim_stream(NULL, max_len => 1)"),
        format!("SELECT \"{n}\".trim_stream('s')"),
        format!("SELECT \"{n}\".trim_stream('s', max_len => -1)"),
        format!("SELECT * FROM \"{n}\".maintain(NULL)"),
        format!("SELECT * FROM \"{n}\".group_stats('s', NULL)"),
    ];
    for sql in &calls {
        rejects(&raw, sql).await;
    }
    // Nothing was claimed, published, created or removed.
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (3, 0, 0, 0));
    assert_eq!(
        one_i64(&raw, &format!("SELECT count(*) FROM \"{n}\".messages")).await,
        3
    );
    assert_eq!(
        one_i64(&raw, &format!("SELECT count(*) FROM \"{n}\".streams")).await,
        1
    );
    assert_eq!(
        one_i64(&raw, &format!("SELECT count(*) FROM \"{n}\".groups")).await,
        1
    );
    // The limits themselves are accepted.
    let rows = raw
        .query(
            &format!("SELECT id FROM \"{n}\".read('s', 'g', 'c', n => 10000)"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
}

/// A by-hand maintain() racing others (the scout's) and trims, on a stream whose partitions
/// are missing, never fails: partition DDL is serialised per namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_maintain_and_trim_never_fail() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    for round in 0..3 {
        // Drop every range partition: the next passes must all create them again.
        let raw = ns.raw().await;
        let tables: Vec<String> = raw
            .query(&format!("SELECT table_name FROM \"{n}\".partitions"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for t in &tables {
            raw.batch_execute(&format!("DROP TABLE \"{n}\".\"{t}\""))
                .await
                .unwrap();
        }
        raw.batch_execute(&format!("DELETE FROM \"{n}\".partitions"))
            .await
            .unwrap();
        let mut tasks = vec![];
        for i in 0..10 {
            let url = ns.url.clone();
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let sql = if i % 5 == 4 {
                    format!("SELECT \"{n}\".trim_stream('s', max_age => interval '1 hour')")
                } else {
                    format!("SELECT * FROM \"{n}\".maintain()")
                };
                c.batch_execute(&sql).await
            }));
        }
        for t in tasks {
            let r = tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("timed out")
                .unwrap();
            assert!(r.is_ok(), "round {round}: {:?}", r.err());
        }
        let parts = one_i64(&raw, &format!("SELECT count(*) FROM \"{n}\".partitions")).await;
        assert!(parts >= 4, "round {round}: {parts} partitions");
    }
}

/// `stats(stream, group)` reads one group and tells a missing stream from a missing group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_stats_reads_one_group_and_types_what_is_missing() {
    let ns = namespace().await;
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group("s", "g", Default::default()).await.unwrap();
    ns.create_group("s", "other", Default::default())
        .await
        .unwrap();
    for i in 0..2 {
        ns.publish(
            "s",
            OutgoingMessage::json(&serde_json::json!({ "i": i })).unwrap(),
        )
        .await
        .unwrap();
    }
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.stream.as_str(), s.group.as_deref()), ("s", Some("g")));
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (2, 0, 0, 0));
    assert!(s.oldest_ready_age.is_some());
    // The same numbers as the namespace-wide view.
    let all = ns.stats_all().await.unwrap();
    let same = all
        .iter()
        .find(|x| x.stream == "s" && x.group.as_deref() == Some("g"))
        .unwrap();
    assert_eq!(
        (same.ready, same.in_flight, same.delayed, same.dead),
        (s.ready, s.in_flight, s.delayed, s.dead)
    );
    assert!(matches!(
        ns.stats("nope", "g").await,
        Err(Error::StreamNotFound(stream)) if stream == "nope"
    ));
    assert!(matches!(
        ns.stats("s", "nope").await,
        Err(Error::GroupNotFound { group, .. }) if group == "nope"
    ));
}
