//! Rate limits from the command line (issue 12.3): `group create --rate/--key-rate`, `group
//! rate` to change or remove them, `group list --json` showing them, and bad rates refused as
//! usage errors before anything is written.

use super::{fresh_namespace, pgtide};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rate_limits_are_set_shown_changed_and_validated() {
    let ns = fresh_namespace().await;
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "mail"]).await.ok();
    for bad in [
        "0/s",
        "-1/s",
        "NaN",
        "inf/s",
        "1e3/s",
        "10/fortnight",
        "2000000/s",
        "",
    ] {
        // `--rate=VALUE`: a value starting with '-' is the value, not a flag.
        let flag = format!("--rate={bad}");
        let run = pgtide(&ns, &["group", "create", "mail", "bad", &flag]).await;
        assert_eq!(run.code, 2, "--rate {bad:?}: {run:?}");
        assert!(run.stderr.contains("rate"), "{run:?}");
        let flag = format!("--key-rate={bad}");
        let run = pgtide(&ns, &["group", "create", "mail", "bad", &flag]).await;
        assert_eq!(run.code, 2, "--key-rate {bad:?}: {run:?}");
    }
    for burst in ["0", "1000001", "-1", "x"] {
        let flag = format!("--burst={burst}");
        let run = pgtide(
            &ns,
            &["group", "create", "mail", "bad", "--rate", "1/s", &flag],
        )
        .await;
        assert_eq!(run.code, 2, "--burst {burst:?}: {run:?}");
    }
    let run = pgtide(&ns, &["group", "create", "mail", "bad", "--burst", "5"]).await;
    assert_eq!(run.code, 2, "--burst without --rate: {run:?}");
    let listed = pgtide(&ns, &["group", "list", "mail", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed, serde_json::json!([]), "nothing created");

    pgtide(
        &ns,
        &[
            "group",
            "create",
            "mail",
            "out",
            "--rate",
            "6000/min",
            "--burst",
            "20",
            "--key-rate",
            "1/2s",
        ],
    )
    .await
    .ok();
    let listed = pgtide(&ns, &["group", "list", "mail", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed[0]["rate"], 100.0, "{listed}");
    assert_eq!(listed[0]["burst"], 20, "{listed}");
    assert_eq!(listed[0]["key_rate"], 0.5, "{listed}");
    assert_eq!(listed[0]["key_burst"], 1, "{listed}");

    pgtide(&ns, &["group", "rate", "mail", "out", "5/s"])
        .await
        .ok();
    pgtide(&ns, &["group", "rate", "mail", "out", "off", "--per-key"])
        .await
        .ok();
    let listed = pgtide(&ns, &["group", "list", "mail", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed[0]["rate"], 5.0, "{listed}");
    assert_eq!(listed[0]["burst"], 5, "{listed}");
    assert!(listed[0]["key_rate"].is_null(), "{listed}");
    let bad = pgtide(
        &ns,
        &["group", "rate", "mail", "out", "off", "--burst", "3"],
    )
    .await;
    assert_eq!(bad.code, 2, "{bad:?}");
    let missing = pgtide(&ns, &["group", "rate", "mail", "nope", "1/s"]).await;
    assert_ne!(missing.code, 0, "{missing:?}");
    assert!(missing.stderr.contains("nope"), "{missing:?}");

    // The limit holds for the CLI's own consumer: five tokens at once, no more.
    for n in 0..8 {
        let data = format!(r#"{{"n":{n}}}"#);
        pgtide(&ns, &["publish", "mail", "--data", &data])
            .await
            .ok();
    }
    pgtide(
        &ns,
        &["group", "rate", "mail", "out", "1/h", "--burst", "5"],
    )
    .await
    .ok();
    let got = pgtide(
        &ns,
        &["consume", "mail", "-g", "out", "-n", "8", "--wait", "2s"],
    )
    .await
    .ok();
    assert_eq!(got.lines().len(), 5, "{got:?}");
}
