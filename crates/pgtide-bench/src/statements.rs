//! What the unnamed statement mode (for transaction-mode poolers, issue 9 item 4) costs against
//! prepared statements, on a direct connection:
//!
//! * publish, 1 and 16 publishers, three sides alternating in rounds: raw INSERT 1/txn (the
//!   baseline), [`pgtide::PgBackend::publish`] with prepared statements (the run's handle), and
//!   the same through a handle built with [`pgtide::StatementMode::Unnamed`] (unnamed
//!   statements with declared parameter types; its publishes open a transaction with
//!   `SET LOCAL pgtide.notify = off`, pipelined with the publish and COMMIT). Both engine handles
//!   notify through the coalescing notifier;
//! * consume, 4 consumers looping `ack_and_fetch(previous batch, 10)`, prepared against
//!   unnamed, each on a backlog of its own.

use super::harness::{plural, run_workers, Step};
use super::postgres::{fetch_ack, ConsumeState};
use super::raw::{raw_clients, raw_insert_one};
use super::{Bench, Case, Unit, CONSUMERS, FILL_BATCH, GROUP};
use pgtide::{OutgoingMessage, PgBackend, Result, StatementMode};

pub(super) const STATEMENTS: &str = "statements";
pub(super) const CONSUME_PREPARED: &str = "statements-consume-prepared";
pub(super) const CONSUME_UNNAMED: &str = "statements-consume-unnamed";

/// Publisher counts of the case.
const PUBLISHERS: [usize; 2] = [1, 16];
/// Batch of the consume comparison.
const BATCH: usize = 10;
/// Drain rate (messages/s) each consume backlog leaves room for.
const DRAIN_ROOM: f64 = 40_000.0;

/// The publish sides, by index in [`Bench::alternate_n`].
const RAW: usize = 0;
const PREPARED: usize = 1;
const UNNAMED: usize = 2;

impl Bench<'_> {
    pub(super) async fn statement_cases(
        &self,
        baselines: &mut Vec<Case>,
        cases: &mut Vec<Case>,
    ) -> Step<()> {
        let unnamed = self
            .config
            .engine(self.config.url.clone())
            .namespace(self.ns)
            .pool_size(self.config.pool_size)
            .statement_mode(StatementMode::Unnamed)
            // A direct connection: keep wake-ups on, as the prepared side has them.
            .notifications(true)
            .build()?;
        let outcome = self.statement_with(&unnamed, baselines, cases).await;
        unnamed.shutdown().await;
        outcome
    }

    async fn statement_with(
        &self,
        unnamed: &PgBackend,
        baselines: &mut Vec<Case>,
        cases: &mut Vec<Case>,
    ) -> Step<()> {
        let ns = self.ns;
        let sql = format!("INSERT INTO \"{ns}\".raw_insert (id, payload) VALUES ($1, $2)");
        for n in PUBLISHERS {
            self.progress(format_args!(
                "statement modes: raw INSERT vs publish prepared vs unnamed, {}",
                plural(n, "publisher")
            ));
            let raw = raw_clients(&self.config.url, n, &sql, self.value.clone()).await?;
            let prepared = vec![(self.pg.clone(), self.msg.clone()); n];
            let unnamed = vec![(unnamed.clone(), self.msg.clone()); n];
            let sums = self
                .alternate_n(3, |i, w, d| {
                    let (raw, prepared, unnamed) = (raw.clone(), prepared.clone(), unnamed.clone());
                    async move {
                        match i {
                            RAW => run_workers(raw, w, d, raw_insert_one).await,
                            PREPARED => run_workers(prepared, w, d, publish_one).await,
                            _ => run_workers(unnamed, w, d, publish_one).await,
                        }
                    }
                })
                .await?;
            let rate = |i: usize| sums[i].rate();
            let publishers = plural(n, "publisher");
            baselines.push(Case::info(
                format!(
                    "raw INSERT 1/txn (statement modes), {}",
                    plural(n, "client")
                ),
                rate(RAW),
                Unit::PerSecond,
            ));
            cases.push(Case::against(
                format!("publish prepared vs raw, {publishers}"),
                rate(PREPARED),
                Unit::PerSecond,
                rate(RAW),
            ));
            cases.push(Case::against(
                format!("publish unnamed vs raw, {publishers}"),
                rate(UNNAMED),
                Unit::PerSecond,
                rate(RAW),
            ));
            cases.push(Case::against(
                format!("publish unnamed vs prepared, {publishers}"),
                rate(UNNAMED),
                Unit::PerSecond,
                rate(PREPARED),
            ));
        }

        let window = (self.config.phase + self.config.warmup).as_secs_f64();
        let backlog = ((window * DRAIN_ROOM) as u64).next_multiple_of(FILL_BATCH as u64);
        self.fill(CONSUME_PREPARED, backlog).await?;
        self.fill(CONSUME_UNNAMED, backlog).await?;
        self.progress(format_args!(
            "statement modes: consume B={BATCH} prepared vs unnamed, {CONSUMERS} clients"
        ));
        let prepared = consumers(&self.pg, CONSUME_PREPARED).await?;
        let unnamed = consumers(unnamed, CONSUME_UNNAMED).await?;
        let (prepared, unnamed) = self
            .alternate(
                |w, d| run_workers(prepared.clone(), w, d, fetch_ack),
                |w, d| run_workers(unnamed.clone(), w, d, fetch_ack),
            )
            .await?;
        cases.push(
            Case::info(
                format!(
                    "consume B={BATCH} prepared, {}",
                    plural(CONSUMERS, "consumer")
                ),
                prepared.rate(),
                Unit::PerSecond,
            )
            .note(prepared.exhausted_note("backlog")),
        );
        cases.push(
            Case::against(
                format!(
                    "consume B={BATCH} unnamed vs prepared, {}",
                    plural(CONSUMERS, "consumer")
                ),
                unnamed.rate(),
                Unit::PerSecond,
                prepared.rate(),
            )
            .note(unnamed.exhausted_note("backlog")),
        );
        Ok(())
    }
}

async fn consumers(pg: &PgBackend, stream: &str) -> Result<Vec<ConsumeState<pgtide::PgConsumer>>> {
    let mut consumers = vec![];
    for i in 0..CONSUMERS {
        let consumer = pg.consumer(stream, GROUP, &format!("bench-{i}")).await?;
        consumers.push(ConsumeState::new(consumer, BATCH));
    }
    Ok(consumers)
}

async fn publish_one((pg, msg): (PgBackend, OutgoingMessage)) -> Result<Option<u64>> {
    pg.publish(STATEMENTS, msg).await?;
    Ok(Some(1))
}
