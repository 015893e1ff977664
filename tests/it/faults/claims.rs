//! Claims that a crash of PostgreSQL loses. By default a claim that settles nothing commits
//! without waiting for its WAL flush (`synchronous_claims(false)`): a crash right after it may
//! lose it. The delivery is then ready again, and the consumer that still holds the lost claim
//! must be fenced: the next claim draws a token the lost one never had, even though the crash
//! also lost everything else the claim wrote (a sequence's advance with it).
//!
//! The loss is made certain, not left to timing: the cluster's WAL writer is stopped (SIGSTOP)
//! before the claim, so the claim's commit record stays in the server's WAL buffers, and then
//! killed (SIGKILL), which makes the postmaster restart every process and recover from the WAL
//! on disk. Nothing else commits in between: the handle runs no scout and no listener.

use std::process::Command;
use std::time::{Duration, Instant};

use pgtide::{PgBackend, StreamConfig};

use crate::common::{json, raw_client as connect, WAIT};
use pgtide_testing::Cluster;

async fn handle(url: &str, synchronous_claims: bool) -> PgBackend {
    let pg = PgBackend::builder(url)
        .namespace("claims")
        .notifications(false)
        .synchronous_claims(synchronous_claims)
        .build()
        .unwrap();
    pg.migrate().await.unwrap();
    pg.ensure_stream("s", &StreamConfig::default())
        .await
        .unwrap();
    pg.ensure_group("s", "g", pgtide::GroupStart::New)
        .await
        .unwrap();
    pg
}

fn signal(pid: i32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// Stops the WAL writer, runs `claim`, then kills the WAL writer: the server restarts every
/// process and recovers from the WAL on disk. Returns once it accepts connections again.
async fn crash_with_wal_writer_stopped<F: std::future::Future<Output = ()>>(url: &str, claim: F) {
    let admin = connect(url).await;
    let pid: i32 = admin
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(admin);
    signal(pid, "-STOP");
    claim.await;
    signal(pid, "-KILL");
    // The postmaster notices, ends every backend and recovers; wait until it answers again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Connections made before the crash restart may still answer briefly: ask for a new
        // backend whose start time follows the kill.
        if let Ok(Ok((client, conn))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_postgres::connect(url, tokio_postgres::NoTls),
        )
        .await
        {
            tokio::spawn(conn);
            let writer: Option<i32> = client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'",
                    &[],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get(0));
            if writer.is_some_and(|w| w != pid) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the server did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Retries `op` while the handle's pooled connections still die of the crash.
async fn retry<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = pgtide::Result<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                println!("{what}: {e} (retrying)");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Whether the delivery of message `id` in group `g` is held by a consumer, and its token.
async fn held(url: &str, id: uuid::Uuid) -> (Option<String>, Option<i64>) {
    let client = connect(url).await;
    let row = client
        .query_one(
            "SELECT d.consumer, d.lease_token FROM claims.delivery_state d \
             JOIN claims.groups g ON g.id = d.group_id WHERE g.name = 'g' AND d.message_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// A cluster of its own, one message published, claimed by consumer "first" while the WAL
/// writer was stopped, then the crash (`crash_with_wal_writer_stopped`).
struct Crashed {
    _cluster: Cluster,
    url: String,
    pg: PgBackend,
    first: pgtide::PgConsumer,
    id: uuid::Uuid,
    claimed: pgtide::Delivery,
}

async fn claim_then_crash(synchronous_claims: bool) -> Crashed {
    let cluster = Cluster::start(&["checkpoint_timeout = '1h'", "autovacuum = off"]);
    let url = cluster.url();
    let pg = handle(&url, synchronous_claims).await;
    let id = pg
        .publish("s", json(serde_json::json!(1)))
        .await
        .unwrap()
        .id;
    let first = pg.consumer("s", "g", "first").await.unwrap();
    let mut claimed = vec![];
    crash_with_wal_writer_stopped(&url, async {
        claimed = first.try_fetch(1).await.unwrap();
    })
    .await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id(), id);
    Crashed {
        _cluster: cluster,
        url,
        pg,
        first,
        id,
        claimed: claimed.remove(0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_lost_in_a_crash_leaves_its_holder_fenced() {
    let Crashed {
        _cluster,
        url,
        pg,
        first,
        id,
        claimed,
    } = claim_then_crash(false).await;

    // The premise: the crash lost the claim (the delivery is ready again, no holder).
    assert_eq!(held(&url, id).await, (None, None));

    // A second consumer claims it again, under a token of its own.
    let second = pg.consumer("s", "g", "second").await.unwrap();
    let again = retry("the second claim", || second.try_fetch(1)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id(), id);
    let (holder, token) = held(&url, id).await;
    assert_eq!(holder.as_deref(), Some("second"));
    assert!(token.is_some());

    // The first consumer still believes it holds the delivery: its ack changes nothing.
    let (first, claimed) = (&first, &claimed);
    let report = retry("the lost claim's ack", || async move {
        first.ack_batch(&[claimed]).await
    })
    .await;
    assert!(report.settled.is_empty(), "{report:?}");
    assert_eq!(report.lost, vec![id]);
    assert_eq!(held(&url, id).await, (Some("second".into()), token));

    // The second's ack settles it.
    let report = second.ack_batch(&[&again[0]]).await.unwrap();
    assert_eq!(report.settled, vec![id]);
    pg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_claims_survive_the_same_crash() {
    let Crashed {
        _cluster,
        url,
        pg,
        first,
        id,
        claimed,
    } = claim_then_crash(true).await;
    // The claim waited for its flush: it survived, and its holder's ack settles it.
    let (holder, token) = held(&url, id).await;
    assert_eq!(holder.as_deref(), Some("first"));
    assert!(token.is_some());
    let (first, claimed) = (&first, &claimed);
    let report = retry(
        "the ack",
        || async move { first.ack_batch(&[claimed]).await },
    )
    .await;
    assert_eq!(report.settled, vec![id]);
    pg.shutdown().await;
}
