//! Fair groups in the Postgres engine (issue 12.5) through the SQL surface and the Rust API:
//! `create_group(..., fair => true)`, `set_key_weight`, `read()` sharing by weight, the same
//! rule as the Rust API for hostile weights and keys (PT001 at every SQL door), the group list
//! and `key_weights`, and maintenance trimming keys that no longer matter.

use crate::common::{namespace, sqlstate};
use pgtide::{Error, GroupConfig, OutgoingMessage, StreamConfig};

/// Keys of the deliveries `read()` hands out now to group `g` of stream `s`, in claim order.
async fn read_keys(raw: &tokio_postgres::Client, n: &str, g: &str, batch: i32) -> Vec<String> {
    raw.query(
        &format!("SELECT coalesce(key, '-') FROM \"{n}\".read('s', '{g}', 'psql', $1)"),
        &[&batch],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_surface_creates_fair_groups_sets_weights_and_read_shares_by_weight() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_group('s', 'f', fair => true);
         SELECT \"{n}\".create_group('s', 'plain');
         SELECT \"{n}\".set_key_weight('s', 'f', 'b', 3);
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'a') FROM generate_series(1, 100) i;
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'b') FROM generate_series(1, 30) i;
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i)) FROM generate_series(1, 10) i;"
    ))
    .await
    .unwrap();
    // b (weight 3) gets three of every five, a and the unkeyed messages one each.
    let got = read_keys(&raw, &n, "f", 40).await;
    let count = |k: &str| got.iter().filter(|g| *g == k).count();
    assert_eq!(got.len(), 40);
    assert!((22..=26).contains(&count("b")), "{got:?}");
    assert!((6..=10).contains(&count("a")), "{got:?}");
    assert!((6..=10).contains(&count("-")), "{got:?}");
    // An unfair group on the same stream gets the stream's order.
    let plain = read_keys(&raw, &n, "plain", 100).await;
    assert!(plain.iter().all(|k| k == "a"), "{plain:?}");

    // The group list shows it; the weights are readable; NULL resets a weight.
    let fair: bool = raw
        .query_one(
            &format!("SELECT fair FROM \"{n}\"._group_list('s') WHERE \"group\" = 'f'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fair);
    let weights: Vec<(String, f64)> = raw
        .query(
            &format!("SELECT key, weight FROM \"{n}\".key_weights WHERE stream = 's' ORDER BY key"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(weights, vec![("b".to_owned(), 3.0)]);
    raw.batch_execute(&format!(
        "SELECT \"{n}\".set_key_weight('s', 'f', 'b', NULL);
         SELECT \"{n}\".set_key_weight('s', 'f', NULL, 0.5);"
    ))
    .await
    .unwrap();
    let weights: Vec<(String, f64)> = raw
        .query(
            &format!("SELECT key, weight FROM \"{n}\".key_weights WHERE stream = 's' ORDER BY key"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        weights,
        vec![(String::new(), 0.5)],
        "'' is the unkeyed messages"
    );
    let missing: bool = raw
        .query_one(
            &format!("SELECT \"{n}\".set_key_weight('s', 'nope', 'b', 2)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!missing, "false for a group that does not exist");

    // Hostile input at every SQL door: PT001, nothing changed.
    for bad in [
        format!("SELECT \"{n}\".set_key_weight('s', 'f', 'b', 0)"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', 'b', -1)"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', 'b', 0.001)"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', 'b', 1000.01)"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', 'b', 'NaN')"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', 'b', 'Infinity')"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', 'b', '-Infinity')"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', '', 2)"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', E'a\\nb', 2)"),
        format!("SELECT \"{n}\".set_key_weight('s', 'f', repeat('k', 257), 2)"),
        format!("SELECT \"{n}\".set_key_weight('s', 'plain', 'b', 2)"),
        format!("SELECT \"{n}\".set_key_weight('S!', 'f', 'b', 2)"),
        format!("SELECT \"{n}\".create_group('s', 'both', ordered => true, fair => true)"),
        format!("SELECT \"{n}\".create_group('s', 'x', fair => NULL)"),
        format!("SELECT \"{n}\".create_group('s', 'f')"),
        format!("SELECT \"{n}\".create_group('s', 'plain', fair => true)"),
    ] {
        assert_eq!(sqlstate(&raw, &bad).await, "PT001", "{bad}");
    }
    let groups: i64 = raw
        .query_one(&format!("SELECT count(*) FROM \"{n}\".groups"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(groups, 2, "no group made by a refused call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_api_shows_fair_groups_and_weights_and_maintenance_trims_idle_keys() {
    let ns = namespace().await;
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group_with("s", "f", &GroupConfig::default().fair_share(true))
        .await
        .unwrap();
    ns.create_group_with("s", "p", &GroupConfig::default())
        .await
        .unwrap();
    let groups = ns.groups(Some("s")).await.unwrap();
    let fair: Vec<(&str, bool)> = groups
        .iter()
        .map(|g| (g.name.as_str(), g.fair_share))
        .collect();
    assert_eq!(fair, vec![("f", true), ("p", false)]);
    ns.set_key_weight("s", "f", Some("gold"), Some(4.0))
        .await
        .unwrap();
    ns.set_key_weight("s", "f", None, Some(0.25)).await.unwrap();
    let weights = ns.key_weights("s", "f", 10).await.unwrap();
    assert_eq!(weights, vec![(Some("gold".to_owned()), 4.0), (None, 0.25)]);
    for (key, weight) in [
        (Some("gold"), Some(0.0)),
        (Some("gold"), Some(f64::NAN)),
        (Some("gold"), Some(1e9)),
    ] {
        let refused = ns.set_key_weight("s", "f", key, weight).await;
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{weight:?}: {refused:?}"
        );
    }
    let refused = ns
        .set_key_weight("s", "f", Some("a\u{0}b"), Some(2.0))
        .await;
    assert!(matches!(refused, Err(Error::InvalidKey(_))), "{refused:?}");
    let refused = ns.set_key_weight("s", "p", Some("gold"), Some(2.0)).await;
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "{refused:?}"
    );
    let refused = ns
        .set_key_weight("s", "nope", Some("gold"), Some(2.0))
        .await;
    assert!(
        matches!(refused, Err(Error::GroupNotFound { .. })),
        "{refused:?}"
    );

    // 300 keys publish once, then `gold` twenty times, and all is consumed: the 300 rows say
    // nothing any more (V has moved past them); maintenance deletes them and keeps the weights.
    let msgs: Vec<OutgoingMessage> = (0..300)
        .map(|i| {
            OutgoingMessage::json(&serde_json::json!({ "i": i }))
                .unwrap()
                .key(format!("t{i}"))
        })
        .collect();
    ns.publish_batch("s", &msgs).await.unwrap();
    let gold: Vec<OutgoingMessage> = (0..20)
        .map(|i| OutgoingMessage::json(&i).unwrap().key("gold"))
        .collect();
    ns.publish_batch("s", &gold).await.unwrap();
    let c = ns.consumer("s", "f", "c").await.unwrap();
    let mut left = 320;
    while left > 0 {
        let got = c.try_fetch(100).await.unwrap();
        assert!(!got.is_empty(), "{left} left");
        left -= got.len();
        c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
    }
    let raw = ns.raw().await;
    let n = ns.namespace();
    let before: i64 = raw
        .query_one(&format!("SELECT count(*) FROM \"{n}\".fair_keys"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(before >= 301, "{before}");
    ns.maintain().await.unwrap();
    let after: i64 = raw
        .query_one(&format!("SELECT count(*) FROM \"{n}\".fair_keys"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, 2, "maintenance left {after} of {before} rows");
    let weights = ns.key_weights("s", "f", 10).await.unwrap();
    assert_eq!(weights.len(), 2, "weighted keys stay: {weights:?}");
}

/// Publishers of overlapping keys in opposite orders, on two handles with their own pools, into
/// a stream with two fair groups: the keys' row locks are taken in one order (group, then key),
/// so no publish deadlocks; every message reaches each group once, stamped in its keys' lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keyed_publishes_into_fair_groups_never_deadlock() {
    let ns = namespace().await;
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    for g in ["f1", "f2"] {
        ns.create_group_with("s", g, &GroupConfig::default().fair_share(true))
            .await
            .unwrap();
    }
    let other = pgtide::PgBackend::builder(ns.url.clone())
        .namespace(ns.namespace())
        .pool_size(4)
        .build()
        .unwrap();
    let handles = [ns.pg.clone(), other];
    let mut tasks = vec![];
    for t in 0..6usize {
        let pg = handles[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..30usize {
                // Half the publishers list the keys forwards, half backwards; some batches
                // leave the key out (the key '').
                let mut keys: Vec<Option<String>> = (0..5).map(|k| Some(format!("k{k}"))).collect();
                keys.push(None);
                if t % 2 == 1 {
                    keys.reverse();
                }
                let msgs: Vec<OutgoingMessage> = keys
                    .iter()
                    .map(|k| {
                        let m = OutgoingMessage::json(&serde_json::json!({"t": t, "r": round}))
                            .unwrap();
                        match k {
                            Some(k) => m.key(k.clone()),
                            None => m,
                        }
                    })
                    .collect();
                pg.publish_batch("s", &msgs).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for g in ["f1", "f2"] {
        let c = ns.consumer("s", g, "c").await.unwrap();
        let mut seen = std::collections::HashSet::new();
        loop {
            let got = c.try_fetch(100).await.unwrap();
            if got.is_empty() {
                break;
            }
            for d in &got {
                assert!(seen.insert(d.id()), "{g}: {} twice", d.id());
            }
            c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
        }
        assert_eq!(seen.len(), 6 * 30 * 6, "{g}: every message once");
    }
}

/// `streams.fair` (migration 0014), which lets `_publish_batch` skip the fair path, follows the
/// stream's fair groups through creations and deletions, also when a fair group is created and
/// another deleted at once; a stream that gains a fair group stamps its next publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streams_fair_flag_follows_its_fair_groups() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    let flag = |stream: &'static str| {
        let raw = &raw;
        let sql = format!("SELECT fair FROM \"{n}\".streams WHERE name = '{stream}'");
        async move { raw.query_one(&sql, &[]).await.unwrap().get::<_, bool>(0) }
    };
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_stream('other');
         SELECT \"{n}\".create_group('s', 'plain');"
    ))
    .await
    .unwrap();
    assert!(!flag("s").await);
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_group('s', 'f1', fair => true);
         SELECT \"{n}\".create_group('s', 'f2', fair => true);
         SELECT \"{n}\".create_group('other', 'f', fair => true);"
    ))
    .await
    .unwrap();
    assert!(flag("s").await && flag("other").await);
    // Published through `_publish_batch` (the Rust API): the fair groups get their deliveries.
    ns.publish_batch(
        "s",
        &[
            OutgoingMessage::json(&1).unwrap(),
            OutgoingMessage::json(&2).unwrap(),
        ],
    )
    .await
    .unwrap();
    for g in ["f1", "f2", "plain"] {
        assert_eq!(ns.stats("s", g).await.unwrap().ready, 2, "group {g}");
    }
    raw.batch_execute(&format!("SELECT \"{n}\".delete_group('s', 'f1')"))
        .await
        .unwrap();
    assert!(flag("s").await, "f2 is still fair");
    raw.batch_execute(&format!("SELECT \"{n}\".delete_group('s', 'f2')"))
        .await
        .unwrap();
    assert!(!flag("s").await);
    assert!(flag("other").await);

    // A fair group created while another is deleted, in two sessions at once: whichever
    // commits last sees the other's change.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_group('s', 'old', fair => true)"
    ))
    .await
    .unwrap();
    let (a, b) = (ns.raw().await, ns.raw().await);
    a.batch_execute(&format!(
        "BEGIN; SELECT \"{n}\".create_group('s', 'new', fair => true)"
    ))
    .await
    .unwrap();
    let deleting = {
        let n = n.clone();
        tokio::spawn(async move {
            b.batch_execute(&format!("SELECT \"{n}\".delete_group('s', 'old')"))
                .await
                .unwrap();
        })
    };
    // The deletion waits for the creation's row lock on the stream.
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND query LIKE '%\"{n}\".delete_group(''s'', ''old'')%'"
    );
    tokio::time::timeout(crate::common::WAIT, async {
        while raw.query_one(&waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
            assert!(
                !deleting.is_finished(),
                "delete_group did not wait for the stream's row lock"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("delete_group never waited for the stream's row lock");
    a.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(crate::common::WAIT, deleting)
        .await
        .unwrap()
        .unwrap();
    assert!(
        flag("s").await,
        "the fair group created meanwhile is still there"
    );
}
