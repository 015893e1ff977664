//! Rate limits in the Postgres engine (issue 12.3) through the SQL surface: `create_group(...,
//! rate => ...)`, `set_rate_limit`, `read()` taking at most the tokens there are, the same rule
//! as the Rust API for hostile values, and the buckets shared by every session.

use crate::common::{namespace, sqlstate};

/// Deliveries `read()` hands out now to `consumer` of group `g` of stream `s`.
async fn read(raw: &tokio_postgres::Client, n: &str, g: &str, batch: i32) -> usize {
    raw.query(
        &format!("SELECT id FROM \"{n}\".read('s', '{g}', 'psql', $1)"),
        &[&batch],
    )
    .await
    .unwrap()
    .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_surface_sets_rate_limits_and_read_takes_only_the_tokens_there_are() {
    let ns = namespace().await;
    let n = ns.namespace().to_owned();
    let raw = ns.raw().await;
    raw.batch_execute(&format!(
        "SELECT \"{n}\".create_stream('s');
         SELECT \"{n}\".create_group('s', 'g', rate => 0.2, burst => 3);
         SELECT \"{n}\".create_group('s', 'k', key_rate => 0.2);
         SELECT \"{n}\".create_group('s', 'free');
         SELECT \"{n}\".publish('s', jsonb_build_object('n', i), key => 'a') FROM generate_series(1, 10) i;"
    ))
    .await
    .unwrap();
    // A full bucket of 3; then nothing for five seconds (0.2/s).
    assert_eq!(read(&raw, &n, "g", 10).await, 3);
    assert_eq!(read(&raw, &n, "g", 10).await, 0);
    // One key at 0.2/s with the default burst (1): one delivery, the rest put off.
    assert_eq!(read(&raw, &n, "k", 10).await, 1);
    assert_eq!(read(&raw, &n, "k", 10).await, 0);
    let put_off: i64 = raw
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{n}\".deliveries WHERE \"group\" = 'k' AND state = 'delayed'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(put_off, 9, "the key's others wait for its tokens");
    assert_eq!(
        read(&raw, &n, "free", 10).await,
        10,
        "other groups unaffected"
    );

    // The group list shows the limits; set_rate_limit changes and removes them.
    let row = raw
        .query_one(
            &format!("SELECT rate, burst, key_rate, key_burst FROM \"{n}\"._group_list('s') WHERE \"group\" = 'g'"),
            &[],
        )
        .await
        .unwrap();
    let got: (Option<f64>, Option<i32>, Option<f64>, Option<i32>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(got, (Some(0.2), Some(3), None, None));
    raw.batch_execute(&format!("SELECT \"{n}\".set_rate_limit('s', 'g', 1000, 2)"))
        .await
        .unwrap();
    assert_eq!(
        read(&raw, &n, "g", 10).await,
        2,
        "a new bucket, full at its burst"
    );
    raw.batch_execute(&format!("SELECT \"{n}\".set_rate_limit('s', 'g', NULL)"))
        .await
        .unwrap();
    assert_eq!(read(&raw, &n, "g", 10).await, 5, "no limit: the rest");
    let missing: bool = raw
        .query_one(
            &format!("SELECT \"{n}\".set_rate_limit('s', 'nope', 1)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!missing);

    // Hostile values: PT001 at every SQL door, nothing created or changed.
    for (rate, burst) in [
        ("0", "NULL"),
        ("-1", "NULL"),
        ("'NaN'", "NULL"),
        ("'Infinity'", "NULL"),
        ("1000001", "NULL"),
        ("0.00001", "NULL"),
        ("1", "0"),
        ("1", "1000001"),
        ("NULL", "5"),
    ] {
        for sql in [
            format!("SELECT \"{n}\".create_group('s', 'bad', rate => {rate}, burst => {burst})"),
            format!(
                "SELECT \"{n}\".create_group('s', 'bad', key_rate => {rate}, key_burst => {burst})"
            ),
            format!("SELECT \"{n}\".set_rate_limit('s', 'k', {rate}, {burst})"),
            format!("SELECT \"{n}\".set_rate_limit('s', 'k', {rate}, {burst}, per_key => true)"),
        ] {
            assert_eq!(sqlstate(&raw, &sql).await, "PT001", "{sql}");
        }
    }
    assert_eq!(
        sqlstate(
            &raw,
            &format!("SELECT \"{n}\".set_rate_limit('s', 'k', 1, per_key => NULL)")
        )
        .await,
        "PT001"
    );
    let groups: i64 = raw
        .query_one(&format!("SELECT count(*) FROM \"{n}\".groups"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(groups, 3);
}

/// The Rust doors: `GroupConfig` limits land in the registry, `set_rate_limit(_per_key)`
/// change them, bad values are `InvalidConfig` before any SQL runs, a missing group is
/// `GroupNotFound`; a consumer waiting on an empty bucket is woken by the next token (no
/// notification announces one), and every consumer shares the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_api_sets_limits_and_fetch_waits_for_the_next_token() {
    use pgtide::{Error, GroupConfig, OutgoingMessage, RateLimit, StreamConfig};
    use std::time::Duration;

    let ns = namespace().await;
    let pg = ns.pg.clone();
    pg.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    let config = GroupConfig::default()
        .rate_limit(RateLimit::per_second(2.0).burst(1))
        .rate_limit_per_key("30/min".parse().unwrap());
    pg.create_group_with("s", "g", &config).await.unwrap();
    let info = pg.groups(Some("s")).await.unwrap();
    assert_eq!(
        info[0].rate_limit,
        Some(RateLimit::per_second(2.0).burst(1))
    );
    assert_eq!(
        info[0].rate_limit_per_key,
        Some(RateLimit::per_second(0.5).burst(1))
    );
    for bad in [
        RateLimit::per_second(f64::NAN),
        RateLimit::per_second(1.0).burst(0),
    ] {
        let e = pg.set_rate_limit("s", "g", Some(bad)).await;
        assert!(matches!(e, Err(Error::InvalidConfig(_))), "{e:?}");
    }
    let e = pg.set_rate_limit("s", "nope", None).await;
    assert!(matches!(e, Err(Error::GroupNotFound { .. })), "{e:?}");
    pg.set_rate_limit_per_key("s", "g", None).await.unwrap();

    let msgs: Vec<OutgoingMessage> = (0..3)
        .map(|n| OutgoingMessage::json(&serde_json::json!({ "n": n })).unwrap())
        .collect();
    pg.publish_batch("s", &msgs).await.unwrap();
    let a = pg.consumer("s", "g", "a").await.unwrap();
    let b = pg.consumer("s", "g", "b").await.unwrap();
    assert_eq!(a.try_fetch(10).await.unwrap().len(), 1, "the burst");
    assert!(b.try_fetch(10).await.unwrap().is_empty(), "shared bucket");
    // The fallback poll (30 s by default) is past the timeout: only the claim's hint can
    // wake these in time.
    let next = b.fetch(10, Duration::from_secs(20)).await.unwrap();
    assert_eq!(next.len(), 1, "woken by the next token");
    let last = a.fetch(10, Duration::from_secs(20)).await.unwrap();
    assert_eq!(last.len(), 1);
}
