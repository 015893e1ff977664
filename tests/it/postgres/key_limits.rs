//! The per-key concurrency limit in the Postgres engine (issue 12): the SQL surface
//! (`create_group(..., max_in_flight_per_key => n)`, `set_max_in_flight_per_key`, `read()`), the
//! same rule as the Rust API for hostile values, changing the limit over a backlog, lease
//! expiry, and every settle moving a key on (or keeping its place).

use std::collections::HashMap;
use std::time::Duration;

use pgtide::{Error, GroupConfig, OutgoingMessage, StreamConfig};

use crate::common::{namespace, sqlstate};

/// What `read()` hands `psql` from group `g` of stream `s` now, counted by key (`-`: none).
async fn read_keys(raw: &tokio_postgres::Client, n: &str, g: &str) -> HashMap<String, i64> {
    let rows = raw
        .query(
            &format!("SELECT key FROM \"{n}\".read('s', '{g}', 'psql', 100)"),
            &[],
        )
        .await
        .unwrap();
    let mut out = HashMap::new();
    for r in rows {
        let k: Option<String> = r.get(0);
        *out.entry(k.unwrap_or_else(|| "-".into())).or_default() += 1;
    }
    out
}

fn counts(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

/// Deliveries of group `g` in the `deliveries` view's state `state`.
async fn in_state(raw: &tokio_postgres::Client, n: &str, g: &str, state: &str) -> i64 {
    raw.query_one(
        &format!(
            "SELECT count(*) FROM \"{n}\".deliveries WHERE \"group\" = '{g}' AND state = '{state}'"
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_surface_sets_changes_and_removes_per_key_limits() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_group('s', 'g', max_in_flight_per_key => 2);
         SELECT \"{n}\".create_group('s', 'later');
         SELECT \"{n}\".create_group('s', 'free');
         SELECT \"{n}\".create_group('s', 'o', ordered => true, max_in_flight_per_key => 1);
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'a') FROM generate_series(1, 8) i;
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'b') FROM generate_series(1, 3) i;
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i)) FROM generate_series(1, 2) i;"
    ))
    .await
    .unwrap();
    // Two of each key, every unkeyed message; the rest wait in their keys' lines.
    assert_eq!(
        read_keys(&raw, &n, "g").await,
        counts(&[("a", 2), ("b", 2), ("-", 2)])
    );
    assert_eq!(read_keys(&raw, &n, "g").await, HashMap::new());
    assert_eq!(in_state(&raw, &n, "g", "waiting").await, 7);
    assert_eq!(
        read_keys(&raw, &n, "free").await,
        counts(&[("a", 8), ("b", 3), ("-", 2)]),
        "other groups unaffected"
    );
    assert_eq!(
        read_keys(&raw, &n, "o").await,
        counts(&[("a", 1), ("b", 1), ("-", 2)]),
        "an ordered group with 1: one per key"
    );

    // The group list shows it.
    let rows = raw
        .query(
            &format!(
                "SELECT \"group\", max_in_flight_per_key FROM \"{n}\"._group_list('s') ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap();
    let listed: Vec<(String, Option<i32>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        listed,
        [
            ("free".into(), None),
            ("g".into(), Some(2)),
            ("later".into(), None),
            ("o".into(), Some(1))
        ]
    );

    // An ack by SQL makes room for one more of its key.
    let a: Vec<(uuid::Uuid, i64)> = raw
        .query(
            &format!(
                "SELECT message_id, lease_token FROM \"{n}\".delivery_state d
                 WHERE d.key = 'a' AND d.consumer = 'psql'
                   AND d.group_id = \"{n}\".group_id('s', 'g') LIMIT 1"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let acked: i32 = raw
        .query_one(
            &format!("SELECT \"{n}\".ack('s', 'g', $1, $2)"),
            &[&vec![a[0].0], &vec![a[0].1]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(acked, 1);
    assert_eq!(read_keys(&raw, &n, "g").await, counts(&[("a", 1)]));

    // Raised: the lines move up at once. Removed: every waiting delivery goes.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".set_max_in_flight_per_key('s', 'g', 4)"
    ))
    .await
    .unwrap();
    assert_eq!(
        read_keys(&raw, &n, "g").await,
        counts(&[("a", 2), ("b", 1)])
    );
    raw.batch_execute(&format!(
        "SELECT \"{n}\".set_max_in_flight_per_key('s', 'g', NULL)"
    ))
    .await
    .unwrap();
    assert_eq!(read_keys(&raw, &n, "g").await, counts(&[("a", 3)]));
    assert_eq!(in_state(&raw, &n, "g", "waiting").await, 0);
    // Publishes after the removal are plain deliveries.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'a') FROM generate_series(1, 3) i"
    ))
    .await
    .unwrap();
    assert_eq!(read_keys(&raw, &n, "g").await, counts(&[("a", 3)]));

    // Set over a backlog: each key keeps its first, the rest wait (the new messages too).
    raw.batch_execute(&format!(
        "SELECT \"{n}\".set_max_in_flight_per_key('s', 'later', 1)"
    ))
    .await
    .unwrap();
    assert_eq!(in_state(&raw, &n, "later", "waiting").await, 10 + 2);
    assert_eq!(
        read_keys(&raw, &n, "later").await,
        counts(&[("a", 1), ("b", 1), ("-", 2)])
    );
    // Reset: skipping the backlog empties the lines; from the oldest, the whole stream is
    // queued again behind the keys' heads.
    ns.pg
        .reset_group("s", "later", Some(chrono::Utc::now()))
        .await
        .unwrap();
    assert_eq!(in_state(&raw, &n, "later", "waiting").await, 0);
    assert_eq!(read_keys(&raw, &n, "later").await, HashMap::new());
    ns.pg.reset_group("s", "later", None).await.unwrap();
    assert_eq!(in_state(&raw, &n, "later", "waiting").await, 12);
    assert_eq!(
        read_keys(&raw, &n, "later").await,
        counts(&[("a", 1), ("b", 1), ("-", 2)])
    );

    // Hostile values: the Rust API's rule, PT001, nothing changed.
    for bad in [
        "set_max_in_flight_per_key('s', 'g', 0)".to_owned(),
        "set_max_in_flight_per_key('s', 'g', -1)".to_owned(),
        "set_max_in_flight_per_key('s', 'o', 2)".to_owned(),
        "set_max_in_flight_per_key('bad name', 'g', 2)".to_owned(),
        "set_max_in_flight_per_key('s', NULL, 2)".to_owned(),
        "create_group('s', 'x', max_in_flight_per_key => 0)".to_owned(),
        "create_group('s', 'y', ordered => true, max_in_flight_per_key => 2)".to_owned(),
    ] {
        assert_eq!(
            sqlstate(&raw, &format!("SELECT \"{n}\".{bad}")).await,
            "PT001",
            "{bad}"
        );
    }
    let missing: bool = raw
        .query_one(
            &format!("SELECT \"{n}\".set_max_in_flight_per_key('s', 'nope', 1)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!missing);
    let groups = ns.pg.groups(Some("s")).await.unwrap();
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["free", "g", "later", "o"], "nothing created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_api_validates_and_shows_per_key_limits() {
    let ns = namespace().await;
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group_with("s", "g", &GroupConfig::default().max_in_flight_per_key(5))
        .await
        .unwrap();
    ns.create_group_with("s", "o", &GroupConfig::default().ordered(true))
        .await
        .unwrap();
    for bad in [Some(0), Some(u32::MAX), Some(i32::MAX as u32 + 1)] {
        let refused = ns.pg.set_max_in_flight_per_key("s", "g", bad).await;
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{refused:?}"
        );
    }
    let refused = ns.pg.set_max_in_flight_per_key("s", "o", Some(2)).await;
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "{refused:?}"
    );
    ns.pg
        .set_max_in_flight_per_key("s", "o", Some(1))
        .await
        .unwrap();
    let missing = ns.pg.set_max_in_flight_per_key("s", "nope", Some(1)).await;
    assert!(
        matches!(missing, Err(Error::GroupNotFound { .. })),
        "{missing:?}"
    );
    let bad_name = ns.pg.set_max_in_flight_per_key("s", "no pe", Some(1)).await;
    assert!(
        matches!(bad_name, Err(Error::InvalidName { .. })),
        "{bad_name:?}"
    );
    let limits = |groups: Vec<pgtide::GroupInfo>| -> Vec<Option<u32>> {
        groups.iter().map(|g| g.max_in_flight_per_key).collect()
    };
    assert_eq!(
        limits(ns.pg.groups(Some("s")).await.unwrap()),
        [Some(5), Some(1)]
    );
    ns.pg
        .set_max_in_flight_per_key("s", "g", None)
        .await
        .unwrap();
    assert_eq!(
        limits(ns.pg.groups(Some("s")).await.unwrap()),
        [None, Some(1)]
    );
}

fn keyed(key: &str, n: u32) -> OutgoingMessage {
    OutgoingMessage::json(&serde_json::json!({ "n": n }))
        .unwrap()
        .key(key)
}

/// With one per key: a lease that runs out frees the key's place (the delivery is claimed
/// again, not the next of the key, and the stale handle cannot settle it); a nack with a delay
/// keeps the place until the retry; a term, an ack and a release move on as they should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_frees_the_place_and_settles_move_the_key_on() {
    let ns = namespace().await;
    ns.create_stream(
        "s",
        &StreamConfig::default()
            .lease(Duration::from_secs(1))
            .max_deliver(10),
    )
    .await
    .unwrap();
    ns.create_group_with("s", "g", &GroupConfig::default().max_in_flight_per_key(1))
        .await
        .unwrap();
    let msgs: Vec<OutgoingMessage> = (0..4).map(|i| keyed("a", i)).collect();
    let ids: Vec<uuid::Uuid> = ns
        .pg
        .publish_batch("s", &msgs)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    let c1 = ns.pg.consumer("s", "g", "c1").await.unwrap();
    let c2 = ns.pg.consumer("s", "g", "c2").await.unwrap();
    let first = c1.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].id(), ids[0]);
    assert!(c2.try_fetch(10).await.unwrap().is_empty());

    // c1 "dies": its lease runs out and the same delivery goes to c2.
    let again = c2.fetch(10, Duration::from_secs(10)).await.unwrap();
    assert_eq!(again.len(), 1, "the place was freed by the lease's end");
    assert_eq!((again[0].id(), again[0].attempt), (ids[0], 2));
    let stale = c1.ack(&first[0]).await;
    assert!(matches!(stale, Err(Error::LeaseLost { .. })), "{stale:?}");
    c2.ack(&again[0]).await.unwrap();

    // An ack moved the key on; a delayed nack keeps the place until the retry.
    let second = c1.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(second.iter().map(|d| d.id()).collect::<Vec<_>>(), [ids[1]]);
    c1.nack(&second[0], Some(Duration::from_secs(60)), None)
        .await
        .unwrap();
    assert!(
        c2.try_fetch(10).await.unwrap().is_empty(),
        "still its key's"
    );
    let stats = ns.pg.stats("s", "g").await.unwrap();
    assert_eq!((stats.delayed, stats.ready), (1, 2));

    // A release hands it back, due now; a term moves on.
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "UPDATE \"{}\".delivery_state SET visible_at = now() WHERE message_id = '{}'",
        ns.namespace(),
        ids[1]
    ))
    .await
    .unwrap();
    let retried = c2.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(retried.iter().map(|d| d.id()).collect::<Vec<_>>(), [ids[1]]);
    c2.release_batch(&[&retried[0]]).await.unwrap();
    let back = c1.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(back.iter().map(|d| d.id()).collect::<Vec<_>>(), [ids[1]]);
    c1.term(&back[0], "bad").await.unwrap();
    let third = c2.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(third.iter().map(|d| d.id()).collect::<Vec<_>>(), [ids[2]]);
    c2.ack(&third[0]).await.unwrap();
    let last = c1.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(last.iter().map(|d| d.id()).collect::<Vec<_>>(), [ids[3]]);
    c1.ack(&last[0]).await.unwrap();
    let stats = ns.pg.stats("s", "g").await.unwrap();
    assert_eq!(
        (stats.ready, stats.delayed, stats.in_flight, stats.dead),
        (0, 0, 0, 1)
    );
}

/// With the group's `max_in_flight` the group's room bounds a claim first; with a per-key rate a
/// head put off for want of tokens keeps its key's place (as a pause does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limit_combines_with_max_in_flight_and_rate_limits() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_group('s', 'capped', max_in_flight => 3, max_in_flight_per_key => 2);
         SELECT \"{n}\".create_group('s', 'rated', key_rate => 1.0 / 60, max_in_flight_per_key => 2);
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'a') FROM generate_series(1, 5) i;
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'b') FROM generate_series(1, 5) i;"
    ))
    .await
    .unwrap();
    let got = read_keys(&raw, &n, "capped").await;
    assert_eq!(got.values().sum::<i64>(), 3, "the group's room: {got:?}");
    assert!(got.values().all(|&k| k <= 2), "{got:?}");
    assert_eq!(read_keys(&raw, &n, "capped").await, HashMap::new());

    // One token per key a minute: one of each key claimed, its second head put off (delayed,
    // holding the key's place), the rest waiting in the lines.
    assert_eq!(
        read_keys(&raw, &n, "rated").await,
        counts(&[("a", 1), ("b", 1)])
    );
    assert_eq!(read_keys(&raw, &n, "rated").await, HashMap::new());
    assert_eq!(in_state(&raw, &n, "rated", "in_flight").await, 2);
    assert_eq!(in_state(&raw, &n, "rated", "delayed").await, 2);
    assert_eq!(in_state(&raw, &n, "rated", "waiting").await, 6);
}

/// The limit set, raised and removed over and over while another handle publishes keyed
/// messages and consumers drain them: no publish is lost or left waiting in a line with no head
/// (every message is handled, each once), and nothing deadlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_limit_under_load_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};

    let ns = namespace().await;
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group_with("s", "g", &GroupConfig::default().max_in_flight_per_key(1))
        .await
        .unwrap();
    let other = pgtide::PgBackend::builder(ns.url.clone())
        .namespace(ns.namespace())
        .pool_size(4)
        .build()
        .unwrap();
    let total = 400usize;
    let done = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(async move {
        let mut ids = vec![];
        for chunk in 0..(total / 10) {
            let msgs: Vec<OutgoingMessage> = (0..10)
                .map(|i| keyed(&format!("k{}", (chunk + i) % 7), i as u32))
                .collect();
            for r in other.publish_batch("s", &msgs).await.unwrap() {
                ids.push(r.id);
            }
        }
        ids
    });
    let toggling = {
        let (pg, done) = (ns.pg.clone(), done.clone());
        tokio::spawn(async move {
            let settings = [None, Some(2), Some(1), None, Some(3)];
            let mut i = 0;
            while !done.load(SeqCst) {
                pg.set_max_in_flight_per_key("s", "g", settings[i % settings.len()])
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    let seen: Arc<Mutex<Vec<uuid::Uuid>>> = Arc::default();
    let mut consumers = vec![];
    for c in 0..3 {
        let c = ns.pg.consumer("s", "g", &format!("c{c}")).await.unwrap();
        let (seen, done) = (seen.clone(), done.clone());
        consumers.push(tokio::spawn(async move {
            while !done.load(SeqCst) {
                let batch = c.fetch(10, Duration::from_millis(200)).await.unwrap();
                for d in &batch {
                    c.ack(d).await.unwrap();
                    seen.lock().unwrap().push(d.id());
                }
            }
        }));
    }
    let published = publishing.await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while seen.lock().unwrap().len() < total {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {total} handled: some delivery was lost or stuck",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, SeqCst);
    let toggles = toggling.await.unwrap();
    for c in consumers {
        c.await.unwrap();
    }
    assert!(toggles > 3, "the limit changed {toggles} times");
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let mut published = published;
    published.sort();
    assert_eq!(seen, published, "each message handled once");
    let stats = ns.pg.stats("s", "g").await.unwrap();
    assert_eq!((stats.ready, stats.delayed, stats.in_flight), (0, 0, 0));
}
