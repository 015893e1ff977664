//! The claim floor (src/postgres/floor.rs): claims start their walk of the claim index just
//! below what the group last claimed, so a held snapshot's dead entries are not walked; and the
//! sweeps (claims without the floor) still find what lies below it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use pgtide::{PgConsumer, StreamConfig};
use uuid::Uuid;

use super::wakeups::{handle, HOUR};
use crate::common::{json, namespace, TestNs, WAIT};

/// Publishes one message and consumes what the consumer gets, until it got a message published
/// `past` after `since` (database clock): by then the group's floor (the latest due time
/// claimed, minus a second) is past `since`. Returns the ids consumed.
async fn move_floor_past(
    ns: &TestNs,
    c: &PgConsumer,
    since: DateTime<Utc>,
    past: Duration,
) -> Vec<Uuid> {
    let raw = ns.raw().await;
    let target = since + chrono::Duration::from_std(past).unwrap();
    let mut seen = vec![];
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        // The database's clock, as the floor's due times are (the message id is the client's).
        let now: DateTime<Utc> = raw.query_one("SELECT now()", &[]).await.unwrap().get(0);
        ns.publish("s", json(serde_json::json!("filler")))
            .await
            .unwrap();
        let got = c.fetch(100, WAIT).await.unwrap();
        let refs: Vec<_> = got.iter().collect();
        c.ack_batch(&refs).await.unwrap();
        seen.extend(got.iter().map(|d| d.id()));
        if now > target {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the floor never moved"
        );
    }
}

/// A transaction that publishes, then commits more than a second later: its delivery's due
/// time is its transaction's start, below the floor the consumers moved meanwhile. A sweep must
/// still deliver it (the fallback poll is an hour, so only the sweep can).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_commits_below_the_floor_is_delivered_by_a_sweep() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let pg = handle(&ns.url, ns.namespace())
        .claim_floor(true)
        .poll_interval(HOUR)
        .build()
        .unwrap();
    let c = pg.consumer("s", "g", "c").await.unwrap();

    let mut late = ns.raw().await;
    let tx = late.transaction().await.unwrap();
    let row = tx
        .query_one(
            &format!(
                "SELECT \"{}\".publish('s', '\"late\"'::jsonb), now()",
                ns.namespace()
            ),
            &[],
        )
        .await
        .unwrap();
    let (late_id, began): (Uuid, DateTime<Utc>) = (row.get(0), row.get(1));
    let seen = move_floor_past(&ns, &c, began, Duration::from_secs(2)).await;
    assert!(!seen.contains(&late_id), "seen before its commit");
    tx.commit().await.unwrap();

    let mut got = vec![];
    while !got.contains(&late_id) {
        let batch = c.fetch(100, WAIT).await.unwrap();
        assert!(!batch.is_empty(), "the late publish was never delivered");
        let refs: Vec<_> = batch.iter().collect();
        c.ack_batch(&refs).await.unwrap();
        got.extend(batch.iter().map(|d| d.id()));
    }
}

/// A claim that rolls back after the floor moved past its delivery (the claims in between
/// skipped the locked row): the delivery is ready again below the floor, and a sweep must
/// deliver it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_rolled_back_below_the_floor_is_delivered_again() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let pg = handle(&ns.url, ns.namespace())
        .claim_floor(true)
        .poll_interval(HOUR)
        .build()
        .unwrap();
    let c = pg.consumer("s", "g", "c").await.unwrap();
    let first = ns
        .publish("s", json(serde_json::json!("first")))
        .await
        .unwrap()
        .id;

    let mut rogue = ns.raw().await;
    let tx = rogue.transaction().await.unwrap();
    // What a claim does to the delivery's row (not `read()`, which would also lock the
    // messages table for as long as this transaction stays open, and keep the scout's partition
    // maintenance, and the claims queued behind it, waiting).
    let row = tx
        .query_one(
            &format!(
                "UPDATE \"{}\".delivery_state \
                 SET visible_at = now() + interval '30 s', consumer = 'rogue', attempts = attempts + 1 \
                 WHERE message_id = $1 RETURNING message_id, now()",
                ns.namespace()
            ),
            &[&first],
        )
        .await
        .unwrap();
    let (claimed, began): (Uuid, DateTime<Utc>) = (row.get(0), row.get(1));
    assert_eq!(claimed, first);
    let seen = move_floor_past(&ns, &c, began, Duration::from_secs(2)).await;
    assert!(!seen.contains(&first), "claimed twice at once");
    tx.rollback().await.unwrap();

    let mut got = vec![];
    loop {
        let batch = c.fetch(100, WAIT).await.unwrap();
        assert!(
            !batch.is_empty(),
            "the rolled-back claim was never delivered"
        );
        let refs: Vec<_> = batch.iter().collect();
        c.ack_batch(&refs).await.unwrap();
        if let Some(d) = batch.iter().find(|d| d.id() == first) {
            assert_eq!(d.attempt, 1, "a rolled-back claim does not count");
            break;
        }
        got.extend(batch.iter().map(|d| d.id()));
    }
}

/// Publishes a message with a minute's head start: its delivery lies below a floor the
/// consumers' claims left about a second under the present.
async fn publish_ahead(ns: &TestNs) -> Uuid {
    let m = pgtide::OutgoingMessage::json(&serde_json::json!("ahead"))
        .unwrap()
        .priority(60);
    ns.publish("s", m).await.unwrap().id
}

/// Publishes one message and consumes it: the floor moves to a second below it.
async fn consume_one(ns: &TestNs, c: &PgConsumer) {
    let id = ns
        .publish("s", json(serde_json::json!("plain")))
        .await
        .unwrap()
        .id;
    let got = c.fetch(10, WAIT).await.unwrap();
    assert_eq!(got.iter().map(|d| d.id()).collect::<Vec<_>>(), vec![id]);
    c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
}

/// A claim from the floor that finds nothing is followed at once by a sweep: a delivery below
/// the floor (here a priority head start of a minute, longer than the consumers' lag) is
/// claimed by the fetch its publish wakes and by a `try_fetch`. Sweeps are otherwise an hour
/// apart and the fallback poll is an hour, so nothing else could deliver it within the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_finds_nothing_from_the_floor_sweeps_at_once() {
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let pg = handle(&ns.url, ns.namespace())
        .claim_floor(true)
        .claim_sweep_interval(HOUR)
        .poll_interval(HOUR)
        .build()
        .unwrap();
    let c = pg.consumer("s", "g", "c").await.unwrap();
    // The first claim sweeps (no floor yet); the later ones claim from the floor.
    consume_one(&ns, &c).await;
    consume_one(&ns, &c).await;

    // A waiting fetch, woken by the publish.
    let fetching = tokio::spawn(async move {
        let got = c.fetch(10, WAIT).await.unwrap();
        (c, got)
    });
    // The fetch registers its stream just before it waits, after it subscribed to wake-ups.
    let raw = ns.raw().await;
    super::wake_registrations::until_registrations(&raw, &ns, 1).await;
    let early = publish_ahead(&ns).await;
    let (c, got) = fetching.await.unwrap();
    assert_eq!(
        got.iter().map(|d| d.id()).collect::<Vec<_>>(),
        vec![early],
        "the fetch woken for a delivery below the floor came back without it"
    );
    c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();

    // A try_fetch, which does not wait.
    consume_one(&ns, &c).await;
    consume_one(&ns, &c).await;
    let early = publish_ahead(&ns).await;
    let got = c.try_fetch(10).await.unwrap();
    assert_eq!(
        got.iter().map(|d| d.id()).collect::<Vec<_>>(),
        vec![early],
        "try_fetch came back without the delivery below the floor"
    );
}

/// Index entries one `_claim` returned to its walk (dead ones included: a held snapshot keeps
/// them from being marked dead), counted in the claim's own transaction, which is rolled back.
async fn entries_walked(
    raw: &mut tokio_postgres::Client,
    ns: &str,
    group: i32,
    floor: Option<DateTime<Utc>>,
) -> (i64, i64) {
    let tx = raw.transaction().await.unwrap();
    // Counts not yet flushed to the shared statistics, which carry over from earlier
    // transactions of the session: the difference is this claim's.
    let counted = format!(
        "SELECT pg_stat_get_xact_tuples_returned('\"{ns}\".delivery_state_claim'::regclass)"
    );
    let before: i64 = tx.query_one(&counted, &[]).await.unwrap().get(0);
    let claimed: i64 = tx
        .query_one(
            &format!("SELECT count(*) FROM \"{ns}\"._claim($1, 10, 'probe', NULL, $2)"),
            &[&group, &floor],
        )
        .await
        .unwrap()
        .get(0);
    let after: i64 = tx.query_one(&counted, &[]).await.unwrap().get(0);
    tx.rollback().await.unwrap();
    (claimed, after - before)
}

/// Under a held snapshot, a claim from the start walks every entry consumed since the snapshot
/// began; a claim from the floor the engine keeps (the latest due time it claimed, minus a
/// second) walks about a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_held_snapshot_a_floored_claim_walks_a_batch_not_the_dead_entries() {
    const DRAINED: usize = 3_000;
    let ns = namespace().await;
    ns.stream_with_groups("s", StreamConfig::default(), &["g"])
        .await;
    let c = ns.consumer("s", "g", "c").await.unwrap();
    let holder = ns.raw().await;
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .await
        .unwrap();

    // Consumed while the snapshot is held: their index entries stay. A priority of 5 makes
    // them due 5 s before they were published, below the floor of what comes next (so the
    // test needs no wait for the clock).
    for chunk in 0..DRAINED / 500 {
        let batch: Vec<_> = (0..500)
            .map(|i| json(serde_json::json!(chunk * 500 + i)).priority(5))
            .collect();
        ns.publish_batch("s", &batch).await.unwrap();
    }
    let mut drained = 0;
    while drained < DRAINED {
        let got = c.try_fetch(500).await.unwrap();
        assert!(!got.is_empty(), "drained only {drained}");
        let refs: Vec<_> = got.iter().collect();
        c.ack_batch(&refs).await.unwrap();
        drained += got.len();
    }
    let fresh: Vec<_> = (0..20).map(|i| json(serde_json::json!(i))).collect();
    ns.publish_batch("s", &fresh).await.unwrap();

    let mut raw = ns.raw().await;
    let (group, oldest_fresh): (i32, DateTime<Utc>) = {
        let row = raw
            .query_one(
                &format!(
                    "SELECT g.id, min(d.visible_at) FROM \"{0}\".groups g \
                     JOIN \"{0}\".delivery_state d ON d.group_id = g.id \
                     WHERE d.consumer IS NULL GROUP BY g.id",
                    ns.namespace()
                ),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    // What the engine's floor would be after claiming the first fresh delivery.
    let floor = Some(oldest_fresh - chrono::Duration::seconds(1));
    let (claimed, from_start) = entries_walked(&mut raw, ns.namespace(), group, None).await;
    assert_eq!(claimed, 10);
    let (claimed, from_floor) = entries_walked(&mut raw, ns.namespace(), group, floor).await;
    assert_eq!(claimed, 10);
    assert!(
        from_start >= DRAINED as i64,
        "the claim from the start walked {from_start} entries: the snapshot did not keep the \
         {DRAINED} dead ones (the test proves nothing)"
    );
    assert!(
        from_floor <= 20,
        "the floored claim walked {from_floor} entries, from the start {from_start}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
}
