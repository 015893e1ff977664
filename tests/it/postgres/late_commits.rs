//! Work whose due time has passed by the time its transaction commits: a nack with a short
//! delay takes `now()` at the start of its transaction, so under load (or behind a row lock) the
//! retry can become visible only after the scout's due check already looked past its due time.
//! The scout must still wake the consumers waiting for it, not leave it to the fallback poll.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgtide::StreamConfig;

use super::wakeups::{handle, until_waiting, HOUR};
use crate::common::wait_for;
use crate::common::{json, namespace, WAIT};

/// Waits until a statement of this namespace's `_nack` is blocked on a row lock.
async fn until_nack_blocked(raw: &tokio_postgres::Client) {
    let deadline = Instant::now() + WAIT;
    loop {
        let row = raw
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE '%\\_nack(%'",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the nack never blocked on the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Engine bug behind a flaky worker test: the due-waker only looked for deliveries that became
/// visible after its previous check, so a retry committed after that check with an earlier
/// due time was never announced; a waiting consumer got it only from its fallback poll (30 s
/// by default; an hour here, so the test would time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_committed_after_its_due_time_still_wakes_waiting_consumers() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let side = handle(&ns.url, ns.namespace())
        .poll_interval(HOUR)
        .scout_max_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    side.start_scout();
    let mut scout = side.watch_scout();
    wait_for(&mut scout, WAIT, "the scout elected", |s| s.is_leader).await;
    side.publish("s", json(serde_json::json!(1))).await.unwrap();
    let a = side.consumer("s", "g", "a").await.unwrap();
    let d = a.fetch(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt, 1);

    // Lock the delivery's row: the nack's transaction starts now, its retry is due 10 ms later,
    // but it commits only when the lock is released.
    let mut raw = ns.raw().await;
    let lock = raw.transaction().await.unwrap();
    let locked = format!(
        "SELECT 1 FROM {}.delivery_state WHERE message_id = $1 FOR UPDATE",
        ns.namespace()
    );
    assert_eq!(lock.execute(&locked, &[&d.id()]).await.unwrap(), 1);
    let id = d.id();
    let nack = tokio::spawn(async move { a.nack(&d, Some(Duration::from_millis(10)), None).await });
    let observer = ns.raw().await;
    until_nack_blocked(&observer).await;
    // The scout checks past the retry's due time while the retry is not yet committed.
    let blocked_at: DateTime<Utc> = observer
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0);
    let past_due = blocked_at + chrono::Duration::milliseconds(100);
    wait_for(
        &mut scout,
        WAIT,
        "a due check past the retry's due time",
        |s| s.last_check_at.is_some_and(|at| at > past_due),
    )
    .await;

    // A consumer waiting from now on can only be woken by the scout.
    let b = side.consumer("s", "g", "b").await.unwrap();
    let waiting = tokio::spawn(async move { tokio::time::timeout(WAIT, b.fetch(1, HOUR)).await });
    until_waiting(&side, 1).await;
    lock.commit().await.unwrap();
    nack.await.unwrap().unwrap();
    let got = waiting
        .await
        .unwrap()
        .expect("the retry was never announced to the waiting consumer")
        .unwrap();
    assert_eq!((got[0].id(), got[0].attempt), (id, 2));
}
