//! Hostile input at the command line (issue 8, item 4): durations past the library's rule are
//! usage errors (exit 2) wherever a duration or an age is taken, and a reader that closes the
//! pipe early ends the command quietly (exit 0) instead of a panic (exit 101).

use std::process::Stdio;

use pgtide::{GroupStart, StreamConfig};

use super::{command, pgtide};
use crate::common::namespace;

#[tokio::test]
async fn durations_past_the_rule_are_usage_errors() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let cases: &[&[&str]] = &[
        &["group", "create", "s", "g2", "--from", "14000000w"],
        &["group", "reset", "s", "g", "--from", "14000000w"],
        &["group", "reset", "s", "g", "--from", "9999-01-01T00:00:00Z"],
        &["publish", "s", "--delay", "14000000w", "--data", "{}"],
        &["consume", "s", "--group", "g", "--lease", "14000000w"],
        &["stream", "update", "s", "--lease", "14000000w"],
        &["stream", "create", "s2", "--retention", "36501d"],
    ];
    for args in cases {
        let run = pgtide(&ns, args).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("36500") || run.stderr.contains("100 years"),
            "{args:?}: {run:?}"
        );
    }
    // Nothing was created or published by the refused commands.
    assert!(ns.pg.create_group("s", "g2", GroupStart::New).await.is_ok());
}

#[tokio::test]
async fn a_closed_stdout_ends_table_and_json_commands_quietly() {
    let ns = namespace().await;
    for i in 0..3 {
        ns.stream_with_groups(&format!("s{i}"), StreamConfig::default(), &["g"])
            .await;
    }
    for args in [
        &["stream", "list"][..],
        &["stream", "list", "--json"],
        &["group", "list", "s0"],
        &["stats"],
        &["stats", "--json"],
    ] {
        let mut c = command(&ns, args);
        c.stdout(Stdio::piped());
        let mut child = c.spawn().unwrap();
        // Close the read end before the command writes anything: every write hits EPIPE.
        drop(child.stdout.take());
        let out = tokio::time::timeout(super::RUN_TIMEOUT, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
