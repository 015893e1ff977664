//! What the wake-up mechanism costs a publisher (issue 3, item 1), at 1 and 16 publishers, five
//! sides alternating in rounds:
//!
//! * floor: the engine's publish statement (`sql/publish.sql`) on raw connections with
//!   `SET pgtide.notify = off` and no notifier: no wake-up at all;
//! * engine: [`pgtide::PgBackend::publish`], whose pool sets `pgtide.notify = off` and pokes the
//!   coalescing notifier, which sends `pg_notify` after the commit;
//! * engine, NOTIFY in the transaction: the same on a handle built with the opt-in
//!   `notify_in_transaction(true)`, where a publish alone in flight notifies inside its own
//!   transaction, so the two ways are compared in the same run;
//! * engine without wake-ups: the same on a handle built with `notifications(false)`, which
//!   tells the engine's own overhead (pool, checks) apart from the notifier's;
//! * SQL: the floor's statement on the same raw connections with the setting reset, so the
//!   statement-level trigger runs, as for publishers that go through SQL (psql, application
//!   triggers, `<ns>.publish(…)`). No consumer waits, so it sends no NOTIFY: busy consumers, or
//!   none, cost SQL publishers nothing (the trigger notifies only streams with a registered
//!   waiter, `sql/functions/wakeups.sql`);
//! * SQL, a consumer waiting: the same with a registration of the stream held throughout (as an
//!   idle consumer's process holds one), so every publish NOTIFYs inside its transaction: the
//!   worst case, and what every SQL publish cost before registrations.
//!
//! A raw LISTEN on the namespace channel counts the notifications each side sends while
//! measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::harness::{plural, run_workers, Step, Throughput};
use super::raw::{raw_clients, raw_publish, set_notify, Listener, PublishInput, Raw};
use super::{Bench, Case, Target, Unit};
use pgtide::{OutgoingMessage, PgBackend, Result};

pub(super) const TRIGGER: &str = "trigger";

/// Publisher counts of the trigger-cost case.
const PUBLISHERS: [usize; 2] = [1, 16];

/// The engine's own publish statement (the file `PgBackend::publish` runs), so that the floor
/// measures exactly the statement the engine sends.
const PUBLISH_SQL: &str = include_str!("../../../sql/publish.sql");
/// Most the wake-up mechanism may cost: publish rate at least this share of the floor.
const TARGET: f64 = 0.8;

/// The sides, by index in [`Bench::alternate_n`].
const FLOOR: usize = 0;
const ENGINE: usize = 1;
const QUIET: usize = 2;
const SQL: usize = 3;
const IN_TRANSACTION: usize = 4;
const SQL_WAITER: usize = 5;
/// The holder id of the registration the SQL-with-a-waiter side holds.
const WAITER: &str = "bench-waiter";

/// What the sides publish with.
struct Sides {
    raw: Vec<Raw<PublishInput>>,
    engine: Vec<(PgBackend, OutgoingMessage)>,
    quiet: Vec<(PgBackend, OutgoingMessage)>,
    in_transaction: Vec<(PgBackend, OutgoingMessage)>,
    received: Arc<AtomicU64>,
    /// The namespace (validated by the library).
    ns: String,
}

impl Bench<'_> {
    pub(super) async fn trigger_cases(
        &self,
        baselines: &mut Vec<Case>,
        cases: &mut Vec<Case>,
    ) -> Step<()> {
        let url = self.config.url.as_str();
        let listener = Listener::connect(url, &format!("pgtide.{}", self.ns), false).await?;
        let input = Arc::new(PublishInput {
            stream: TRIGGER.to_owned(),
            payload: self.msg.payload().to_vec(),
        });
        let quiet = self
            .config
            .engine(url)
            .namespace(self.ns)
            .pool_size(PUBLISHERS[1])
            .notifications(false)
            .build()?;
        let in_transaction = self
            .config
            .engine(url)
            .namespace(self.ns)
            .pool_size(PUBLISHERS[1])
            .notify_in_transaction(true)
            .build()?;
        let outcome = self
            .trigger_with(
                &listener,
                &input,
                [&quiet, &in_transaction],
                baselines,
                cases,
            )
            .await;
        quiet.shutdown().await;
        in_transaction.shutdown().await;
        outcome
    }

    async fn trigger_with(
        &self,
        listener: &Listener,
        input: &Arc<PublishInput>,
        [quiet, in_transaction]: [&PgBackend; 2],
        baselines: &mut Vec<Case>,
        cases: &mut Vec<Case>,
    ) -> Step<()> {
        // The library validated the namespace; its placeholders are rendered as the library does.
        let sql = PUBLISH_SQL
            .replace("@ns_lit@", &format!("'{}'", self.ns))
            .replace("@ns@", &format!("\"{}\"", self.ns));
        for n in PUBLISHERS {
            self.progress(format_args!(
                "trigger cost: floor vs engine vs engine without wake-ups vs SQL (trigger) vs SQL with a waiter, {}",
                plural(n, "publisher")
            ));
            let sides = Sides {
                raw: raw_clients(&self.config.url, n, &sql, input.clone()).await?,
                engine: vec![(self.pg.clone(), self.msg.clone()); n],
                quiet: vec![(quiet.clone(), self.msg.clone()); n],
                in_transaction: vec![(in_transaction.clone(), self.msg.clone()); n],
                received: listener.received(),
                ns: self.ns.to_owned(),
            };
            let sums = self
                .alternate_n(6, |i, w, d| run_side(&sides, i, w, d))
                .await?;
            let rate = |i: usize| sums[i].0.rate();
            let per_100 = |i: usize| {
                let (t, notes): &(Throughput, u64) = &sums[i];
                format!(
                    "{:.1} NOTIFYs per 100 publishes",
                    *notes as f64 * 100.0 / t.items.max(1) as f64
                )
            };
            let publishers = plural(n, "publisher");
            baselines.push(Case::info(
                format!("publish floor: statement, notify off, {publishers}"),
                rate(FLOOR),
                Unit::PerSecond,
            ));
            cases.push(Case::against(
                format!("publish engine, no wake-ups, vs floor, {publishers}"),
                rate(QUIET),
                Unit::PerSecond,
                rate(FLOOR),
            ));
            cases.push(
                Case::compared(
                    format!("publish engine (notifier) vs floor, {publishers}"),
                    rate(ENGINE),
                    Unit::PerSecond,
                    rate(FLOOR),
                    Target::RatioAtLeast(TARGET),
                )
                .note(Some(format!(
                    "{}; {:.2}x the engine without wake-ups",
                    per_100(ENGINE),
                    rate(ENGINE) / rate(QUIET).max(f64::MIN_POSITIVE)
                ))),
            );
            cases.push(
                Case::against(
                    format!("publish engine (NOTIFY in the transaction) vs floor, {publishers}"),
                    rate(IN_TRANSACTION),
                    Unit::PerSecond,
                    rate(FLOOR),
                )
                .note(Some(format!(
                    "{}; the engine (notifier) is {:.2}x this",
                    per_100(IN_TRANSACTION),
                    rate(ENGINE) / rate(IN_TRANSACTION).max(f64::MIN_POSITIVE)
                ))),
            );
            cases.push(
                Case::compared(
                    format!("publish SQL (trigger on, no consumer waiting) vs floor, {publishers}"),
                    rate(SQL),
                    Unit::PerSecond,
                    rate(FLOOR),
                    Target::RatioAtLeast(TARGET),
                )
                .note(Some(per_100(SQL))),
            );
            cases.push(
                Case::against(
                    format!("publish SQL (trigger on, a consumer waiting) vs floor, {publishers}"),
                    rate(SQL_WAITER),
                    Unit::PerSecond,
                    rate(FLOOR),
                )
                .note(Some(per_100(SQL_WAITER))),
            );
        }
        Ok(())
    }
}

/// One round of one side; counts the notifications seen after the warm-up.
async fn run_side(
    sides: &Sides,
    side: usize,
    warmup: Duration,
    window: Duration,
) -> Step<(Throughput, u64)> {
    if matches!(side, FLOOR | SQL | SQL_WAITER) {
        set_notify(&sides.raw, side != FLOOR).await?;
    }
    // The waiter's registration, held by the first publisher's session (alive all along, so
    // `maintain()` keeps it) for this side only.
    if let Some(first) = sides.raw.first() {
        let sql = if side == SQL_WAITER {
            format!(
                "SELECT \"{}\"._wake_register('{TRIGGER}', '{WAITER}', pg_backend_pid(), '0')",
                sides.ns
            )
        } else {
            format!("SELECT \"{}\"._wake_release(NULL, '{WAITER}')", sides.ns)
        };
        first.client.batch_execute(&sql).await?;
    }
    let received = sides.received.clone();
    let at_start = tokio::spawn(async move {
        tokio::time::sleep(warmup).await;
        received.load(Ordering::Relaxed)
    });
    let t = match side {
        ENGINE => run_workers(sides.engine.clone(), warmup, window, publish_trigger).await?,
        QUIET => run_workers(sides.quiet.clone(), warmup, window, publish_trigger).await?,
        IN_TRANSACTION => {
            run_workers(
                sides.in_transaction.clone(),
                warmup,
                window,
                publish_trigger,
            )
            .await?
        }
        _ => run_workers(sides.raw.clone(), warmup, window, raw_publish).await?,
    };
    let before = at_start.await.unwrap_or(0);
    Ok((
        t,
        sides
            .received
            .load(Ordering::Relaxed)
            .saturating_sub(before),
    ))
}

async fn publish_trigger((pg, msg): (PgBackend, OutgoingMessage)) -> Result<Option<u64>> {
    pg.publish(TRIGGER, msg).await?;
    Ok(Some(1))
}
