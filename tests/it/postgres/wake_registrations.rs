//! SQL publishes notify only streams with a registered waiter (issue 11, goal 6): the protocol in
//! `sql/functions/wakeups.sql` and the registrar (`src/postgres/background/registrar.rs`).
//!
//! A lost wake-up shows as a fetch that times out: every consumer here has a 1 h fallback poll.
//! Notifications are delivered in commit order, so a NOTIFY sent after a publish commits tells
//! whether the publish notified ("the first one tells").

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pgtide::{Delivery, PgBackend, PgConsumer, StreamConfig};
use tokio::sync::mpsc::UnboundedReceiver;

use super::wakeups::{handle, until_waiting, waiting_side, waiting_side_with, HOUR};
use crate::common::{namespace, sqlstate, wait_for, TestNs, WAIT};

/// A raw LISTEN on the namespace's channel: its payloads, in arrival order.
async fn listen(ns: &TestNs) -> (tokio_postgres::Client, UnboundedReceiver<String>) {
    let (client, mut conn) = tokio_postgres::connect(&ns.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"pgtide.{}\"", ns.namespace()))
        .await
        .unwrap();
    (client, rx)
}

/// The next notification's payload.
async fn next(rx: &mut UnboundedReceiver<String>) -> String {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a notification")
        .unwrap()
}

/// Sends a marker NOTIFY after whatever committed before it.
async fn mark(raw: &tokio_postgres::Client, ns: &TestNs) {
    raw.batch_execute(&format!("NOTIFY \"pgtide.{}\", '!mark'", ns.namespace()))
        .await
        .unwrap();
}

async fn registrations(raw: &tokio_postgres::Client, ns: &TestNs) -> i64 {
    raw.query_one(
        &format!("SELECT count(*) FROM \"{}\".wake_waiters", ns.namespace()),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits until the namespace has `n` registrations.
pub(super) async fn until_registrations(raw: &tokio_postgres::Client, ns: &TestNs, n: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = registrations(raw, ns).await;
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "{now} registrations, not {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn sql_publish(raw: &tokio_postgres::Client, ns: &TestNs, stream: &str, n: i64) {
    raw.execute(
        &format!(
            "SELECT \"{}\".publish($1, to_jsonb($2::int8))",
            ns.namespace()
        ),
        &[&stream, &n],
    )
    .await
    .unwrap();
}

/// A fetch of one on a task of its own, with the time it returned.
fn fetch_one(c: &PgConsumer) -> tokio::task::JoinHandle<(Vec<Delivery>, Instant)> {
    let c = c.clone();
    tokio::spawn(async move {
        let got = c.fetch(1, WAIT).await.unwrap();
        (got, Instant::now())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_publish_notifies_only_while_a_consumer_waits() {
    let ns = namespace().await;
    // The scout's due checks also NOTIFY a stream with newly visible deliveries (a publish nobody
    // claimed yet): its first check runs when it is elected, the next one not within the test.
    let (side, c) = waiting_side_with(&ns, |b| b.scout_max_interval(HOUR)).await;
    wait_for(
        &mut side.watch_scout(),
        WAIT,
        "the scout's first due check",
        |s| s.last_check_at.is_some(),
    )
    .await;
    let raw = ns.raw().await;
    let (_listener, mut heard) = listen(&ns).await;

    // Nobody waits (the consumer's first fetch returned): no NOTIFY.
    until_registrations(&raw, &ns, 0).await;
    sql_publish(&raw, &ns, "s", 1).await;
    mark(&raw, &ns).await;
    assert_eq!(
        next(&mut heard).await,
        "!mark",
        "a publish nobody waits for notified"
    );
    assert_eq!(ns.stats("s", "g").await.unwrap().ready, 1);
    let got = c.fetch(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    c.ack(&got[0]).await.unwrap();

    // A consumer waits: its process is registered, and the publish notifies and wakes it.
    let waiter = fetch_one(&c);
    until_waiting(&side, 1).await;
    until_registrations(&raw, &ns, 1).await;
    let sent = Instant::now();
    sql_publish(&raw, &ns, "s", 2).await;
    let (got, at) = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(at - sent < Duration::from_secs(2), "took {:?}", at - sent);
    assert_eq!(next(&mut heard).await, "s");
    c.ack(&got[0]).await.unwrap();

    // Heard once, the registration stays (a trickle costs no statement); a second notification
    // before the consumer went idle again means publishers outrun it: taken back, so the next
    // publish nobody waits for is quiet again.
    assert_eq!(registrations(&raw, &ns).await, 1);
    sql_publish(&raw, &ns, "s", 3).await;
    assert_eq!(next(&mut heard).await, "s");
    until_registrations(&raw, &ns, 0).await;
    sql_publish(&raw, &ns, "s", 4).await;
    mark(&raw, &ns).await;
    assert_eq!(next(&mut heard).await, "!mark");

    // Shutting down takes back the registration of a fetch that was waiting.
    let got = c.fetch(2, WAIT).await.unwrap();
    assert_eq!(got.len(), 2, "the third and fourth messages");
    let waiter = tokio::spawn({
        let c = c.clone();
        async move { c.fetch(1, HOUR).await }
    });
    until_waiting(&side, 1).await;
    until_registrations(&raw, &ns, 1).await;
    waiter.abort();
    side.shutdown().await;
    assert_eq!(registrations(&raw, &ns).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_publishers_racing_idle_consumers_lose_no_wake_up() {
    // Four SQL publishers with short pauses and two consumer processes that keep going idle: every
    // idle spell registers, is heard, is taken back. A wake-up lost in any of those windows leaves
    // a fetch waiting for its 1 h poll, and the test times out.
    const PER: i64 = 40;
    const PUBLISHERS: i64 = 4;
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let sides: Vec<PgBackend> = (0..2)
        .map(|_| {
            handle(&ns.url, ns.namespace())
                .poll_interval(HOUR)
                .build()
                .unwrap()
        })
        .collect();
    let total = (PER * PUBLISHERS) as usize;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut consumers = tokio::task::JoinSet::new();
    for (i, side) in sides.iter().enumerate() {
        let c = side.consumer("s", "g", &format!("c{i}")).await.unwrap();
        let received = received.clone();
        consumers.spawn(async move {
            use std::sync::atomic::Ordering;
            while received.load(Ordering::SeqCst) < total {
                let got = c.fetch(3, Duration::from_secs(2)).await.unwrap();
                if got.is_empty() {
                    continue;
                }
                let refs: Vec<&Delivery> = got.iter().collect();
                c.ack_batch(&refs).await.unwrap();
                received.fetch_add(got.len(), Ordering::SeqCst);
            }
        });
    }
    let mut publishers = tokio::task::JoinSet::new();
    for p in 0..PUBLISHERS {
        let raw = ns.raw().await;
        let namespace = ns.namespace().to_owned();
        publishers.spawn(async move {
            for i in 0..PER {
                raw.execute(
                    &format!("SELECT \"{namespace}\".publish('s', to_jsonb($1::int8))"),
                    &[&(p * PER + i)],
                )
                .await
                .unwrap();
                // Pauses of 0 to 3 ms: sometimes the consumers are busy, sometimes idle.
                tokio::time::sleep(Duration::from_micros(((p * 7 + i * 13) % 4 * 1000) as u64))
                    .await;
            }
        });
    }
    while let Some(done) = publishers.join_next().await {
        done.unwrap();
    }
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(done) = consumers.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "a wake-up was lost: {} of {total} received",
        received.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!(ns.stats("s", "g").await.unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_publishing_transaction_is_waited_out() {
    // The publish took the stream's wake lock before any registration existed and skipped its
    // NOTIFY; the consumer registers while it is still open. The registration's wait for it
    // times out, the row stays and the registrar tries again until the transaction is over, then
    // wakes the consumer: it must not wait for its poll.
    let ns = namespace().await;
    let (side, c) = waiting_side(&ns).await;
    let raw = ns.raw().await;
    until_registrations(&raw, &ns, 0).await;
    let mut publisher = ns.raw().await;
    let tx = publisher.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT \"{}\".publish('s', '1'::jsonb)", ns.namespace()),
        &[],
    )
    .await
    .unwrap();
    let waiter = fetch_one(&c);
    until_waiting(&side, 1).await;
    // The row is in: the first wait-out ended (timed out, as the lock is held) and committed it.
    until_registrations(&raw, &ns, 1).await;
    let sent = Instant::now();
    tx.commit().await.unwrap();
    let (got, at) = waiter.await.unwrap();
    assert_eq!(got.len(), 1, "the long transaction's message");
    assert!(at - sent < Duration::from_secs(3), "took {:?}", at - sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_and_always_publishes_notify_and_wake_locks_stay_bounded() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let n = ns.namespace();
    let mut raw = ns.raw().await;
    let (_listener, mut heard) = listen(&ns).await;
    let advisory =
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()";

    // READ COMMITTED, nobody waiting: quiet, and the group's wake lock (`_wake_lock`, the key
    // the trigger computes inline) is held until the commit.
    let tx = raw.transaction().await.unwrap();
    tx.execute(&format!("SELECT \"{n}\".publish('s', '1'::jsonb)"), &[])
        .await
        .unwrap();
    let held: i64 = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_locks l
                 WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.mode = 'ShareLock'
                   AND ((l.classid::int8 << 32) | l.objid::int8)
                       = \"{n}\"._wake_lock(\"{n}\".group_id('s', 'g'))"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 1);
    assert_eq!(
        tx.query_one(advisory, &[]).await.unwrap().get::<_, i64>(0),
        1
    );
    tx.commit().await.unwrap();
    mark(&raw, &ns).await;
    assert_eq!(next(&mut heard).await, "!mark");

    // Its snapshot is older than the lock: REPEATABLE READ notifies, and takes no lock.
    raw.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT \"{n}\".publish('s', '2'::jsonb);"
    ))
    .await
    .unwrap();
    assert_eq!(
        raw.query_one(advisory, &[]).await.unwrap().get::<_, i64>(0),
        0
    );
    raw.batch_execute("COMMIT").await.unwrap();
    assert_eq!(next(&mut heard).await, "s");

    // A registration waiting for (or holding) the group's wake lock: the publisher's try fails
    // and it notifies, with no row to see yet.
    let mut registrar = ns.raw().await;
    let holding = registrar.transaction().await.unwrap();
    holding
        .execute(
            &format!(
                "SELECT pg_advisory_xact_lock(\"{n}\"._wake_lock(\"{n}\".group_id('s', 'g')))"
            ),
            &[],
        )
        .await
        .unwrap();
    sql_publish(&raw, &ns, "s", 20).await;
    assert_eq!(next(&mut heard).await, "s");
    holding.rollback().await.unwrap();

    // `pgtide.notify = always`: for listeners of one's own.
    raw.batch_execute(&format!(
        "SET pgtide.notify = always; SELECT \"{n}\".publish('s', '3'::jsonb); RESET pgtide.notify"
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut heard).await, "s");
    assert_eq!(ns.stats("s", "g").await.unwrap().ready, 4);

    // One transaction publishing to 100 groups holds one wake lock per bucket: at most 64.
    let fan: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
    let names: Vec<&str> = fan.iter().map(String::as_str).collect();
    ns.stream_with_groups("wide", StreamConfig::default(), &names)
        .await;
    raw.batch_execute(&format!(
        "BEGIN; SELECT \"{n}\".publish('wide', '1'::jsonb);"
    ))
    .await
    .unwrap();
    assert_eq!(
        raw.query_one(advisory, &[]).await.unwrap().get::<_, i64>(0),
        64
    );
    raw.batch_execute("COMMIT").await.unwrap();
    mark(&raw, &ns).await;
    assert_eq!(next(&mut heard).await, "!mark");
    assert_eq!(ns.stats("wide", "f99").await.unwrap().ready, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_check_their_input_and_maintain_drops_those_of_gone_sessions() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let n = ns.namespace();
    let raw = ns.raw().await;
    let long = "x".repeat(201);
    for bad in [
        format!("SELECT \"{n}\"._wake_register('S!', 'h', 1, '0')"),
        format!("SELECT \"{n}\"._wake_register(NULL, 'h', 1, '0')"),
        format!("SELECT \"{n}\"._wake_register('s', '', 1, '0')"),
        format!("SELECT \"{n}\"._wake_register('s', '{long}', 1, '0')"),
        format!("SELECT \"{n}\"._wake_register('s', NULL, 1, '0')"),
        format!("SELECT \"{n}\"._wake_register('s', 'h', 0, '0')"),
        format!("SELECT \"{n}\"._wake_register('s', 'h', NULL, '0')"),
        format!("SELECT \"{n}\"._wake_register('s', 'h', 1, '-1s')"),
        format!("SELECT \"{n}\"._wake_register('s', 'h', 1, '2s')"),
        format!("SELECT \"{n}\"._wake_register('s', 'h', 1, NULL)"),
        format!("SELECT \"{n}\"._wake_release(NULL, '')"),
        format!("SELECT \"{n}\"._wake_release(NULL, NULL)"),
    ] {
        assert_eq!(sqlstate(&raw, &bad).await, "PT001", "{bad}");
    }
    assert_eq!(registrations(&raw, &ns).await, 0);
    // No such stream: NULL, nothing written.
    let none: Option<bool> = raw
        .query_one(
            &format!("SELECT \"{n}\"._wake_register('nope', 'h', 1, '0')"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(none, None);

    // One registration of a live session (this one), one of a gone one.
    for sql in [
        format!("SELECT \"{n}\"._wake_register('s', 'live', pg_backend_pid(), '0')"),
        format!("SELECT \"{n}\"._wake_register('s', 'gone', 2147483647, '0')"),
    ] {
        let in_force: Option<bool> = raw.query_one(&sql, &[]).await.unwrap().get(0);
        assert_eq!(in_force, Some(true), "{sql}");
    }
    assert_eq!(registrations(&raw, &ns).await, 2);
    ns.maintain().await.unwrap();
    let left: Vec<String> = raw
        .query(&format!("SELECT holder FROM \"{n}\".wake_waiters"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["live"]);
    // Deleting the stream takes its registrations along.
    ns.delete_stream("s").await.unwrap();
    assert_eq!(registrations(&raw, &ns).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_registrar_shows_in_the_listener_status_and_the_poller_still_delivers() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let n = ns.namespace();
    let raw = ns.raw().await;
    // Registration fails as it would for a role that may not run it.
    raw.batch_execute(&format!(
        "ALTER FUNCTION \"{n}\"._wake_register(text, text, integer, interval) RENAME TO _wake_register_gone"
    ))
    .await
    .unwrap();
    let side = handle(&ns.url, n)
        .poll_interval(Duration::from_millis(300))
        .build()
        .unwrap();
    let c = side.consumer("s", "g", "c").await.unwrap();
    let waiter = fetch_one(&c);
    crate::common::wait_for(
        &mut side.watch_listener(),
        WAIT,
        "the registrar's failure",
        |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("registrar:"))
        },
    )
    .await;
    // Unregistered, the SQL publish sends no NOTIFY; the fallback poll still finds it.
    sql_publish(&raw, &ns, "s", 1).await;
    let (got, _) = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(registrations(&raw, &ns).await, 0);
    side.shutdown().await;
}
