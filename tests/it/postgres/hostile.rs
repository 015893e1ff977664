//! Hostile input and hostile stored data (issue 8, item 4): the one duration rule at every door
//! (Rust API, SQL), undecodable stored messages moved to the dead letters as `malformed`, a due
//! time past chrono's range that does not break the scout, and property tests that throw
//! arbitrary names, headers, payloads and durations at the Rust API and the SQL functions.

use std::time::Duration;

use chrono::Utc;
use pgtide::{Error, GroupStart, OutgoingMessage, PgBackend, StreamConfig, MAX_DURATION};
use proptest::prelude::*;

use crate::common::{json, namespace, sqlstate, TestNs, WAIT};

const TOO_LONG: Duration = Duration::from_secs(MAX_DURATION.as_secs() + 1);

async fn pending(ns: &TestNs, stream: &str) -> i64 {
    ns.raw()
        .await
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{n}\".messages m JOIN \"{n}\".streams s ON s.id = m.stream_id WHERE s.name = $1",
                n = ns.namespace()
            ),
            &[&stream],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_past_the_rule_are_rejected_by_the_rust_api() {
    let ns = namespace().await;
    let pg = &ns.pg;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let bad_config = |c: StreamConfig| async move {
        matches!(
            pg.create_stream("x", &c).await,
            Err(Error::InvalidConfig(_))
        )
    };
    assert!(bad_config(StreamConfig::default().lease(TOO_LONG)).await);
    assert!(bad_config(StreamConfig::default().retention(TOO_LONG)).await);
    assert!(bad_config(StreamConfig::default().dedupe_window(TOO_LONG)).await);
    assert!(bad_config(StreamConfig::default().partition_interval(TOO_LONG)).await);
    assert!(
        bad_config(StreamConfig::default().backoff(pgtide::Backoff::schedule([TOO_LONG]))).await
    );
    assert!(matches!(
        pg.update_stream("s", &StreamConfig::default().lease(TOO_LONG))
            .await,
        Err(Error::InvalidConfig(_))
    ));

    // A batch with one bad delay is rejected whole: nothing is written.
    let batch = [
        json(serde_json::json!(1)),
        json(serde_json::json!(2)).delay(TOO_LONG),
    ];
    assert!(matches!(
        pg.publish_batch("s", &batch).await,
        Err(Error::InvalidConfig(_))
    ));
    let far = Utc::now() + chrono::Duration::days(40_000);
    assert!(matches!(
        pg.publish("s", json(serde_json::json!(3)).deliver_at(far))
            .await,
        Err(Error::InvalidConfig(_))
    ));
    assert_eq!(pending(&ns, "s").await, 0);
    // The bound itself is accepted.
    pg.publish("s", json(serde_json::json!(4)).delay(MAX_DURATION))
        .await
        .unwrap();

    let c = pg.consumer("s", "g", "c").await.unwrap();
    pg.publish("s", json(serde_json::json!(5))).await.unwrap();
    let huge = c.clone().with_lease(TOO_LONG);
    assert!(matches!(
        huge.try_fetch(10).await,
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        huge.ack_and_fetch(&[], 10).await,
        Err(Error::InvalidConfig(_))
    ));
    // Nothing was claimed by the refused fetches.
    let mut d = c.try_fetch(10).await.unwrap();
    assert_eq!(d.len(), 1);
    assert!(matches!(
        c.nack(&d[0], Some(TOO_LONG), None).await,
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        c.in_progress(&mut d[0], Some(TOO_LONG)).await,
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        c.in_progress(&mut d[0], Some(Duration::ZERO)).await,
        Err(Error::InvalidConfig(_))
    ));
    c.ack(&d[0]).await.unwrap();
    assert!(matches!(
        pg.reset_group("s", "g", Some(far)).await,
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        pg.trim_stream("s", Some(TOO_LONG), None).await,
        Err(Error::InvalidConfig(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_past_the_rule_are_rejected_by_the_sql_functions() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let raw = ns.raw().await;
    let n = ns.namespace();
    for sql in [
        format!("SELECT \"{n}\".publish('s', '{{}}', delay => '270000 years')"),
        format!("SELECT \"{n}\".publish('s', '{{}}', delay => '-1 second')"),
        format!("SELECT \"{n}\".publish_bytes('s', '\\x00', delay => '36501 days')"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', 'c', 1, lease => '270000 years')"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', 'c', 1, lease => '0')"),
        format!("SELECT \"{n}\".nack('s', 'g', ARRAY[gen_random_uuid()], delay => '270000 years')"),
        format!("SELECT \"{n}\".in_progress('s', 'g', ARRAY[gen_random_uuid()], lease => '270000 years')"),
        format!("SELECT \"{n}\".create_stream('x', lease => '270000 years')"),
        format!("SELECT \"{n}\".create_stream('x', retention => '270000 years')"),
        format!("SELECT \"{n}\".create_stream('x', backoff => ARRAY['1s', '270000 years']::interval[])"),
    ] {
        assert_eq!(sqlstate(&raw, &sql).await, "PT001", "{sql}");
    }
    assert_eq!(pending(&ns, "s").await, 0);
    // The bound itself is accepted.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".publish('s', '{{}}', delay => '36500 days')"
    ))
    .await
    .unwrap();
}

/// A JSON object nested `depth` deep, as SQL text: past serde_json's recursion limit.
pub(super) fn deep_headers(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_stored_message_is_dead_lettered_as_malformed() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let raw = ns.raw().await;
    let n = ns.namespace();
    let deep = deep_headers(10_000);
    let publish_three = || async {
        for headers in [
            "'{\"k\": \"v\"}'".to_owned(),
            format!("'{deep}'"),
            "NULL".to_owned(),
        ] {
            raw.batch_execute(&format!(
                "SELECT \"{n}\".publish('s', '{{}}', headers => {headers}::jsonb)"
            ))
            .await
            .unwrap();
        }
    };
    let c = ns.pg.consumer("s", "g", "c").await.unwrap();

    // try_fetch: the two good messages are delivered, the bad one is a dead letter.
    publish_three().await;
    let batch = c.try_fetch(10).await.unwrap();
    assert_eq!(batch.len(), 2);
    let dead = ns.pg.dead_letters("s", "g", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "malformed");

    // ack_and_fetch: the same, in the same call that acks the first batch.
    publish_three().await;
    let refs: Vec<_> = batch.iter().collect();
    let (report, next) = c.ack_and_fetch(&refs, 10).await.unwrap();
    assert_eq!(report.settled.len(), 2);
    assert_eq!(next.len(), 2);
    let dead = ns.pg.dead_letters("s", "g", 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.reason == "malformed"));
    // Nothing else is left leased or pending.
    let refs: Vec<_> = next.iter().collect();
    c.ack_batch(&refs).await.unwrap();
    assert!(c.try_fetch(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_time_past_chronos_range_does_not_break_the_scout() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let raw = ns.raw().await;
    let n = ns.namespace();
    // Written around the SQL bound (the internal function takes a visibility as is), as a row
    // stored before the rule existed would be.
    raw.batch_execute(&format!(
        "SELECT * FROM \"{n}\"._publish('s', \"{n}\".uuid_v7(), '\\x00', false, NULL,
                                        now() + interval '270000 years', NULL)"
    ))
    .await
    .unwrap();
    let hour = Duration::from_secs(3600);
    let pg = PgBackend::builder(&ns.url)
        .namespace(n)
        .pool_size(4)
        .poll_interval(hour)
        .scout_max_interval(hour)
        .build()
        .unwrap();
    pg.start_scout();
    let mut scout = pg.watch_scout();
    tokio::time::timeout(WAIT, scout.wait_for(|s| s.last_check_at.is_some()))
        .await
        .expect("the scout checks due times")
        .unwrap();
    // Another delayed message still fires through the due-waker (the fallback poll is an hour).
    let c = pg.consumer("s", "g", "c").await.unwrap();
    pg.publish(
        "s",
        json(serde_json::json!(1)).delay(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let got = c.fetch(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    let status = pg.scout_status();
    assert_eq!(status.restarts, 0, "{status:?}");
    pg.shutdown().await;
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9][a-z0-9._-]{0,10}",
        any::<String>(),
        Just(String::new()),
        Just("x".repeat(65)),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..1_000_000).prop_map(Duration::from_millis),
        (0u64..=u64::MAX).prop_map(Duration::from_secs),
        Just(MAX_DURATION),
        Just(TOO_LONG),
        Just(Duration::ZERO),
    ]
}

fn message() -> impl Strategy<Value = OutgoingMessage> {
    (
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec((any::<String>(), any::<String>()), 0..4),
        proptest::option::of(duration()),
        any::<i32>(),
    )
        .prop_map(|(payload, headers, delay, priority)| {
            let mut m = OutgoingMessage::bytes(payload).priority(priority);
            for (k, v) in headers {
                m = m.header(k, v);
            }
            match delay {
                Some(d) => m.delay(d),
                None => m,
            }
        })
}

/// True for the errors hostile input may produce: typed rejections, never a raw failure.
fn typed(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidName { .. }
            | Error::InvalidConfig(_)
            | Error::StreamNotFound(_)
            | Error::GroupNotFound { .. }
            | Error::PayloadTooLarge { .. }
            | Error::StreamExists(_)
    )
}

#[test]
fn arbitrary_input_to_the_rust_api_and_sql_is_rejected_typed_or_accepted_whole() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ns = rt.block_on(async {
        let ns = namespace().await;
        ns.stream_with_groups("s", StreamConfig::default(), &["g"])
            .await;
        ns
    });
    let raw = rt.block_on(ns.raw());
    let n = ns.namespace().to_owned();
    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        stream in name(),
        group in name(),
        consumer in name(),
        batch in proptest::collection::vec(message(), 1..4),
        lease in duration(),
        retention in duration(),
        sql_delay in "[-]?[0-9]{1,9} (seconds|days|years|months)",
        sql_headers in proptest::option::of(any::<String>()),
    )| {
        rt.block_on(async {
            let pg = &ns.pg;
            let before = pending(&ns, "s").await;
            match pg.publish_batch("s", &batch).await {
                Ok(receipts) => prop_assert_eq!(receipts.len(), batch.len()),
                Err(e) => {
                    prop_assert!(typed(&e), "{e:?}");
                    // No partial write of a rejected batch.
                    prop_assert_eq!(pending(&ns, "s").await, before);
                }
            }
            if let Err(e) = pg.publish(&stream, OutgoingMessage::bytes(vec![1])).await {
                prop_assert!(typed(&e), "{e:?}");
            }
            let config = StreamConfig::default().lease(lease).retention(retention);
            match pg.create_stream(&stream, &config).await {
                Ok(()) => {
                    prop_assert!(lease <= MAX_DURATION && retention <= MAX_DURATION);
                    pg.delete_stream(&stream).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                Err(e) => prop_assert!(typed(&e), "{e:?}"),
            }
            match pg.consumer("s", &group, &consumer).await {
                Ok(c) => {
                    if let Err(e) = c.with_lease(lease).try_fetch(1).await {
                        prop_assert!(typed(&e), "{e:?}");
                    }
                }
                Err(e) => prop_assert!(typed(&e), "{e:?}"),
            }
            // SQL: an arbitrary delay interval and arbitrary headers text.
            let headers = sql_headers.map(|h| serde_json::json!({ "h": h }));
            let res = raw
                .query_one(
                    &format!("SELECT \"{n}\".publish('s', '{{}}', headers => $1, delay => $2::text::interval)"),
                    &[&headers, &sql_delay],
                )
                .await;
            if let Err(e) = res {
                let code = e.code().map(|c| c.code().to_owned());
                // PT001 from the duration rule; 22008 (interval out of range) from the parser.
                prop_assert!(
                    matches!(code.as_deref(), Some("PT001") | Some("22008") | Some("22015")),
                    "{sql_delay}: {e:?}"
                );
            }
            Ok(())
        })?;
    });
    // Every message that went in can be read back: the group is never blocked.
    rt.block_on(async {
        let c = ns.pg.consumer("s", "g", "drain").await.unwrap();
        let _ = c.try_fetch(1000).await.unwrap();
    });
    let _ = GroupStart::New;
}
