//! Fair groups from the command line (issue 12.5): `group create --fair`, `group weight` to set
//! or reset a key's weight, `group list --json` and `group keys` showing them, bad weights and
//! keys refused as usage errors (exit 2) before anything is written.

use super::{fresh_namespace, pgtide};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_fair_groups_and_weights_are_set_shown_and_validated() {
    let ns = fresh_namespace().await;
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "jobs"]).await.ok();
    let both = pgtide(
        &ns,
        &["group", "create", "jobs", "bad", "--fair", "--ordered"],
    )
    .await;
    assert_eq!(both.code, 2, "--fair with --ordered: {both:?}");
    let listed = pgtide(&ns, &["group", "list", "jobs", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed, serde_json::json!([]), "nothing created");

    pgtide(&ns, &["group", "create", "jobs", "work", "--fair"])
        .await
        .ok();
    pgtide(&ns, &["group", "create", "jobs", "plain"])
        .await
        .ok();
    let listed = pgtide(&ns, &["group", "list", "jobs", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed[0]["group"], "plain", "{listed}");
    assert_eq!(listed[0]["fair"], false, "{listed}");
    assert_eq!(listed[1]["fair"], true, "{listed}");

    for bad in [
        "0", "-1", "0.001", "1000.5", "NaN", "inf", "1e2", "", "3x", "1.2.3", ".",
    ] {
        let run = pgtide(
            &ns,
            &["group", "weight", "jobs", "work", "tenant-a", "--", bad],
        )
        .await;
        assert_eq!(run.code, 2, "weight {bad:?}: {run:?}");
    }
    for bad_key in ["", "a\u{7}b"] {
        let run = pgtide(&ns, &["group", "weight", "jobs", "work", bad_key, "2"]).await;
        assert_eq!(run.code, 2, "key {bad_key:?}: {run:?}");
    }
    let not_fair = pgtide(&ns, &["group", "weight", "jobs", "plain", "tenant-a", "2"]).await;
    assert_eq!(not_fair.code, 2, "a group that is not fair: {not_fair:?}");
    let missing = pgtide(&ns, &["group", "weight", "jobs", "nope", "tenant-a", "2"]).await;
    assert_ne!(missing.code, 0, "{missing:?}");
    assert!(missing.stderr.contains("nope"), "{missing:?}");

    pgtide(&ns, &["group", "weight", "jobs", "work", "tenant-a", "3"])
        .await
        .ok();
    pgtide(&ns, &["group", "weight", "jobs", "work", "tenant-b", "0.5"])
        .await
        .ok();
    let keys = pgtide(&ns, &["group", "keys", "jobs", "work", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(
        keys,
        serde_json::json!([{"key": "tenant-a", "weight": 3.0}, {"key": "tenant-b", "weight": 0.5}])
    );
    pgtide(
        &ns,
        &["group", "weight", "jobs", "work", "tenant-a", "default"],
    )
    .await
    .ok();
    let table = pgtide(&ns, &["group", "keys", "jobs", "work"]).await.ok();
    assert!(!table.stdout.contains("tenant-a"), "{table:?}");
    assert!(table.stdout.contains("tenant-b"), "{table:?}");

    // The CLI's own consumer sees the shares: tenant-a (weight 1 again) has 20 queued before
    // tenant-b's 5; with weights 1 : 0.5, the first 12 hold 8 of a and 4 of b.
    for n in 0..20 {
        let data = format!(r#"{{"t":"tenant-a","n":{n}}}"#);
        pgtide(
            &ns,
            &["publish", "jobs", "--data", &data, "--key", "tenant-a"],
        )
        .await
        .ok();
    }
    for n in 0..5 {
        let data = format!(r#"{{"t":"tenant-b","n":{n}}}"#);
        pgtide(
            &ns,
            &["publish", "jobs", "--data", &data, "--key", "tenant-b"],
        )
        .await
        .ok();
    }
    let got = pgtide(
        &ns,
        &["consume", "jobs", "-g", "work", "-n", "12", "--wait", "2s"],
    )
    .await
    .ok();
    assert_eq!(got.lines().len(), 12, "{got:?}");
    let b = got
        .lines()
        .iter()
        .filter(|l| l.contains("tenant-b"))
        .count();
    assert_eq!(b, 4, "{got:?}");
}
