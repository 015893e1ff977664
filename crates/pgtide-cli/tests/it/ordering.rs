//! Ordering keys from the command line (issue 12): `group create --ordered`, `publish --key`,
//! the key in `consume` output and `group list`, and a bad key refused before anything is written.

use super::{depth, fresh_namespace, pgtide};

fn payload_n(line: &str) -> (String, i64) {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    (
        v["key"].as_str().unwrap_or("-").to_owned(),
        v["payload"]["n"].as_i64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_ordered_group_delivers_one_key_at_a_time() {
    let ns = fresh_namespace().await;
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "orders"]).await.ok();
    let created = pgtide(&ns, &["group", "create", "orders", "ship", "--ordered"])
        .await
        .ok();
    assert!(
        created.stdout.contains("created ordered group"),
        "{created:?}"
    );
    // Asking for the other setting of an existing group is refused.
    let flipped = pgtide(
        &ns,
        &["group", "create", "orders", "ship", "--if-not-exists"],
    )
    .await;
    assert_ne!(flipped.code, 0, "{flipped:?}");
    assert!(flipped.stderr.contains("ordered"), "{flipped:?}");
    let listed = pgtide(&ns, &["group", "list", "orders", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed[0]["ordered"], true, "{listed}");

    for n in 1..=3 {
        let data = format!(r#"{{"n":{n}}}"#);
        pgtide(&ns, &["publish", "orders", "--data", &data, "--key", "a"])
            .await
            .ok();
    }
    pgtide(
        &ns,
        &["publish", "orders", "--data", r#"{"n":1}"#, "--key", "b"],
    )
    .await
    .ok();
    // A bad key: usage error, nothing published.
    let bad = pgtide(&ns, &["publish", "orders", "--data", "{}", "--key", "a\tb"]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("--key"), "{bad:?}");
    assert_eq!(depth(&ns, "orders", "ship").await, (4, 0, 0, 0));

    // Without acking: one head per key, nothing else of key `a` is handed out.
    let held = pgtide(
        &ns,
        &[
            "consume", "orders", "-g", "ship", "-n", "10", "--no-ack", "--lease", "1h",
        ],
    )
    .await
    .ok();
    let mut got: Vec<(String, i64)> = held.lines().into_iter().map(payload_n).collect();
    got.sort();
    assert_eq!(got, [("a".to_owned(), 1), ("b".to_owned(), 1)], "{held:?}");
    assert_eq!(depth(&ns, "orders", "ship").await, (2, 0, 2, 0));

    let keys = pgtide(&ns, &["group", "keys", "orders", "ship", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(keys[0]["key"], "a", "{keys}");
    assert_eq!(
        (keys[0]["pending"].as_i64(), keys[0]["waiting"].as_i64()),
        (Some(3), Some(2))
    );
    assert_eq!(keys[0]["head_state"], "in_flight");
    assert_eq!(keys[1]["key"], "b");
    let table = pgtide(&ns, &["group", "keys", "orders", "ship", "--limit", "1"])
        .await
        .ok();
    assert_eq!(table.lines().len(), 2, "a header and one key: {table:?}");
    let missing = pgtide(&ns, &["group", "keys", "orders", "nope"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_ordered_group_consumes_a_key_in_publish_order() {
    let ns = fresh_namespace().await;
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "orders"]).await.ok();
    pgtide(&ns, &["group", "create", "orders", "ship", "--ordered"])
        .await
        .ok();
    for n in 1..=5 {
        let data = format!(r#"{{"n":{n}}}"#);
        pgtide(&ns, &["publish", "orders", "--data", &data, "--key", "k"])
            .await
            .ok();
    }
    // One run: each ack lets the next of the key go, and the run keeps fetching until it has 5.
    let one = pgtide(
        &ns,
        &[
            "consume", "orders", "-g", "ship", "-n", "5", "--wait", "10s",
        ],
    )
    .await
    .ok();
    let seen: Vec<(String, i64)> = one.lines().into_iter().map(payload_n).collect();
    let want: Vec<(String, i64)> = (1..=5).map(|n| ("k".to_owned(), n)).collect();
    assert_eq!(seen, want);
}
