//! The fair group's statements (issue 12.5) under the hostile planner of `plans.rs`: the claim
//! with its re-stamping of due real-time rows, `ack_and_fetch`, SQL `read()`, and publishes
//! (the fast path, keyed batches, one message with a dedupe key, SQL `publish`) into a stream
//! with a fair group, over a 200 000-delivery virtual backlog and 51 000 keys' rows.

use serde_json::Value;
use uuid::Uuid;

use super::plans::{
    check_plans, claimed_rows, explaining_session, render, ASYNC_CLAIM, BACKLOG, BATCH, NO_FLOOR,
};
use crate::common::namespace;
use pgtide::StreamConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_group_statements_stay_o_batch_under_generic_plans_and_hostile_costs() {
    let ns = namespace().await;
    ns.create_stream("plans", &StreamConfig::default().max_deliver(3))
        .await
        .unwrap();
    ns.create_group_with(
        "plans",
        "f",
        &pgtide::GroupConfig::default().fair_share(true),
    )
    .await
    .unwrap();
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    // Virtual stamps in id order over 1 000 keys, about one in forty rows a retry that came due
    // an hour ago (re-stamped by the claims), and the rows of 50 000 other keys.
    raw.batch_execute(&format!(
        "INSERT INTO \"{n}\".messages (stream_id, id, payload, is_json, key)
         SELECT s.id, \"{n}\".uuid_v7(now() - (({BACKLOG} - i) * interval '1 ms')), '{{\"n\": 1}}', true,
                'k' || (i % 1000)
         FROM \"{n}\".streams s, generate_series(1, {BACKLOG}) i WHERE s.name = 'plans';
         INSERT INTO \"{n}\".delivery_state (group_id, message_id, visible_at)
         SELECT g.id, m.id,
                CASE WHEN get_byte(uuid_send(m.id), 15) < 6 THEN \"{n}\".uuid_time(m.id) - interval '1 hour'
                     ELSE \"{n}\"._fair_base() + (\"{n}\".uuid_time(m.id) - timestamptz '2020-01-01') END
         FROM \"{n}\".groups g JOIN \"{n}\".messages m ON m.stream_id = g.stream_id;
         INSERT INTO \"{n}\".fair_keys (group_id, key, vt)
         SELECT g.id, 'k' || i, \"{n}\"._fair_base() + (now() - timestamptz '2020-01-01')
         FROM \"{n}\".groups g, generate_series(0, 999) i;
         INSERT INTO \"{n}\".fair_keys (group_id, key, vt, weight)
         SELECT g.id, 'x' || i, \"{n}\"._fair_base() + i * interval '1 second', 2
         FROM \"{n}\".groups g, generate_series(1, 50000) i;
         INSERT INTO \"{n}\".counter_deltas (group_id, pending) SELECT id, {BACKLOG} FROM \"{n}\".groups;
         ANALYZE \"{n}\".messages, \"{n}\".delivery_state, \"{n}\".streams, \"{n}\".groups, \"{n}\".fair_keys;"
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
    let publish = render(include_str!("../../../sql/publish.sql"), &n);
    let publish_keyed = render(include_str!("../../../sql/publish_keyed.sql"), &n);
    let publish_one = render(include_str!("../../../sql/publish_one.sql"), &n);

    for round in 0..2 {
        let rows = s
            .query(
                &claim,
                &[&group, &BATCH, &"c1", &lease_us, &NO_FLOOR, &ASYNC_CLAIM],
            )
            .await
            .unwrap();
        check_plans(&mut rx, "fair claim (re-stamps due retries)", &mut faults);
        assert_eq!(rows.len(), BATCH as usize, "claim returned a short batch");
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get("id")).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.get("attempt")).collect();
        let tokens: Vec<i64> = rows.iter().map(|r| r.get("lease_token")).collect();
        let rows = s
            .query(
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
        assert_eq!(claimed_rows(rows).len(), BATCH as usize);
        check_plans(&mut rx, "fair ack_and_fetch", &mut faults);

        let new_ids = |k: usize| -> Vec<Uuid> { (0..k).map(|_| Uuid::now_v7()).collect() };
        let payloads: Vec<Vec<u8>> = vec![b"{}".to_vec(); BATCH as usize];
        let is_json = vec![true; BATCH as usize];
        let headers: Vec<Option<Value>> = vec![None; BATCH as usize];
        let deliver_at: Vec<Option<chrono::DateTime<chrono::Utc>>> = vec![None; BATCH as usize];
        let delay: Vec<Option<i64>> = (0..BATCH).map(|i| (i == 0).then_some(60_000_000)).collect();
        let priority = vec![0i32; BATCH as usize];
        s.query(
            &publish,
            &[
                &"plans",
                &new_ids(BATCH as usize),
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
        check_plans(&mut rx, "publish into a fair group", &mut faults);

        let keys: Vec<Option<String>> = (0..BATCH)
            .map(|i| {
                Some(match i % 3 {
                    0 => format!("k{i}"),
                    1 => format!("x{}", i * 1000),
                    _ => format!("new{round}-{i}"),
                })
            })
            .collect();
        s.query(
            &publish_keyed,
            &[
                &"plans",
                &new_ids(BATCH as usize),
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
        check_plans(&mut rx, "keyed publish into a fair group", &mut faults);

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
        check_plans(
            &mut rx,
            "publish with dedupe key into a fair group",
            &mut faults,
        );

        let read = s
            .query(
                &format!("SELECT id FROM \"{n}\".read('plans', 'f', 'psql', $1)"),
                &[&BATCH],
            )
            .await
            .unwrap();
        assert_eq!(read.len(), BATCH as usize);
        check_plans(&mut rx, "SQL read (fair)", &mut faults);
        s.query(
            &format!("SELECT \"{n}\".publish('plans', '{{}}', key => $1)"),
            &[&format!("k{round}")],
        )
        .await
        .unwrap();
        check_plans(&mut rx, "SQL publish into a fair group", &mut faults);
    }
    assert!(
        faults.is_empty(),
        "O(backlog) plans:\n{}",
        faults.join("\n")
    );
}
