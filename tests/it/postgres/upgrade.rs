//! Upgrading in place: a namespace installed by the released migrations 0001–0006 (exactly as
//! the previous release's `migrate()` left it, sqlx bookkeeping included), holding data, is
//! upgraded by `migrate()`: data intact, functions current, consumers working; then unchanged
//! function files are skipped and a changed one is re-applied.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use futures_util::future::BoxFuture;
use pgtide::{PgBackend, StreamConfig};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use super::privileges::{table_rights, Role};
use crate::common::{database_url, json, namespace, unique, TestNs, WAIT};

/// The migrations of the previous release, as it shipped them.
#[rustfmt::skip]
const RELEASED: &[(i64, &str, &str)] = &[
    (1, "core", include_str!("../../../migrations/0001_core.sql")),
    (2, "delivery", include_str!("../../../migrations/0002_delivery.sql")),
    (3, "wakeups", include_str!("../../../migrations/0003_wakeups.sql")),
    (4, "purge", include_str!("../../../migrations/0004_purge.sql")),
    (5, "operations", include_str!("../../../migrations/0005_operations.sql")),
    (6, "plans", include_str!("../../../migrations/0006_plans.sql")),
];

/// Every function file; all are applied on the first `migrate()` of the new release.
const FILES: &[&str] = &[
    "functions/core.sql",
    "functions/ordering.sql",
    "functions/flow_control.sql",
    "functions/fair.sql",
    "functions/maintenance.sql",
    "functions/registry.sql",
    "functions/publish.sql",
    "functions/delivery.sql",
    "functions/wakeups.sql",
    "functions/operations.sql",
    "functions/inspection.sql",
];

#[derive(Debug)]
struct Released(String);

impl MigrationSource<'static> for Released {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(RELEASED
                .iter()
                .map(|(version, name, sql)| {
                    let sql = sql
                        .replace("@ns_lit@", &format!("'{}'", self.0))
                        .replace("@ns@", &format!("\"{}\"", self.0));
                    Migration::new(
                        *version,
                        Cow::Borrowed(*name),
                        MigrationType::Simple,
                        Cow::Owned(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Installs `ns` the way the previous release's `migrate()` did.
async fn install_released(url: &str, ns: &str) {
    let options = PgConnectOptions::from_str(url)
        .unwrap()
        .options([("search_path", format!("\"{ns}\""))]);
    let mut conn = PgConnection::connect_with(&options).await.unwrap();
    sqlx::raw_sql(&format!("CREATE SCHEMA \"{ns}\""))
        .execute(&mut conn)
        .await
        .unwrap();
    Migrator::new(Released(ns.to_owned()))
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// A digest of every row of every table, by table.
async fn data(raw: &tokio_postgres::Client, ns: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for table in [
        "streams",
        "groups",
        "partitions",
        "messages",
        "delivery_state",
        "dead_letter_state",
        "dedupe",
        "scout_lease",
    ] {
        let digest: Option<String> = raw
            .query_one(
                &format!(
                    // Columns added by later migrations (lease_token, the ordering key's, fair) are
                    // not the old data.
                    "SELECT md5(string_agg((to_jsonb(t) - '{{lease_token,key,key_seq,ordered,max_in_flight,rate,burst,key_rate,key_burst,fair,max_in_flight_per_key,key_limited}}'::text[])::text, ',' \
                     ORDER BY (to_jsonb(t) - '{{lease_token,key,key_seq,ordered,max_in_flight,rate,burst,key_rate,key_burst,fair,max_in_flight_per_key,key_limited}}'::text[])::text)) \
                     FROM \"{ns}\".{table} t"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        out.insert(table.to_owned(), digest.unwrap_or_default());
    }
    // Counters as the sum of folded and unfolded: folding may run at any time.
    let counters: Option<String> = raw
        .query_one(
            &format!(
                "SELECT string_agg(group_id || ':' || pending || ':' || dead, ',' ORDER BY group_id)
                 FROM (SELECT group_id, sum(pending) AS pending, sum(dead) AS dead
                       FROM (SELECT group_id, pending, dead FROM \"{ns}\".group_counters
                             UNION ALL SELECT group_id, pending, dead FROM \"{ns}\".counter_deltas) x
                       GROUP BY group_id) c"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    out.insert("counters".to_owned(), counters.unwrap_or_default());
    out
}

/// Every function and view of the namespace, with its definition (namespace name taken out),
/// except the streams' own lookup functions (`_lookup_s<stream id>`, one per stream: see
/// [`lookups`]).
async fn definitions(raw: &tokio_postgres::Client, ns: &str) -> BTreeMap<String, String> {
    raw.query(
        "SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
                replace(pg_get_functiondef(p.oid), $1::text, '<ns>')
           FROM pg_proc p WHERE p.pronamespace = $1::text::regnamespace
            AND p.proname !~ '^_lookup_s[0-9]+$'
         UNION ALL
         SELECT 'view ' || viewname, replace(definition, $1::text, '<ns>')
           FROM pg_views WHERE schemaname = $1::text",
        &[&ns],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The streams' lookup functions (`_claim` reads messages through them), as `stream: function`.
async fn lookups(raw: &tokio_postgres::Client, ns: &str) -> Vec<String> {
    raw.query(
        &format!(
            "SELECT s.name || ': ' || coalesce(p.proname::text, 'none')
               FROM \"{ns}\".streams s
               LEFT JOIN pg_proc p
                 ON p.pronamespace = $1::text::regnamespace AND p.proname = '_lookup_s' || s.id
              ORDER BY s.name"
        ),
        &[&ns],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Every table, column and index of the namespace (namespace name taken out).
async fn tables(raw: &tokio_postgres::Client, ns: &str) -> Vec<String> {
    let mut rows: Vec<String> = raw
        .query(
            "SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              WHERE c.relnamespace = $1::text::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
                AND c.relname NOT LIKE 'messages_s%'
             UNION ALL
             SELECT 'idx ' || replace(indexdef, $1::text, '<ns>') FROM pg_indexes
              WHERE schemaname = $1::text AND tablename NOT LIKE 'messages_s%'",
            &[&ns],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    rows.sort();
    rows
}

async fn applied_at(
    raw: &tokio_postgres::Client,
    ns: &str,
) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    raw.query(
        &format!("SELECT file, applied_at FROM \"{ns}\"._pgtide_sql ORDER BY file"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_namespace_upgrades_in_place_with_its_data() {
    let url = database_url().await;
    let name = unique("up");
    install_released(&url, &name).await;
    let ns = TestNs {
        pg: PgBackend::builder(url.clone())
            .namespace(name.clone())
            .build()
            .unwrap(),
        url: url.clone(),
    };
    let raw = ns.raw().await;
    let n = name.as_str();
    assert!(
        !ns.is_migrated().await.unwrap(),
        "a 0006 namespace is out of date"
    );

    // Data, written through the previous release's SQL surface: for group billing one ready,
    // one delayed, two in flight and one dead delivery; group audit has them all pending.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('orders');
         SELECT \"{n}\".create_group('orders', 'billing');
         SELECT \"{n}\".create_group('orders', 'audit');
         SELECT \"{n}\".publish('orders', jsonb_build_object('n', i)) FROM generate_series(1, 3) i;
         SELECT \"{n}\".publish('orders', '{{\"n\": 4}}', dedupe_key => 'four');
         SELECT \"{n}\".publish('orders', '{{\"n\": 5}}', delay => interval '1 hour');"
    ))
    .await
    .unwrap();
    let claimed: Vec<Uuid> = raw
        .query(
            &format!("SELECT id FROM \"{n}\".read('orders', 'billing', 'old-consumer', 3)"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(claimed.len(), 3);
    raw.execute(
        &format!("SELECT \"{n}\".term('orders', 'billing', ARRAY[$1::uuid], 'bad')"),
        &[&claimed[0]],
    )
    .await
    .unwrap();
    let in_flight = claimed[1..].to_vec();

    // A runtime role granted by the previous release: table privileges, and EXECUTE on every
    // function by default.
    let role = Role::create(&ns, "up").await;
    raw.execute(&format!("SELECT \"{n}\".grant_runtime($1)"), &[&role.name])
        .await
        .unwrap();
    assert!(!table_rights(&raw, n, &role.name).await.is_empty());

    let data_before = data(&raw, n).await;
    let defs_before = definitions(&raw, n).await;

    let report = ns.migrate().await.unwrap();
    assert_eq!(
        report.migrations,
        vec![
            "0007_sql_files".to_owned(),
            "0008_lease_tokens".to_owned(),
            "0009_least_privilege".to_owned(),
            "0010_ordering".to_owned(),
            "0011_flow_control".to_owned(),
            "0012_fair_share".to_owned(),
            "0013_key_concurrency".to_owned(),
            "0014_key_index".to_owned(),
            "0015_key_heads".to_owned(),
            "0016_wake_waiters".to_owned()
        ]
    );
    assert_eq!(report.sql_files, FILES);
    assert!(ns.is_migrated().await.unwrap());

    // The data is untouched.
    assert_eq!(data(&raw, n).await, data_before);

    // The runtime role granted by the previous release keeps what it had (processes of that
    // release write the tables directly until they are restarted); granting it again takes the
    // table privileges away, records it, and grants this release's functions.
    let as_role = role.raw().await;
    assert!(!table_rights(&raw, n, &role.name).await.is_empty());
    as_role
        .execute(&format!("SELECT * FROM \"{n}\".stats()"), &[])
        .await
        .unwrap();
    ns.grant_runtime(&role.name).await.unwrap();
    assert_eq!(
        table_rights(&raw, n, &role.name).await,
        Vec::<String>::new()
    );
    let recorded: bool = raw
        .query_one(
            &format!("SELECT read_only FROM \"{n}\"._grants WHERE role = $1"),
            &[&role.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!recorded, "recorded as a runtime role");
    as_role
        .execute(
            &format!("SELECT * FROM \"{n}\".group_stats('orders', 'billing')"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        as_role
            .batch_execute(&format!("DELETE FROM \"{n}\".delivery_state"))
            .await
            .unwrap_err()
            .code()
            .map(|c| c.code().to_owned()),
        Some("42501".to_owned())
    );

    // The function files re-created what 0001–0006 had left, except what this release changes.
    let defs_after = definitions(&raw, n).await;
    let changed: Vec<&String> = defs_before
        .iter()
        .filter(|(k, v)| defs_after.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    let added: Vec<&String> = defs_after
        .keys()
        .filter(|k| !defs_before.contains_key(*k))
        .collect();
    let names = |v: &[&String]| -> Vec<String> {
        v.iter()
            .map(|k| k.split('(').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        names(&changed),
        [
            "_ack",
            "_claim",
            "_extend",
            "_nack",
            "_notify_inserted",
            "_publish",
            "_purge_dead",
            "_release",
            "_release_consumer",
            "_replay_dead",
            "_scout_acquire",
            "_scout_due",
            "_scout_resign",
            "_term",
            "ack",
            "create_group",
            "create_stream",
            "delete_group",
            "delete_stream",
            "drop_expired_partitions",
            "ensure_partition",
            "extend",
            "grant_runtime",
            "group_id",
            "maintain",
            "nack",
            "publish",
            "publish_bytes",
            "publish_counts",
            "purge_dead",
            "purge_stream",
            "read",
            "release_consumer",
            "replay_dead",
            "reset_group",
            "stats",
            "stream_id",
            "term",
            "trim_stream",
            "view deliveries",
            "view messages_view",
        ],
        "{changed:?}"
    );
    assert_eq!(
        names(&added),
        [
            "_ack",
            "_advance_keys",
            "_apply_grant",
            "_bury_exhausted",
            "_check",
            "_check_duration",
            "_check_grantee",
            "_check_key",
            "_check_key_limit",
            "_check_keys",
            "_check_maintain_at",
            "_check_name",
            "_check_publish",
            "_check_rate",
            "_check_settle",
            "_check_weight",
            "_claim",
            "_claim_limited",
            "_come_back",
            "_default_burst",
            "_enqueue_fair",
            "_enqueue_keyed",
            "_extend",
            "_fair_base",
            "_fair_ceiling",
            "_fair_now",
            "_fair_restamp",
            "_fair_step",
            "_granted_functions",
            "_group_list",
            "_group_ref",
            "_group_stats",
            "_in_flight_room",
            "_is_ordered",
            "_key_limit_lock",
            "_key_lock_budget",
            "_key_room",
            "_lease_token",
            "_lines_lock",
            "_lock_keys",
            "_lock_partitions",
            "_lookup_define",
            "_lookup_drop",
            "_maintain_budget",
            "_maintain_next",
            "_maintain_rest",
            "_maintain_step",
            "_maintain_stream",
            "_max_batch",
            "_migration_status",
            "_missing_slots",
            "_nack",
            "_parked_bound",
            "_parked_offset",
            "_pause",
            "_payload_ok",
            "_payload_too_large",
            "_publish",
            "_publish_batch",
            "_publish_keyed",
            "_refill",
            "_regrant",
            "_release",
            "_repair_keys",
            "_scout_maintain",
            "_scout_maintain",
            "_settle_wakes",
            "_stream_list",
            "_term",
            "_trim_fair_keys",
            "_trim_rate_buckets",
            "_trim_wake_waiters",
            "_visible_at",
            "_wake_lock",
            "_wake_register",
            "_wake_release",
            "_wake_room",
            "ack",
            "create_group",
            "ensure_partitions",
            "extend",
            "grant_runtime",
            "group_stats",
            "in_progress",
            "nack",
            "publish",
            "publish_bytes",
            "revoke_runtime",
            "set_key_weight",
            "set_max_in_flight",
            "set_max_in_flight_per_key",
            "set_rate_limit",
            "streams_per_transaction",
            "term",
            "view key_weights",
            "view keys",
        ],
        "{added:?}"
    );

    // The stream created by the released migrations got its lookup function from the upgrade.
    let ids: Vec<String> = raw
        .query(
            &format!("SELECT '_lookup_s' || id FROM \"{n}\".streams"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(lookups(&raw, n).await, [format!("orders: {}", ids[0])]);

    // And the namespace now equals a freshly installed one.
    let fresh = namespace().await;
    let fresh_raw = fresh.raw().await;
    assert_eq!(definitions(&fresh_raw, fresh.namespace()).await, defs_after);
    assert_eq!(
        tables(&fresh_raw, fresh.namespace()).await,
        tables(&raw, n).await
    );

    // Counts and consumers work on the upgraded data.
    let billing = ns.stats("orders", "billing").await.unwrap();
    assert_eq!(
        (
            billing.ready,
            billing.delayed,
            billing.in_flight,
            billing.dead
        ),
        (1, 1, 2, 1),
        "{billing:?}"
    );
    let consumer = ns
        .consumer("orders", "billing", "new-consumer")
        .await
        .unwrap();
    let got = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    consumer.ack(&got[0]).await.unwrap();
    let extended: i32 = raw
        .query_one(
            &format!("SELECT \"{n}\".in_progress('orders', 'billing', $1)"),
            &[&in_flight],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(extended, 2);
    let acked: i32 = raw
        .query_one(
            &format!("SELECT \"{n}\".ack('orders', 'billing', $1)"),
            &[&in_flight],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(acked, 2);
    assert_eq!(ns.replay_dead("orders", "billing", None).await.unwrap(), 1);
    let replayed = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].id(), claimed[0]);
    consumer.ack(&replayed[0]).await.unwrap();
    let receipt = ns
        .publish("orders", json(serde_json::json!({"n": 6})))
        .await
        .unwrap();
    let got = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), receipt.id);
    consumer.ack(&got[0]).await.unwrap();
    let audit = ns
        .consumer("orders", "audit", "new-consumer")
        .await
        .unwrap();
    assert_eq!(audit.fetch(10, WAIT).await.unwrap().len(), 5);
    let dup = ns
        .publish(
            "orders",
            json(serde_json::json!({"n": 4})).dedupe_key("four"),
        )
        .await
        .unwrap();
    assert!(dup.duplicate, "the dedupe window survived the upgrade");

    // A second migrate() skips every unchanged file.
    let stamps = applied_at(&raw, n).await;
    assert_eq!(stamps.len(), FILES.len());
    let again = ns.migrate().await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(applied_at(&raw, n).await, stamps);

    // A file whose text differs from what was applied (as after upgrading the library) is
    // re-applied, alone.
    raw.execute(
        &format!(
            "UPDATE \"{n}\"._pgtide_sql SET checksum = '\\x00' WHERE file = 'functions/delivery.sql'"
        ),
        &[],
    )
    .await
    .unwrap();
    assert!(!ns.is_migrated().await.unwrap());
    let report = ns.migrate().await.unwrap();
    assert!(report.migrations.is_empty(), "{report:?}");
    assert_eq!(report.sql_files, ["functions/delivery.sql"]);
    assert!(ns.is_migrated().await.unwrap());
    let restamped = applied_at(&raw, n).await;
    for ((file, before), (_, after)) in stamps.iter().zip(&restamped) {
        assert_eq!(
            before != after,
            file == "functions/delivery.sql",
            "{file}: {before} -> {after}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_dropped_midway_leaves_no_lock_behind() {
    let url = database_url().await;
    let name = unique("cancel");
    let ns = TestNs {
        pg: PgBackend::builder(url.clone())
            .namespace(name)
            .pool_size(2)
            .build()
            .unwrap(),
        url,
    };
    // Drop migrate() futures at different points (connecting, migrating, applying files).
    for ms in [1, 5, 20, 50, 100, 200] {
        let _ = tokio::time::timeout(Duration::from_millis(ms), ns.migrate()).await;
    }
    // A dropped call must not leave the migration lock held (on a pooled connection or
    // elsewhere): the next call gets it and completes.
    tokio::time::timeout(WAIT, ns.migrate())
        .await
        .expect("migrate() waited on a lock left behind")
        .unwrap();
    assert!(ns.is_migrated().await.unwrap());
    ns.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
}

/// The key indexes of migrations 0010 and 0013, as a namespace at 0013 has them.
const KEY_INDEXES_0013: &str = "
    CREATE UNIQUE INDEX delivery_state_key_head ON @ns@.delivery_state (group_id, key)
        WHERE key IS NOT NULL AND visible_at < '5000-01-01 00:00:00+00' AND key_limited IS NULL;
    CREATE INDEX delivery_state_key_line ON @ns@.delivery_state (group_id, key, key_seq)
        WHERE key IS NOT NULL AND visible_at >= '5000-01-01 00:00:00+00';
    CREATE INDEX delivery_state_key_slots ON @ns@.delivery_state (group_id, key)
        WHERE key IS NOT NULL AND visible_at < '5000-01-01 00:00:00+00' AND key_limited;";

/// Reads up to 100 deliveries of `group` of stream `orders` through SQL `read`, acks them all
/// (checking every ack counted), and returns their `(k, i)` payload fields in order.
async fn read_and_ack(raw: &tokio_postgres::Client, n: &str, group: &str) -> Vec<(String, i32)> {
    let rows = raw
        .query(
            &format!(
                "SELECT r.payload->>'k', (r.payload->>'i')::int, r.id
                 FROM \"{n}\".read('orders', '{group}', 'c', 100) r ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(2)).collect();
    let acked: i32 = raw
        .query_one(
            &format!("SELECT \"{n}\".ack('orders', '{group}', $1)"),
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(acked as usize, ids.len());
    got
}

/// A namespace at migration 0013 whose ordered and per-key limited groups hold key lines
/// (heads and waiting deliveries; in the limited group one key numbered the way 0013's
/// `set_max_in_flight_per_key` could leave it, a head behind a waiting delivery) upgrades to
/// 0014's one key index: the lines are kept, renumbered where needed, and move on in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_at_0013_with_key_lines_upgrades_to_one_key_index() {
    let ns = namespace().await;
    let raw = ns.raw().await;
    let n = ns.namespace().to_owned();
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('orders');
         SELECT \"{n}\".create_group('orders', 'ord', ordered => true);
         SELECT \"{n}\".create_group('orders', 'lim', max_in_flight_per_key => 2);
         SELECT \"{n}\".create_group('orders', 'fair', fair => true);
         SELECT \"{n}\".publish('orders', jsonb_build_object('k', k, 'i', i), key => 'k' || k)
         FROM generate_series(1, 4) i, generate_series(0, 2) k ORDER BY i, k;"
    ))
    .await
    .unwrap();
    // Key k0 of `lim`: its second head numbered after its last waiting delivery.
    raw.batch_execute(&format!(
        "UPDATE \"{n}\".delivery_state d SET key_seq = x.top + 1
         FROM (SELECT max(key_seq) AS top, (array_agg(message_id ORDER BY key_seq)
                      FILTER (WHERE visible_at < '5000-01-01'))[2] AS head
               FROM \"{n}\".delivery_state
               WHERE group_id = \"{n}\".group_id('orders', 'lim') AND key = 'k0') x
         WHERE d.group_id = \"{n}\".group_id('orders', 'lim') AND d.message_id = x.head;"
    ))
    .await
    .unwrap();
    // Back to 0013's schema: its three key indexes, no `streams.fair`, no `key_heads`, no
    // `wake_waiters`, 0014 to 0016 not applied, and every function file due again.
    raw.batch_execute(&format!(
        "DROP INDEX \"{n}\".delivery_state_key;
             DROP TABLE \"{n}\".key_heads;
             DROP TABLE \"{n}\".wake_waiters;
             ALTER TABLE \"{n}\".streams DROP COLUMN fair;
             DELETE FROM \"{n}\"._sqlx_migrations WHERE version >= 14;
             UPDATE \"{n}\"._pgtide_sql SET checksum = '\\x00';
             {}",
        KEY_INDEXES_0013.replace("@ns@", &format!("\"{n}\""))
    ))
    .await
    .unwrap();
    assert!(!ns.is_migrated().await.unwrap());

    let report = ns.migrate().await.unwrap();
    assert_eq!(
        report.migrations,
        vec![
            "0014_key_index".to_owned(),
            "0015_key_heads".to_owned(),
            "0016_wake_waiters".to_owned()
        ]
    );
    assert!(ns.is_migrated().await.unwrap());
    let indexes: Vec<String> = raw
        .query(
            "SELECT indexname::text FROM pg_indexes
             WHERE schemaname = $1 AND tablename = 'delivery_state' ORDER BY 1",
            &[&n],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        [
            "delivery_state_claim",
            "delivery_state_key",
            "delivery_state_pkey"
        ]
    );
    // In every line the heads come first.
    let broken: i64 = raw
        .query_one(
            &format!(
                "SELECT count(*) FROM (
                   SELECT group_id, key FROM \"{n}\".delivery_state WHERE key IS NOT NULL
                   GROUP BY group_id, key
                   HAVING max(key_seq) FILTER (WHERE visible_at < '5000-01-01')
                        > min(key_seq) FILTER (WHERE visible_at >= '5000-01-01')) x"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(broken, 0, "a line with a head behind a waiting delivery");
    let fair: bool = raw
        .query_one(
            &format!("SELECT fair FROM \"{n}\".streams WHERE name = 'orders'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fair, "streams.fair is set for a stream with a fair group");

    // The lines move on: `ord` one per key at a time, in publish order; `lim` two per key.
    let read = |group: &'static str| read_and_ack(&raw, &n, group);
    for i in 1..=4 {
        let want: Vec<(String, i32)> = (0..3).map(|k| (k.to_string(), i)).collect();
        assert_eq!(read("ord").await, want, "ordered group, round {i}");
    }
    assert!(read("ord").await.is_empty());
    let mut lim: Vec<(String, i32)> = read("lim").await;
    assert_eq!(lim.len(), 6, "two heads per key: {lim:?}");
    lim.extend(read("lim").await);
    assert!(read("lim").await.is_empty());
    lim.sort();
    assert_eq!(
        lim,
        (0..3)
            .flat_map(|k| (1..=4).map(move |i| (k.to_string(), i)))
            .collect::<Vec<_>>()
    );
    assert_eq!(read("fair").await.len(), 12);
}

/// A namespace at migration 0014 whose ordered group holds live key lines (heads in flight,
/// waiting deliveries behind them) and whose per-key limited group holds lines too upgrades to
/// 0015: `key_heads` gets one row per key of the ordered group, the key index loses the ordered
/// heads, and the lines move on in publish order; a key whose line empties loses its row, and
/// its next publish is its head again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_at_0014_with_key_lines_upgrades_to_key_heads() {
    let ns = namespace().await;
    let raw = ns.raw().await;
    let n = ns.namespace().to_owned();
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('orders');
         SELECT \"{n}\".create_group('orders', 'ord', ordered => true);
         SELECT \"{n}\".create_group('orders', 'lim', max_in_flight_per_key => 2);
         SELECT \"{n}\".publish('orders', jsonb_build_object('k', k, 'i', i), key => 'k' || k)
         FROM generate_series(1, 4) i, generate_series(0, 2) k ORDER BY i, k;"
    ))
    .await
    .unwrap();
    // The ordered group's heads in flight across the upgrade.
    let leased = raw
        .query(
            &format!(
                "SELECT r.payload->>'k', (r.payload->>'i')::int, r.id, r.lease_token
                 FROM \"{n}\".read('orders', 'ord', 'c', 100) r ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32)> = leased.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        [
            ("0".to_owned(), 1),
            ("1".to_owned(), 1),
            ("2".to_owned(), 1)
        ]
    );
    // Back to 0014's schema: its key index (every keyed delivery), no `key_heads`, 0015 not
    // applied, and every function file due again.
    raw.batch_execute(&format!(
        "DROP TABLE \"{n}\".key_heads;
         DROP INDEX \"{n}\".delivery_state_key;
         CREATE INDEX delivery_state_key ON \"{n}\".delivery_state (group_id, key, key_seq)
             WHERE key IS NOT NULL;
         DELETE FROM \"{n}\"._sqlx_migrations WHERE version = 15;
         UPDATE \"{n}\"._pgtide_sql SET checksum = '\\x00';"
    ))
    .await
    .unwrap();
    assert!(!ns.is_migrated().await.unwrap());

    let report = ns.migrate().await.unwrap();
    assert_eq!(report.migrations, vec!["0015_key_heads".to_owned()]);
    assert!(ns.is_migrated().await.unwrap());
    let heads_sql = format!(
        "SELECT coalesce(string_agg(h.key, ',' ORDER BY h.key), '') FROM \"{n}\".key_heads h
         WHERE h.group_id = \"{n}\".group_id('orders', 'ord')"
    );
    let heads: String = raw.query_one(&heads_sql, &[]).await.unwrap().get(0);
    assert_eq!(
        heads, "k0,k1,k2",
        "one key_heads row per key of the ordered group"
    );
    let others: i64 = raw
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{n}\".key_heads h
                 WHERE h.group_id <> \"{n}\".group_id('orders', 'ord')"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(others, 0, "key_heads rows only for ordered groups");
    let predicate: String = raw
        .query_one(
            "SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i
             WHERE i.indexrelid = to_regclass(format('%I.delivery_state_key', $1::text))",
            &[&n],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        predicate.contains("key_limited") && predicate.contains("visible_at"),
        "the key index holds waiting and per-key limited deliveries only: {predicate}"
    );

    // The heads leased before the upgrade settle; the lines move on in publish order.
    let ids: Vec<Uuid> = leased.iter().map(|r| r.get(2)).collect();
    let tokens: Vec<i64> = leased.iter().map(|r| r.get(3)).collect();
    let acked: i32 = raw
        .query_one(
            &format!("SELECT \"{n}\".ack('orders', 'ord', $1, $2)"),
            &[&ids, &tokens],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(acked, 3);
    let read = |group: &'static str| read_and_ack(&raw, &n, group);
    for i in 2..=4 {
        let want: Vec<(String, i32)> = (0..3).map(|k| (k.to_string(), i)).collect();
        assert_eq!(read("ord").await, want, "ordered group, round {i}");
    }
    assert!(read("ord").await.is_empty());
    let heads: String = raw.query_one(&heads_sql, &[]).await.unwrap().get(0);
    assert_eq!(heads, "", "drained keys keep no key_heads row");
    // A drained key's next message is its head at once; one behind it waits.
    raw.batch_execute(&format!(
        "SELECT \"{n}\".publish('orders', jsonb_build_object('k', 0, 'i', i), key => 'k0')
         FROM generate_series(5, 6) i ORDER BY i;"
    ))
    .await
    .unwrap();
    assert_eq!(read("ord").await, [("0".to_owned(), 5)]);
    assert_eq!(read("ord").await, [("0".to_owned(), 6)]);
    assert!(read("ord").await.is_empty());

    let mut lim: Vec<(String, i32)> = read("lim").await;
    assert_eq!(lim.len(), 6, "two heads per key: {lim:?}");
    lim.extend(read("lim").await);
    lim.extend(read("lim").await);
    assert!(read("lim").await.is_empty());
    lim.sort();
    let mut want: Vec<(String, i32)> = (0..3)
        .flat_map(|k| (1..=4).map(move |i| (k.to_string(), i)))
        .collect();
    want.extend([("0".to_owned(), 5), ("0".to_owned(), 6)]);
    want.sort();
    assert_eq!(lim, want);
}
