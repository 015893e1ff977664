//! NATS JetStream and Redis Streams under faults: consumer processes killed with SIGKILL, and the
//! server itself killed and restarted on its data, on servers the tests start on ports of their
//! own.

use super::run::{kill_a_consumer, run, Fault, RestartLoss};
use pgtide_testing::Server;

async fn under_faults(server: &Server, url: &str, restart_loss: RestartLoss) {
    let restart: Fault = Box::new(|_| {
        server.crash_restart();
        Some("server restart")
    });
    let report = run(
        url,
        "faults",
        vec![kill_a_consumer(), restart],
        restart_loss,
    )
    .await;
    println!("{}", report.join("\n"));
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_loses_nothing_under_kills_and_restarts() {
    let server = Server::nats();
    // Acks are not fenced on NATS and JetStream keeps a consumer's ack state on disk
    // asynchronously: a killed server redelivers acks of its last moments (usually up to ~50
    // per restart at this load), and once, on a loaded machine, the whole stream of a group
    // whose consumer state had not reached the disk yet (21 447 duplicates, nothing lost).
    // nats-server 2.9 has no setting to sync it; what is checked is that nothing is lost.
    under_faults(
        &server,
        &format!("nats://127.0.0.1:{}", server.port),
        RestartLoss::Anything,
    )
    .await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loses_nothing_under_kills_and_restarts() {
    let server = Server::redis();
    under_faults(
        &server,
        &format!("redis://127.0.0.1:{}", server.port),
        RestartLoss::Settles(0),
    )
    .await;
}
