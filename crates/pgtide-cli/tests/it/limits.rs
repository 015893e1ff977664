//! Concurrency limits from the command line (issue 12): `group create --max-in-flight` and
//! `--max-in-flight-per-key`, `group limit` (with `--per-key`) to change or remove them, `group
//! list --json` showing them, and bad values refused as usage errors (exit 2) before anything
//! is written.

use super::{fresh_namespace, pgtide};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_concurrency_limits_are_set_shown_changed_and_validated() {
    let ns = fresh_namespace().await;
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "jobs"]).await.ok();
    for bad in ["0", "-1", "x", "2147483648", "1.5", " 2", ""] {
        let flag = format!("--max-in-flight-per-key={bad}");
        let run = pgtide(&ns, &["group", "create", "jobs", "bad", &flag]).await;
        assert_eq!(run.code, 2, "--max-in-flight-per-key {bad:?}: {run:?}");
        let run = pgtide(&ns, &["group", "limit", "jobs", "bad", bad, "--per-key"]).await;
        assert_eq!(run.code, 2, "group limit {bad:?}: {run:?}");
        let run = pgtide(&ns, &["group", "limit", "jobs", "bad", bad]).await;
        assert_eq!(run.code, 2, "group limit {bad:?}: {run:?}");
    }
    // Ordered already means one per key.
    let run = pgtide(
        &ns,
        &[
            "group",
            "create",
            "jobs",
            "bad",
            "--ordered",
            "--max-in-flight-per-key",
            "2",
        ],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    let listed = pgtide(&ns, &["group", "list", "jobs", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed, serde_json::json!([]), "nothing created");

    pgtide(
        &ns,
        &[
            "group",
            "create",
            "jobs",
            "w",
            "--max-in-flight",
            "9",
            "--max-in-flight-per-key",
            "2",
        ],
    )
    .await
    .ok();
    let listed = pgtide(&ns, &["group", "list", "jobs", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed[0]["max_in_flight"], 9, "{listed}");
    assert_eq!(listed[0]["max_in_flight_per_key"], 2, "{listed}");

    // The limit holds for the CLI's own consumer: two of the key, the unkeyed one.
    for n in 0..5 {
        let data = format!(r#"{{"n":{n}}}"#);
        pgtide(&ns, &["publish", "jobs", "--data", &data, "--key", "k"])
            .await
            .ok();
    }
    pgtide(&ns, &["publish", "jobs", "--data", "{}"]).await.ok();
    // --no-ack: the deliveries stay leased, so the key stays full for the whole wait.
    let got = pgtide(
        &ns,
        &[
            "consume", "jobs", "-g", "w", "-n", "6", "--wait", "2s", "--no-ack",
        ],
    )
    .await
    .ok();
    assert_eq!(got.lines().len(), 3, "{got:?}");

    pgtide(&ns, &["group", "limit", "jobs", "w", "4", "--per-key"])
        .await
        .ok();
    pgtide(&ns, &["group", "limit", "jobs", "w", "off"])
        .await
        .ok();
    let listed = pgtide(&ns, &["group", "list", "jobs", "--json"])
        .await
        .ok()
        .json();
    assert!(listed[0]["max_in_flight"].is_null(), "{listed}");
    assert_eq!(listed[0]["max_in_flight_per_key"], 4, "{listed}");
    pgtide(&ns, &["group", "limit", "jobs", "w", "off", "--per-key"])
        .await
        .ok();
    let listed = pgtide(&ns, &["group", "list", "jobs", "--json"])
        .await
        .ok()
        .json();
    assert!(listed[0]["max_in_flight_per_key"].is_null(), "{listed}");

    let missing = pgtide(&ns, &["group", "limit", "jobs", "nope", "3", "--per-key"]).await;
    assert_ne!(missing.code, 0, "{missing:?}");
    assert!(missing.stderr.contains("nope"), "{missing:?}");
}
