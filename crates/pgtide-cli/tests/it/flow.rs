//! The main flow: migrate → stream/group → publish (flag, file, 10 000 lines of stdin) →
//! consume → stats → a poison message to dead letters → replay → consume again; plus bad input.

use std::collections::HashSet;

use super::{depth, fresh_namespace, pgtide, pgtide_stdin};
use crate::common::{namespace, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publish_consume_dead_letter_flow() {
    let ns = fresh_namespace().await;
    let up = pgtide(&ns, &["migrate"]).await.ok();
    assert!(up.stdout.contains("installed namespace"), "{up:?}");
    pgtide(
        &ns,
        &[
            "stream",
            "create",
            "orders",
            "--lease",
            "30s",
            "--max-deliver",
            "2",
            "--backoff",
            "10ms",
            "--retention",
            "7d",
        ],
    )
    .await
    .ok();
    let shown = pgtide(&ns, &["stream", "show", "orders", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(shown["max_deliver"], 2);
    assert_eq!(shown["lease_secs"], 30.0);
    assert_eq!(shown["retention_secs"], 7.0 * 86_400.0);
    pgtide(&ns, &["group", "create", "orders", "billing"])
        .await
        .ok();
    pgtide(&ns, &["group", "create", "orders", "audit"])
        .await
        .ok();

    // --data with a header
    let first = pgtide(
        &ns,
        &[
            "publish",
            "orders",
            "--data",
            r#"{"n":-1}"#,
            "--header",
            "source=cli",
        ],
    )
    .await
    .ok();
    let first_id = first.stdout.trim().to_owned();
    // --file
    let path = std::env::temp_dir().join(format!("{}.json", unique("pgtide")));
    std::fs::write(&path, "{\n  \"n\": -2\n}\n").unwrap();
    let from_file = pgtide(
        &ns,
        &["publish", "orders", "--file", path.to_str().unwrap()],
    )
    .await
    .ok();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(from_file.lines().len(), 1);
    // stdin, 10 000 lines
    let input: String = (0..10_000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    let many = pgtide_stdin(&ns, &["publish", "orders"], input).await.ok();
    let mut published: HashSet<String> = many.lines().iter().map(|s| s.to_string()).collect();
    assert_eq!(published.len(), 10_000);
    published.insert(first_id.clone());
    published.insert(from_file.stdout.trim().to_owned());

    // A malformed line rejects its whole batch and names the line.
    let bad = pgtide_stdin(
        &ns,
        &["publish", "orders"],
        "{\"ok\":1}\n{oops\n{\"ok\":2}\n",
    )
    .await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("line 2"), "{bad:?}");
    assert!(bad.stderr.contains("nothing was published"), "{bad:?}");
    assert_eq!(bad.stderr.lines().count(), 1, "{bad:?}");
    assert_eq!(depth(&ns, "orders", "billing").await, (10_002, 0, 0, 0));

    // Consume everything: one JSON object per line, acked after printing.
    let consumed = pgtide(
        &ns,
        &[
            "consume", "orders", "-g", "billing", "-n", "20000", "--batch", "1000",
        ],
    )
    .await
    .ok();
    let mut seen = HashSet::new();
    for line in consumed.lines() {
        let d: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(d["stream"], "orders");
        assert_eq!(d["group"], "billing");
        assert_eq!(d["attempt"], 1);
        assert_eq!(d["payload_encoding"], "json");
        assert!(d["payload"]["n"].is_i64(), "{line}");
        if d["id"] == first_id.as_str() {
            assert_eq!(d["headers"]["source"], "cli");
            assert_eq!(d["payload"]["n"], -1);
        }
        seen.insert(d["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, published);
    assert_eq!(depth(&ns, "orders", "billing").await, (0, 0, 0, 0));
    assert_eq!(depth(&ns, "orders", "audit").await, (10_002, 0, 0, 0));

    // A poison message: nacked until max_deliver (2), then a dead letter.
    let poison = pgtide(&ns, &["publish", "orders", "--raw", "--data", "poison"])
        .await
        .ok();
    let poison_id = poison.stdout.trim().to_owned();
    for attempt in 1..=2 {
        let got = pgtide(
            &ns,
            &[
                "consume", "orders", "-g", "billing", "--nack", "--wait", "10s",
            ],
        )
        .await
        .ok();
        let d: serde_json::Value = serde_json::from_str(got.stdout.trim()).unwrap();
        assert_eq!(d["id"], poison_id.as_str());
        assert_eq!(d["attempt"], attempt);
        assert_eq!(d["payload"], "poison");
        assert_eq!(d["payload_encoding"], "text");
    }
    assert_eq!(depth(&ns, "orders", "billing").await, (0, 0, 0, 1));
    let dead = pgtide(
        &ns,
        &["dead", "list", "orders", "--group", "billing", "--json"],
    )
    .await
    .ok();
    let letter: serde_json::Value = serde_json::from_str(dead.stdout.trim()).unwrap();
    assert_eq!(letter["id"], poison_id.as_str());
    assert_eq!(letter["reason"], "max_deliver");
    assert_eq!(letter["attempts"], 2);
    assert_eq!(letter["payload"], "poison");
    let shown = pgtide(&ns, &["dead", "show", "orders", "--id", &poison_id])
        .await
        .ok();
    assert_eq!(shown.json()["group"], "billing");

    // Replay, then it is consumed again with a fresh attempt count.
    let replayed = pgtide(
        &ns,
        &[
            "dead", "replay", "orders", "--group", "billing", "--id", &poison_id,
        ],
    )
    .await
    .ok();
    assert!(replayed.stdout.contains("replayed 1"), "{replayed:?}");
    assert_eq!(depth(&ns, "orders", "billing").await, (1, 0, 0, 0));
    let again = pgtide(
        &ns,
        &["consume", "orders", "-g", "billing", "--wait", "10s"],
    )
    .await
    .ok();
    let d: serde_json::Value = serde_json::from_str(again.stdout.trim()).unwrap();
    assert_eq!(
        (d["id"].as_str(), d["attempt"].as_i64()),
        (Some(poison_id.as_str()), Some(1))
    );
    assert_eq!(depth(&ns, "orders", "billing").await, (0, 0, 0, 0));
    let missing = pgtide(&ns, &["dead", "replay", "orders", "--id", &poison_id]).await;
    assert_eq!(missing.code, 3, "{missing:?}");

    // Replay the group from the beginning, then trim the stream to its newest 3 messages.
    let reset = pgtide(
        &ns,
        &["group", "reset", "orders", "billing", "--from", "beginning"],
    )
    .await
    .ok();
    assert!(reset.stdout.contains("10003 messages queued"), "{reset:?}");
    assert_eq!(depth(&ns, "orders", "billing").await.0, 10_003);
    let trimmed = pgtide(&ns, &["trim", "orders", "--max-len", "3"])
        .await
        .ok();
    assert!(
        trimmed.stdout.contains("trimmed 10000 messages"),
        "{trimmed:?}"
    );
    assert_eq!(depth(&ns, "orders", "billing").await, (3, 0, 0, 0));
    assert_eq!(depth(&ns, "orders", "audit").await, (3, 0, 0, 0));
    let skip = pgtide(&ns, &["group", "reset", "orders", "audit", "--from", "now"])
        .await
        .ok();
    assert!(skip.stdout.contains("3 deliveries skipped"), "{skip:?}");

    pgtide(&ns, &["stream", "delete", "orders"]).await.ok();
    assert_eq!(pgtide(&ns, &["stream", "show", "orders"]).await.code, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bad_input_writes_nothing_and_exits_with_documented_codes() {
    let ns = namespace().await;
    pgtide(&ns, &["stream", "create", "s1"]).await.ok();
    pgtide(&ns, &["group", "create", "s1", "g"]).await.ok();

    let cases: &[(&[&str], i32)] = &[
        (&["stream", "create", "Bad Name"], 2),
        (&["stream", "create", "s1"], 5),
        (&["stream", "create", "s2", "--lease", "30"], 2),
        (&["publish", "nope", "--data", "{}"], 3),
        (&["publish", "s1", "--data", "{not json"], 2),
        (&["publish", "s1", "--data", "{}", "--header", "novalue"], 2),
        (&["consume", "s1", "-g", "missing"], 3),
        (&["group", "reset", "s1", "g", "--from", "yesterday"], 2),
        (
            &[
                "dead",
                "show",
                "s1",
                "--id",
                "01900000-0000-7000-8000-000000000000",
            ],
            3,
        ),
        (&["--backend", "redis://127.0.0.1", "stats"], 2),
        (&["--namespace", "not_installed_here", "stats"], 3),
    ];
    for (args, code) in cases {
        let r = pgtide(&ns, args).await;
        assert_eq!(r.code, *code, "{args:?}: {r:?}");
        assert_eq!(
            r.stderr.lines().count(),
            1,
            "one line on stderr: {args:?}: {r:?}"
        );
        assert!(
            r.stderr.starts_with("pgtide: ") || r.stderr.starts_with("error:"),
            "{r:?}"
        );
    }
    let unreachable = super::run_with(
        {
            let mut c = super::command(&ns, &["stats"]);
            c.env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/test");
            c
        },
        None,
    )
    .await;
    assert_eq!(unreachable.code, 1, "{unreachable:?}");
    assert!(
        unreachable.stderr.contains("cannot connect"),
        "{unreachable:?}"
    );

    // --file --lines checks the whole file first: a bad line 3 of 1500 publishes nothing.
    let path = std::env::temp_dir().join(format!("{}.ndjson", unique("pgtide")));
    let mut text: String = (0..1500).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    text.replace_range(
        text.find("{\"i\":2}").unwrap()..text.find("{\"i\":3}").unwrap(),
        "{x\n",
    );
    std::fs::write(&path, text).unwrap();
    let r = pgtide(
        &ns,
        &[
            "publish",
            "s1",
            "--file",
            path.to_str().unwrap(),
            "--lines",
            "--batch-size",
            "100",
        ],
    )
    .await;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("line 3:"), "{r:?}");
    assert_eq!(r.stdout, "");
    // A bad line in stdin after full batches: the earlier batches are in, its batch is not.
    let mut input: String = (0..250).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    input.push_str("not json\n{\"i\":251}\n");
    let r = pgtide_stdin(&ns, &["publish", "s1", "--batch-size", "100"], input).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("line 251:"), "{r:?}");
    assert!(
        r.stderr
            .contains("lines 1-200 (200 messages) were published"),
        "{r:?}"
    );
    assert_eq!(r.lines().len(), 200);
    assert_eq!(super::depth(&ns, "s1", "g").await, (200, 0, 0, 0));

    // Dedupe: the second publish returns the first id and says so.
    let a = pgtide(&ns, &["publish", "s1", "--data", "1", "--dedupe-key", "k"])
        .await
        .ok();
    let b = pgtide(&ns, &["publish", "s1", "--data", "2", "--dedupe-key", "k"])
        .await
        .ok();
    assert_eq!(a.stdout, b.stdout);
    assert!(b.stderr.contains("duplicate"), "{b:?}");
    // Delayed messages show as delayed.
    pgtide(&ns, &["publish", "s1", "--data", "3", "--delay", "1h"])
        .await
        .ok();
    assert_eq!(super::depth(&ns, "s1", "g").await, (201, 1, 0, 0));
}

/// A payload an event worker cannot decode (published with the CLI, a valid envelope but not the
/// handler's type) is dead-lettered at once, and `dead list` shows it with reason `malformed`
/// and the attempt it died on, in the table and in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_dead_list_shows_malformed_for_an_undecodable_event() {
    use std::sync::{Arc, Mutex};

    use pgtide::{CancellationToken, Outcome, OutgoingMessage, Worker};

    let ns = namespace().await;
    pgtide(&ns, &["stream", "create", "events", "--max-deliver", "5"])
        .await
        .ok();
    pgtide(&ns, &["group", "create", "events", "billing"])
        .await
        .ok();
    // The handler takes events whose payload is a number; this one is an object.
    let produced_at = chrono::Utc::now().to_rfc3339();
    let bad = pgtide(
        &ns,
        &[
            "publish",
            "events",
            "--data",
            r#"{"order":"x"}"#,
            "--header",
            "event-type=order.created",
            "--header",
            "event-schema-version=1",
            "--header",
            &format!("event-produced-at={produced_at}"),
        ],
    )
    .await
    .ok();
    let bad_id = bad.stdout.trim().to_owned();
    ns.publish(
        "events",
        OutgoingMessage::event("order.created", &7u64).unwrap(),
    )
    .await
    .unwrap();

    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let consumer = ns.consumer("events", "billing", "w").await.unwrap();
    let worker = Worker::events(consumer, {
        let seen = seen.clone();
        move |ev: pgtide::Event<u64>, _d| {
            seen.lock().unwrap().push(ev.data);
            async { Ok::<_, String>(Outcome::Ack) }
        }
    });
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    let deadline = tokio::time::Instant::now() + crate::common::WAIT;
    while ns.stats("events", "billing").await.unwrap().dead < 1 || seen.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker dead-letters the bad event and handles the good one"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![7]);
    assert_eq!(
        (report.dead_lettered, report.retried),
        (1, 0),
        "dead-lettered at once, not retried: {report:?}"
    );

    let table = pgtide(&ns, &["dead", "list", "events", "--group", "billing"])
        .await
        .ok();
    let lines = table.lines();
    assert_eq!(lines.len(), 2, "a header and one dead letter: {table:?}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &cells[..4],
        &["billing", bad_id.as_str(), "1", "malformed"],
        "GROUP ID ATTEMPTS REASON: {table:?}"
    );
    let json = pgtide(
        &ns,
        &["dead", "list", "events", "--group", "billing", "--json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(json["id"], bad_id.as_str());
    assert_eq!(json["reason"], pgtide::MALFORMED);
    assert_eq!(json["attempts"], 1);
    assert_eq!(json["payload"], serde_json::json!({"order": "x"}));
    assert_eq!(json["headers"]["event-type"], "order.created");
}
