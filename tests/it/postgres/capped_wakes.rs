//! Room in a group with a concurrency limit wakes the consumers waiting for it: a settle that
//! ends a lease, or a raised limit, must reach a consumer whose claim found the group full,
//! from whichever handle or SQL session it comes, without waiting for the fallback poll (set to
//! an hour here).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtide::{
    CancellationToken, Delivery, GroupConfig, GroupStart, Outcome, PgBackend, PgConsumer,
    StreamConfig, Worker,
};

use super::wakeups::{handle, listening, until_waiting, HOUR};
use crate::common::{eventually, json, namespace, wait_for, TestNs, WAIT};

/// How the delivery holding the group's only slot is let go.
#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Term,
    /// A retry an hour away: the slot frees now, the delivery stays out of reach.
    Nack,
    /// A pause an hour away: the same.
    Pause,
    SqlAck,
    SqlTerm,
    SqlNack,
    /// The limit goes from 1 to 2 (through the engine).
    Raise,
    /// The same, in SQL.
    SqlRaise,
    /// `release_consumer` in SQL: the held delivery is ready again at once.
    SqlRelease,
    /// The stream trimmed to its newest message: the held delivery goes with its message.
    Trim,
    /// The same, in SQL.
    SqlTrim,
}

/// Runs the SQL settle `call` (returning how many it settled) and checks that it settled one.
async fn settles_one(raw: &tokio_postgres::Client, call: &str) {
    let n: i64 = raw
        .query_one(&format!("SELECT ({call})::int8"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "{call}");
}

/// A handle that finds room only by a wake-up: a 1 h fallback poll, no claim floor (its sweeps
/// would come back within a second), and a scout that checks for newly visible work only when
/// told to (its periodic check would wake the stream within a second of the publish).
fn quiet_handle(ns: &TestNs) -> PgBackend {
    handle(&ns.url, ns.namespace())
        .poll_interval(HOUR)
        .claim_floor(false)
        .scout_max_interval(HOUR)
        .build()
        .unwrap()
}

/// A consumer side of its own (standing for another process) with a 1 h fallback poll and a
/// connected listener. The stream must be empty.
async fn waiting_side(ns: &TestNs, stream: &str) -> (PgBackend, PgConsumer) {
    let side = quiet_handle(ns);
    let c = side.consumer(stream, "g", "waiter").await.unwrap();
    // The first fetch starts the listener and, as it waits out its timeout, asks for the
    // stream's registration (nothing is published yet).
    listening(&side, &c, Duration::from_millis(100)).await;
    // That fetch also registered the stream for SQL publishes' wake-ups (registrar.rs), and the
    // registrar wakes the stream's fetches once the registration is in force: let that happen
    // now, so that no later wait is cut short by it.
    let raw = ns.raw().await;
    let sql = format!(
        "SELECT count(*) FROM \"{q}\".wake_waiters w JOIN \"{q}\".streams s ON s.id = w.stream_id \
         WHERE s.name = $1",
        q = ns.namespace()
    );
    let deadline = Instant::now() + WAIT;
    while raw
        .query_one(&sql, &[&stream])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline, "no registration of {stream}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (side, c)
}

/// Holds the only slot of a group limited to one, lets a consumer of another handle wait for
/// room, settles as `how`, and returns how long the waiter took to get the next delivery.
async fn woken_after(ns: &TestNs, stream: &str, how: Settle, limited_late: bool) -> Duration {
    ns.create_stream(stream, &StreamConfig::default())
        .await
        .unwrap();
    if limited_late {
        ns.create_group(stream, "g", GroupStart::New).await.unwrap();
    } else {
        ns.create_group_with(stream, "g", &GroupConfig::default().max_in_flight(1))
            .await
            .unwrap();
    }
    // Both consumers exist before the limit when `limited_late`: what they learnt of the group
    // when they were made must not decide whether their settles wake anyone.
    let holding_side = quiet_handle(ns);
    let holder = holding_side.consumer(stream, "g", "holder").await.unwrap();
    let (side, waiter) = waiting_side(ns, stream).await;
    let raw = ns.raw().await;
    let q = ns.namespace();
    if limited_late {
        raw.execute(
            &format!("SELECT \"{q}\".set_max_in_flight('{stream}', 'g', 1)"),
            &[],
        )
        .await
        .unwrap();
    }
    ns.publish_batch(
        stream,
        &[json(serde_json::json!(0)), json(serde_json::json!(1))],
    )
    .await
    .unwrap();
    let held = holder.fetch(5, WAIT).await.unwrap();
    assert_eq!(held.len(), 1, "the limit lets one go");
    assert!(
        waiter.try_fetch(1).await.unwrap().is_empty(),
        "the group is full"
    );

    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            let got = waiter.fetch(1, WAIT * 2).await.unwrap();
            (got, Instant::now())
        }
    });
    until_waiting(&side, 1).await;
    let d = &held[0];
    let ids = format!("ARRAY['{}']::uuid[]", d.id());
    let sent = Instant::now();
    match how {
        Settle::Ack => holder.ack(d).await.unwrap(),
        Settle::Term => holder.term(d, "done with it").await.unwrap(),
        Settle::Nack => holder.nack(d, Some(HOUR), None).await.unwrap(),
        Settle::Pause => {
            let report = holder
                .pause_batch(&[d], chrono::Utc::now() + chrono::Duration::hours(1))
                .await
                .unwrap();
            assert_eq!(report.settled, [d.id()]);
        }
        Settle::SqlAck => settles_one(&raw, &format!("\"{q}\".ack('{stream}', 'g', {ids})")).await,
        Settle::SqlTerm => {
            settles_one(&raw, &format!("\"{q}\".term('{stream}', 'g', {ids})")).await
        }
        Settle::SqlNack => {
            let call = format!("\"{q}\".nack('{stream}', 'g', {ids}, interval '1 hour')");
            settles_one(&raw, &call).await
        }
        Settle::Raise => ns.set_max_in_flight(stream, "g", Some(2)).await.unwrap(),
        Settle::SqlRelease => {
            let call = format!("\"{q}\".release_consumer('{stream}', 'g', 'holder')");
            settles_one(&raw, &call).await
        }
        Settle::Trim => {
            let removed = ns.trim_stream(stream, None, Some(1)).await.unwrap();
            assert_eq!(removed, 1);
        }
        Settle::SqlTrim => {
            let call = format!("\"{q}\".trim_stream('{stream}', max_len => 1)");
            settles_one(&raw, &call).await
        }
        Settle::SqlRaise => {
            raw.execute(
                &format!("SELECT \"{q}\".set_max_in_flight('{stream}', 'g', 2)"),
                &[],
            )
            .await
            .unwrap();
        }
    }
    let (got, at) = waiting.await.unwrap();
    assert_eq!(got.len(), 1, "{how:?}: the waiter got nothing");
    if !matches!(how, Settle::SqlRelease) {
        assert_ne!(got[0].id(), d.id(), "{how:?}");
    }
    side.shutdown().await;
    holding_side.shutdown().await;
    at - sent
}

/// Runs [`woken_after`] for each way in `hows`, each on a stream of its own, and checks that
/// the waiter was woken well before its fetch's timeout (20 s; the poll is an hour).
async fn each_wakes(ns: &TestNs, prefix: &str, hows: &[Settle], limited_late: bool) {
    for (i, &how) in hows.iter().enumerate() {
        let took = woken_after(ns, &format!("{prefix}{i}"), how, limited_late).await;
        assert!(
            took < Duration::from_secs(2),
            "{how:?}: woken after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_made_in_a_capped_group_wakes_a_consumer_waiting_for_it() {
    let ns = namespace().await;
    let hows = [
        Settle::Ack,
        Settle::Term,
        Settle::Nack,
        Settle::Pause,
        Settle::SqlAck,
        Settle::SqlTerm,
        Settle::SqlNack,
        Settle::Raise,
        Settle::SqlRaise,
        Settle::SqlRelease,
        Settle::Trim,
        Settle::SqlTrim,
    ];
    each_wakes(&ns, "s", &hows, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_set_after_the_consumers_were_made_still_wakes_them() {
    let ns = namespace().await;
    each_wakes(&ns, "late", &[Settle::Ack, Settle::SqlAck], true).await;
}

/// Stream `s` with group `g` made with `config`, and `n` messages 0, 1, … (with `key`).
async fn backlog(ns: &TestNs, config: &GroupConfig, n: i64, key: Option<&str>) {
    ns.create_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group_with("s", "g", config).await.unwrap();
    let msgs: Vec<_> = (0..n)
        .map(|i| {
            let m = json(serde_json::json!(i));
            match key {
                Some(k) => m.key(k),
                None => m,
            }
        })
        .collect();
    ns.publish_batch("s", &msgs).await.unwrap();
}

/// A worker of a capped group whose handlers finish while its next claim waits for room: the
/// acks it settles meanwhile must let that claim go on, not leave it to the fallback poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_drains_a_capped_group_with_slow_handlers() {
    let ns = namespace().await;
    backlog(&ns, &GroupConfig::default().max_in_flight(2), 40, None).await;
    // Work that outlasts the worker's next claim: its acks arrive while it waits.
    let handled = drain(&ns, quiet_handle(&ns), 40, 8, Duration::from_millis(20)).await;
    assert_eq!(handled.len(), 40);
}

/// The same for an ordered group with a single key: each ack makes the key's next message its
/// head, which only a claim after the ack's commit can see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_drains_a_single_key_ordered_group() {
    let ns = namespace().await;
    let config = GroupConfig::default().ordered(true);
    backlog(&ns, &config, 30, Some("k")).await;
    drains_in_order(&ns, quiet_handle(&ns), 30, 4).await;
}

/// A handle that polls (notifications off), once an hour: nothing wakes a waiting claim.
fn polling_handle(ns: &TestNs) -> PgBackend {
    handle(&ns.url, ns.namespace())
        .notifications(false)
        .poll_interval(HOUR)
        .claim_floor(false)
        .build()
        .unwrap()
}

/// Without notifications a settle wakes nobody, so a worker's acks must ride with its next claim
/// for that claim to see the room they made (a claim beside them would wait for the next poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_worker_drains_a_single_key_ordered_group() {
    let ns = namespace().await;
    let config = GroupConfig::default().ordered(true);
    backlog(&ns, &config, 30, Some("k")).await;
    drains_in_order(&ns, polling_handle(&ns), 30, 1).await;
}

/// The same for a group whose concurrency limit the worker fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_worker_drains_a_capped_group() {
    let ns = namespace().await;
    let config = GroupConfig::default().max_in_flight(1);
    backlog(&ns, &config, 30, None).await;
    drains_in_order(&ns, polling_handle(&ns), 30, 1).await;
}

/// Runs a worker of `concurrency` on the backlog of group `g` (messages 0..n) until it has
/// handled them all, which must come in order.
async fn drains_in_order(ns: &TestNs, side: PgBackend, n: i64, concurrency: usize) {
    let handled = drain(ns, side, n, concurrency, Duration::ZERO).await;
    assert_eq!(handled, (0..n).collect::<Vec<i64>>());
}

/// Runs a worker of `concurrency`, whose handlers each take `work`, on the backlog of group `g`
/// until it has handled `n` messages; checks that it acked them all and left the group empty,
/// then shuts `side` down. Returns the messages in the order they were handled.
async fn drain(
    ns: &TestNs,
    side: PgBackend,
    n: i64,
    concurrency: usize,
    work: Duration,
) -> Vec<i64> {
    let seen = Arc::new(std::sync::Mutex::new(vec![]));
    let worker = Worker::new(side.consumer("s", "g", "w").await.unwrap(), {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                let i: i64 = d.json().map_err(|e| e.to_string())?;
                seen.lock().unwrap().push(i);
                Ok::<_, String>(Outcome::Ack)
            }
        }
    })
    .concurrency(concurrency);
    let token = CancellationToken::new();
    let run = tokio::spawn(worker.run(token.clone()));
    eventually(WAIT * 2, "the backlog drained", || {
        seen.lock().unwrap().len() == n as usize
    })
    .await;
    token.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, n as u64);
    let s = ns.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight), (0, 0));
    side.shutdown().await;
    let handled = seen.lock().unwrap().clone();
    handled
}

/// A claim that takes an undecodable message moves it to the dead letters on the way: the room it
/// held in a capped group is free at once, and the next claim must hear of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_dead_lettered_on_the_way_frees_its_room() {
    let ns = namespace().await;
    ns.create_stream("m", &StreamConfig::default())
        .await
        .unwrap();
    ns.create_group_with("m", "g", &GroupConfig::default().max_in_flight(1))
        .await
        .unwrap();
    let (side, c) = waiting_side(&ns, "m").await;
    let raw = ns.raw().await;
    let q = ns.namespace();
    let deep = super::hostile::deep_headers(10_000);
    let before = side.listener_status().last_notification_at;
    raw.batch_execute(&format!(
        "SELECT \"{q}\".publish('m', '1', headers => '{deep}'::jsonb); \
         SELECT \"{q}\".publish('m', '2')"
    ))
    .await
    .unwrap();
    // The publish's own NOTIFY is heard before the fetch below waits, so that it cannot be
    // what wakes it.
    wait_for(&mut side.watch_listener(), WAIT, "the publish heard", |s| {
        s.last_notification_at != before
    })
    .await;
    let started = Instant::now();
    let got = c.fetch(1, WAIT * 2).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json::<i64>().unwrap(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "woken after {:?}",
        started.elapsed()
    );
    let dead = ns.dead_letters("m", "g", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "malformed");
    side.shutdown().await;
}

/// A claim that finds an ordered key's head on its last attempt, its lease run out, moves it to
/// the dead letters and lets the key's next message go, in a later statement than its own walk:
/// the fetch must claim again for that message, since nothing else wakes it (the engine's pool
/// does not notify, and this handle's scout and poll look only once an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_dead_letters_a_keys_head_comes_back_for_the_next() {
    let ns = namespace().await;
    ns.create_stream("b", &StreamConfig::default().max_deliver(1))
        .await
        .unwrap();
    ns.create_group_with("b", "g", &GroupConfig::default().ordered(true))
        .await
        .unwrap();
    // Registered for wake-ups before anything is published: a registration coming into force
    // wakes the stream's fetches, which would hide what this checks.
    let (side, waiter) = waiting_side(&ns, "b").await;
    let msgs = [
        json(serde_json::json!(0)).key("k"),
        json(serde_json::json!(1)).key("k"),
    ];
    ns.publish_batch("b", &msgs).await.unwrap();
    let lease = Duration::from_millis(200);
    let holder = side
        .consumer("b", "g", "holder")
        .await
        .unwrap()
        .with_lease(lease);
    let held = holder.try_fetch(5).await.unwrap();
    assert_eq!(held.len(), 1, "only the key's head goes");
    // Its only attempt's lease runs out.
    let expires = held[0].lease_expires_at;
    eventually(WAIT, "the head's lease expired", || {
        chrono::Utc::now() > expires + chrono::Duration::milliseconds(50)
    })
    .await;
    // Without a second claim the fetch finds the next message only at its timeout's last claim.
    let started = Instant::now();
    let got = waiter.fetch(1, WAIT * 2).await.unwrap();
    let took = started.elapsed();
    assert!(took < WAIT, "the key's next message claimed after {took:?}");
    assert_eq!(got.len(), 1, "the key's next message was not claimed");
    assert_eq!(got[0].json::<i64>().unwrap(), 1);
    let dead = ns.stats("b", "g").await.unwrap().dead;
    assert_eq!(dead, 1, "the head went to the dead letters");
    side.shutdown().await;
}
