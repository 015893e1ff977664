//! The publish rule (payload limit, visibility from delay and priority) is one definition in SQL
//! (`sql/functions/publish.sql`): every path — the engine's fast path, `_publish` for dedupe
//! keys, the SQL `publish()` — rejects the same payloads with the same error and schedules the
//! same deliveries.

use pgtide::{Error, OutgoingMessage, StreamConfig};
use uuid::Uuid;

use crate::common::{json, namespace, TestNs};

fn assert_too_large(err: &Error, size: usize, limit: usize, path: &str) {
    assert!(
        matches!(err, Error::PayloadTooLarge { stream, size: s, limit: l }
            if stream == "big" && *s == size && *l == limit),
        "{path}: {err:?}"
    );
}

/// Lowers the stream's limit behind the engine's back: its cached limit (a quick reject before
/// any round trip) is now stale, so only the SQL rule stands between the payload and the table.
async fn lower_limit_in_sql(ns: &TestNs, limit: i32) {
    ns.raw()
        .await
        .execute(
            &format!(
                "UPDATE \"{}\".streams SET max_payload = $1 WHERE name = 'big'",
                ns.namespace()
            ),
            &[&limit],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_payload_is_rejected_by_every_path_with_the_same_error() {
    let ns = namespace().await;
    ns.stream_with_groups("big", StreamConfig::default().max_payload(100), &["g"])
        .await;
    // Warm the engine's stream cache with the limit of 100.
    ns.publish("big", OutgoingMessage::bytes(vec![1u8; 100]))
        .await
        .unwrap();
    lower_limit_in_sql(&ns, 10).await;
    let payload = vec![7u8; 50];

    let err = ns
        .publish("big", OutgoingMessage::bytes(payload.clone()))
        .await
        .unwrap_err();
    assert_too_large(&err, 50, 10, "fast path");
    let err = ns
        .publish(
            "big",
            OutgoingMessage::bytes(payload.clone()).dedupe_key("k1"),
        )
        .await
        .unwrap_err();
    assert_too_large(&err, 50, 10, "dedupe path");

    let mut sqlx_conn = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&ns.url).await.unwrap()
    };
    let err = ns
        .publish_sqlx(
            &mut sqlx_conn,
            "big",
            &[OutgoingMessage::bytes(payload.clone())],
        )
        .await
        .unwrap_err();
    assert_too_large(&err, 50, 10, "sqlx fast path");
    let err = ns
        .publish_sqlx(
            &mut sqlx_conn,
            "big",
            &[OutgoingMessage::bytes(payload.clone()).dedupe_key("k2")],
        )
        .await
        .unwrap_err();
    assert_too_large(&err, 50, 10, "sqlx dedupe path");

    let raw = ns.raw().await;
    let n = ns.namespace();
    for (sql, path) in [
        (
            format!("SELECT \"{n}\".publish_bytes('big', $1)"),
            "SQL publish_bytes",
        ),
        (
            format!("SELECT \"{n}\".publish_bytes('big', $1, dedupe_key => 'k3')"),
            "SQL publish_bytes with dedupe key",
        ),
    ] {
        let err = raw.query_one(&sql, &[&payload]).await.unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{path}: {err}"));
        assert_eq!(db.code().code(), "PT004", "{path}");
        assert_eq!(db.detail(), Some("size=50 limit=10"), "{path}");
    }
    let json_payload = format!("\"{}\"", "x".repeat(48));
    let err = raw
        .query_one(
            &format!("SELECT \"{n}\".publish('big', $1::text::jsonb)"),
            &[&json_payload],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("PT004"), "{err}");

    // Nothing was written but the warm-up message.
    let stats = ns.stats("big", "g").await.unwrap();
    assert_eq!(stats.ready, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_priority_counts_as_zero_on_every_path() {
    let ns = namespace().await;
    ns.stream_with_groups("prio", StreamConfig::default(), &["g"])
        .await;
    let raw = ns.raw().await;
    let n = ns.namespace().to_owned();
    // The engine's fast-path statement, run as is (the Rust API already clamps priorities).
    let fast = include_str!("../../../sql/publish.sql")
        .replace("@ns_lit@", &format!("'{n}'"))
        .replace("@ns@", &format!("\"{n}\""));
    let fast_id = Uuid::now_v7();
    raw.query_one(
        &fast,
        &[
            &"prio",
            &vec![fast_id],
            &vec![b"{}".to_vec()],
            &vec![true],
            &vec![None::<serde_json::Value>],
            &vec![None::<chrono::DateTime<chrono::Utc>>],
            &vec![None::<i64>],
            &vec![-3600i32],
        ],
    )
    .await
    .unwrap();
    let sql_id: Uuid = raw
        .query_one(
            &format!("SELECT \"{n}\".publish('prio', '{{}}', priority => -3600)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let keyed_id: Uuid = raw
        .query_one(
            &format!(
                "SELECT \"{n}\".publish('prio', '{{}}', dedupe_key => 'k', priority => -3600)"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let rust_id = ns
        .publish("prio", json(serde_json::json!(1)).priority(-3600))
        .await
        .unwrap()
        .id;
    for (id, path) in [
        (fast_id, "fast path"),
        (sql_id, "SQL publish"),
        (keyed_id, "SQL publish with dedupe key"),
        (rust_id, "Rust publish"),
    ] {
        let state: String = raw
            .query_one(
                &format!("SELECT state FROM \"{n}\".deliveries WHERE message_id = $1"),
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(state, "ready", "{path}");
    }
}
