//! Ordered groups in the Postgres engine (issue 12), through the SQL surface and the paths that
//! move deliveries in bulk (replay, reset, trim, a group created from the oldest message): each
//! leaves one head per key, in publish order.

use uuid::Uuid;

use crate::common::{namespace, sqlstate};

/// A row of the `keys` view: key, pending, waiting, head state, consumer.
type KeyRow = (String, i64, i64, Option<String>, Option<String>);

/// `(key, n, state)` of every delivery of group `g`, by key and publish order.
async fn lines(raw: &tokio_postgres::Client, n: &str, g: &str) -> Vec<(String, i64, String)> {
    raw.query(
        &format!(
            "SELECT d.key, (m.payload->>'n')::int8, d.state
             FROM \"{n}\".deliveries d JOIN \"{n}\".messages_view m ON m.id = d.message_id
             WHERE d.\"group\" = $1 ORDER BY d.key, (m.payload->>'n')::int8"
        ),
        &[&g],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_surface_publishes_keys_and_reads_one_head_per_key() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_group('s', 'o', ordered => true);
         SELECT \"{n}\".create_group('s', 'u');
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'a') FROM generate_series(1, 3) i;
         SELECT \"{n}\".publish('s', '{{\"n\": 0}}', key => 'b');"
    ))
    .await
    .unwrap();
    let states = lines(&raw, &n, "o").await;
    let want: Vec<(String, i64, String)> = [
        ("a", 1, "ready"),
        ("a", 2, "waiting"),
        ("a", 3, "waiting"),
        ("b", 0, "ready"),
    ]
    .iter()
    .map(|(k, i, s)| (k.to_string(), *i, s.to_string()))
    .collect();
    assert_eq!(states, want);
    let read = raw
        .query(
            &format!("SELECT id, key, lease_token FROM \"{n}\".read('s', 'o', 'psql', 10)"),
            &[],
        )
        .await
        .unwrap();
    let keys: Vec<Option<String>> = read.iter().map(|r| r.get(1)).collect();
    assert_eq!(keys.len(), 2, "one head per key: {keys:?}");
    assert!(keys.contains(&Some("a".into())) && keys.contains(&Some("b".into())));
    // The keys view: each key's head in flight to `psql`, two of a's waiting behind it.
    let keys_view: Vec<KeyRow> = raw
        .query(
            &format!(
                "SELECT key, pending, waiting, head_state, consumer FROM \"{n}\".keys
                 WHERE \"group\" = 'o' ORDER BY pending DESC, key"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let held = || (Some("in_flight".to_owned()), Some("psql".to_owned()));
    assert_eq!(
        keys_view,
        [
            ("a".to_owned(), 3, 2, held().0, held().1),
            ("b".to_owned(), 1, 0, held().0, held().1)
        ]
    );
    let unordered = raw
        .query(
            &format!("SELECT key FROM \"{n}\".read('s', 'u', 'psql', 10)"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(unordered.len(), 4, "the unordered group gets everything");
    // Acking a's head by SQL makes a2 the head.
    let a_head: Uuid = read
        .iter()
        .find(|r| r.get::<_, Option<String>>(1).as_deref() == Some("a"))
        .unwrap()
        .get(0);
    raw.execute(
        &format!("SELECT \"{n}\".ack('s', 'o', ARRAY[$1::uuid])"),
        &[&a_head],
    )
    .await
    .unwrap();
    let next = raw
        .query(
            &format!("SELECT payload FROM \"{n}\".read('s', 'o', 'psql', 10)"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].get::<_, serde_json::Value>(0)["n"], 2);

    // The key rule at the SQL door: PT001, nothing written.
    for bad in ["''", "'a' || chr(10)", "repeat('k', 257)"] {
        assert_eq!(
            sqlstate(
                &raw,
                &format!("SELECT \"{n}\".publish('s', '{{}}', key => {bad})")
            )
            .await,
            "PT001",
            "{bad}"
        );
    }
    assert_eq!(
        sqlstate(
            &raw,
            &format!("SELECT \"{n}\".create_group('s', 'o', ordered => false)")
        )
        .await,
        "PT001",
        "the ordering of an existing group is fixed"
    );
    // A keyed publish to an ordered group in a snapshot transaction would read an old line.
    assert_eq!(
        sqlstate(
            &raw,
            &format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ;
                 SELECT \"{n}\".publish('s', '{{}}', key => 'c');"
            )
        )
        .await,
        "PT001"
    );
    raw.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_paths_keep_one_head_per_key_in_publish_order() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s', max_deliver => 1);
         SELECT \"{n}\".create_group('s', 'o', ordered => true);
         -- 2 ms apart: ids made in SQL are random inside one millisecond, and reset and trim
         -- go by id.
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'k' || (i % 2)), pg_sleep(0.002)
         FROM generate_series(1, 6) i;"
    ))
    .await
    .unwrap();
    // A group created from the oldest message queues the keys' lines in publish order.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_group('s', 'late', 'oldest', ordered => true)"
    ))
    .await
    .unwrap();
    let want = |heads: &[i64]| -> Vec<(String, i64, String)> {
        (1..=6)
            .map(|i| {
                let state = if heads.contains(&i) {
                    "ready"
                } else {
                    "waiting"
                };
                (format!("k{}", i % 2), i, state.to_owned())
            })
            .collect::<Vec<_>>()
    };
    let sorted = |mut v: Vec<(String, i64, String)>| {
        v.sort();
        v
    };
    assert_eq!(sorted(lines(&raw, &n, "late").await), sorted(want(&[1, 2])));

    // Term the head of k1 (message 1): message 3 becomes k1's head; replaying 1 puts it at the
    // back of k1's line.
    let head: Uuid = raw
        .query_one(
            &format!("SELECT id FROM \"{n}\".read('s', 'o', 'psql', 10) WHERE key = 'k1'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    raw.execute(
        &format!("SELECT \"{n}\".term('s', 'o', ARRAY[$1::uuid])"),
        &[&head],
    )
    .await
    .unwrap();
    raw.execute(&format!("SELECT \"{n}\".replay_dead('s', 'o')"), &[])
        .await
        .unwrap();
    let k1: Vec<i64> = raw
        .query(
            &format!(
                "SELECT (m.payload->>'n')::int8 FROM \"{n}\".delivery_state d
                 JOIN \"{n}\".messages_view m ON m.id = d.message_id
                 JOIN \"{n}\".groups g ON g.id = d.group_id
                 WHERE g.name = 'o' AND d.key = 'k1' ORDER BY d.visible_at < '5000-01-01' DESC, d.key_seq"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(k1, [3, 5, 1], "head 3, then 5, then the replayed 1");

    // A reset queues everything again: one head per key, the oldest.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".release_consumer('s', 'o', 'psql');
         DELETE FROM \"{n}\".delivery_state d USING \"{n}\".groups g
         WHERE g.id = d.group_id AND g.name = 'o';
         SELECT \"{n}\".reset_group('s', 'o');"
    ))
    .await
    .unwrap();
    assert_eq!(sorted(lines(&raw, &n, "o").await), sorted(want(&[1, 2])));

    // A trim that removes the heads lets the next of each key go.
    raw.batch_execute(&format!("SELECT \"{n}\".trim_stream('s', max_len => 4)"))
        .await
        .unwrap();
    let left = sorted(lines(&raw, &n, "o").await);
    assert_eq!(
        left,
        sorted(
            want(&[3, 4])
                .into_iter()
                .filter(|(_, i, _)| *i > 2)
                .collect()
        ),
        "{left:?}"
    );
}

/// A trim (and retention, the same rule) moves on only the keys whose deliveries it removed:
/// each key it repairs is an advisory lock held to commit, and advisory locks share the server's
/// lock table, so repairing every key of a group with thousands of keys in flight would fail with
/// "out of shared memory" on every pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_locks_only_the_keys_of_what_it_removed() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let mut raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_group('s', 'o', ordered => true);
         SELECT \"{n}\".publish('s', '{{\"n\": 0}}', key => 'old');
         -- ids made in SQL are random inside one millisecond; the trim goes by id
         SELECT pg_sleep(0.002);
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'k' || i) FROM generate_series(1, 1000) i;"
    ))
    .await
    .unwrap();
    let tx = raw.transaction().await.unwrap();
    let trimmed: i64 = tx
        .query_one(
            &format!("SELECT \"{n}\".trim_stream('s', max_len => 1000)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        trimmed, 1,
        "only the first message is older than the newest 1000"
    );
    let locks = advisory_locks(&tx).await;
    assert!(
        locks <= 5,
        "the trim holds {locks} advisory locks: a lock per key of the group, not per key it touched"
    );
    tx.commit().await.unwrap();
    let heads: Vec<String> = raw
        .query(
            &format!(
                "SELECT h.key::text FROM \"{n}\".key_heads h JOIN \"{n}\".groups g ON g.id = h.group_id
                 WHERE g.name = 'o' AND h.key IN ('old', 'k1', 'k1000') ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        heads,
        ["k1", "k1000"],
        "the trimmed key lost its head row, the others kept theirs"
    );
    let lines = lines(&raw, &n, "o").await;
    assert_eq!(lines.len(), 1000);
    assert!(
        lines.iter().all(|(_, _, state)| state == "ready"),
        "every remaining key has its head"
    );
}

/// Advisory locks held by the connection `tx` runs on.
async fn advisory_locks(tx: &tokio_postgres::Transaction<'_>) -> i64 {
    tx.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// One transaction that publishes to thousands of keys of an ordered group holds a bounded
/// number of advisory locks (past its budget, the group's lines lock exclusively), so it cannot
/// fill the server's lock table; meanwhile the group's other keyed publishers wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_publishing_many_keys_holds_a_bounded_number_of_locks() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let mut raw = ns.raw().await;
    let other = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_group('s', 'o', ordered => true);
         SELECT \"{n}\".create_group('s', 'plain');"
    ))
    .await
    .unwrap();
    let tx = raw.transaction().await.unwrap();
    // One publish per key: 2 000 calls of the key rule.
    tx.batch_execute(&format!(
        "SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'k' || i)
         FROM generate_series(1, 2000) i;"
    ))
    .await
    .unwrap();
    let locks = advisory_locks(&tx).await;
    assert!(
        locks <= 260,
        "2 000 keyed publishes in one transaction hold {locks} advisory locks"
    );
    // Another keyed publisher of the group waits for this transaction (its lock times out).
    other
        .batch_execute("SET lock_timeout = '300ms'")
        .await
        .unwrap();
    assert_eq!(
        sqlstate(
            &other,
            &format!("SELECT \"{n}\".publish('s', '{{\"n\": 0}}', key => 'elsewhere')")
        )
        .await,
        "55P03",
        "the group's lines are held exclusively"
    );
    tx.commit().await.unwrap();
    other
        .batch_execute(&format!(
            "RESET lock_timeout;
             SELECT \"{n}\".publish('s', '{{\"n\": 0}}', key => 'elsewhere');"
        ))
        .await
        .unwrap();
    let lines = lines(&raw, &n, "o").await;
    assert_eq!(lines.len(), 2001);
    assert!(
        lines.iter().all(|(_, _, state)| state == "ready"),
        "every key has its head"
    );
}

/// A reset of an ordered group with thousands of keys repairs every key under the group's lines
/// lock, not a lock per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_many_keys_holds_a_bounded_number_of_locks() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let mut raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_group('s', 'o', ordered => true);
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'k' || (i % 3000))
         FROM generate_series(1, 6000) i;
         -- every delivery gone, so that the reset queues every key again
         DELETE FROM \"{n}\".delivery_state d USING \"{n}\".groups g
         WHERE g.id = d.group_id AND g.name = 'o';
         DELETE FROM \"{n}\".key_heads;"
    ))
    .await
    .unwrap();
    let tx = raw.transaction().await.unwrap();
    tx.batch_execute(&format!("SELECT \"{n}\".reset_group('s', 'o')"))
        .await
        .unwrap();
    let locks = advisory_locks(&tx).await;
    assert!(
        locks <= 10,
        "a reset of 3 000 keys holds {locks} advisory locks"
    );
    tx.commit().await.unwrap();
    let lines = lines(&raw, &n, "o").await;
    assert_eq!(lines.len(), 6000);
    let ready = lines
        .iter()
        .filter(|(_, _, state)| state == "ready")
        .count();
    assert_eq!(ready, 3000, "one head per key");
}

/// Key locks name their namespace: advisory locks are per database, and two namespaces whose
/// groups have the same id must not wait for (or deadlock with) each other's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_locks_of_another_namespace_do_not_block() {
    let (a, b) = (namespace().await, namespace().await);
    let (na, nb) = (a.namespace().to_owned(), b.namespace().to_owned());
    let mut ra = a.raw().await;
    let rb = b.raw().await;
    let mut ids = vec![];
    for (raw, n) in [(&ra, &na), (&rb, &nb)] {
        raw.batch_execute(&format!(
            "SELECT \"{n}\".create_stream('s');
             SELECT \"{n}\".create_group('s', 'o', ordered => true);"
        ))
        .await
        .unwrap();
        let id: i32 = raw
            .query_one(&format!("SELECT \"{n}\".group_id('s', 'o')"), &[])
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    assert_eq!(ids[0], ids[1], "both namespaces' groups have the same id");
    let tx = ra.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SELECT \"{na}\".publish('s', '{{\"n\": 1}}', key => 'customer-42')"
    ))
    .await
    .unwrap();
    rb.batch_execute(&format!(
        "SET lock_timeout = '2s';
         SELECT \"{nb}\".publish('s', '{{\"n\": 1}}', key => 'customer-42');"
    ))
    .await
    .unwrap();
    tx.commit().await.unwrap();
    for (raw, n) in [(&ra, &na), (&rb, &nb)] {
        assert_eq!(
            lines(raw, n, "o").await,
            [("customer-42".to_owned(), 1, "ready".to_owned())]
        );
    }
}

/// Through the Rust API: one `publish_batch` of 10 000 messages with distinct keys into a stream
/// with an ordered group and a per-key limited group succeeds (a lock per key would fill the
/// server's lock table: about 7 800 entries with the defaults), and every key gets its head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_ten_thousand_keys_publishes() {
    let ns = namespace().await;
    ns.pg
        .create_stream("s", &pgtide::StreamConfig::default())
        .await
        .unwrap();
    ns.pg
        .create_group_with("s", "o", &pgtide::GroupConfig::default().ordered(true))
        .await
        .unwrap();
    ns.pg
        .create_group_with(
            "s",
            "lim",
            &pgtide::GroupConfig::default().max_in_flight_per_key(1),
        )
        .await
        .unwrap();
    let msgs: Vec<pgtide::OutgoingMessage> = (0..10_000)
        .map(|i| {
            pgtide::OutgoingMessage::json(&serde_json::json!({ "n": i }))
                .unwrap()
                .key(format!("customer-{i}"))
        })
        .collect();
    let receipts = ns.pg.publish_batch("s", &msgs).await.unwrap();
    assert_eq!(receipts.len(), 10_000);
    let raw = ns.raw().await;
    let n = ns.namespace().to_owned();
    for group in ["o", "lim"] {
        let ready: i64 = raw
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{n}\".deliveries WHERE \"group\" = $1 AND state = 'ready'"
                ),
                &[&group],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(ready, 10_000, "group {group}: one head per key");
    }
}
