//! Many streams in one namespace ([`crate::BenchConfig::scale_streams`], 2 groups each), in a
//! database of its own (`<namespace>_scale`, dropped at the end) so that its query count is
//! the engine's alone:
//!
//! - creating a stream with its partitions (`create_stream`: the stream, then its time
//!   partitions in a second transaction), p50 and p99;
//! - `maintain()` over all of them (partitions already prepared: the pass that runs every
//!   minute), median of 3;
//! - publishing spread round-robin over every stream against publishing to one, 4 publishers,
//!   alternating rounds (after an untimed spread round that warms every connection's caches);
//! - 200 idle consumers (`fetch` waiting on wake-ups) on 4 handles of this process, 50 each:
//!   each handle has its own pool, LISTEN connection and scout candidacy, as a process would.
//!   Their fallback poll is set to one hour, so the count is what they cost beyond it: the
//!   transactions of the database (`pg_stat_database`) over a window, per handle;
//! - then a publish every 20 ms to one of those 200 streams: publish return → its consumer's
//!   `fetch` returns; a first round wakes every consumer once, then 300 wake-ups (1000 in a
//!   full run) give the p99.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_postgres::Client;
use uuid::Uuid;

use super::harness::{run_workers, Step};
use super::report::Summary;
use super::{Bench, Case, Target, Timing, Unit};
use pgtide::{GroupStart, OutgoingMessage, PgBackend, Result, StreamConfig};

/// Idle consumers, and the handles ("processes") they are spread over.
const IDLE_CONSUMERS: usize = 200;
const HANDLES: usize = 4;
/// Publishers of the spread-publish comparison.
const PUBLISHERS: usize = 4;

impl Bench<'_> {
    pub(super) async fn scale_case(
        &self,
        cases: &mut Vec<Case>,
        wakeups: &mut Vec<Timing>,
    ) -> Step<()> {
        let db = format!("{}_scale", self.ns);
        let admin = super::raw::connect(&self.config.url).await?;
        if let Err(e) = admin
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await
        {
            cases.push(
                Case::info("scale: not measured", f64::NAN, Unit::Millis).note(Some(format!(
                    "the case needs a database of its own and CREATE DATABASE failed: {e}"
                ))),
            );
            return Ok(());
        }
        let url = with_database(&self.config.url, &db);
        let outcome = self.scale_in(&url, &db, &admin, cases, wakeups).await;
        let dropped = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await;
        outcome?;
        dropped?;
        Ok(())
    }

    async fn scale_in(
        &self,
        url: &str,
        db: &str,
        admin: &Client,
        cases: &mut Vec<Case>,
        wakeups: &mut Vec<Timing>,
    ) -> Step<()> {
        let n = self.config.scale_streams.max(IDLE_CONSUMERS);
        let pg = self
            .config
            .engine(url)
            .namespace(self.ns)
            .pool_size(self.config.pool_size)
            .build()?;
        pg.migrate().await?;
        let streams: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("s{i}")).collect());
        self.progress(format_args!("scale: creating {n} streams x 2 groups"));
        let mut creates = vec![];
        let started = Instant::now();
        for s in streams.iter() {
            let t = Instant::now();
            pg.create_stream(s, &StreamConfig::default()).await?;
            creates.push(t.elapsed());
            for g in ["g1", "g2"] {
                pg.ensure_group(s, g, GroupStart::New).await?;
            }
        }
        let total = started.elapsed().as_secs_f64();
        let create = Summary::of(creates);
        cases.push(
            Case::info(
                format!("scale: create a stream with its partitions, p50 ({n} streams)"),
                create.p50_ms,
                Unit::Millis,
            )
            .target(Target::ValueAtMost(20.0))
            .note(Some(format!(
                "p99 {:.1} ms; {n} streams with 2 groups each in {total:.1} s",
                create.p99_ms
            ))),
        );

        let mut passes = vec![];
        for _ in 0..3 {
            let t = Instant::now();
            pg.maintain().await?;
            passes.push(t.elapsed());
        }
        let maintain = Summary::of(passes);
        cases.push(
            Case::info(
                format!("scale: maintain() with {n} streams x 2 groups, median of 3"),
                maintain.p50_ms,
                Unit::Millis,
            )
            .target(Target::ValueAtMost(1000.0)),
        );

        self.progress(format_args!(
            "scale: publish to one stream vs spread over {n}"
        ));
        let spread = |one: bool| {
            (0..PUBLISHERS)
                .map(|i| Spread {
                    pg: pg.clone(),
                    msg: self.msg.clone(),
                    streams: streams.clone(),
                    next: Arc::new(std::sync::atomic::AtomicUsize::new(i * n / PUBLISHERS)),
                    one,
                })
                .collect::<Vec<_>>()
        };
        // Untimed: the pooled connections meet the streams' tables (a first touch opens them).
        run_workers(
            spread(false),
            Duration::ZERO,
            self.config.phase * 2,
            publish_spread,
        )
        .await?;
        let (one, many) = self
            .alternate(
                |w, d| run_workers(spread(true), w, d, publish_spread),
                |w, d| run_workers(spread(false), w, d, publish_spread),
            )
            .await?;
        cases.push(Case::compared(
            format!("scale: publish spread over {n} streams (vs one), {PUBLISHERS} publishers"),
            many.rate(),
            Unit::PerSecond,
            one.rate(),
            Target::RatioAtLeast(0.9),
        ));

        self.idle_consumers(url, db, admin, &pg, &streams, cases, wakeups)
            .await?;
        pg.shutdown().await;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn idle_consumers(
        &self,
        url: &str,
        db: &str,
        admin: &Client,
        pg: &PgBackend,
        streams: &Arc<Vec<String>>,
        cases: &mut Vec<Case>,
        wakeups: &mut Vec<Timing>,
    ) -> Step<()> {
        self.progress(format_args!(
            "scale: {IDLE_CONSUMERS} idle consumers on {HANDLES} handles"
        ));
        let (tx, mut rx) = mpsc::unbounded_channel::<(Uuid, Instant)>();
        let mut handles = vec![];
        let mut tasks = JoinSet::new();
        let stop = tokio_util::sync::CancellationToken::new();
        for h in 0..HANDLES {
            let handle = self
                .config
                .engine(url)
                .namespace(self.ns)
                .pool_size(4)
                .poll_interval(Duration::from_secs(3600))
                .build()?;
            for j in 0..IDLE_CONSUMERS / HANDLES {
                let stream = &streams[h * (IDLE_CONSUMERS / HANDLES) + j];
                let c = handle
                    .consumer(stream, "g1", &format!("idle-{h}-{j}"))
                    .await?;
                let (tx, stop) = (tx.clone(), stop.clone());
                tasks.spawn(async move {
                    while !stop.is_cancelled() {
                        let ds = c.fetch_until(10, Duration::from_secs(3600), &stop).await?;
                        let at = Instant::now();
                        let refs: Vec<_> = ds.iter().collect();
                        if !refs.is_empty() {
                            c.ack_batch(&refs).await?;
                        }
                        for d in &ds {
                            let _ = tx.send((d.id(), at));
                        }
                    }
                    Ok::<_, pgtide::Error>(())
                });
            }
            handles.push(handle);
        }
        // Past the first claims of every consumer.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let window = if self.config.quick {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(60)
        };
        let (queries, top) = count_queries(admin, db, window).await?;
        let per_handle = queries as f64 / window.as_secs_f64() / HANDLES as f64;
        cases.push(
            Case::info(
                format!("scale: queries/s per process, {IDLE_CONSUMERS} idle consumers on {HANDLES}"),
                per_handle,
                Unit::PerSecond,
            )
            .target(Target::ValueAtMost(1.0))
            .note(Some(format!(
                "{per_handle:.2}/s: statements started by the scale database's client backends over {:.0} s (pg_stat_activity \
                 sampled every 5 ms), divided by {HANDLES} handles of one process (each its own pool, \
                 listener and scout candidate); fallback poll 1 h, so this is the cost beyond it; most \
                 frequent: {top}",
                window.as_secs_f64()
            ))),
        );

        // Measured after every consumer woke once (below); 300 so that the p99 is not the
        // second-worst sample of a hundred.
        let samples = if self.config.quick { 300 } else { 1000 };
        let mut latencies = vec![];
        let mut first_wakes = vec![];
        let mut publish_errors: Option<(u32, String)> = None;
        let mut early: HashMap<Uuid, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let sent_from = Instant::now();
        for i in 0..IDLE_CONSUMERS + samples {
            tick.tick().await;
            let stream = &streams[(i * 7919) % IDLE_CONSUMERS];
            let receipt = match pg.publish(stream, self.msg.clone()).await {
                Ok(receipt) => receipt,
                Err(e) => {
                    publish_errors.get_or_insert_with(|| (0, e.to_string())).0 += 1;
                    continue;
                }
            };
            let published = Instant::now();
            let deadline = published + Duration::from_secs(2);
            let got = loop {
                if let Some(at) = early.remove(&receipt.id) {
                    break Some(at);
                }
                match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                    Ok(Some((id, at))) if id == receipt.id => break Some(at),
                    Ok(Some((id, at))) => {
                        early.insert(id, at);
                    }
                    Ok(None) | Err(_) => break None,
                }
            };
            let latency = got.map_or(Duration::from_secs(2), |at| {
                at.saturating_duration_since(published)
            });
            // A first round wakes each consumer once (`i` walks every stream once first); it is
            // reported apart, so the p99 is that of wake-ups in steady state.
            if i < IDLE_CONSUMERS {
                first_wakes.push(latency);
            } else {
                latencies.push(latency);
            }
        }
        let rate = (IDLE_CONSUMERS + samples) as f64 / sent_from.elapsed().as_secs_f64();
        let first = Summary::of(first_wakes);
        let wake = Summary::of(latencies);
        wakeups.push(wake.timing(
            format!("publish -> fetch, {IDLE_CONSUMERS} idle consumers on {HANDLES} handles"),
            rate,
        ));
        cases.push(
            Case::info(
                format!("scale: publish -> idle consumer wakes, p99 ({IDLE_CONSUMERS} consumers)"),
                wake.p99_ms,
                Unit::Millis,
            )
            .target(Target::ValueAtMost(5.0))
            .note(Some(format!(
                "p50 {:.2} ms over {samples} wake-ups, after a first round that woke each consumer \
                 once (p50 {:.2} ms, p99 {:.2} ms); the consumers drained the spread-publish \
                 backlog when they started, so their streams are no longer new to the pooled \
                 connections in either",
                wake.p50_ms, first.p50_ms, first.p99_ms
            ))),
        );
        if let Some((n, e)) = publish_errors {
            cases.push(
                Case::info(
                    format!("scale: wake-up publishes that failed (of {samples})"),
                    n as f64,
                    Unit::Count,
                )
                .target(Target::ValueAtMost(0.0))
                .note(Some(format!("first error: {e}"))),
            );
        }
        stop.cancel();
        // A consumer that failed is reported, not fatal: with many streams a claim can run the
        // server out of lock-table entries, and that is a finding of this case.
        let mut failed = 0;
        let mut first_error = None;
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = super::harness::joined(r) {
                failed += 1;
                if first_error.is_none() {
                    first_error = Some(match e {
                        super::harness::Failure::Error(e) => e.to_string(),
                        super::harness::Failure::Panic(p) => std::panic::resume_unwind(p),
                    });
                }
            }
        }
        if let Some(e) = first_error {
            cases.push(
                Case::info(
                    format!("scale: idle consumers that failed (of {IDLE_CONSUMERS})"),
                    failed as f64,
                    Unit::Count,
                )
                .target(Target::ValueAtMost(0.0))
                .note(Some(format!("first error: {e}"))),
            );
        }
        for h in handles {
            h.shutdown().await;
        }
        Ok(())
    }
}

/// Statements the client backends of database `db` start during `window`, counted by sampling
/// `pg_stat_activity` every 5 ms (a backend's `query_start` changes with each statement; two on
/// one backend within 5 ms count once, which idle load never comes near). Autovacuum is not a
/// client backend. Returns the count and the most frequent statements.
async fn count_queries(admin: &Client, db: &str, window: Duration) -> Result<(u64, String)> {
    let until = Instant::now() + window;
    let mut seen: HashMap<i32, chrono::DateTime<chrono::Utc>> = HashMap::new();
    let mut by_text: HashMap<String, u64> = HashMap::new();
    let mut first = true;
    let mut count = 0;
    while Instant::now() < until {
        let rows = admin
            .query(
                "SELECT pid, query_start, left(regexp_replace(query, '\\s+', ' ', 'g'), 70)
                 FROM pg_stat_activity
                 WHERE datname = $1 AND backend_type = 'client backend' AND query_start IS NOT NULL",
                &[&db],
            )
            .await?;
        for r in rows {
            let pid: i32 = r.try_get(0)?;
            let start: chrono::DateTime<chrono::Utc> = r.try_get(1)?;
            let text: Option<String> = r.try_get(2)?;
            if seen.insert(pid, start) != Some(start) && !first {
                count += 1;
                *by_text.entry(text.unwrap_or_default()).or_default() += 1;
            }
        }
        first = false;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut top: Vec<(String, u64)> = by_text.into_iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    let top = top
        .iter()
        .take(3)
        .map(|(text, n)| format!("{n} x `{text}`"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((
        count,
        if top.is_empty() {
            "none".to_owned()
        } else {
            top
        },
    ))
}

/// One spread publisher: round-robin over `streams` (or always the first when `one`).
#[derive(Clone)]
struct Spread {
    pg: PgBackend,
    msg: OutgoingMessage,
    streams: Arc<Vec<String>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    one: bool,
}

async fn publish_spread(s: Spread) -> Result<Option<u64>> {
    let i = if s.one {
        // The last stream: the idle consumers below sit on the first ones, and a backlog of the
        // one-stream rounds would keep one of them draining through the idle window.
        s.streams.len().saturating_sub(1)
    } else {
        s.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % s.streams.len()
    };
    s.pg.publish(&s.streams[i], s.msg).await?;
    Ok(Some(1))
}

/// `url` with its database replaced by `db` (URL or `key=value` form).
pub(super) fn with_database(url: &str, db: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let host_start = scheme_end + 3;
        let base = match base[host_start..].find('/') {
            Some(slash) => &base[..host_start + slash],
            None => base,
        };
        match query {
            Some(q) => format!("{base}/{db}?{q}"),
            None => format!("{base}/{db}"),
        }
    } else {
        format!("{url} dbname={db}")
    }
}

/// `url` with `-c setting` added to the server options (URL or `key=value` form).
pub(super) fn with_setting(url: &str, setting: &str) -> String {
    if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-c%20{}", setting.replace('=', "%3D"))
    } else {
        format!("{url} options='-c {setting}'")
    }
}

#[cfg(test)]
mod tests {
    use super::{with_database, with_setting};

    #[test]
    fn urls_get_another_database_and_settings() {
        assert_eq!(
            with_database("postgres://u@h:5432/test?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
        assert_eq!(
            with_database("host=h user=u", "x"),
            "host=h user=u dbname=x"
        );
        assert_eq!(
            with_setting("postgres://h/db", "jit=off"),
            "postgres://h/db?options=-c%20jit%3Doff"
        );
        assert_eq!(
            with_setting("postgres://h/db?a=b", "jit=off"),
            "postgres://h/db?a=b&options=-c%20jit%3Doff"
        );
    }
}
