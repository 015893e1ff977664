//! Jepsen-style accounting on PostgreSQL: unique numbers are published under load while consumer
//! processes are killed with SIGKILL and restarted, the server is crash-restarted, listener
//! backends are terminated and the scout holder is killed. Afterwards every acknowledged publish
//! must have been delivered to every group, nothing may be delivered that was not published, and
//! duplicates must stay within what was in flight at the kills and crashes.
//!
//! Consumers are real processes: this test binary started again with the ignored test
//! [`consumer_child`] selected and its orders in environment variables. Each writes every number
//! its handler sees to a file of its own (before the ack, so a kill between the two shows up as a
//! duplicate, never as a loss).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgtide::{
    CancellationToken, Delivery, GroupStart, Outcome, OutgoingMessage, PgBackend, Queue,
    StreamConfig, Worker,
};

use super::cluster::Cluster;

const NAMESPACE: &str = "faults";
const STREAM: &str = "numbers";
const GROUPS: [&str; 2] = ["g1", "g2"];
const CHILDREN_PER_GROUP: usize = 2;
const PREFETCH: usize = 16;
const CHAOS: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(2);

/// One consumer process of the test: which group, its output file, and the running child.
struct Consumer {
    group: &'static str,
    slot: usize,
    generation: usize,
    dir: PathBuf,
    child: Option<Child>,
}

impl Consumer {
    fn name(&self) -> String {
        format!("{}-{}-{}", self.group, self.slot, self.generation)
    }

    fn out(&self) -> PathBuf {
        self.dir.join(format!("{}.out", self.name()))
    }

    fn spawn(&mut self, url: &str) {
        self.generation += 1;
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "faults::postgres::consumer_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("PGTIDE_FAULT_URL", url)
            .env("PGTIDE_FAULT_GROUP", self.group)
            .env("PGTIDE_FAULT_NAME", self.name())
            .env("PGTIDE_FAULT_OUT", self.out())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
}

/// Entry point of a consumer process (does nothing when run as an ordinary test).
#[test]
#[ignore = "started by postgres_loses_nothing_under_kills_and_crashes as a child process"]
fn consumer_child() {
    let (Ok(url), Ok(group), Ok(name), Ok(out)) = (
        std::env::var("PGTIDE_FAULT_URL"),
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
        let pg = PgBackend::builder(url)
            .namespace(NAMESPACE)
            .pool_size(4)
            .scout_ttl(Duration::from_secs(2))
            .build()
            .unwrap();
        pg.start_scout();
        std::fs::write(format!("{out}.holder"), pg.scout_status().holder_id).unwrap();
        // Run the worker again whenever it gives up (the server was down for a while).
        loop {
            let Ok(consumer) = pg.consumer(STREAM, &group, &name).await else {
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
    });
}

fn read_numbers(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_loses_nothing_under_kills_and_crashes() {
    let cluster = Cluster::start(&[]);
    let url = cluster.url();
    let pg = PgBackend::builder(url.clone())
        .namespace(NAMESPACE)
        .pool_size(4)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    pg.migrate().await.unwrap();
    pg.create_stream(
        STREAM,
        StreamConfig::default().lease(LEASE).max_deliver(1000),
    )
    .await
    .unwrap();
    for g in GROUPS {
        pg.create_group(STREAM, g, GroupStart::New).await.unwrap();
    }

    let dir = std::env::temp_dir().join(format!("pgtide-faults-out-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut consumers: Vec<Consumer> = GROUPS
        .iter()
        .flat_map(|g| (0..CHILDREN_PER_GROUP).map(move |slot| (*g, slot)))
        .map(|(group, slot)| Consumer {
            group,
            slot,
            generation: 0,
            dir: dir.clone(),
            child: None,
        })
        .collect();
    for c in &mut consumers {
        c.spawn(&url);
    }

    // Publishers: unique numbers, one per call. Ok = acknowledged; an error leaves the number
    // "maybe" published (the commit may have happened before the connection died).
    let stop = CancellationToken::new();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let maybe = Arc::new(Mutex::new(BTreeSet::new()));
    let mut publishers = vec![];
    for p in 0..2u64 {
        let (pg, stop, acked, maybe) = (pg.clone(), stop.clone(), acked.clone(), maybe.clone());
        publishers.push(tokio::spawn(async move {
            let mut n = p;
            while !stop.is_cancelled() {
                n += 2;
                let msg = OutgoingMessage::json(&n).unwrap();
                match pg.publish(STREAM, msg).await {
                    Ok(_) => acked.lock().unwrap().insert(n),
                    Err(_) => {
                        maybe.lock().unwrap().insert(n);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        true
                    }
                };
            }
        }));
    }

    // The faults, one every three seconds.
    let raw_url = url.clone();
    let mut kills: BTreeMap<&str, usize> = BTreeMap::new();
    let mut crashes = 0;
    let mut listener_kills = 0;
    let mut scout_kills = 0;
    let started = Instant::now();
    let mut step = 0;
    while started.elapsed() < CHAOS {
        tokio::time::sleep(Duration::from_secs(3)).await;
        step += 1;
        match step % 4 {
            1 => {
                let victim = step % consumers.len();
                let c = &mut consumers[victim];
                c.kill();
                *kills.entry(c.group).or_default() += 1;
                c.spawn(&url);
            }
            2 => {
                cluster.crash_restart();
                crashes += 1;
            }
            3 => {
                // The scout holder's process.
                let Ok((client, conn)) =
                    tokio_postgres::connect(&raw_url, tokio_postgres::NoTls).await
                else {
                    continue;
                };
                tokio::spawn(conn);
                let holder: Option<String> = client
                    .query_opt(
                        &format!("SELECT holder FROM \"{NAMESPACE}\".scout WHERE active"),
                        &[],
                    )
                    .await
                    .ok()
                    .flatten()
                    .and_then(|r| r.get(0));
                if let Some(holder) = holder {
                    for c in consumers.iter_mut() {
                        let file = format!("{}.holder", c.out().display());
                        if std::fs::read_to_string(&file).ok().as_deref() == Some(holder.as_str()) {
                            c.kill();
                            *kills.entry(c.group).or_default() += 1;
                            scout_kills += 1;
                            c.spawn(&url);
                            break;
                        }
                    }
                }
            }
            _ => {
                let Ok((client, conn)) =
                    tokio_postgres::connect(&raw_url, tokio_postgres::NoTls).await
                else {
                    continue;
                };
                tokio::spawn(conn);
                if let Ok(rows) = client
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await
                {
                    listener_kills += rows.len();
                }
            }
        }
    }
    stop.cancel();
    for p in publishers {
        p.await.unwrap();
    }

    // Drain: every group empty (nothing ready, delayed or leased), within a bound.
    let drained_by = Instant::now() + Duration::from_secs(120);
    loop {
        let mut stats = vec![];
        for g in GROUPS {
            stats.push(Queue::stats(&pg, STREAM, g).await);
        }
        let pending: i64 = stats
            .iter()
            .map(|s| s.as_ref().map_or(1, |s| s.ready + s.delayed + s.in_flight))
            .sum();
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < drained_by,
            "groups did not drain: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for c in &mut consumers {
        c.kill();
    }

    let acked = acked.lock().unwrap().clone();
    let maybe = maybe.lock().unwrap().clone();
    let mut report = vec![format!(
        "published {} acknowledged, {} unacknowledged (errors while the server was down); \
         {crashes} crash-restarts, {scout_kills} scout-holder kills, {listener_kills} listener \
         backends terminated, consumer kills {kills:?}",
        acked.len(),
        maybe.len()
    )];
    for g in GROUPS {
        let mut seen: Vec<u64> = vec![];
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{g}-")) && name.ends_with(".out") {
                seen.extend(read_numbers(&entry.path()));
            }
        }
        let unique: BTreeSet<u64> = seen.iter().copied().collect();
        let lost: Vec<&u64> = acked.difference(&unique).collect();
        let invented: Vec<&u64> = unique
            .iter()
            .filter(|n| !acked.contains(n) && !maybe.contains(n))
            .collect();
        let duplicates = seen.len() - unique.len();
        let bound = (kills.get(g).copied().unwrap_or(0) + crashes * CHILDREN_PER_GROUP) * PREFETCH;
        report.push(format!(
            "group {g}: delivered {} unique, lost {}, not published {}, duplicates {duplicates} \
             (bound {bound})",
            unique.len(),
            lost.len(),
            invented.len()
        ));
        assert!(
            lost.is_empty(),
            "group {g} lost {lost:?}\n{}",
            report.join("\n")
        );
        assert!(
            invented.is_empty(),
            "group {g} got unpublished {invented:?}"
        );
        assert!(duplicates <= bound, "{}", report.join("\n"));
    }
    println!("{}", report.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
