//! Wake-up latency (issue 3, item 6): publish → handler start at a steady 500 msg/s, the raw
//! NOTIFY round trip beside it as the floor, and the lateness of delayed messages.
//!
//! Two engine handles share the namespace: a publisher, and a consumer side running one
//! [`Worker`] (no-op handler, concurrency 16) per stream. The publisher's pool does not fire the
//! trigger; its coalescing notifier NOTIFYs after the commit, the worker handle's listener hears
//! it, and the waiting worker claims. Every message carries its publish timestamp in a header;
//! the handler records when it starts.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::harness::{joined, Accumulate, Failure, Step};
use super::raw::{connect, notify_round_trips, Listener};
use super::report::Summary;
use super::{Bench, Case, Target, Timing, Unit, GROUP};
use pgtide::{Delivery, Error, Outcome, PgBackend, Worker};

pub(super) const E2E: &str = "e2e";
pub(super) const DELAYED: &str = "delayed";

/// Steady publish rate of the latency case, messages/s.
const E2E_RATE: f64 = 500.0;
/// Publish rate of the delayed case, messages/s.
const DELAYED_RATE: f64 = 50.0;
/// Delay of every message of the delayed case.
const DELAY: Duration = Duration::from_secs(1);
/// Handlers of each worker.
const CONCURRENCY: usize = 16;
/// Microseconds since the run's epoch `Instant` when the publish call started.
const SENT_HEADER: &str = "bench-sent-us";
/// Due time of a delayed message, Unix microseconds.
const DUE_HEADER: &str = "bench-due-us";
/// How long a round waits for the handlers of what it published.
const SETTLE_WAIT: Duration = Duration::from_secs(3);

/// When a handler started, with the timestamps its message carried.
#[derive(Debug, Clone, Copy)]
struct Start {
    at: Instant,
    wall: DateTime<Utc>,
    sent_us: Option<u64>,
    due_us: Option<i64>,
}

/// Handler starts by message id; `changed` fires on every insert.
#[derive(Default)]
struct Starts {
    map: Mutex<HashMap<Uuid, Start>>,
    changed: Notify,
}

impl Starts {
    fn record(&self, d: &Delivery) {
        let start = Start {
            at: Instant::now(),
            wall: Utc::now(),
            sent_us: d
                .message
                .headers
                .get(SENT_HEADER)
                .and_then(|v| v.parse().ok()),
            due_us: d
                .message
                .headers
                .get(DUE_HEADER)
                .and_then(|v| v.parse().ok()),
        };
        if let Ok(mut m) = self.map.lock() {
            m.insert(d.id(), start);
        }
        self.changed.notify_waiters();
    }

    /// Waits until a handler started for every id, or `until`; then removes and returns them.
    async fn take(&self, ids: &[Uuid], until: tokio::time::Instant) -> Vec<Option<Start>> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let all = self
                .map
                .lock()
                .map(|m| ids.iter().all(|id| m.contains_key(id)))
                .unwrap_or(true);
            if all || tokio::time::timeout_at(until, changed).await.is_err() {
                break;
            }
        }
        match self.map.lock() {
            Ok(mut m) => ids.iter().map(|id| m.remove(id)).collect(),
            Err(_) => vec![None; ids.len()],
        }
    }
}

/// Samples of the rounds of one side of the latency comparison.
#[derive(Debug, Default)]
struct E2eSamples {
    /// Publish returned (the commit, as the publisher saw it) → handler start.
    commit: Vec<Duration>,
    /// Publish call (the header's timestamp) → handler start.
    call: Vec<Duration>,
    /// Publish returned → the first notification for the stream heard after it by a raw LISTEN
    /// on the namespace channel: the notifier's share of the wake-up.
    heard: Vec<Duration>,
    /// Messages that reached no handler in time (counted in `commit` and `call` at the wait).
    missing: u64,
    /// The raw side: `pg_notify` → arrival on a LISTEN connection.
    round_trip: Vec<Duration>,
}

impl Accumulate for E2eSamples {
    fn add(&mut self, round: Self) {
        self.commit.extend(round.commit);
        self.call.extend(round.call);
        self.heard.extend(round.heard);
        self.missing += round.missing;
        self.round_trip.extend(round.round_trip);
    }
}

impl Bench<'_> {
    pub(super) async fn wakeup_cases(&self, cases: &mut Vec<Case>) -> Step<Vec<Timing>> {
        let (url, ns) = (self.config.url.as_str(), self.ns);
        let consumers = self.config.engine(url).namespace(ns).pool_size(8).build()?;
        let publisher = self.config.engine(url).namespace(ns).pool_size(4).build()?;
        let token = CancellationToken::new();
        let _stop = token.clone().drop_guard();
        let starts = Arc::new(Starts::default());
        let mut workers = JoinSet::new();
        for stream in [E2E, DELAYED] {
            let consumer = consumers
                .consumer(stream, GROUP, &format!("{stream}-worker"))
                .await?;
            let starts = starts.clone();
            let worker = Worker::new(consumer, move |d: Delivery| {
                let starts = starts.clone();
                async move {
                    starts.record(&d);
                    Ok::<_, Infallible>(Outcome::Ack)
                }
            })
            .concurrency(CONCURRENCY);
            workers.spawn(worker.run(token.clone()));
        }
        let outcome = self
            .wakeups_with(&consumers, &publisher, &starts, cases)
            .await;
        token.cancel();
        while let Some(r) = workers.join_next().await {
            joined(r)?;
        }
        publisher.shutdown().await;
        consumers.shutdown().await;
        outcome
    }

    async fn wakeups_with(
        &self,
        consumers: &PgBackend,
        publisher: &PgBackend,
        starts: &Starts,
        cases: &mut Vec<Case>,
    ) -> Step<Vec<Timing>> {
        // The workers subscribe on their first wait; measure once their listener is up.
        let until = Instant::now() + Duration::from_secs(10);
        while !consumers.listener_status().connected && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.progress(format_args!(
            "publish -> handler start at {E2E_RATE:.0}/s vs raw NOTIFY round trip"
        ));
        let channel = format!("{}_rtt", self.ns);
        let sender = connect(&self.config.url).await?;
        let url = self.config.url.as_str();
        let probe = tokio::sync::Mutex::new(Listener::connect(url, &channel, true).await?);
        let watch = format!("pgtide.{}", self.ns);
        let watch = tokio::sync::Mutex::new(Listener::connect(url, &watch, true).await?);
        let epoch = Instant::now();
        let (tide, floor) = self
            .alternate(
                |w, d| self.e2e_round(publisher, starts, &watch, epoch, w, d),
                |w, d| {
                    let (sender, probe, channel) = (&sender, &probe, channel.as_str());
                    async move {
                        let mut listener = probe.lock().await;
                        let round_trip =
                            notify_round_trips(sender, &mut listener, channel, E2E_RATE, w, d)
                                .await?;
                        Ok::<_, Failure>(E2eSamples {
                            round_trip,
                            ..E2eSamples::default()
                        })
                    }
                },
            )
            .await?;
        let secs = self.config.phase.as_secs_f64();
        let missing = tide.missing;
        let commit = Summary::of(tide.commit);
        let call = Summary::of(tide.call);
        let heard = Summary::of(tide.heard);
        let floor = Summary::of(floor.round_trip);
        let missed = (missing > 0).then(|| {
            format!(
                "{missing} messages not handled within {} s, counted at that wait",
                SETTLE_WAIT.as_secs()
            )
        });
        cases.push(
            Case::compared(
                "publish commit -> handler start p50 (vs NOTIFY p50)",
                commit.p50_ms,
                Unit::Millis,
                floor.p50_ms,
                Target::ValueAtMost(1.0),
            )
            .note(missed.clone()),
        );
        cases.push(
            Case::compared(
                "publish commit -> handler start p99 (vs NOTIFY p99)",
                commit.p99_ms,
                Unit::Millis,
                floor.p99_ms,
                Target::ValueAtMost(5.0),
            )
            .note(missed),
        );
        let mut timings = vec![
            commit.timing(
                "publish commit -> handler start (worker, NOTIFY via another handle)",
                commit.samples as f64 / secs,
            ),
            call.timing(
                "publish call -> handler start (header timestamp)",
                call.samples as f64 / secs,
            ),
            heard.timing(
                "  of which publish commit -> NOTIFY heard (raw LISTEN)",
                heard.samples as f64 / secs,
            ),
            floor.timing(
                "raw NOTIFY round trip (floor): pg_notify -> LISTEN",
                floor.samples as f64 / secs,
            ),
        ];

        self.progress(format_args!(
            "delayed messages: {DELAYED_RATE:.0}/s due after {} s",
            DELAY.as_secs()
        ));
        let (late, missing, rate) = self.delayed_lateness(publisher, starts).await?;
        let late = Summary::of(late);
        timings.push(late.timing("delayed 1 s: handler start - due time", rate));
        cases.push(
            Case::info("delayed 1 s: lateness p99", late.p99_ms, Unit::Millis)
                .target(Target::ValueAtMost(100.0))
                .note((missing > 0).then(|| {
                    format!(
                        "{missing} delayed messages not handled within {} s of their due time",
                        SETTLE_WAIT.as_secs()
                    )
                })),
        );
        Ok(timings)
    }

    /// Publishes to [`E2E`] at [`E2E_RATE`] for `warmup + window`, each publish in a task of its
    /// own so that a slow commit does not hold back the next tick, then collects when the
    /// handlers started.
    async fn e2e_round(
        &self,
        publisher: &PgBackend,
        starts: &Starts,
        watch: &tokio::sync::Mutex<Listener>,
        epoch: Instant,
        warmup: Duration,
        window: Duration,
    ) -> Step<E2eSamples> {
        let mut watch = watch.lock().await;
        watch.clear();
        let from = Instant::now() + warmup;
        let until = from + window;
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / E2E_RATE));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut publishes = JoinSet::new();
        let mut published = vec![];
        while Instant::now() < until {
            ticks.tick().await;
            let pg = publisher.clone();
            let sent = Instant::now();
            let msg = self.msg.clone().header(
                SENT_HEADER,
                sent.duration_since(epoch).as_micros().to_string(),
            );
            publishes.spawn(async move {
                let receipt = pg.publish(E2E, msg).await?;
                Ok::<_, Error>((receipt.id, sent, Instant::now()))
            });
            while let Some(r) = publishes.try_join_next() {
                published.push(joined(r)?);
            }
        }
        while let Some(r) = publishes.join_next().await {
            published.push(joined(r)?);
        }
        let ids: Vec<Uuid> = published.iter().map(|p| p.0).collect();
        let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
        let found = starts.take(&ids, deadline).await;
        // Every handler started, so the notifications that woke them have arrived too.
        let arrivals = watch.take_arrivals(E2E);
        let mut samples = E2eSamples::default();
        for ((_, sent, returned), start) in published.into_iter().zip(found) {
            if sent < from {
                continue;
            }
            // The first NOTIFY after the publish call began: one sent in the publishing
            // transaction arrives with its commit, before the call returns (counted as 0).
            let next = arrivals.partition_point(|at| *at < sent);
            if let Some(at) = arrivals.get(next) {
                samples.heard.push(at.saturating_duration_since(returned));
            }
            match start {
                Some(s) => {
                    samples
                        .commit
                        .push(s.at.saturating_duration_since(returned));
                    let sent_us = s.sent_us.unwrap_or_default();
                    let started_us = s.at.duration_since(epoch).as_micros() as u64;
                    samples
                        .call
                        .push(Duration::from_micros(started_us.saturating_sub(sent_us)));
                }
                None => {
                    samples.missing += 1;
                    samples.commit.push(returned.elapsed());
                    samples.call.push(sent.elapsed());
                }
            }
        }
        Ok(samples)
    }

    /// Publishes to [`DELAYED`] at [`DELAYED_RATE`] for one phase, each message due [`DELAY`]
    /// later; returns handler start − due time, the messages never handled, and the rate.
    async fn delayed_lateness(
        &self,
        publisher: &PgBackend,
        starts: &Starts,
    ) -> Step<(Vec<Duration>, u64, f64)> {
        let window = self.config.phase;
        let began = Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / DELAYED_RATE));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ids = vec![];
        let mut last_due = Utc::now();
        while began.elapsed() < window {
            ticks.tick().await;
            let due = Utc::now() + DELAY;
            let msg = self
                .msg
                .clone()
                .deliver_at(due)
                .header(DUE_HEADER, due.timestamp_micros().to_string());
            ids.push(publisher.publish(DELAYED, msg).await?.id);
            last_due = due;
        }
        let rate = ids.len() as f64 / began.elapsed().as_secs_f64();
        let wait = (last_due - Utc::now()).to_std().unwrap_or_default() + SETTLE_WAIT;
        let found = starts.take(&ids, tokio::time::Instant::now() + wait).await;
        let (mut late, mut missing) = (vec![], 0);
        for start in found {
            match start {
                Some(s) => {
                    let due_us = s.due_us.unwrap_or_default();
                    let lateness_us = s.wall.timestamp_micros() - due_us;
                    late.push(Duration::from_micros(lateness_us.max(0) as u64));
                }
                None => {
                    missing += 1;
                    late.push(SETTLE_WAIT);
                }
            }
        }
        Ok((late, missing, rate))
    }
}
