//! What `consume` leaves behind when it exits: `--no-ack` keeps what it printed leased (the
//! attempt counts toward max_deliver), `--requeue-on-exit` hands it back at once, counted.

use std::time::Duration;

use crate::common::WAIT;
use crate::{depth, fresh_namespace, pgtide};

/// Waits until the group's `(ready, delayed, in_flight, dead)` is `want` (a lease expiring).
async fn wait_depth(ns: &crate::TestNs, stream: &str, group: &str, want: (i64, i64, i64, i64)) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = depth(ns, stream, group).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "depth of {stream}/{group} stayed {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parse(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_consume_no_ack_counts_the_attempt_until_max_deliver() {
    let ns = fresh_namespace().await;
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "s", "--max-deliver", "2"])
        .await
        .ok();
    pgtide(&ns, &["group", "create", "s", "g"]).await.ok();
    let id = pgtide(&ns, &["publish", "s", "--data", r#"{"poison":true}"#])
        .await
        .ok()
        .stdout
        .trim()
        .to_owned();
    let peek = [
        "consume", "s", "-g", "g", "--no-ack", "--lease", "1s", "--wait", "5s",
    ];
    for attempt in 1..=2 {
        let got = pgtide(&ns, &peek).await.ok();
        let d = parse(got.stdout.trim());
        assert_eq!(
            (d["id"].as_str(), d["attempt"].as_i64()),
            (Some(id.as_str()), Some(attempt))
        );
        // Still leased after the exit, not handed back uncounted.
        assert_eq!(depth(&ns, "s", "g").await, (0, 0, 1, 0));
        wait_depth(&ns, "s", "g", (1, 0, 0, 0)).await;
    }
    // The lease of the last allowed attempt expired: the next claim dead-letters it.
    let third = pgtide(&ns, &peek).await.ok();
    assert_eq!(third.stdout, "", "{third:?}");
    assert_eq!(depth(&ns, "s", "g").await, (0, 0, 0, 1));
    let dead = pgtide(&ns, &["dead", "list", "s", "--group", "g", "--json"])
        .await
        .ok();
    let letter = parse(dead.stdout.trim());
    assert_eq!(letter["id"], id.as_str());
    assert_eq!(letter["reason"], "max_deliver");
    assert_eq!(letter["attempts"], 2);

    pgtide(&ns, &["dead", "replay", "s", "--group", "g", "--id", &id])
        .await
        .ok();
    let again = pgtide(&ns, &["consume", "s", "-g", "g", "--wait", "5s"])
        .await
        .ok();
    let d = parse(again.stdout.trim());
    assert_eq!(
        (d["id"].as_str(), d["attempt"].as_i64()),
        (Some(id.as_str()), Some(1))
    );
    assert_eq!(depth(&ns, "s", "g").await, (0, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_consume_requeue_on_exit_hands_back_at_once_counting_the_attempt() {
    let ns = fresh_namespace().await;
    pgtide(&ns, &["migrate"]).await.ok();
    pgtide(&ns, &["stream", "create", "s", "--max-deliver", "2"])
        .await
        .ok();
    pgtide(&ns, &["group", "create", "s", "g"]).await.ok();
    pgtide(&ns, &["publish", "s", "--data", "1"]).await.ok();
    let peek = [
        "consume",
        "s",
        "-g",
        "g",
        "--no-ack",
        "--requeue-on-exit",
        "--wait",
        "5s",
    ];
    let first = pgtide(&ns, &peek).await.ok();
    assert_eq!(parse(first.stdout.trim())["attempt"], 1);
    // Visible again at once (the stream's lease is 30 s), the attempt counted.
    assert_eq!(depth(&ns, "s", "g").await, (1, 0, 0, 0));
    let second = pgtide(&ns, &peek).await.ok();
    assert_eq!(parse(second.stdout.trim())["attempt"], 2);
    // That was the last allowed attempt: handing it back dead-letters it.
    assert_eq!(depth(&ns, "s", "g").await, (0, 0, 0, 1));

    let usage = pgtide(&ns, &["consume", "s", "-g", "g", "--requeue-on-exit"]).await;
    assert_eq!(usage.code, 2, "--requeue-on-exit needs --no-ack: {usage:?}");
}
