//! The accounting shared by every backend's fault test: consumer processes (this test binary
//! started again with the ignored test [`consumer_child`] selected), publishers of unique numbers,
//! and the final check. Each consumer process writes every number its handler sees to a file of
//! its own before the ack, so a kill between the two shows up as a duplicate, never as a loss.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgtide::{
    AnyBackend, CancellationToken, Delivery, GroupStart, Outcome, OutgoingMessage, PgBackend,
    Queue, StreamConfig, Worker,
};

pub const STREAM: &str = "numbers";
pub const GROUPS: [&str; 2] = ["g1", "g2"];
pub const CHILDREN_PER_GROUP: usize = 2;
pub const PREFETCH: usize = 16;
/// How long faults are injected while publishers run.
pub const CHAOS: Duration = Duration::from_secs(30);
/// Leases are short so that deliveries of a killed consumer come back quickly.
pub const LEASE: Duration = Duration::from_secs(2);

/// The backend under test, as the consumer processes reach it.
pub async fn connect(url: &str, namespace: &str) -> pgtide::Result<AnyBackend> {
    if url.starts_with("postgres") {
        let pg = PgBackend::builder(url)
            .namespace(namespace)
            .pool_size(4)
            .connect_timeout(Duration::from_secs(5))
            .scout_ttl(Duration::from_secs(2))
            .build()?;
        return Ok(AnyBackend::Postgres(pg));
    }
    AnyBackend::connect(url, namespace).await
}

/// One consumer process of a test: which group, its output file, and the running child.
pub struct ConsumerProcess {
    pub group: &'static str,
    slot: usize,
    generation: usize,
    dir: PathBuf,
    child: Option<Child>,
}

impl ConsumerProcess {
    fn name(&self) -> String {
        format!("{}-{}-{}", self.group, self.slot, self.generation)
    }

    fn out(&self) -> PathBuf {
        self.dir.join(format!("{}.out", self.name()))
    }

    /// The scout holder id the process wrote (Postgres only).
    pub fn holder(&self) -> Option<String> {
        std::fs::read_to_string(format!("{}.holder", self.out().display())).ok()
    }

    fn spawn(&mut self, url: &str, namespace: &str) {
        self.generation += 1;
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "faults::run::consumer_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("PGTIDE_FAULT_URL", url)
            .env("PGTIDE_FAULT_NAMESPACE", namespace)
            .env("PGTIDE_FAULT_GROUP", self.group)
            .env("PGTIDE_FAULT_NAME", self.name())
            .env("PGTIDE_FAULT_OUT", self.out())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL; the run restarts the process after the fault.
    pub fn kill_for_fault(&mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Entry point of a consumer process (does nothing when run as an ordinary test).
#[test]
#[ignore = "started by the fault tests as a child process"]
fn consumer_child() {
    let (Ok(url), Ok(namespace), Ok(group), Ok(name), Ok(out)) = (
        std::env::var("PGTIDE_FAULT_URL"),
        std::env::var("PGTIDE_FAULT_NAMESPACE"),
        std::env::var("PGTIDE_FAULT_GROUP"),
        std::env::var("PGTIDE_FAULT_NAME"),
        std::env::var("PGTIDE_FAULT_OUT"),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .unwrap();
        let file = Arc::new(Mutex::new(file));
        // (Re)connect and run the worker again whenever it gives up (the server was down).
        loop {
            let Ok(queue) = connect(&url, &namespace).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if let AnyBackend::Postgres(pg) = &queue {
                pg.start_scout();
                let _ = std::fs::write(format!("{out}.holder"), pg.scout_status().holder_id);
            }
            loop {
                let Ok(consumer) = queue.consumer(STREAM, &group, &name).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let file = file.clone();
                let worker = Worker::new(consumer, move |delivery: Delivery| {
                    let file = file.clone();
                    async move {
                        let n: u64 = delivery.json().map_err(|e| e.to_string())?;
                        let mut f = file.lock().map_err(|e| e.to_string())?;
                        f.write_all(format!("{n}\n").as_bytes())
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(Outcome::Ack)
                    }
                })
                .concurrency(8)
                .prefetch(PREFETCH);
                let _ = worker.run(CancellationToken::new()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
}

/// A fault the test injects; returns a label for the report, or None when it did nothing.
pub type Fault<'a> = Box<dyn FnMut(&mut Vec<ConsumerProcess>) -> Option<&'static str> + 'a>;

/// What a server restart may forget of the settles it had taken before it was killed.
#[derive(Clone, Copy, Debug)]
pub enum RestartLoss {
    /// At most this many settles per restart (0: the server makes every settle durable first).
    Settles(usize),
    /// Any number: the server writes a consumer's settle state to disk asynchronously and a
    /// kill can lose all of it (nats-server 2.9 lost a new consumer's whole ack state once under
    /// load, and redelivered the group's stream). Nothing may be lost either way; duplicates are
    /// then bounded by one redelivery of everything published per restart.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Anything,
}

/// Publishes unique numbers while `faults` run one after the other every three seconds (after
/// each, killed consumer processes are restarted), then waits until every acknowledged number
/// reached every group and checks the accounting. Duplicates may be what the killed processes
/// had claimed (`PREFETCH` each) plus, per server restart, what every consumer had claimed and
/// what `restart_loss` allows (settles the server took but had not made durable). Returns the
/// report lines.
pub async fn run(
    url: &str,
    namespace: &str,
    mut faults: Vec<Fault<'_>>,
    restart_loss: RestartLoss,
) -> Vec<String> {
    let queue = connect(url, namespace).await.unwrap();
    if let AnyBackend::Postgres(pg) = &queue {
        pg.migrate().await.unwrap();
    }
    queue
        .ensure_stream(
            STREAM,
            &StreamConfig::default().lease(LEASE).max_deliver(1000),
        )
        .await
        .unwrap();
    for g in GROUPS {
        queue
            .ensure_group(STREAM, g, GroupStart::New)
            .await
            .unwrap();
    }

    let dir = std::env::temp_dir().join(format!("pgtide-faults-out-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut consumers: Vec<ConsumerProcess> = GROUPS
        .iter()
        .flat_map(|g| (0..CHILDREN_PER_GROUP).map(move |slot| (*g, slot)))
        .map(|(group, slot)| ConsumerProcess {
            group,
            slot,
            generation: 0,
            dir: dir.clone(),
            child: None,
        })
        .collect();
    for c in &mut consumers {
        c.spawn(url, namespace);
    }

    // Publishers: unique numbers, one per call. Ok = acknowledged; an error leaves the number
    // "maybe" published (the commit may have happened before the connection died).
    let stop = CancellationToken::new();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let maybe = Arc::new(Mutex::new(BTreeSet::new()));
    let mut publishers = vec![];
    for p in 0..2u64 {
        let (queue, stop, acked, maybe) =
            (queue.clone(), stop.clone(), acked.clone(), maybe.clone());
        publishers.push(tokio::spawn(async move {
            let mut n = p;
            while !stop.is_cancelled() {
                n += 2;
                let msg = OutgoingMessage::json(&n).unwrap();
                let published =
                    tokio::time::timeout(Duration::from_secs(5), queue.publish(STREAM, msg)).await;
                if matches!(published, Ok(Ok(_))) {
                    acked.lock().unwrap().insert(n);
                } else {
                    maybe.lock().unwrap().insert(n);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }

    let mut injected: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut kills: BTreeMap<&'static str, usize> = BTreeMap::new();
    let started = Instant::now();
    let mut step = 0;
    while started.elapsed() < CHAOS {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let which = step % faults.len();
        let fault = &mut faults[which];
        step += 1;
        if let Some(label) = fault(&mut consumers) {
            *injected.entry(label).or_default() += 1;
        }
        for c in consumers.iter_mut().filter(|c| c.child.is_none()) {
            *kills.entry(c.group).or_default() += 1;
            c.spawn(url, namespace);
        }
    }
    stop.cancel();
    for p in publishers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let maybe = maybe.lock().unwrap().clone();

    // Every acknowledged number in every group, within a bound.
    let read_group = |g: &str| -> Vec<u64> {
        let mut seen = vec![];
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{g}-")) && name.ends_with(".out") {
                seen.extend(read_numbers(&entry.path()));
            }
        }
        seen
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing: usize = GROUPS
            .iter()
            .map(|g| {
                let seen: BTreeSet<u64> = read_group(g).into_iter().collect();
                acked.difference(&seen).count()
            })
            .sum();
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumers.clear(); // kills them

    let crashes = injected.get("server restart").copied().unwrap_or(0);
    let mut report = vec![format!(
        "published {} acknowledged, {} unacknowledged (errors while the server was down); \
         faults {injected:?}; consumer processes killed per group {kills:?}",
        acked.len(),
        maybe.len()
    )];
    let mut failures = vec![];
    for g in GROUPS {
        let seen = read_group(g);
        let unique: BTreeSet<u64> = seen.iter().copied().collect();
        let lost: Vec<&u64> = acked.difference(&unique).collect();
        let invented: Vec<&u64> = unique
            .iter()
            .filter(|n| !acked.contains(n) && !maybe.contains(n))
            .collect();
        let duplicates = seen.len() - unique.len();
        // What a killed process or a crashed server can have had in hand.
        let forgotten = match restart_loss {
            RestartLoss::Settles(n) => n,
            RestartLoss::Anything => acked.len() + maybe.len(),
        };
        let bound = (kills.get(g).copied().unwrap_or(0) + crashes * CHILDREN_PER_GROUP) * PREFETCH
            + crashes * forgotten;
        report.push(format!(
            "group {g}: delivered {} unique, lost {}, not published {}, duplicates {duplicates} \
             (bound {bound})",
            unique.len(),
            lost.len(),
            invented.len()
        ));
        if !lost.is_empty() {
            failures.push(format!("group {g} lost {:?}", &lost[..lost.len().min(20)]));
        }
        if !invented.is_empty() {
            failures.push(format!("group {g} got unpublished {invented:?}"));
        }
        if duplicates > bound {
            failures.push(format!("group {g}: {duplicates} duplicates > {bound}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        report.join("\n")
    );
    report
}

fn read_numbers(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills one consumer process, in turn.
pub fn kill_a_consumer<'a>() -> Fault<'a> {
    let mut next = 0;
    Box::new(move |consumers: &mut Vec<ConsumerProcess>| {
        next += 1;
        let i = next % consumers.len();
        consumers[i].kill();
        Some("consumer process kill")
    })
}
