//! PostgreSQL under faults: consumer processes killed with SIGKILL, the server crash-restarted
//! (`pg_ctl -m immediate`: no checkpoint, every backend killed), listener backends terminated,
//! the scout holder's process killed — on a cluster of the test's own with fsync and
//! synchronous_commit on.

use super::run::{kill_a_consumer, run, ConsumerProcess, Fault, RestartLoss};
use pgtide_testing::Cluster;

/// Runs a statement on the test's cluster from a fault (faults are synchronous).
fn query(url: &str, sql: &str) -> Vec<tokio_postgres::Row> {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
            else {
                return vec![];
            };
            tokio::spawn(conn);
            client.query(sql, &[]).await.unwrap_or_default()
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_loses_nothing_under_kills_and_crashes() {
    let cluster = Cluster::start(&[]);
    let url = cluster.url();
    let crash: Fault = Box::new(|_| {
        cluster.crash_restart();
        Some("server restart")
    });
    let scout: Fault = Box::new(|consumers: &mut Vec<ConsumerProcess>| {
        let rows = query(&url, "SELECT holder FROM faults.scout WHERE active");
        let holder: Option<String> = rows.first().and_then(|r| r.get(0));
        let c = consumers
            .iter_mut()
            .find(|c| holder.is_some() && c.holder() == holder)?;
        c.kill_for_fault();
        Some("scout holder kill")
    });
    let listeners: Fault = Box::new(|_| {
        let rows = query(
            &url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
        );
        (!rows.is_empty()).then_some("listener backend terminated")
    });
    let report = run(
        &url,
        "faults",
        vec![kill_a_consumer(), crash, scout, listeners],
        RestartLoss::Settles(0),
    )
    .await;
    println!("{}", report.join("\n"));
}
