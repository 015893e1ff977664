//! The sampling task: every interval it reads the stats of every group (the same queries as
//! `pgtide stats`), the publish counts, the scout lease and this process's listener (on a broker:
//! the stats of the groups given, see `source.rs`), keeps an hour of rates and lag in memory for
//! the charts, and publishes each sample to the page's event streams. A failed sample is shown on
//! the page and retried at the next tick: the task never dies while the dashboard runs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtide::CancellationToken;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::source::Source;
use crate::human::format_time;
use crate::stats::{rates, Sample};

/// How far back the charts go.
const HISTORY: Duration = Duration::from_secs(3600);

/// One point of the charts: unix time, and per series its value (`None`: no value then).
#[derive(Debug, Clone)]
pub(crate) struct Point {
    t: f64,
    /// Messages per second published, by stream (Postgres only: brokers keep no counts).
    publish: BTreeMap<String, f64>,
    /// Messages per second settled (acked or dead-lettered), by `stream/group`.
    ack: BTreeMap<String, f64>,
    /// Age in seconds of the oldest ready delivery (0 when none is ready), by `stream/group`.
    lag: BTreeMap<String, f64>,
}

impl Point {
    fn to_json(&self) -> Value {
        json!({"t": self.t, "publish": self.publish, "ack": self.ack, "lag": self.lag})
    }
}

/// The latest sample as the page shows it, and the point it added to the charts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Latest {
    pub(crate) overview: Value,
    pub(crate) point: Option<Value>,
}

/// Handle on the sampling task.
pub(crate) struct Sampler {
    latest: watch::Receiver<Arc<Latest>>,
    history: Arc<Mutex<VecDeque<Point>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Sampler {
    /// Starts sampling every `interval` until `token` is cancelled.
    pub(crate) fn start(
        source: Arc<Source>,
        interval: Duration,
        token: CancellationToken,
    ) -> Sampler {
        let (tx, latest) = watch::channel(Arc::new(Latest {
            overview: json!({"at": null, "groups": [], "error": "no sample yet"}),
            point: None,
        }));
        let history = Arc::new(Mutex::new(VecDeque::new()));
        let task = tokio::spawn(run(source, interval, token, tx, history.clone()));
        Sampler {
            latest,
            history,
            task: Mutex::new(Some(task)),
        }
    }

    /// Subscribes to samples (the current one is marked seen: read it with `borrow`).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Latest>> {
        self.latest.clone()
    }

    /// The latest sample.
    pub(crate) fn latest(&self) -> Arc<Latest> {
        self.latest.borrow().clone()
    }

    /// The charts' points, oldest first.
    pub(crate) fn history(&self) -> Value {
        let points: Vec<Value> = lock(&self.history).iter().map(Point::to_json).collect();
        json!({ "points": points })
    }

    /// Waits for the task to end (after the token was cancelled).
    pub(crate) async fn stopped(&self) {
        let task = lock(&self.task).take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "pgtide dashboard: the sampling task failed");
            }
        }
    }
}

/// A poisoned lock only means a panic elsewhere mid-update of plain data: keep serving it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn run(
    source: Arc<Source>,
    interval: Duration,
    token: CancellationToken,
    tx: watch::Sender<Arc<Latest>>,
    history: Arc<Mutex<VecDeque<Point>>>,
) {
    let max_points = (HISTORY.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 1;
    let mut ticker = tokio::time::interval(interval);
    // After a slow sample, carry on at the interval rather than catching up in a burst.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev: Option<Sample> = None;
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let (scout, listener) = source.engine_status().await;
        let sample = source.sample().await;
        let latest = match sample {
            Ok(cur) => {
                let point = prev.as_ref().map(|p| point(p, &cur));
                let overview = overview(&source, &cur, prev.as_ref(), scout, listener);
                if let Some(p) = &point {
                    let mut h = lock(&history);
                    h.push_back(p.clone());
                    while h.len() > max_points {
                        h.pop_front();
                    }
                }
                prev = Some(cur);
                Latest {
                    overview,
                    point: point.as_ref().map(Point::to_json),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "pgtide dashboard: sampling failed; retrying at the next interval");
                // Keep the last counts on the page, with the error beside them.
                let mut overview = tx.borrow().overview.clone();
                overview["error"] = json!(e.message);
                Latest {
                    overview,
                    point: None,
                }
            }
        };
        tx.send_replace(Arc::new(latest));
    }
}

fn key(stream: &str, group: &str) -> String {
    format!("{stream}/{group}")
}

/// The charts' point between two samples (rates need two; without publish counts, on a
/// broker, the point has the lag only).
fn point(prev: &Sample, cur: &Sample) -> Point {
    let r = rates(prev, cur);
    let mut ack = BTreeMap::new();
    let mut lag = BTreeMap::new();
    for g in &cur.groups {
        let Some(name) = &g.group else { continue };
        let k = key(&g.stream, name);
        if let Some(v) = r
            .as_ref()
            .and_then(|r| r.settle.get(&(g.stream.clone(), name.clone())))
        {
            ack.insert(k.clone(), round(*v));
        }
        lag.insert(
            k,
            round(g.oldest_ready_age.map_or(0.0, |d| d.as_secs_f64())),
        );
    }
    Point {
        t: cur.wall.timestamp_millis() as f64 / 1000.0,
        publish: r
            .iter()
            .flat_map(|r| &r.publish)
            .map(|(s, v)| (s.clone(), round(*v)))
            .collect(),
        ack,
        lag,
    }
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The page's tables: every group with its counts and rates, the scout and the listener.
fn overview(
    source: &Source,
    cur: &Sample,
    prev: Option<&Sample>,
    scout: Value,
    listener: Value,
) -> Value {
    let r = prev.and_then(|p| rates(p, cur));
    let groups: Vec<Value> = cur
        .groups
        .iter()
        .map(|g| {
            let publish = r.as_ref().and_then(|r| r.publish.get(&g.stream)).copied();
            let settle = r.as_ref().and_then(|r| {
                let name = g.group.as_ref()?;
                r.settle.get(&(g.stream.clone(), name.clone())).copied()
            });
            json!({
                "stream": g.stream, "group": g.group, "ready": g.ready, "delayed": g.delayed,
                "in_flight": g.in_flight, "dead": g.dead,
                "oldest_ready_age_secs": g.oldest_ready_age.map(|d| round(d.as_secs_f64())),
                "publish_rate": publish.map(round), "ack_rate": settle.map(round),
            })
        })
        .collect();
    json!({
        "namespace": source.namespace(),
        "backend": source.kind(),
        // Brokers keep no publish counts: the page says so instead of drawing empty rates.
        "rates": cur.published.is_some(),
        "at": format_time(cur.wall),
        "groups": groups,
        "scout": scout,
        "listener": listener,
        "error": null,
    })
}
