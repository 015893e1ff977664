//! The SQL surface, driven from plain SQL as a psql user or another language would.

use crate::common::namespace;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_publish_read_ack_and_views() {
    let ns = namespace().await;
    let raw = ns.raw().await;
    let n = ns.namespace();
    raw.batch_execute("SET search_path TO public")
        .await
        .unwrap();
    let one = |sql: String| {
        let raw = &raw;
        async move { raw.query_one(&sql, &[]).await.unwrap() }
    };
    assert!(one(format!("SELECT \"{n}\".create_stream('orders')"))
        .await
        .get::<_, bool>(0));
    assert!(!one(format!("SELECT \"{n}\".create_stream('orders')"))
        .await
        .get::<_, bool>(0));
    assert!(
        one(format!("SELECT \"{n}\".create_group('orders', 'billing')"))
            .await
            .get::<_, bool>(0)
    );
    let id: uuid::Uuid = one(format!(
        "SELECT \"{n}\".publish('orders', '{{\"id\": 1}}'::jsonb)"
    ))
    .await
    .get(0);
    let id2: uuid::Uuid = one(format!(
        "SELECT \"{n}\".publish('orders', '{{\"id\": 2}}', headers => '{{\"k\": \"v\"}}', delay => interval '1 hour', dedupe_key => 'two')"
    ))
    .await
    .get(0);
    let dup: uuid::Uuid = one(format!(
        "SELECT \"{n}\".publish('orders', '{{\"id\": 3}}', dedupe_key => 'two')"
    ))
    .await
    .get(0);
    assert_eq!(id2, dup);

    // Publish from the application's own trigger, in its transaction.
    raw.batch_execute(&format!(
        "CREATE TABLE \"{n}\".app_orders (id int primary key);
         CREATE FUNCTION \"{n}\".app_orders_publish() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM \"{n}\".publish('orders', jsonb_build_object('id', NEW.id)); RETURN NEW; END $$;
         CREATE TRIGGER app_orders_publish AFTER INSERT ON \"{n}\".app_orders
             FOR EACH ROW EXECUTE FUNCTION \"{n}\".app_orders_publish();"
    ))
    .await
    .unwrap();
    raw.batch_execute(&format!(
        "BEGIN; INSERT INTO \"{n}\".app_orders VALUES (41); ROLLBACK;"
    ))
    .await
    .unwrap();
    raw.batch_execute(&format!("INSERT INTO \"{n}\".app_orders VALUES (42)"))
        .await
        .unwrap();

    let stats = one(format!(
        "SELECT ready, delayed, in_flight, dead FROM \"{n}\".stream_stats WHERE stream = 'orders' AND \"group\" = 'billing'"
    ))
    .await;
    assert_eq!(
        (
            stats.get::<_, i64>(0),
            stats.get::<_, i64>(1),
            stats.get::<_, i64>(2),
            stats.get::<_, i64>(3)
        ),
        (2, 1, 0, 0)
    );

    let rows = raw
        .query(&format!("SELECT id, payload, headers, attempt FROM \"{n}\".read('orders', 'billing', 'consumer-1', 10)"), &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, uuid::Uuid>(0), id);
    assert_eq!(
        rows[0].get::<_, serde_json::Value>(1),
        serde_json::json!({"id": 1})
    );
    assert_eq!(
        rows[1].get::<_, serde_json::Value>(1),
        serde_json::json!({"id": 42})
    );
    assert_eq!(rows[0].get::<_, i32>(3), 1);

    let pending = one(format!(
        "SELECT count(*), min(consumer), min(state) FROM \"{n}\".deliveries WHERE stream = 'orders' AND state = 'in_flight'"
    ))
    .await;
    assert_eq!(pending.get::<_, i64>(0), 2);
    assert_eq!(pending.get::<_, String>(1), "consumer-1");

    let acked: i32 = one(format!(
        "SELECT \"{n}\".ack('orders', 'billing', ARRAY['{id}']::uuid[])"
    ))
    .await
    .get(0);
    assert_eq!(acked, 1);
    let again: i32 = one(format!(
        "SELECT \"{n}\".ack('orders', 'billing', ARRAY['{id}']::uuid[])"
    ))
    .await
    .get(0);
    assert_eq!(again, 0);
    let id42 = rows[1].get::<_, uuid::Uuid>(0);
    let termed: i32 = one(format!(
        "SELECT \"{n}\".term('orders', 'billing', ARRAY['{id42}']::uuid[], 'bad order')"
    ))
    .await
    .get(0);
    assert_eq!(termed, 1);
    let dead = one(format!(
        "SELECT message_id, reason, payload FROM \"{n}\".dead_letters"
    ))
    .await;
    assert_eq!(dead.get::<_, uuid::Uuid>(0), id42);
    assert_eq!(dead.get::<_, String>(1), "bad order");
    assert_eq!(
        dead.get::<_, serde_json::Value>(2),
        serde_json::json!({"id": 42})
    );
    let replayed: i32 = one(format!("SELECT \"{n}\".replay_dead('orders', 'billing')"))
        .await
        .get(0);
    assert_eq!(replayed, 1);
    let rows = raw
        .query(
            &format!("SELECT id FROM \"{n}\".read('orders', 'billing', 'c2', 10)"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let nacked: i32 = one(format!("SELECT \"{n}\".nack('orders', 'billing', ARRAY['{id42}']::uuid[], interval '1 hour', 'later')"))
        .await
        .get(0);
    assert_eq!(nacked, 1);

    // Bad names and unknown objects raise clear errors with pgtide's SQLSTATEs.
    let err = raw
        .query_one(&format!("SELECT \"{n}\".create_stream('Bad Name')"), &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "PT001");
    assert!(err.as_db_error().unwrap().message().contains("invalid"));
    let err = raw
        .query_one(&format!("SELECT \"{n}\".publish('nope', '1')"), &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "PT002");
    let err = raw
        .query(
            &format!("SELECT * FROM \"{n}\".read('orders', 'nope', 'c', 1)"),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "PT003");
}

/// `read` returns a lease token per delivery; the by-name settles given the tokens refuse a
/// delivery someone else now holds, and without tokens they are unfenced (documented).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_settles_are_fenced_by_lease_tokens() {
    let ns = namespace().await;
    let raw = ns.raw().await;
    let n = ns.namespace();
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s'); SELECT \"{n}\".create_group('s', 'g');
         SELECT \"{n}\".publish('s', '1');"
    ))
    .await
    .unwrap();
    let read = format!("SELECT id, lease_token, attempt FROM \"{n}\".read('s', 'g', $1)");
    let first = raw.query_one(&read, &[&"psql-1"]).await.unwrap();
    let (id, stale): (uuid::Uuid, i64) = (first.get(0), first.get(1));
    // psql-1 hands it back; psql-2 claims it with the same attempt number but a new token.
    let released: i64 = raw
        .query_one(
            &format!("SELECT \"{n}\".release_consumer('s', 'g', 'psql-1')"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(released, 1);
    let second = raw.query_one(&read, &[&"psql-2"]).await.unwrap();
    let fresh: i64 = second.get(1);
    assert_eq!(second.get::<_, uuid::Uuid>(0), id);
    assert_eq!(second.get::<_, i32>(2), first.get::<_, i32>(2));
    assert_ne!(fresh, stale);
    for call in [
        "ack('s', 'g', ARRAY[$1]::uuid[], ARRAY[$2]::int8[])",
        "nack('s', 'g', ARRAY[$1]::uuid[], tokens => ARRAY[$2]::int8[])",
        "term('s', 'g', ARRAY[$1]::uuid[], tokens => ARRAY[$2]::int8[])",
        "in_progress('s', 'g', ARRAY[$1]::uuid[], tokens => ARRAY[$2]::int8[])",
    ] {
        let settled: i32 = raw
            .query_one(&format!("SELECT \"{n}\".{call}"), &[&id, &stale])
            .await
            .unwrap()
            .get(0);
        assert_eq!(settled, 0, "stale token settled through {call}");
    }
    let settled: i32 = raw
        .query_one(
            &format!("SELECT \"{n}\".ack('s', 'g', ARRAY[$1]::uuid[], ARRAY[$2]::int8[])"),
            &[&id, &fresh],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(settled, 1);
}
