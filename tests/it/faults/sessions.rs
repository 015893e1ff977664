//! pgtide's sessions against a hostile server: every backend terminated under publish + worker
//! load, and a database whose DBA set one-second statement, idle-in-transaction and idle-session
//! timeouts. Both on a cluster of the test's own (terminating every backend, or altering a
//! database, on the shared server would hit the other tests).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgtide::{CancellationToken, Delivery, Outcome, PgBackend, StreamConfig, Worker};
use tokio::sync::watch;

use crate::common::{json, raw_client as connect, wait_for, WAIT};
use pgtide_testing::Cluster;

/// The lease of `terminated_backends_recover_and_lose_nothing`'s stream.
const LEASE: Duration = Duration::from_secs(3);

/// A handle on `url` with stream `s`, group `g` and a scout started (its lease short, so a
/// replacement takes over fast).
async fn scouted(url: &str, namespace: &str) -> PgBackend {
    let pg = PgBackend::builder(url)
        .namespace(namespace)
        .scout_ttl(Duration::from_secs(2))
        .build()
        .unwrap();
    pg.migrate().await.unwrap();
    pg.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    pg.ensure_group("s", "g", pgtide::GroupStart::New)
        .await
        .unwrap();
    pg.start_scout();
    pg
}

/// Waits until `count` (a watch of handled messages) passes `above`.
async fn progress(count: &mut watch::Receiver<usize>, above: usize, what: &str) {
    wait_for(count, WAIT, what, |n| *n > above).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_recover_and_lose_nothing() {
    let cluster = Cluster::start(&[]);
    let url = cluster.url();
    let pg = scouted(&url, "sessions").await;
    // A claim whose backend is terminated after its commit but before its rows reach the client
    // leaves deliveries leased to a consumer that never saw them: they come back when the lease
    // expires (at-least-once), so the lease is short here and the drain below waits for it. On a
    // loaded machine that window is wide enough to be hit (seen in CI beside a soak).
    let mut config = StreamConfig::default();
    config.lease = LEASE;
    pg.update_stream("s", &config).await.unwrap();
    wait_for(&mut pg.watch_scout(), WAIT, "a scout", |s| s.is_leader).await;
    wait_for(&mut pg.watch_listener(), WAIT, "the listener", |s| {
        s.connected
    })
    .await;

    // The worker: every handled sequence number, and a watch of how many.
    let handled: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let (count_tx, mut count) = watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let worker = Worker::new(pg.consumer("s", "g", "w").await.unwrap(), {
        let handled = handled.clone();
        move |d: Delivery| {
            let handled = handled.clone();
            let count_tx = count_tx.clone();
            async move {
                let i: u64 = d.json().map_err(|e| e.to_string())?;
                let n = {
                    let mut h = handled.lock().unwrap();
                    h.insert(i);
                    h.len()
                };
                count_tx.send_replace(n);
                Ok::<_, String>(Outcome::Ack)
            }
        }
    })
    .concurrency(4);
    let stop = CancellationToken::new();
    let worker_run = tokio::spawn(worker.run(stop.clone()));

    // The publisher: one message per call, as fast as the server takes them. A publish that
    // failed may still have committed (the backend died after the commit): only the confirmed
    // ones are owed, and a failed one is not retried under the same number.
    let confirmed: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let publisher = tokio::spawn({
        let (pg, confirmed, stop) = (pg.clone(), confirmed.clone(), stop.clone());
        async move {
            let mut failures = 0u64;
            for i in 0u64.. {
                if stop.is_cancelled() {
                    break;
                }
                match pg.publish("s", json(serde_json::json!(i))).await {
                    Ok(_) => {
                        confirmed.lock().unwrap().insert(i);
                    }
                    Err(e) => {
                        assert!(e.is_retryable(), "publish failed for good: {e}");
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            failures
        }
    });

    progress(&mut count, 100, "the first messages handled").await;
    let tasks = pg.background_tasks();
    let killer = connect(&url).await;
    for round in 1..=3u64 {
        let before_listener = pg.listener_status().reconnects;
        let before_handled = *count.borrow();
        let killed: i64 = killer
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND backend_type = 'client backend' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert!(
            killed >= 2,
            "round {round}: only {killed} backends to terminate"
        );
        let started = Instant::now();
        wait_for(&mut pg.watch_listener(), WAIT, "the listener back", |s| {
            s.connected && s.reconnects > before_listener
        })
        .await;
        wait_for(&mut pg.watch_scout(), WAIT, "a scout again", |s| {
            s.is_leader
        })
        .await;
        progress(&mut count, before_handled + 100, "the worker going on").await;
        println!(
            "round {round}: {killed} backends terminated, listener, scout and worker back in {:?}",
            started.elapsed()
        );
    }

    stop.cancel();
    let publish_failures = publisher.await.unwrap();
    let confirmed = confirmed.lock().unwrap().clone();
    let done = {
        let handled = handled.clone();
        move || confirmed.is_subset(&handled.lock().unwrap())
    };
    // The worker was stopped with the publisher; a second one drains what is left.
    let report = worker_run.await.unwrap().unwrap();
    let drain = Worker::new(pg.consumer("s", "g", "w2").await.unwrap(), {
        let handled = handled.clone();
        move |d: Delivery| {
            let handled = handled.clone();
            async move {
                let i: u64 = d.json().map_err(|e| e.to_string())?;
                handled.lock().unwrap().insert(i);
                Ok::<_, String>(Outcome::Ack)
            }
        }
    });
    let stop_drain = CancellationToken::new();
    let drain_run = tokio::spawn(drain.run(stop_drain.clone()));
    crate::common::eventually(WAIT + LEASE, "every confirmed publish handled", done).await;
    // The drain goes on until the group is empty: a delivery handled but whose ack died with its
    // backend comes back after its lease, and is acked again.
    tokio::time::timeout(WAIT + LEASE, async {
        loop {
            match pg.stats("s", "g").await {
                Ok(s) if s.ready == 0 && s.in_flight == 0 && s.dead == 0 => break,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the group drained");
    stop_drain.cancel();
    drain_run.await.unwrap().unwrap();
    assert_eq!(pg.background_tasks(), tasks, "a background task died");
    println!(
        "{} handled, {publish_failures} publishes failed (retryable), worker report {report:?}",
        handled.lock().unwrap().len()
    );
    pg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_timeouts_set_by_a_dba_do_not_reach_pgtide() {
    let cluster = Cluster::start(&[]);
    let admin = connect(&cluster.url()).await;
    for statement in [
        "CREATE DATABASE hostile",
        "ALTER DATABASE hostile SET statement_timeout = '1s'",
        "ALTER DATABASE hostile SET idle_in_transaction_session_timeout = '1s'",
        "ALTER DATABASE hostile SET idle_session_timeout = '1s'",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    let url = format!("postgres://postgres@127.0.0.1:{}/hostile", cluster.port);
    // The premise: an ordinary session of that database is cancelled after a second.
    let plain = connect(&url).await;
    let e = plain
        .batch_execute("SELECT pg_sleep(1.5)")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );

    let pg = scouted(&url, "hostile").await;
    let scout = wait_for(&mut pg.watch_scout(), WAIT, "a scout", |s| s.is_leader).await;
    let listener = wait_for(&mut pg.watch_listener(), WAIT, "the listener", |s| {
        s.connected
    })
    .await;
    let tasks = pg.background_tasks();

    // A consumer blocked in fetch well past every timeout is woken by a publish (and not by the
    // fallback poll, 30 s away).
    let consumer = pg.consumer("s", "g", "c").await.unwrap();
    let waiting = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            let got = consumer.fetch(1, Duration::from_secs(60)).await.unwrap();
            (got, Instant::now())
        }
    });
    wait_for(
        &mut pg.watch_waiting_fetches(),
        WAIT,
        "a waiting fetch",
        |n| *n > 0,
    )
    .await;
    // Time must pass here: it is what the server's timeouts count.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let published = pg
        .publish("s", json(serde_json::json!("late")))
        .await
        .unwrap();
    let at = Instant::now();
    let (got, woken) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting fetch was woken")
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), published.id);
    assert!(
        woken - at < Duration::from_secs(5),
        "woken after {:?}",
        woken - at
    );
    consumer.ack(&got[0]).await.unwrap();

    // The scout kept its lease and term all along; the listener never reconnected.
    let now = pg.scout_status();
    assert!(now.is_leader, "{now:?}");
    assert_eq!(now.term, scout.term, "{now:?}");
    let now = pg.listener_status();
    assert!(now.connected, "{now:?}");
    assert_eq!(now.reconnects, listener.reconnects, "{now:?}");

    // A DBA's maintenance holds a lock on the messages for a while (its session watches the
    // wait from inside its transaction, where no idle timeout applies): pgtide's publish waits for
    // it rather than being cancelled after a second (57014, not retryable: the publish would
    // fail for good).
    let dba = connect(&url).await;
    dba.batch_execute(
        "SET idle_in_transaction_session_timeout = 0; \
         BEGIN; LOCK TABLE hostile.messages IN SHARE MODE",
    )
    .await
    .unwrap();
    let blocked = tokio::spawn({
        let pg = pg.clone();
        async move { pg.publish("s", json(serde_json::json!("blocked"))).await }
    });
    tokio::time::timeout(WAIT, async {
        loop {
            // How long pgtide's publish has been waiting for the lock, by the server's clock.
            let waited: Option<f64> = dba
                .query_one(
                    "SELECT max(extract(epoch FROM clock_timestamp() - query_start))::float8 \
                     FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
            // A publish that ended early was cancelled: its error is shown below.
            if waited.is_some_and(|w| w > 1.5) || blocked.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the publish waits on the lock");
    dba.batch_execute("COMMIT").await.unwrap();
    let receipt = tokio::time::timeout(WAIT, blocked)
        .await
        .expect("the publish went through once the lock was released")
        .unwrap()
        .expect("the publish waited for the lock instead of being cancelled");
    let got = consumer.fetch(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), receipt.id);
    consumer.ack(&got[0]).await.unwrap();

    // A worker whose handler outlasts the timeouts: pgtide holds no transaction open across it.
    let n = 6;
    for i in 0..n {
        pg.publish("s", json(serde_json::json!(i))).await.unwrap();
    }
    let worker = Worker::new(consumer, |_: Delivery| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok::<_, String>(Outcome::Ack)
    })
    .concurrency(3);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            // The server ends pooled sessions idle for a second (idle_session_timeout is left
            // to the server there): one taken from the pool as it dies fails, retryably.
            match pg.stats("s", "g").await {
                Ok(s) if s.ready == 0 && s.in_flight == 0 => break,
                Ok(_) => {}
                Err(e) => assert!(e.is_retryable(), "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the worker handled everything");
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, n);
    assert_eq!((report.lease_lost, report.retried), (0, 0), "{report:?}");
    let s = pg.stats("s", "g").await.unwrap();
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (0, 0, 0, 0));
    assert_eq!(pg.background_tasks(), tasks, "a background task died");
    assert_eq!(pg.listener_status().reconnects, listener.reconnects);
    pg.shutdown().await;
}
