//! What a new user tripped over (issue 10, items 6-8): help that separates global options and
//! shows examples, `new`/`oldest` for where a group starts, what `migrate` applied, warnings and
//! dry runs on publish, zero counts and intervals refused, wording, and one timestamp format.

use std::process::Stdio;

use pgtide::PgBackend;

use super::{depth, fresh_namespace, pgtide, pgtide_stdin, run_with, Run};
use crate::common::{namespace, TestNs};

/// `pgtide args...` with no database in the environment (for what is refused before connecting).
async fn offline(args: &[&str]) -> Run {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgtide"));
    c.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("PGTIDE_BACKEND")
        .env_remove("PGTIDE_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    run_with(c, None).await
}

/// True for the one timestamp format of every output: RFC 3339, UTC, milliseconds.
fn is_time(text: &str) -> bool {
    text.len() == "2024-05-01T12:00:00.000Z".len()
        && text.ends_with('Z')
        && chrono::DateTime::parse_from_rfc3339(text).is_ok()
}

#[tokio::test]
async fn cli_help_separates_global_options_and_shows_an_example_per_command() {
    let commands: &[&[&str]] = &[
        &[],
        &["migrate"],
        &["grant"],
        &["stream"],
        &["stream", "create"],
        &["stream", "update"],
        &["stream", "list"],
        &["stream", "show"],
        &["stream", "delete"],
        &["stream", "purge"],
        &["group"],
        &["group", "create"],
        &["group", "list"],
        &["group", "delete"],
        &["group", "reset"],
        &["publish"],
        &["consume"],
        &["stats"],
        &["dead"],
        &["dead", "list"],
        &["dead", "show"],
        &["dead", "replay"],
        &["dead", "purge"],
        &["trim"],
        &["health"],
        &["scout"],
        &["bench"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let help = offline(&args).await.ok().stdout;
        let (own, global) = help
            .split_once("Global options:")
            .unwrap_or_else(|| panic!("no global options heading in {args:?}:\n{help}"));
        assert!(!own.contains("--database-url"), "{args:?}:\n{help}");
        let global = global.split("Example").next().unwrap_or_default();
        for flag in ["--database-url", "--namespace", "--backend", "--log-format"] {
            assert!(global.contains(flag), "{flag} in {args:?}:\n{help}");
        }
        let example = help
            .split_once("Example")
            .map(|(_, rest)| rest)
            .unwrap_or_else(|| panic!("no example in {args:?}:\n{help}"));
        assert!(example.contains("pgtide "), "{args:?}:\n{help}");
    }
    let publish = offline(&["publish", "--help"]).await.ok().stdout;
    let own = publish.split("Global options:").next().unwrap_or_default();
    assert!(own.contains("--dry-run"), "{publish}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_migrate_says_what_it_applied() {
    let ns = fresh_namespace().await;
    let latest = PgBackend::latest_migration();
    let first = pgtide(&ns, &["migrate"]).await.ok();
    assert_eq!(
        first.stdout.trim(),
        format!(
            "installed namespace {:?} (migrations 1–{latest})",
            ns.namespace()
        ),
        "{first:?}"
    );
    let again = pgtide(&ns, &["migrate"]).await.ok();
    assert_eq!(
        again.stdout.trim(),
        format!(
            "namespace {:?} is up to date (migration {latest})",
            ns.namespace()
        ),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_group_start_is_new_or_oldest_with_the_old_words_as_aliases() {
    let ns = namespace().await;
    pgtide(&ns, &["stream", "create", "s"]).await.ok();
    // Published before any group exists: warned about on stderr.
    let lonely = pgtide(&ns, &["publish", "s", "--data", "1"]).await.ok();
    assert!(
        lonely
            .stderr
            .contains("warning: stream \"s\" has no groups")
            && lonely.stderr.contains("--from oldest"),
        "{lonely:?}"
    );
    let created = |group: &'static str, from: Option<&'static str>| {
        let ns: &TestNs = &ns;
        async move {
            let mut args = vec!["group", "create", "s", group];
            if let Some(from) = from {
                args.extend(["--from", from]);
            }
            pgtide(ns, &args).await.ok().stdout
        }
    };
    let oldest = "starting with the oldest retained message";
    let new = "starting with new messages";
    assert!(created("a", Some("oldest")).await.contains(oldest));
    assert!(created("b", None).await.contains(new));
    assert!(created("c", Some("beginning")).await.contains(oldest));
    assert!(created("d", Some("now")).await.contains(new));
    assert!(created("e", Some("new")).await.contains(new));
    for (group, ready) in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", 0)] {
        assert_eq!(depth(&ns, "s", group).await.0, ready, "group {group}");
    }
    // With groups, no warning.
    let heard = pgtide(&ns, &["publish", "s", "--data", "2"]).await.ok();
    assert!(heard.stderr.is_empty(), "{heard:?}");

    let skipped = pgtide(&ns, &["group", "reset", "s", "b", "--from", "new"])
        .await
        .ok();
    assert!(
        skipped
            .stdout
            .contains("to new messages: 1 delivery skipped, 0 messages queued again"),
        "{skipped:?}"
    );
    let replayed = pgtide(&ns, &["group", "reset", "s", "d", "--from", "oldest"])
        .await
        .ok();
    assert!(
        replayed.stdout.contains(
            "to the oldest retained message: 0 deliveries skipped, 1 message queued again"
        ),
        "{replayed:?}"
    );
    let help = pgtide(&ns, &["group", "create", "--help"])
        .await
        .ok()
        .stdout;
    assert!(help.contains("[default: new]"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publish_dry_run_prints_what_would_be_published() {
    let ns = namespace().await;
    ns.stream_with_groups("s", Default::default(), &["g"]).await;
    let one = pgtide(
        &ns,
        &[
            "publish",
            "s",
            "--data",
            r#"{"a":1}"#,
            "--header",
            "k=v",
            "--delay",
            "5s",
            "--dry-run",
        ],
    )
    .await
    .ok();
    let line = one.json();
    assert_eq!(line["stream"], "s");
    assert_eq!(line["payload"], serde_json::json!({"a": 1}));
    assert_eq!(line["payload_encoding"], "json");
    assert_eq!(line["headers"], serde_json::json!({"k": "v"}));
    assert_eq!(line["delay_secs"], 5.0);
    assert!(
        one.stderr.contains("ok: 1 message would be published"),
        "{one:?}"
    );

    let lines = pgtide_stdin(
        &ns,
        &["publish", "s", "--dry-run"],
        "{\"n\":1}\n{\"n\":2}\n",
    )
    .await
    .ok();
    let payloads: Vec<serde_json::Value> = lines
        .lines()
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["payload"].clone())
        .collect();
    assert_eq!(
        payloads,
        vec![serde_json::json!({"n": 1}), serde_json::json!({"n": 2})]
    );
    assert!(
        lines.stderr.contains("ok: 2 messages would be published"),
        "{lines:?}"
    );

    let file = std::env::temp_dir().join(format!("{}.jsonl", ns.namespace()));
    std::fs::write(&file, "\"x\"\n").unwrap();
    let from_file = pgtide(
        &ns,
        &[
            "publish",
            "s",
            "--raw",
            "--file",
            file.to_str().unwrap(),
            "--lines",
            "--dry-run",
        ],
    )
    .await
    .ok();
    let _ = std::fs::remove_file(&file);
    let printed = from_file.json();
    assert_eq!(
        (&printed["payload"], &printed["payload_encoding"]),
        (&serde_json::json!("\"x\""), &serde_json::json!("text"))
    );
    assert!(
        from_file.stderr.contains("ok: 1 message would"),
        "{from_file:?}"
    );
    assert_eq!(
        depth(&ns, "s", "g").await,
        (0, 0, 0, 0),
        "nothing published"
    );
}

#[tokio::test]
async fn cli_rejects_a_zero_count_and_a_zero_watch_interval() {
    let count = offline(&["consume", "s", "--group", "g", "--count", "0"]).await;
    assert_eq!(count.code, 2, "{count:?}");
    assert!(
        count.stderr.contains("--count") && count.stderr.contains("use 1 or more"),
        "{count:?}"
    );
    let watch = offline(&["stats", "--watch", "0s"]).await;
    assert_eq!(watch.code, 2, "{watch:?}");
    assert!(
        watch.stderr.contains("--watch") && watch.stderr.contains("is zero"),
        "{watch:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_deleting_what_does_not_exist_does_not_suggest_creating_it() {
    let ns = namespace().await;
    let stream = pgtide(&ns, &["stream", "delete", "nope"]).await;
    assert_eq!(stream.code, 3, "{stream:?}");
    assert!(stream.stderr.contains("nothing to delete"), "{stream:?}");
    assert!(!stream.stderr.contains("create"), "{stream:?}");
    ns.stream_with_groups("s", Default::default(), &[]).await;
    let group = pgtide(&ns, &["group", "delete", "s", "nope"]).await;
    assert_eq!(group.code, 3, "{group:?}");
    assert!(group.stderr.contains("nothing to delete"), "{group:?}");
    assert!(!group.stderr.contains("create"), "{group:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_counts_jitter_and_timestamps_read_as_written() {
    let ns = namespace().await;
    pgtide(
        &ns,
        &[
            "stream",
            "create",
            "s",
            "--max-deliver",
            "1",
            "--backoff-jitter",
            "0.1",
        ],
    )
    .await
    .ok();
    pgtide(&ns, &["group", "create", "s", "g"]).await.ok();
    pgtide(&ns, &["publish", "s", "--data", "1"]).await.ok();
    pgtide(&ns, &["consume", "s", "-g", "g", "--nack", "--wait", "10s"])
        .await
        .ok();
    assert_eq!(depth(&ns, "s", "g").await, (0, 0, 0, 1));

    // Timestamps: one format in tables, text and JSON.
    let dead = pgtide(&ns, &["dead", "list", "s", "--json"])
        .await
        .ok()
        .json();
    assert!(is_time(dead["dead_at"].as_str().unwrap()), "{dead}");
    let table = pgtide(&ns, &["dead", "list", "s"]).await.ok();
    assert!(
        table.lines()[1].split_whitespace().any(is_time),
        "{table:?}"
    );
    let shown = pgtide(&ns, &["stream", "show", "s", "--json"])
        .await
        .ok()
        .json();
    assert!(is_time(shown["created_at"].as_str().unwrap()), "{shown}");
    assert_eq!(shown["backoff_jitter"], serde_json::json!(0.1));
    let text = pgtide(&ns, &["stream", "show", "s"]).await.ok().stdout;
    assert!(text.contains("(jitter 0.1)"), "{text}");
    let created = text
        .lines()
        .find_map(|l| l.strip_prefix("created:"))
        .map(str::trim)
        .unwrap_or_default();
    assert!(is_time(created), "{text}");
    let list = pgtide(&ns, &["stream", "list"]).await.ok();
    assert!(list.lines()[1].split_whitespace().any(is_time), "{list:?}");
    let groups = pgtide(&ns, &["group", "list", "s", "--json"])
        .await
        .ok()
        .json();
    assert!(
        is_time(groups[0]["created_at"].as_str().unwrap()),
        "{groups}"
    );
    let groups = pgtide(&ns, &["group", "list", "s"]).await.ok();
    assert!(
        groups.lines()[1].split_whitespace().any(is_time),
        "{groups:?}"
    );
    let stats = pgtide(&ns, &["stats", "--json"]).await.ok().json();
    assert!(is_time(stats["at"].as_str().unwrap()), "{stats}");

    // Counts of one are singular.
    let replayed = pgtide(&ns, &["dead", "replay", "s", "--all"]).await.ok();
    assert_eq!(
        replayed.stdout.trim(),
        "replayed 1 dead letter of group \"g\"",
        "{replayed:?}"
    );
    let trimmed = pgtide(&ns, &["trim", "s", "--max-len", "0"]).await.ok();
    assert_eq!(
        trimmed.stdout.trim(),
        "trimmed 1 message from stream \"s\"",
        "{trimmed:?}"
    );
    pgtide(&ns, &["publish", "s", "--data", "2"]).await.ok();
    let purged = pgtide(&ns, &["stream", "purge", "s"]).await.ok();
    assert!(
        purged.stdout.contains("1 pending delivery dropped"),
        "{purged:?}"
    );
}
