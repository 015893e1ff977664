//! Every hot statement keeps an O(batch) plan whatever the plan cache picks and whatever the
//! statistics say.
//!
//! A large backlog is loaded and analysed, then each statement the engine prepares (the files in
//! `sql/`) and each SQL-surface function runs in a session with a hostile planner: generic plans
//! forced (the plan cache's choice after a few executions, which cannot see `LIMIT $n`), random
//! I/O priced as if on a slow disk (which favours hash joins over whole-group scans) and default
//! JIT thresholds. `auto_explain` sends the actual plan of every nested statement back as a notice;
//! each plan must not JIT, must not seq-scan or bitmap-scan the queue tables, must not hash them,
//! and no node over them may read more than a small multiple of the batch.

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

use crate::common::namespace;
use pgtide::StreamConfig;

pub(super) const BACKLOG: i64 = 200_000;
pub(super) const BATCH: i32 = 10;
/// Rows any plan node over a queue table may touch for a batch of ten.
const ROW_LIMIT: f64 = 1_000.0;
/// A claim without a floor (the engine's sweeps, and SQL `read`).
pub(super) const NO_FLOOR: Option<chrono::DateTime<chrono::Utc>> = None;
/// Claims commit without waiting for the flush (the engine's default, `synchronous_claims(false)`).
pub(super) const ASYNC_CLAIM: bool = true;

/// Tables whose size grows with the backlog or the history.
fn is_queue_table(relation: &str) -> bool {
    relation == "delivery_state"
        || relation == "dead_letter_state"
        || relation == "dedupe"
        || relation == "fair_keys"
        || relation.starts_with("messages")
}

/// Everything wrong with one plan (a node and its children).
fn check_node(node: &Value, hashed: bool, what: &str, faults: &mut Vec<String>) {
    let kind = node["Node Type"].as_str().unwrap_or("");
    let relation = node["Relation Name"].as_str().unwrap_or("");
    if is_queue_table(relation) {
        if kind == "Seq Scan" || kind.starts_with("Bitmap") {
            faults.push(format!("{what}: {kind} on {relation}"));
        }
        if hashed {
            faults.push(format!("{what}: hash built over {relation}"));
        }
        let loops = node["Actual Loops"].as_f64().unwrap_or(1.0);
        let read = node["Actual Rows"].as_f64().unwrap_or(0.0) * loops
            + node["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
            + node["Rows Removed by Index Recheck"]
                .as_f64()
                .unwrap_or(0.0);
        if read > ROW_LIMIT {
            faults.push(format!("{what}: {kind} on {relation} read {read} rows"));
        }
    }
    let hashed = hashed || kind == "Hash" || kind == "Merge Join";
    if let Some(children) = node["Plans"].as_array() {
        for child in children {
            check_node(child, hashed, what, faults);
        }
    }
}

/// A session with auto_explain reporting every nested plan as a JSON notice.
pub(super) async fn explaining_session(
    url: &str,
) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notice(notice) = message {
                let _ = tx.send(notice.message().to_owned());
            }
        }
    });
    client
        .batch_execute(
            "LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_analyze = on;
             SET auto_explain.log_timing = off;
             SET auto_explain.log_format = json;
             SET auto_explain.log_level = notice;
             SET client_min_messages = notice;
             SET plan_cache_mode = force_generic_plan;
             SET random_page_cost = 100;
             SET jit = on;
             SET jit_above_cost = 100000;",
        )
        .await
        .unwrap();
    (client, rx)
}

/// Checks every plan reported so far for the statement `what`.
pub(super) fn check_plans(
    rx: &mut mpsc::UnboundedReceiver<String>,
    what: &str,
    faults: &mut Vec<String>,
) {
    let mut seen = 0;
    while let Ok(notice) = rx.try_recv() {
        let Some(json) = notice.split_once("plan:").map(|(_, j)| j.trim()) else {
            continue;
        };
        let explained: Value = serde_json::from_str(json).unwrap();
        seen += 1;
        if explained.get("JIT").is_some() {
            let text = explained["Query Text"].as_str().unwrap_or("");
            faults.push(format!("{what}: JIT compiled {:.60}", text.trim()));
        }
        check_node(&explained["Plan"], false, what, faults);
    }
    assert!(seen > 0, "{what}: auto_explain reported no plan");
}

/// The claimed rows of an `ack_and_fetch` (`sql/ack_claim.sql`): those with an id (the acked ids
/// come in a first row without one).
pub(super) fn claimed_rows(rows: Vec<tokio_postgres::Row>) -> Vec<tokio_postgres::Row> {
    rows.into_iter()
        .filter(|r| r.get::<_, Option<Uuid>>("id").is_some())
        .collect()
}

pub(super) fn render(sql: &str, ns: &str) -> String {
    sql.replace("@ns@", &format!("\"{ns}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_statements_stay_o_batch_under_generic_plans_and_hostile_costs() {
    let ns = namespace().await;
    ns.stream_with_groups("plans", StreamConfig::default(), &["g"])
        .await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    // The backlog, loaded in bulk: a ready delivery per message, oldest first.
    raw.batch_execute(&format!(
        "INSERT INTO \"{n}\".messages (stream_id, id, payload, is_json)
         SELECT s.id, \"{n}\".uuid_v7(now() - (({BACKLOG} - i) * interval '1 ms')), '{{\"n\": 1}}', true
         FROM \"{n}\".streams s, generate_series(1, {BACKLOG}) i WHERE s.name = 'plans';
         INSERT INTO \"{n}\".delivery_state (group_id, message_id, visible_at)
         SELECT g.id, m.id, \"{n}\".uuid_time(m.id) - interval '1 hour'
         FROM \"{n}\".groups g JOIN \"{n}\".messages m ON m.stream_id = g.stream_id;
         INSERT INTO \"{n}\".counter_deltas (group_id, pending) SELECT id, {BACKLOG} FROM \"{n}\".groups;
         ANALYZE \"{n}\".messages, \"{n}\".delivery_state, \"{n}\".streams, \"{n}\".groups;"
    ))
    .await
    .unwrap();
    let group: i32 = raw
        .query_one(&format!("SELECT id FROM \"{n}\".groups"), &[])
        .await
        .unwrap()
        .get(0);

    let (s, mut rx) = explaining_session(&ns.url).await;
    let mut faults = vec![];
    let lease_us: i64 = 30_000_000;
    let claim = render(include_str!("../../../sql/claim.sql"), &n);
    let ack_claim = render(include_str!("../../../sql/ack_claim.sql"), &n);
    let ack = render(include_str!("../../../sql/ack.sql"), &n);
    let nack = render(include_str!("../../../sql/nack.sql"), &n);
    let term = render(include_str!("../../../sql/term.sql"), &n);
    let extend = render(include_str!("../../../sql/extend.sql"), &n);
    let release = render(include_str!("../../../sql/release.sql"), &n);
    let publish = render(include_str!("../../../sql/publish.sql"), &n);
    let publish_one = render(include_str!("../../../sql/publish_one.sql"), &n);
    let stats = render(include_str!("../../../sql/stats.sql"), &n);
    let scout_due = render(include_str!("../../../sql/scout_due.sql"), &n);

    // Twice: the second round runs on plans the session has cached.
    for round in 0..2 {
        let rows = s
            .query(
                &claim,
                &[&group, &BATCH, &"c1", &lease_us, &NO_FLOOR, &ASYNC_CLAIM],
            )
            .await
            .unwrap();
        check_plans(&mut rx, "claim", &mut faults);
        assert_eq!(rows.len(), BATCH as usize, "claim returned a short batch");
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get("id")).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.get("attempt")).collect();
        let tokens: Vec<i64> = rows.iter().map(|r| r.get("lease_token")).collect();

        let extended = s
            .query(&extend, &[&group, &ids, &attempts, &tokens, &lease_us])
            .await
            .unwrap();
        assert_eq!(extended.len(), ids.len());
        check_plans(&mut rx, "extend", &mut faults);

        let acked = s
            .query(
                &ack,
                &[
                    &group,
                    &ids[0..2].to_vec(),
                    &attempts[0..2].to_vec(),
                    &tokens[0..2].to_vec(),
                ],
            )
            .await
            .unwrap();
        assert_eq!(acked.len(), 2);
        check_plans(&mut rx, "ack", &mut faults);

        let delays: Vec<i64> = vec![60_000_000; 2];
        let errors: Vec<String> = vec!["boom".into(); 2];
        let nacked = s
            .query(
                &nack,
                &[
                    &group,
                    &ids[2..4].to_vec(),
                    &attempts[2..4].to_vec(),
                    &tokens[2..4].to_vec(),
                    &delays,
                    &errors,
                ],
            )
            .await
            .unwrap();
        assert_eq!(nacked.len(), 2);
        check_plans(&mut rx, "nack", &mut faults);

        let reasons: Vec<String> = vec!["bad".into(); 2];
        let termed = s
            .query(
                &term,
                &[
                    &group,
                    &ids[4..6].to_vec(),
                    &attempts[4..6].to_vec(),
                    &tokens[4..6].to_vec(),
                    &reasons,
                ],
            )
            .await
            .unwrap();
        assert_eq!(termed.len(), 2);
        check_plans(&mut rx, "term", &mut faults);

        let released = s
            .query(
                &release,
                &[
                    &group,
                    &ids[6..8].to_vec(),
                    &attempts[6..8].to_vec(),
                    &tokens[6..8].to_vec(),
                ],
            )
            .await
            .unwrap();
        assert_eq!(released.len(), 2);
        check_plans(&mut rx, "release", &mut faults);

        // Acks of the last two riding with the next claim.
        let rows = s
            .query(
                &ack_claim,
                &[
                    &group,
                    &ids[8..10].to_vec(),
                    &attempts[8..10].to_vec(),
                    &BATCH,
                    &"c1",
                    &lease_us,
                    &tokens[8..10].to_vec(),
                    &NO_FLOOR,
                    &ASYNC_CLAIM,
                ],
            )
            .await
            .unwrap();
        assert_eq!(claimed_rows(rows).len(), BATCH as usize);
        check_plans(&mut rx, "ack_and_fetch", &mut faults);

        // The same with a claim floor (src/postgres/floor.rs) in the middle of the backlog:
        // the walk starts there, and the floor is an index bound, not a filter.
        let floor: Option<chrono::DateTime<chrono::Utc>> = s
            .query_one("SELECT now() - interval '1 hour' - interval '100 s'", &[])
            .await
            .unwrap()
            .get(0);
        let rows = s
            .query(
                &claim,
                &[&group, &BATCH, &"c1", &lease_us, &floor, &ASYNC_CLAIM],
            )
            .await
            .unwrap();
        check_plans(&mut rx, "floored claim", &mut faults);
        assert_eq!(
            rows.len(),
            BATCH as usize,
            "floored claim returned a short batch"
        );
        let dues: Vec<chrono::DateTime<chrono::Utc>> =
            rows.iter().map(|r| r.get("due_at")).collect();
        assert!(
            dues.iter().all(|d| Some(*d) >= floor),
            "floored claim returned rows below its floor"
        );
        let f_ids: Vec<Uuid> = rows.iter().map(|r| r.get("id")).collect();
        let f_attempts: Vec<i32> = rows.iter().map(|r| r.get("attempt")).collect();
        let f_tokens: Vec<i64> = rows.iter().map(|r| r.get("lease_token")).collect();
        let rows = s
            .query(
                &ack_claim,
                &[
                    &group,
                    &f_ids,
                    &f_attempts,
                    &BATCH,
                    &"c1",
                    &lease_us,
                    &f_tokens,
                    &floor,
                    &ASYNC_CLAIM,
                ],
            )
            .await
            .unwrap();
        assert_eq!(claimed_rows(rows).len(), BATCH as usize);
        check_plans(&mut rx, "floored ack_and_fetch", &mut faults);

        let new_ids: Vec<Uuid> = (0..BATCH).map(|_| Uuid::now_v7()).collect();
        let payloads: Vec<Vec<u8>> = vec![b"{}".to_vec(); BATCH as usize];
        let is_json = vec![true; BATCH as usize];
        let headers: Vec<Option<Value>> = vec![None; BATCH as usize];
        let deliver_at: Vec<Option<chrono::DateTime<chrono::Utc>>> = vec![None; BATCH as usize];
        let delay: Vec<Option<i64>> = vec![None; BATCH as usize];
        let priority = vec![0i32; BATCH as usize];
        s.query(
            &publish,
            &[
                &"plans",
                &new_ids,
                &payloads,
                &is_json,
                &headers,
                &deliver_at,
                &delay,
                &priority,
            ],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "publish", &mut faults);

        let key = format!("k{round}");
        s.query(
            &publish_one,
            &[
                &"plans",
                &Uuid::now_v7(),
                &b"{}".to_vec(),
                &true,
                &None::<Value>,
                &None::<chrono::DateTime<chrono::Utc>>,
                &None::<i64>,
                &key,
                &0i32,
                &None::<String>,
            ],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "publish with dedupe key", &mut faults);

        s.query(&stats, &[]).await.unwrap();
        check_plans(&mut rx, "stats", &mut faults);

        let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
        s.query(&scout_due, &[&hour_ago]).await.unwrap();
        check_plans(&mut rx, "scout due", &mut faults);

        // The SQL surface a psql or other-language consumer uses.
        let read = s
            .query(
                &format!("SELECT id FROM \"{n}\".read('plans', 'g', 'psql', $1)"),
                &[&BATCH],
            )
            .await
            .unwrap();
        assert_eq!(read.len(), BATCH as usize);
        check_plans(&mut rx, "SQL read", &mut faults);
        let read_ids: Vec<Uuid> = read.iter().map(|r| r.get(0)).collect();
        for (call, what) in [
            ("in_progress('plans', 'g', $1::uuid[])", "SQL in_progress"),
            ("extend('plans', 'g', $1::uuid[])", "SQL extend"),
            (
                "nack('plans', 'g', ($1::uuid[])[1:3], delay => interval '1 minute')",
                "SQL nack",
            ),
            ("term('plans', 'g', ($1::uuid[])[4:6])", "SQL term"),
            ("ack('plans', 'g', ($1::uuid[])[7:10])", "SQL ack"),
        ] {
            s.query(&format!("SELECT \"{n}\".{call}"), &[&read_ids])
                .await
                .unwrap();
            check_plans(&mut rx, what, &mut faults);
        }
        s.query(
            &format!("SELECT \"{n}\".release_consumer('plans', 'g', 'c1')"),
            &[],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "SQL release_consumer", &mut faults);
        s.query(
            &format!("SELECT \"{n}\".publish('plans', '{{}}', dedupe_key => $1)"),
            &[&format!("sql{round}")],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "SQL publish", &mut faults);
    }
    assert!(
        faults.is_empty(),
        "O(backlog) plans:\n{}",
        faults.join("\n")
    );
}

/// The same for an ordered group with a concurrency limit (issue 12): a backlog of 200 000 over
/// 1 000 keys, a head per key and the rest waiting in the keys' lines. Claims must still walk only the batch, and the
/// statements that move a key on (`_advance_keys` under ack, term and dead letters) or queue a
/// keyed message (`_enqueue_keyed` under publish) must look lines up by index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_group_statements_stay_o_batch_under_generic_plans_and_hostile_costs() {
    // With a concurrency limit too, so the claim also counts the group's leases.
    keyed_group_statements_stay_o_batch(
        pgtide::GroupConfig::default()
            .ordered(true)
            .max_in_flight(1000),
        1,
    )
    .await;
}

/// The same for a group with a per-key concurrency limit (`max_in_flight_per_key = 3`): three
/// heads per key, counted through `delivery_state_key_slots` when a publish or a settle makes
/// another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limited_group_statements_stay_o_batch_under_generic_plans_and_hostile_costs() {
    keyed_group_statements_stay_o_batch(pgtide::GroupConfig::default().max_in_flight_per_key(3), 3)
        .await;
}

/// The statements of a group with key lines (`config`, group "o"), `heads` of each key's 200
/// deliveries at its head.
async fn keyed_group_statements_stay_o_batch(config: pgtide::GroupConfig, heads: i64) {
    let ns = namespace().await;
    ns.create_stream("plans", &StreamConfig::default().max_deliver(3))
        .await
        .unwrap();
    let limited = if config.ordered { "NULL" } else { "true" };
    ns.create_group_with("plans", "o", &config).await.unwrap();
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "INSERT INTO \"{n}\".messages (stream_id, id, payload, is_json, key)
         SELECT s.id, \"{n}\".uuid_v7(now() - (({BACKLOG} - i) * interval '1 ms')), '{{\"n\": 1}}', true,
                'k' || (i % 1000)
         FROM \"{n}\".streams s, generate_series(1, {BACKLOG}) i WHERE s.name = 'plans';
         INSERT INTO \"{n}\".delivery_state (group_id, message_id, visible_at, key, key_seq, key_limited)
         SELECT g.id, m.id,
                \"{n}\".uuid_time(m.id) - interval '1 hour'
                  + CASE WHEN row_number() OVER (PARTITION BY m.key ORDER BY m.id) <= {heads} THEN interval '0'
                         ELSE \"{n}\"._parked_offset() END,
                m.key, row_number() OVER (ORDER BY m.id), {limited}::boolean
         FROM \"{n}\".groups g JOIN \"{n}\".messages m ON m.stream_id = g.stream_id;
         INSERT INTO \"{n}\".key_heads (group_id, key)
         SELECT DISTINCT d.group_id, d.key FROM \"{n}\".delivery_state d
         JOIN \"{n}\".groups g ON g.id = d.group_id WHERE g.ordered;
         SELECT setval('\"{n}\".key_seq', {BACKLOG});
         INSERT INTO \"{n}\".counter_deltas (group_id, pending) SELECT id, {BACKLOG} FROM \"{n}\".groups;
         ANALYZE \"{n}\".messages, \"{n}\".delivery_state, \"{n}\".streams, \"{n}\".groups;"
    ))
    .await
    .unwrap();
    let group: i32 = raw
        .query_one(&format!("SELECT id FROM \"{n}\".groups"), &[])
        .await
        .unwrap()
        .get(0);

    let (s, mut rx) = explaining_session(&ns.url).await;
    let mut faults = vec![];
    let lease_us: i64 = 30_000_000;
    let claim = render(include_str!("../../../sql/claim.sql"), &n);
    let ack_claim = render(include_str!("../../../sql/ack_claim.sql"), &n);
    let ack = render(include_str!("../../../sql/ack.sql"), &n);
    let nack = render(include_str!("../../../sql/nack.sql"), &n);
    let term = render(include_str!("../../../sql/term.sql"), &n);
    let release = render(include_str!("../../../sql/release.sql"), &n);
    let publish_keyed = render(include_str!("../../../sql/publish_keyed.sql"), &n);
    let pause = render(include_str!("../../../sql/pause.sql"), &n);
    let publish_one = render(include_str!("../../../sql/publish_one.sql"), &n);
    let stats = render(include_str!("../../../sql/stats.sql"), &n);

    for round in 0..2 {
        let rows = s
            .query(
                &claim,
                &[&group, &BATCH, &"c1", &lease_us, &NO_FLOOR, &ASYNC_CLAIM],
            )
            .await
            .unwrap();
        check_plans(&mut rx, "ordered claim", &mut faults);
        assert_eq!(rows.len(), BATCH as usize, "claim returned a short batch");
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get("id")).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.get("attempt")).collect();
        let tokens: Vec<i64> = rows.iter().map(|r| r.get("lease_token")).collect();
        let slice = |a: usize, b: usize| {
            (
                ids[a..b].to_vec(),
                attempts[a..b].to_vec(),
                tokens[a..b].to_vec(),
            )
        };

        let (i, a, t) = slice(0, 2);
        let acked = s.query(&ack, &[&group, &i, &a, &t]).await.unwrap();
        assert_eq!(acked.len(), 2);
        check_plans(&mut rx, "ordered ack (keys move on)", &mut faults);

        let (i, a, t) = slice(2, 4);
        let delays: Vec<i64> = vec![60_000_000; 2];
        let errors: Vec<String> = vec!["boom".into(); 2];
        let nacked = s
            .query(&nack, &[&group, &i, &a, &t, &delays, &errors])
            .await
            .unwrap();
        assert_eq!(nacked.len(), 2);
        check_plans(&mut rx, "ordered nack", &mut faults);

        let (i, a, t) = slice(4, 6);
        let reasons: Vec<String> = vec!["bad".into(); 2];
        let termed = s
            .query(&term, &[&group, &i, &a, &t, &reasons])
            .await
            .unwrap();
        assert_eq!(termed.len(), 2);
        check_plans(&mut rx, "ordered term (keys move on)", &mut faults);

        let (i, a, t) = slice(6, 7);
        let released = s.query(&release, &[&group, &i, &a, &t]).await.unwrap();
        assert_eq!(released.len(), 1);
        check_plans(&mut rx, "ordered release", &mut faults);

        let (i, a, t) = slice(7, 8);
        let until = chrono::Utc::now() + chrono::Duration::seconds(60);
        let paused = s
            .query(&pause, &[&group, &i, &a, &t, &until])
            .await
            .unwrap();
        assert_eq!(paused.len(), 1);
        check_plans(&mut rx, "ordered pause (PauseKey)", &mut faults);

        let (i, a, t) = slice(8, 10);
        let rows = s
            .query(
                &ack_claim,
                &[
                    &group,
                    &i,
                    &a,
                    &BATCH,
                    &"c1",
                    &lease_us,
                    &t,
                    &NO_FLOOR,
                    &ASYNC_CLAIM,
                ],
            )
            .await
            .unwrap();
        assert_eq!(claimed_rows(rows).len(), BATCH as usize);
        check_plans(&mut rx, "ordered ack_and_fetch", &mut faults);

        // Keyed publishes: keys with long lines and new keys.
        let new_ids: Vec<Uuid> = (0..BATCH).map(|_| Uuid::now_v7()).collect();
        let payloads: Vec<Vec<u8>> = vec![b"{}".to_vec(); BATCH as usize];
        let is_json = vec![true; BATCH as usize];
        let headers: Vec<Option<Value>> = vec![None; BATCH as usize];
        let deliver_at: Vec<Option<chrono::DateTime<chrono::Utc>>> = vec![None; BATCH as usize];
        let delay: Vec<Option<i64>> = vec![None; BATCH as usize];
        let priority = vec![0i32; BATCH as usize];
        let keys: Vec<Option<String>> = (0..BATCH)
            .map(|i| {
                Some(if i % 2 == 0 {
                    format!("k{i}")
                } else {
                    format!("new{round}-{i}")
                })
            })
            .collect();
        s.query(
            &publish_keyed,
            &[
                &"plans",
                &new_ids,
                &payloads,
                &is_json,
                &headers,
                &deliver_at,
                &delay,
                &priority,
                &keys,
            ],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "keyed publish", &mut faults);

        s.query(
            &publish_one,
            &[
                &"plans",
                &Uuid::now_v7(),
                &b"{}".to_vec(),
                &true,
                &None::<Value>,
                &None::<chrono::DateTime<chrono::Utc>>,
                &None::<i64>,
                &format!("d{round}"),
                &0i32,
                &"k7",
            ],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "keyed publish with dedupe key", &mut faults);

        s.query(&stats, &[]).await.unwrap();
        check_plans(&mut rx, "stats with key lines", &mut faults);

        let read = s
            .query(
                &format!("SELECT id FROM \"{n}\".read('plans', 'o', 'psql', $1)"),
                &[&BATCH],
            )
            .await
            .unwrap();
        assert_eq!(read.len(), BATCH as usize);
        check_plans(&mut rx, "SQL read (ordered)", &mut faults);
        let read_ids: Vec<Uuid> = read.iter().map(|r| r.get(0)).collect();
        s.query(
            &format!("SELECT \"{n}\".ack('plans', 'o', $1::uuid[])"),
            &[&read_ids],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "SQL ack (ordered)", &mut faults);
        s.query(
            &format!("SELECT \"{n}\".publish('plans', '{{}}', key => $1)"),
            &[&format!("k{round}")],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "SQL publish with key", &mut faults);
    }
    assert!(
        faults.is_empty(),
        "O(backlog) plans:\n{}",
        faults.join("\n")
    );
}

/// The claim of a rate-limited group (`_claim_limited`): a group bucket and per-key buckets, a
/// backlog whose keys come in runs of a thousand (so every claim puts most of its batch off), a
/// group out of tokens, and nothing ready (the "come back" lookup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_claims_stay_o_batch_under_generic_plans_and_hostile_costs() {
    let ns = namespace().await;
    ns.create_stream("plans", &StreamConfig::default().max_deliver(3))
        .await
        .unwrap();
    let config = pgtide::GroupConfig::default()
        .rate_limit(pgtide::RateLimit::per_second(1_000_000.0).burst(1_000_000))
        .rate_limit_per_key(pgtide::RateLimit::per_second(1.0).burst(1));
    ns.create_group_with("plans", "r", &config).await.unwrap();
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "INSERT INTO \"{n}\".messages (stream_id, id, payload, is_json, key)
         SELECT s.id, \"{n}\".uuid_v7(now() - (({BACKLOG} - i) * interval '1 ms')), '{{\"n\": 1}}', true,
                'k' || (i / 1000)
         FROM \"{n}\".streams s, generate_series(1, {BACKLOG}) i WHERE s.name = 'plans';
         INSERT INTO \"{n}\".delivery_state (group_id, message_id, visible_at)
         SELECT g.id, m.id, \"{n}\".uuid_time(m.id) - interval '1 hour'
         FROM \"{n}\".groups g JOIN \"{n}\".messages m ON m.stream_id = g.stream_id;
         INSERT INTO \"{n}\".counter_deltas (group_id, pending) SELECT id, {BACKLOG} FROM \"{n}\".groups;
         ANALYZE \"{n}\".messages, \"{n}\".delivery_state, \"{n}\".streams, \"{n}\".groups;"
    ))
    .await
    .unwrap();
    let group: i32 = raw
        .query_one(&format!("SELECT id FROM \"{n}\".groups"), &[])
        .await
        .unwrap()
        .get(0);

    let (s, mut rx) = explaining_session(&ns.url).await;
    let mut faults = vec![];
    let lease_us: i64 = 30_000_000;
    let claim = render(include_str!("../../../sql/claim.sql"), &n);
    let ack_claim = render(include_str!("../../../sql/ack_claim.sql"), &n);
    let claimed = |rows: &[tokio_postgres::Row]| {
        rows.iter()
            .filter(|r| r.get::<_, Option<Uuid>>("id").is_some())
            .count()
    };
    for round in 0..2usize {
        // Ten of one key: its one token, nine put off; then ten more of it, all put off.
        let rows = s
            .query(
                &claim,
                &[&group, &BATCH, &"c1", &lease_us, &NO_FLOOR, &ASYNC_CLAIM],
            )
            .await
            .unwrap();
        check_plans(&mut rx, "rate-limited claim", &mut faults);
        assert_eq!(
            claimed(&rows),
            1 - round,
            "round {round}: the key's one token"
        );
        let ids: Vec<Uuid> = rows.iter().filter_map(|r| r.get("id")).collect();
        let attempts: Vec<i32> = rows.iter().filter_map(|r| r.get("attempt")).collect();
        let tokens: Vec<i64> = rows.iter().filter_map(|r| r.get("lease_token")).collect();
        s.query(
            &ack_claim,
            &[
                &group,
                &ids,
                &attempts,
                &BATCH,
                &"c1",
                &lease_us,
                &tokens,
                &NO_FLOOR,
                &ASYNC_CLAIM,
            ],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "rate-limited ack_and_fetch", &mut faults);
        s.query(
            &format!("SELECT id FROM \"{n}\".read('plans', 'r', 'psql', $1)"),
            &[&BATCH],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "SQL read (rate-limited)", &mut faults);
    }
    // The group out of tokens: the claim answers when to come back without walking anything.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".set_rate_limit('plans', 'r', 1, 1);
         INSERT INTO \"{n}\".rate_buckets (group_id, key, tokens, refilled_at)
         SELECT id, '', 0, now() FROM \"{n}\".groups"
    ))
    .await
    .unwrap();
    let rows = s
        .query(
            &claim,
            &[&group, &BATCH, &"c1", &lease_us, &NO_FLOOR, &ASYNC_CLAIM],
        )
        .await
        .unwrap();
    check_plans(
        &mut rx,
        "rate-limited claim, group out of tokens",
        &mut faults,
    );
    assert_eq!(claimed(&rows), 0);
    assert_eq!(rows.len(), 1, "a come-back row");
    // Nothing ready: the come-back lookup of the next due delivery.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".set_rate_limit('plans', 'r', NULL);
         UPDATE \"{n}\".delivery_state SET visible_at = now() + interval '1 hour'"
    ))
    .await
    .unwrap();
    let rows = s
        .query(
            &claim,
            &[&group, &BATCH, &"c1", &lease_us, &NO_FLOOR, &ASYNC_CLAIM],
        )
        .await
        .unwrap();
    check_plans(&mut rx, "rate-limited claim, nothing ready", &mut faults);
    assert_eq!(claimed(&rows), 0);
    assert!(
        faults.is_empty(),
        "O(backlog) plans:\n{}",
        faults.join("\n")
    );
}

/// `count` messages of `stream`, a ready delivery of each in every group of the stream, and the
/// counts, written directly (faster than publishing for the plan tests' backlogs).
fn backlog_sql(n: &str, stream: &str, count: i64) -> String {
    format!(
        "INSERT INTO \"{n}\".messages (stream_id, id, payload, is_json)
         SELECT s.id, \"{n}\".uuid_v7(now() - ((1000000 - i) * interval '1 ms')), '{{\"n\": 1}}', true
         FROM \"{n}\".streams s, generate_series(1, {count}) i WHERE s.name = '{stream}';
         INSERT INTO \"{n}\".delivery_state (group_id, message_id, visible_at)
         SELECT g.id, m.id, \"{n}\".uuid_time(m.id) - interval '1 hour'
         FROM \"{n}\".groups g JOIN \"{n}\".streams s ON s.id = g.stream_id
         JOIN \"{n}\".messages m ON m.stream_id = g.stream_id
         WHERE s.name = '{stream}'
         ON CONFLICT DO NOTHING;
         INSERT INTO \"{n}\".counter_deltas (group_id, pending)
         SELECT g.id, {count} FROM \"{n}\".groups g JOIN \"{n}\".streams s ON s.id = g.stream_id
         WHERE s.name = '{stream}';"
    )
}

/// Plans a session caches while the queue is tiny and has no statistics stay O(batch) after the
/// backlog has grown (nothing re-plans them until statistics change): the claim's lease update,
/// the acks and the message lookup must not come to walk the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_cached_on_a_tiny_unanalysed_queue_stay_o_batch_after_it_grows() {
    let ns = namespace().await;
    ns.stream_with_groups("tiny", StreamConfig::default(), &["g"])
        .await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    let group: i32 = raw
        .query_one(&format!("SELECT id FROM \"{n}\".groups"), &[])
        .await
        .unwrap()
        .get(0);
    let load = |count: i64| backlog_sql(&n, "tiny", count);
    // A hundred rows, never analysed (six rounds of ten leave some ready).
    raw.batch_execute(&load(100)).await.unwrap();
    let (s, mut rx) = explaining_session(&ns.url).await;
    let claim = render(include_str!("../../../sql/claim.sql"), &n);
    let ack_claim = render(include_str!("../../../sql/ack_claim.sql"), &n);
    let lease_us: i64 = 30_000_000;
    let mut faults = vec![];
    // Six rounds on the tiny queue (past the plan cache's five custom plans), then the backlog
    // grows behind the session's back, still without statistics, and two more rounds run on
    // the plans cached before.
    let mut held: Vec<tokio_postgres::Row> = vec![];
    for round in 0..8 {
        if round == 6 {
            raw.batch_execute(&load(BACKLOG)).await.unwrap();
        }
        let ids: Vec<Uuid> = held.iter().map(|r| r.get("id")).collect();
        let attempts: Vec<i32> = held.iter().map(|r| r.get("attempt")).collect();
        let tokens: Vec<i64> = held.iter().map(|r| r.get("lease_token")).collect();
        held = claimed_rows(
            s.query(
                &ack_claim,
                &[
                    &group,
                    &ids,
                    &attempts,
                    &BATCH,
                    &"c1",
                    &lease_us,
                    &tokens,
                    &NO_FLOOR,
                    &ASYNC_CLAIM,
                ],
            )
            .await
            .unwrap(),
        );
        assert_eq!(held.len(), BATCH as usize, "a short batch in round {round}");
        if round < 6 {
            while rx.try_recv().is_ok() {}
        } else {
            check_plans(
                &mut rx,
                &format!("ack_and_fetch after growth, round {round}"),
                &mut faults,
            );
        }
    }
    let rows = s
        .query(
            &claim,
            &[&group, &BATCH, &"c1", &lease_us, &NO_FLOOR, &ASYNC_CLAIM],
        )
        .await
        .unwrap();
    check_plans(&mut rx, "claim after growth", &mut faults);
    assert_eq!(rows.len(), BATCH as usize);
    assert!(
        faults.is_empty(),
        "O(backlog) plans:\n{}",
        faults.join("\n")
    );
}

/// Statistics taken while a group was empty say it holds about one row. Once its backlog has
/// grown (before the next ANALYZE), every settle must still look its deliveries up by key, on
/// custom and generic plans alike: with the group's index scan outside the join loop, an ack of
/// ten walked the whole group (65 ms a claim+ack at 1 M in the bench's claim-latency case on a
/// fresh cluster, 2026-12-05).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_stay_o_batch_when_statistics_missed_the_group() {
    let ns = namespace().await;
    for stream in ["old", "new"] {
        ns.stream_with_groups(stream, StreamConfig::default(), &["g"])
            .await;
    }
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    let load = |stream: &str, count: i64| backlog_sql(&n, stream, count);
    raw.batch_execute(&load("old", 20_000)).await.unwrap();
    raw.batch_execute(&format!(
        "ANALYZE \"{n}\".delivery_state; ANALYZE \"{n}\".messages;"
    ))
    .await
    .unwrap();
    raw.batch_execute(&load("new", BACKLOG)).await.unwrap();
    let group: i32 = raw
        .query_one(&format!("SELECT \"{n}\".group_id('new', 'g')"), &[])
        .await
        .unwrap()
        .get(0);
    let (s, mut rx) = explaining_session(&ns.url).await;
    let claim = render(include_str!("../../../sql/claim.sql"), &n);
    let settles = [
        ("ack", render(include_str!("../../../sql/ack.sql"), &n)),
        ("nack", render(include_str!("../../../sql/nack.sql"), &n)),
        ("term", render(include_str!("../../../sql/term.sql"), &n)),
        (
            "extend",
            render(include_str!("../../../sql/extend.sql"), &n),
        ),
        (
            "release",
            render(include_str!("../../../sql/release.sql"), &n),
        ),
    ];
    let lease_us: i64 = 30_000_000;
    let mut faults = vec![];
    for mode in ["force_custom_plan", "force_generic_plan"] {
        s.batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        for (what, sql) in &settles {
            let held = s
                .query(
                    &claim,
                    &[&group, &BATCH, &"c1", &lease_us, &NO_FLOOR, &ASYNC_CLAIM],
                )
                .await
                .unwrap();
            check_plans(&mut rx, &format!("claim ({mode})"), &mut faults);
            assert_eq!(held.len(), BATCH as usize);
            let ids: Vec<Uuid> = held.iter().map(|r| r.get("id")).collect();
            let attempts: Vec<i32> = held.iter().map(|r| r.get("attempt")).collect();
            let tokens: Vec<i64> = held.iter().map(|r| r.get("lease_token")).collect();
            let texts: Vec<String> = vec!["x".to_owned(); ids.len()];
            let delays: Vec<i64> = vec![1_000_000; ids.len()];
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match *what {
                "nack" => vec![&group, &ids, &attempts, &tokens, &delays, &texts],
                "term" => vec![&group, &ids, &attempts, &tokens, &texts],
                "extend" => vec![&group, &ids, &attempts, &tokens, &lease_us],
                _ => vec![&group, &ids, &attempts, &tokens],
            };
            let settled = s.query(sql, &params).await.unwrap();
            assert_eq!(settled.len(), BATCH as usize, "{what} ({mode})");
            check_plans(&mut rx, &format!("{what} ({mode})"), &mut faults);
        }
    }
    assert!(
        faults.is_empty(),
        "O(backlog) plans:\n{}",
        faults.join("\n")
    );
}

/// The small SQL helpers that hot paths call per statement or per row are inlined by the
/// planner. One that is not runs as a SQL function call, with its own executor start-up, every
/// time: `_lines_lock` (`… || p_group`, whose integer concatenation is only STABLE, in an
/// IMMUTABLE function) cost 120 000 instructions per `_lock_keys` call that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_sql_helpers_are_inlined() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(
        "CREATE TEMP TABLE args (i int, ts timestamptz, d interval, f float8, u uuid, k text, b bytea)",
    )
    .await
    .unwrap();
    for call in [
        "_lines_lock(i)",
        "_key_limit_lock(i)",
        "_key_lock_budget()",
        "_wake_lock(i)",
        "_parked_offset()",
        "_parked_bound()",
        "_visible_at(ts, d, i)",
        "uuid_time(u)",
        "_fair_step(f)",
        "_default_burst(f)",
        "_refill(f, ts, f, i, ts)",
        "_payload_ok(k, b, i)",
        "_lease_token()",
    ] {
        let plan: Vec<String> = raw
            .query(
                &format!("EXPLAIN (VERBOSE, COSTS OFF) SELECT \"{n}\".{call} FROM args"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let name = call.split('(').next().unwrap_or(call);
        assert!(
            plan.iter().all(|line| !line.contains(&format!("{name}("))),
            "{call} is not inlined: {plan:?}"
        );
    }
}
