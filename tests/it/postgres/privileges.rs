//! Least privilege (issue 9, item 3): a role granted with `grant_runtime` holds no table or
//! sequence privilege, so as a hostile client it cannot forge messages, rewrite or delete
//! deliveries and dead letters, take the scout lease by hand or read another namespace; yet
//! everything the engine does at runtime works through the namespace's SECURITY DEFINER
//! functions. A read-only role reads views and stats and nothing else.
//!
//! Each test creates its own LOGIN role (trust authentication on the test server) and drops it at
//! the end, whatever happened.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtide::{
    CancellationToken, Delivery, Error, GroupStart, Outcome, PgBackend, StreamConfig, Worker,
};
use sqlx::Connection;
use uuid::Uuid;

use crate::common::{eventually, json, namespace, sqlstate, unique, TestNs, WAIT};

/// A LOGIN role of the test's own, dropped (with every privilege it holds) when the guard goes.
pub(crate) struct Role {
    pub(crate) name: String,
    /// The test database's URL with this role as the user.
    pub(crate) url: String,
    admin_url: String,
}

impl Role {
    pub(crate) async fn create(ns: &TestNs, prefix: &str) -> Role {
        let name = unique(prefix);
        ns.raw()
            .await
            .batch_execute(&format!("CREATE ROLE \"{name}\" LOGIN"))
            .await
            .unwrap();
        Role {
            url: url_as(&ns.url, &name),
            name,
            admin_url: ns.url.clone(),
        }
    }

    /// A backend of the namespace connected as this role.
    fn backend(&self, ns: &TestNs) -> PgBackend {
        PgBackend::builder(self.url.clone())
            .namespace(ns.namespace())
            .pool_size(4)
            .build()
            .unwrap()
    }

    pub(crate) async fn raw(&self) -> tokio_postgres::Client {
        crate::common::raw_client(&self.url).await
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let name = &self.name;
        // DROP OWNED takes the role's privileges (and default privileges) in this database with
        // it; it owns nothing else.
        crate::common::execute_detached(
            &self.admin_url,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';
                             DROP OWNED BY \"{name}\"; DROP ROLE IF EXISTS \"{name}\""
            ),
        );
    }
}

/// `base` (the test database's URL) with `user` as the user, over TCP to the same server.
fn url_as(base: &str, user: &str) -> String {
    let config = tokio_postgres::Config::from_str(base).unwrap();
    let host = config
        .get_hosts()
        .iter()
        .find_map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
            #[allow(unreachable_patterns)]
            _ => None,
        })
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("postgres");
    format!("postgres://{user}@{host}:{port}/{db}")
}

/// Tables (partitions included) and sequences of namespace `ns` on which `role` holds any
/// privilege.
pub(crate) async fn table_rights(
    raw: &tokio_postgres::Client,
    ns: &str,
    role: &str,
) -> Vec<String> {
    raw.query(
        "SELECT c.relname::text FROM pg_class c
          WHERE c.relnamespace = $1::text::regnamespace
            AND ((c.relkind IN ('r', 'p')
                  AND has_table_privilege($2, c.oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER'))
                 OR (c.relkind = 'S' AND has_sequence_privilege($2, c.oid, 'USAGE,SELECT,UPDATE')))
          ORDER BY 1",
        &[&ns, &role],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn denied<T: std::fmt::Debug>(what: &str, r: pgtide::Result<T>) {
    assert!(
        matches!(r, Err(Error::PermissionDenied(_))),
        "{what}: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_role_holds_no_table_and_cannot_forge_or_steal() {
    let ns = namespace().await;
    let other = namespace().await;
    other
        .stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let n = ns.namespace().to_owned();
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let role = Role::create(&ns, "rt").await;
    ns.grant_runtime(&role.name).await.unwrap();
    let rt = role.backend(&ns);

    // A delivery in flight and a dead letter, made by the role itself.
    rt.publish_batch(
        "s",
        &[json(serde_json::json!(1)), json(serde_json::json!(2))],
    )
    .await
    .unwrap();
    let c = rt.consumer("s", "g", "c").await.unwrap();
    let ds = c.fetch(2, WAIT).await.unwrap();
    assert_eq!(ds.len(), 2);
    c.term(&ds[1], "bad").await.unwrap();

    let raw = role.raw().await;
    let m = ds[0].id();
    for sql in [
        // forging a message and its delivery by hand
        format!("INSERT INTO \"{n}\".messages (stream_id, id, payload) VALUES (1, '{}', '\\x00')", Uuid::now_v7()),
        format!("INSERT INTO \"{n}\".delivery_state (group_id, message_id, visible_at) VALUES (1, '{m}', now())"),
        format!("INSERT INTO \"{n}\".counter_deltas (group_id, pending) VALUES (1, 1000)"),
        // rewriting or deleting deliveries, dead letters, the registry
        format!("UPDATE \"{n}\".delivery_state SET visible_at = now(), consumer = NULL"),
        format!("DELETE FROM \"{n}\".delivery_state"),
        format!("DELETE FROM \"{n}\".dead_letter_state"),
        format!("UPDATE \"{n}\".streams SET max_deliver = 1000"),
        format!("TRUNCATE \"{n}\".messages"),
        // taking the scout lease by hand
        format!("UPDATE \"{n}\".scout_lease SET holder = 'thief', term = term + 1, expires_at = now() + interval '1 day'"),
        // reading the tables behind the views, and the fence sequence
        format!("SELECT * FROM \"{n}\".messages"),
        format!("SELECT * FROM \"{n}\".delivery_state"),
        format!("SELECT * FROM \"{n}\".scout_lease"),
        format!("SELECT * FROM \"{n}\"._sqlx_migrations"),
        format!("SELECT nextval('\"{n}\".lease_tokens')"),
        // creating objects in the namespace (a shadowing function, a table)
        format!("CREATE TABLE \"{n}\".x (i int)"),
        format!("CREATE FUNCTION \"{n}\".uuid_v8() RETURNS int LANGUAGE sql AS 'SELECT 1'"),
        // the owner's functions: destructive operations and internal helpers
        format!("SELECT \"{n}\".delete_stream('s')"),
        format!("SELECT \"{n}\".purge_stream('s')"),
        format!("SELECT \"{n}\".delete_group('s', 'g')"),
        format!("SELECT \"{n}\".purge_dead('s', 'g')"),
        format!("SELECT \"{n}\".replay_dead('s', 'g')"),
        format!("SELECT * FROM \"{n}\".reset_group('s', 'g')"),
        format!("SELECT \"{n}\".trim_stream('s', max_len => 0)"),
        format!("SELECT \"{n}\"._purge_dead(1)"),
        format!("SELECT \"{n}\".drop_expired_partitions(1, now() + interval '100 years')"),
        format!("SELECT \"{n}\".ensure_partition(1, now())"),
        format!("SELECT \"{n}\".grant_runtime('{}')", role.name),
        format!("SELECT \"{n}\"._regrant()"),
        // maintenance "as if" later would drop partitions before their retention is up
        format!("SELECT * FROM \"{n}\".maintain(now() + interval '30 days')"),
        // another namespace: neither its tables nor its functions
        format!("SELECT * FROM \"{o}\".streams", o = other.namespace()),
        format!("SELECT \"{o}\".publish('s', '1')", o = other.namespace()),
        format!("SELECT * FROM \"{o}\".stream_stats", o = other.namespace()),
    ] {
        assert_eq!(sqlstate(&raw, &sql).await, "42501", "{sql}");
    }

    // What the role may call still checks its arguments: no lease for a century.
    assert_eq!(
        sqlstate(
            &raw,
            &format!("SELECT \"{n}\"._scout_acquire('thief', 0, interval '1000 years')")
        )
        .await,
        "PT001"
    );

    // The catalog agrees, for every table (partitions included) and every function.
    let leaks: Vec<String> = ns
        .raw()
        .await
        .query(
            "SELECT 'PUBLIC may run ' || p.proname FROM pg_proc p
              WHERE p.pronamespace = $1::text::regnamespace
                AND EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                            WHERE a.grantee = 0)
             UNION ALL
             SELECT 'unpinned definer ' || p.proname FROM pg_proc p
              WHERE p.pronamespace = $1::text::regnamespace AND p.prosecdef
                AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)",
            &[&n],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(leaks.is_empty(), "{leaks:?}");
    assert_eq!(
        table_rights(&ns.raw().await, &n, &role.name).await,
        Vec::<String>::new()
    );

    // The Rust API says what is wrong and what to do.
    denied("delete_stream", rt.delete_stream("s").await);
    denied(
        "update_stream",
        rt.update_stream("s", &StreamConfig::default()).await,
    );
    denied("purge_dead", rt.purge_dead("s", "g", None).await);
    denied(
        "maintain_at later",
        rt.maintain_at(chrono::Utc::now() + chrono::Duration::days(30))
            .await,
    );
    let message = rt.delete_stream("s").await.unwrap_err().to_string();
    assert!(message.contains("pgtide grant"), "{message}");

    // Nothing above changed anything: the delivery is still the role's, the dead letter there.
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.dead), (0, 1, 1), "{s:?}");
    c.ack(&ds[0]).await.unwrap();
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runtime_role_publishes_consumes_settles_and_runs_the_scout() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let role = Role::create(&ns, "rt").await;
    ns.grant_runtime(&role.name).await.unwrap();
    // Granting twice is fine.
    ns.grant_runtime(&role.name).await.unwrap();
    let rt = PgBackend::builder(role.url.clone())
        .namespace(ns.namespace())
        .pool_size(8)
        .scout_ttl(Duration::from_millis(1000))
        .scout_max_interval(Duration::from_millis(50))
        .maintenance_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    assert!(rt.is_migrated().await.unwrap());

    // Streams and groups: created idempotently at start-up, read back.
    assert!(rt
        .ensure_stream("t", &StreamConfig::default())
        .await
        .unwrap());
    assert!(rt.ensure_group("t", "g", GroupStart::New).await.unwrap());
    assert!(!rt.ensure_group("t", "g", GroupStart::New).await.unwrap());
    assert!(rt.stream("t").await.unwrap().is_some());
    assert_eq!(rt.groups(None).await.unwrap().len(), 2);

    // Publish: the fast path, the dedupe path, the SQL function, a tokio-postgres transaction
    // and a sqlx transaction.
    rt.publish_batch(
        "s",
        &[json(serde_json::json!(1)), json(serde_json::json!(2))],
    )
    .await
    .unwrap();
    let keyed = rt
        .publish("s", json(serde_json::json!(3)).dedupe_key("k"))
        .await
        .unwrap();
    assert!(!keyed.duplicate);
    assert!(
        rt.publish("s", json(serde_json::json!(3)).dedupe_key("k"))
            .await
            .unwrap()
            .duplicate
    );
    let mut raw = role.raw().await;
    raw.execute(&format!("SELECT \"{n}\".publish('s', '4')"), &[])
        .await
        .unwrap();
    let tx = raw.transaction().await.unwrap();
    rt.publish_in(&tx, "s", &[json(serde_json::json!(5))])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&role.url).await.unwrap();
    let mut stx = conn.begin().await.unwrap();
    rt.publish_sqlx(&mut stx, "s", &[json(serde_json::json!(6))])
        .await
        .unwrap();
    stx.commit().await.unwrap();
    assert_eq!(rt.stats("s", "g").await.unwrap().ready, 6);

    // Consume and settle every way.
    let c = rt.consumer("s", "g", "c").await.unwrap();
    let mut ds = c.fetch(6, WAIT).await.unwrap();
    assert_eq!(ds.len(), 6);
    c.in_progress(&mut ds[0], Some(Duration::from_secs(60)))
        .await
        .unwrap();
    c.ack(&ds[0]).await.unwrap();
    c.nack(&ds[1], Some(Duration::ZERO), Some("again"))
        .await
        .unwrap();
    c.term(&ds[2], "bad").await.unwrap();
    let tx = raw.transaction().await.unwrap();
    c.ack_in(&tx, &ds[3]).await.unwrap();
    tx.commit().await.unwrap();
    let mut stx = conn.begin().await.unwrap();
    c.ack_sqlx(&mut stx, &ds[4]).await.unwrap();
    stx.commit().await.unwrap();
    c.release_batch(&[&ds[5]]).await.unwrap();
    let again = c.fetch(2, WAIT).await.unwrap();
    assert_eq!(again.len(), 2, "the nacked and the released delivery");
    let (report, next) = c
        .ack_and_fetch(&again.iter().collect::<Vec<_>>(), 10)
        .await
        .unwrap();
    assert_eq!((report.settled.len(), next.len()), (2, 0));
    // The SQL surface for other languages.
    raw.execute(&format!("SELECT \"{n}\".publish('s', '7')"), &[])
        .await
        .unwrap();
    let row = raw
        .query_one(
            &format!("SELECT id, lease_token FROM \"{n}\".read('s', 'g', 'psql', 1)"),
            &[],
        )
        .await
        .unwrap();
    let (id, token): (Uuid, i64) = (row.get(0), row.get(1));
    let acked: i32 = raw
        .query_one(
            &format!("SELECT \"{n}\".ack('s', 'g', ARRAY[$1::uuid], ARRAY[$2::int8])"),
            &[&id, &token],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(acked, 1);

    // Stats, views and maintenance.
    let s = rt.stats("s", "g").await.unwrap();
    assert_eq!(
        (s.ready, s.in_flight, s.delayed, s.dead),
        (0, 0, 0, 1),
        "{s:?}"
    );
    assert!(rt.stats_all().await.unwrap().len() >= 2);
    assert_eq!(rt.dead_letters("s", "g", 10).await.unwrap().len(), 1);
    for view in [
        "stream_stats",
        "deliveries",
        "dead_letters",
        "messages_view",
        "scout",
    ] {
        raw.query(&format!("SELECT * FROM \"{n}\".{view}"), &[])
            .await
            .unwrap();
    }
    rt.maintain().await.unwrap();
    rt.publish_counts().await.unwrap();

    // The worker.
    let n_msgs = 50;
    rt.publish_batch(
        "t",
        &(0..n_msgs)
            .map(|i| json(serde_json::json!(i)))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let seen: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let worker = Worker::new(rt.consumer("t", "g", "w").await.unwrap(), {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                let i: i64 = d.json().map_err(|e| e.to_string())?;
                seen.lock().unwrap().insert(i);
                Ok::<_, String>(Outcome::Ack)
            }
        }
    })
    .concurrency(4);
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    eventually(WAIT, "the worker handled everything", || {
        seen.lock().unwrap().len() == n_msgs
    })
    .await;
    // Idle, the worker's process registers as waiting, as the runtime role (`_wake_register`),
    // so the role's SQL publish notifies and the worker takes it long before its 30 s poll.
    let owner = ns.raw().await;
    let registered = format!("SELECT count(*) FROM \"{n}\".wake_waiters");
    let deadline = std::time::Instant::now() + WAIT;
    while owner
        .query_one(&registered, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never registered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    raw.execute(&format!("SELECT \"{n}\".publish('t', '1000')"), &[])
        .await
        .unwrap();
    eventually(WAIT, "the worker handled the SQL publish", || {
        seen.lock().unwrap().contains(&1000)
    })
    .await;
    token.cancel();
    assert_eq!(run.await.unwrap().unwrap().acked, n_msgs as u64 + 1);

    // The scout: elected, due checks and maintenance, and seen by `health`'s query.
    rt.start_scout();
    let mut scout = rt.watch_scout();
    tokio::time::timeout(
        WAIT,
        scout.wait_for(|s| {
            s.is_leader && s.last_check_at.is_some() && s.last_maintenance_at.is_some()
        }),
    )
    .await
    .expect("the runtime role's scout leads and works")
    .unwrap();
    assert!(rt.scout_holder().await.unwrap().is_some());
    assert_eq!(rt.scout_status().failed_renewals, 0);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_role_reads_views_and_stats_and_nothing_else() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    ns.publish("s", json(serde_json::json!(1))).await.unwrap();
    let role = Role::create(&ns, "ro").await;
    // Runtime first, then read-only: a downgrade, not a union.
    ns.grant_runtime(&role.name).await.unwrap();
    ns.grant_read_only(&role.name).await.unwrap();
    let ro = role.backend(&ns);
    let raw = role.raw().await;

    assert!(ro.is_migrated().await.unwrap());
    assert_eq!(ro.stats("s", "g").await.unwrap().ready, 1);
    assert_eq!(ro.stats_all().await.unwrap().len(), 1);
    assert_eq!(ro.streams().await.unwrap().len(), 1);
    assert_eq!(ro.groups(Some("s")).await.unwrap().len(), 1);
    ro.publish_counts().await.unwrap();
    ro.scout_holder().await.unwrap();
    for view in [
        "stream_stats",
        "deliveries",
        "dead_letters",
        "messages_view",
        "scout",
    ] {
        raw.query(&format!("SELECT * FROM \"{n}\".{view}"), &[])
            .await
            .unwrap();
    }

    denied("publish", ro.publish("s", json(serde_json::json!(2))).await);
    let c = ro.consumer("s", "g", "c").await.unwrap();
    denied("fetch", c.try_fetch(1).await);
    denied("maintain", ro.maintain().await);
    denied(
        "create_stream",
        ro.ensure_stream("t", &StreamConfig::default()).await,
    );
    for sql in [
        format!("SELECT \"{n}\".publish('s', '1')"),
        format!("SELECT * FROM \"{n}\".read('s', 'g', 'c')"),
        format!(
            "SELECT \"{n}\".ack('s', 'g', ARRAY['{}'::uuid])",
            Uuid::now_v7()
        ),
        format!("SELECT \"{n}\"._ack(1, ARRAY['{}'::uuid])", Uuid::now_v7()),
        format!("SELECT \"{n}\"._scout_acquire('x', 0, interval '1 day')"),
        format!("SELECT * FROM \"{n}\".delivery_state"),
        format!("DELETE FROM \"{n}\".dead_letter_state"),
    ] {
        assert_eq!(sqlstate(&raw, &sql).await, "42501", "{sql}");
    }
    assert_eq!(ns.stats("s", "g").await.unwrap().ready, 1);

    // Revoked: nothing at all, not even the views.
    assert!(ns.revoke_runtime(&role.name).await.unwrap());
    denied("stats after revoke", ro.stats("s", "g").await);
    assert_eq!(
        sqlstate(&raw, &format!("SELECT * FROM \"{n}\".stream_stats")).await,
        "42501"
    );
    // Granting the owner itself would revoke its own rights: refused.
    let owner: String = ns
        .raw()
        .await
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(matches!(
        ns.grant_read_only(&owner).await,
        Err(Error::InvalidConfig(_))
    ));
    ro.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_keeps_the_grants_of_recorded_roles_when_functions_are_re_created() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let role = Role::create(&ns, "rt").await;
    ns.grant_runtime(&role.name).await.unwrap();
    // A release that re-creates the settle functions: they come back executable by PUBLIC and
    // by nobody granted, until migrate() puts the recorded grants back.
    let owner = ns.raw().await;
    owner
        .batch_execute(&format!(
            "DROP FUNCTION \"{n}\".ack(text, text, uuid[], bigint[]);
             DELETE FROM \"{n}\"._pgtide_sql WHERE file = 'functions/delivery.sql'"
        ))
        .await
        .unwrap();
    let report = ns.migrate().await.unwrap();
    assert_eq!(report.sql_files, ["functions/delivery.sql"]);

    let raw = role.raw().await;
    raw.execute(&format!("SELECT \"{n}\".publish('s', '1')"), &[])
        .await
        .unwrap();
    let id: Uuid = raw
        .query_one(&format!("SELECT id FROM \"{n}\".read('s', 'g', 'c')"), &[])
        .await
        .unwrap()
        .get(0);
    let acked: i32 = raw
        .query_one(
            &format!("SELECT \"{n}\".ack('s', 'g', ARRAY[$1::uuid])"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(acked, 1);
    let public: bool = owner
        .query_one(
            &format!("SELECT has_function_privilege('public', '\"{n}\".ack(text, text, uuid[], bigint[])', 'EXECUTE')"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!public, "PUBLIC must not run the re-created function");
}

/// A role whose default isolation is SERIALIZABLE (a DBA's `ALTER ROLE … SET
/// default_transaction_isolation`) still publishes keyed messages into an ordered group and
/// settles them: pgtide's sessions pin READ COMMITTED, which its claims and key lines are
/// written for (before, every keyed publish and settle of an ordered group failed with PT001).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_defaulting_to_serializable_uses_ordered_groups() {
    let ns = namespace().await;
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group_with("s", "o", &pgtide::GroupConfig::default().ordered(true))
        .await
        .unwrap();
    let role = Role::create(&ns, "ser").await;
    ns.grant_runtime(&role.name).await.unwrap();
    ns.raw()
        .await
        .batch_execute(&format!(
            "ALTER ROLE \"{}\" SET default_transaction_isolation = 'serializable'",
            role.name
        ))
        .await
        .unwrap();
    let isolation: String = role
        .raw()
        .await
        .query_one("SHOW default_transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        isolation, "serializable",
        "the role's own sessions default to it"
    );
    let rt = role.backend(&ns);
    let msgs: Vec<pgtide::OutgoingMessage> = (0..4)
        .map(|i| json(serde_json::json!({ "i": i })).key(format!("k{}", i % 2)))
        .collect();
    rt.publish_batch("s", &msgs).await.unwrap();
    let c = rt.consumer("s", "o", "c").await.unwrap();
    let mut seen = vec![];
    for _ in 0..2 {
        let batch = c.fetch(10, WAIT).await.unwrap();
        assert_eq!(batch.len(), 2, "one head per key");
        for d in &batch {
            seen.push(
                d.json::<serde_json::Value>().unwrap()["i"]
                    .as_i64()
                    .unwrap(),
            );
        }
        c.ack_batch(&batch.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }
    seen.sort();
    assert_eq!(seen, [0, 1, 2, 3]);
    rt.shutdown().await;
}
