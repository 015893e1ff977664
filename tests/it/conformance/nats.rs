//! Conformance for the NATS backend against the local server (`NATS_URL`, default
//! `nats://127.0.0.1:4222`), NATS-specific checks, and a three-node JetStream cluster that loses
//! a node mid-stream.

use std::collections::HashSet;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pgtide::{
    Error, GroupStart, NatsBackend, NatsOptions, OutgoingMessage, PublishReceipt, Queue,
    QueueConsumer, StreamConfig,
};

fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Deletes the JetStream streams of a namespace when the test ends.
pub struct Cleanup {
    url: String,
    namespace: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = format!("PGTIDE-{}-", self.namespace);
        // Drop cannot await: a runtime of its own on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(client) = async_nats::connect(url).await else {
                    return;
                };
                let js = async_nats::jetstream::new(client);
                let names: Vec<String> = js
                    .stream_names()
                    .filter_map(|n| async move { n.ok() })
                    .collect()
                    .await;
                for name in names.into_iter().filter(|n| n.starts_with(&prefix)) {
                    let _ = js.delete_stream(name).await;
                }
            });
        })
        .join();
    }
}

pub(crate) async fn fresh() -> (NatsBackend, Cleanup) {
    let namespace = crate::common::unique("t");
    let backend = NatsBackend::connect(&url(), &namespace).await.unwrap();
    let cleanup = Cleanup {
        url: url(),
        namespace,
    };
    (backend, cleanup)
}

conformance!(suite, crate::conformance::nats::fresh);

fn msg(v: serde_json::Value) -> OutgoingMessage {
    OutgoingMessage::json(&v).unwrap()
}

/// Fetches until `n` deliveries arrived or `wait` passed, acking each.
async fn drain<C: QueueConsumer>(c: &C, n: usize, wait: Duration) -> Vec<uuid::Uuid> {
    let deadline = Instant::now() + wait;
    let mut ids = vec![];
    while ids.len() < n && Instant::now() < deadline {
        let got = c
            .fetch(n - ids.len(), Duration::from_millis(500))
            .await
            .unwrap();
        c.ack_batch(&got.iter().collect::<Vec<_>>()).await.unwrap();
        ids.extend(got.iter().map(|d| d.id()));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotted_names_do_not_collide() {
    let (q, _cleanup) = fresh().await;
    let stream = "hook.sync";
    q.ensure_stream(stream, &StreamConfig::default())
        .await
        .unwrap();
    // A stream whose encoded name could collide with a naive encoding of "hook.sync".
    q.ensure_stream("hook_sync", &StreamConfig::default())
        .await
        .unwrap();
    let first = q.publish(stream, msg(serde_json::json!(1))).await.unwrap();
    assert!(q
        .ensure_group(stream, "late.group", GroupStart::Oldest)
        .await
        .unwrap());
    let second = q.publish(stream, msg(serde_json::json!(2))).await.unwrap();
    let late = q.consumer(stream, "late.group", "c").await.unwrap();
    let got = drain(&late, 2, Duration::from_secs(10)).await;
    assert_eq!(
        got,
        vec![first.id, second.id],
        "oldest start sees both, in order"
    );
    let other = q.consumer("hook_sync", "late.group", "c").await;
    assert!(
        matches!(other, Err(Error::GroupNotFound { .. })),
        "{other:?}"
    );
    assert!(q
        .ensure_group("hook_sync", "late.group", GroupStart::New)
        .await
        .unwrap());
    let other = q.consumer("hook_sync", "late.group", "c").await.unwrap();
    assert!(drain(&other, 1, Duration::from_millis(500))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_duplicate_returns_the_delayed_original() {
    let (q, _cleanup) = fresh().await;
    q.ensure_stream("later", &StreamConfig::default())
        .await
        .unwrap();
    q.ensure_group("later", "g", GroupStart::New).await.unwrap();
    let delayed = || {
        msg(serde_json::json!("x"))
            .dedupe_key("once")
            .delay(Duration::from_millis(300))
    };
    let first = q.publish("later", delayed()).await.unwrap();
    let again = q.publish("later", delayed()).await.unwrap();
    assert_eq!(
        again,
        PublishReceipt {
            id: first.id,
            duplicate: true
        }
    );
    let c = q.consumer("later", "g", "c").await.unwrap();
    assert_eq!(drain(&c, 2, Duration::from_secs(3)).await, vec![first.id]);
    // Still a duplicate after the move: the delayed original keeps its dedupe key.
    let third = q.publish("later", delayed()).await.unwrap();
    assert_eq!(
        third,
        PublishReceipt {
            id: first.id,
            duplicate: true
        }
    );
}

// --- A three-node JetStream cluster -------------------------------------------------------

/// `n` distinct free loopback ports (held open together so none is handed out twice).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Three `nats-server` processes forming one JetStream cluster; killed (and their storage
/// removed) on drop.
struct Cluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    dir: PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        let dir = std::env::temp_dir().join(crate::common::unique("pgtide-nats"));
        let mut ports = free_ports(6);
        let routes_ports = ports.split_off(3);
        let routes = routes_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            nodes: vec![],
            ports: ports.clone(),
            dir: dir.clone(),
        };
        for i in 0..3 {
            let store = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&store).unwrap();
            let child = Command::new(&bin)
                .args(["-a", "127.0.0.1", "-p", &ports[i].to_string()])
                .args(["-n", &format!("n{i}"), "-js", "-sd"])
                .arg(&store)
                .args(["--cluster_name", "pgtide-it"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", routes_ports[i]),
                ])
                .args(["--routes", &routes])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
            cluster.nodes.push(Some(child));
        }
        cluster
    }

    fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every node accepts client connections.
    async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in &self.ports {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "node on port {port} did not start"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Retries `op` until it succeeds; the cluster answers with (retryable) errors while it elects
/// leaders.
async fn retry<T, F, Fut>(what: &str, wait: Duration, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = pgtide::Result<T>>,
{
    let deadline = Instant::now() + wait;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "{what}: retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Publishes message `i` with a dedupe key, so a retry after an unanswered publish cannot
/// store it twice.
async fn publish_keyed(q: &NatsBackend, i: usize) -> uuid::Uuid {
    let m = || msg(serde_json::json!(i)).dedupe_key(format!("k{i}"));
    retry("publish", Duration::from_secs(30), || {
        q.publish("orders", m())
    })
    .await
    .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_losing_a_node() {
    let mut cluster = Cluster::start();
    cluster.wait_listening().await;
    let options = NatsOptions::default()
        .replicas(3)
        .request_timeout(Duration::from_secs(2));
    let url = cluster.url();
    let q = retry("connect", Duration::from_secs(20), || {
        NatsBackend::connect_with(&url, "cluster", options.clone())
    })
    .await;
    let config = StreamConfig::default().lease(Duration::from_secs(2));
    retry("ensure_stream", Duration::from_secs(30), || {
        q.ensure_stream("orders", &config)
    })
    .await;
    retry("ensure_group", Duration::from_secs(30), || {
        q.ensure_group("orders", "billing", GroupStart::Oldest)
    })
    .await;

    let mut published = HashSet::new();
    for i in 0..100 {
        published.insert(publish_keyed(&q, i).await);
    }
    let c = retry("consumer", Duration::from_secs(30), || {
        q.consumer("orders", "billing", "c")
    })
    .await;
    let mut consumed = HashSet::new();
    while consumed.len() < 50 {
        let got = retry("fetch", Duration::from_secs(30), || {
            c.fetch(10, Duration::from_secs(1))
        })
        .await;
        let _ = c.ack_batch(&got.iter().collect::<Vec<_>>()).await;
        consumed.extend(got.iter().map(|d| d.id()));
    }

    // Kill the stream's leader: the other two keep a quorum and elect a new one.
    let leader = stream_leader(&url, "PGTIDE-cluster-orders").await;
    cluster.kill(leader);

    for i in 100..200 {
        published.insert(publish_keyed(&q, i).await);
    }
    assert_eq!(published.len(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !published.is_subset(&consumed) {
        assert!(
            Instant::now() < deadline,
            "{} of 200 published messages consumed",
            published.intersection(&consumed).count()
        );
        match c.fetch(50, Duration::from_secs(1)).await {
            Ok(got) => {
                // An ack lost in the fail-over only means a redelivery later.
                let _ = c.ack_batch(&got.iter().collect::<Vec<_>>()).await;
                consumed.extend(got.iter().map(|d| d.id()));
            }
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
    }
    assert!(
        consumed.is_subset(&published),
        "delivered a message never published"
    );
}

/// The index of the node leading `stream`.
async fn stream_leader(url: &str, stream: &str) -> usize {
    let servers: Vec<async_nats::ServerAddr> = url.split(',').map(|s| s.parse().unwrap()).collect();
    let client = async_nats::connect(servers).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = match js.get_stream(stream).await {
            Ok(mut s) => s
                .info()
                .await
                .ok()
                .and_then(|i| i.cluster.clone())
                .and_then(|c| c.leader),
            Err(_) => None,
        };
        if let Some(name) = leader.and_then(|l| l.strip_prefix('n').and_then(|n| n.parse().ok())) {
            return name;
        }
        assert!(Instant::now() < deadline, "stream {stream} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
