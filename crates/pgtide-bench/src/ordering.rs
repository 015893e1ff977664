//! Ordered groups (issue 12): consume throughput of an ordered group whose backlog spreads over
//! 1 000 ordering keys against an unordered group with the same messages, and keyed
//! `publish_batch` into a stream with an ordered group against the unkeyed fast path.

use std::sync::Arc;

use pgtide::{GroupConfig, OutgoingMessage, PgBackend, Result, StreamConfig};

use super::harness::{run_workers, Step};
use super::postgres::{fetch_ack, ConsumeState};
use super::report::{Case, Target, Unit};
use super::{Bench, CONSUMERS, FILL_BATCH, GROUP};

/// Stream with one ordered group.
pub(super) const ORDERED: &str = "ordered";
/// Stream with one unordered group, fed the same keyed messages.
pub(super) const UNORDERED: &str = "unordered";
/// Streams of the keyed and unkeyed publish_batch comparison.
const KEYED_PUBLISH: &str = "keyed-publish";
const PLAIN_PUBLISH: &str = "plain-publish";
/// A group created after the others, with one delivery: every other group's rows then sort before
/// its rows in `delivery_state`'s primary key and claim index, so no side of a comparison inserts
/// at the right end of those indexes, where PostgreSQL's B-tree skips the descent from the root
/// (its cached rightmost leaf). Without it the last group created (the unordered side of each
/// comparison here) took that shortcut alone: about 11 % of a `publish_batch` of 100's server work
/// (benches/icount-style counts, 2026-12-04), which only the newest group of a namespace gets.
const TAIL: &str = "ordering-tail";
/// Distinct ordering keys of the backlog.
const KEYS: usize = 1000;
/// Room for this many deliveries per second over the window, on each side.
const ROOM: f64 = 40_000.0;

impl Bench<'_> {
    pub(super) async fn ordering_cases(&self, cases: &mut Vec<Case>) -> Step<()> {
        let ordered = GroupConfig::default().ordered(true);
        for (stream, config) in [
            (ORDERED, ordered.clone()),
            (UNORDERED, GroupConfig::default()),
            (KEYED_PUBLISH, ordered),
            (PLAIN_PUBLISH, GroupConfig::default()),
        ] {
            self.pg
                .ensure_stream(stream, &StreamConfig::default())
                .await?;
            self.pg.ensure_group_with(stream, GROUP, &config).await?;
        }
        self.pg
            .ensure_stream(TAIL, &StreamConfig::default())
            .await?;
        self.pg
            .ensure_group_with(TAIL, GROUP, &GroupConfig::default())
            .await?;
        self.pg.publish(TAIL, self.msg.clone()).await?;
        let window = (self.config.phase + self.config.warmup).as_secs_f64();
        let backlog = ((window * ROOM) as u64).next_multiple_of(FILL_BATCH as u64);
        self.fill_keyed(ORDERED, backlog).await?;
        self.fill_keyed(UNORDERED, backlog).await?;
        for batch in [10, 100] {
            self.progress(format_args!(
                "consume ordered ({KEYS} keys) vs unordered, B={batch}"
            ));
            let ordered = self.ordering_consumers(ORDERED, batch).await?;
            let unordered = self.ordering_consumers(UNORDERED, batch).await?;
            let (ordered, unordered) = self
                .alternate(
                    |w, d| run_workers(ordered.clone(), w, d, fetch_ack),
                    |w, d| run_workers(unordered.clone(), w, d, fetch_ack),
                )
                .await?;
            cases.push(
                Case::compared(
                    format!(
                        "consume ordered group, {KEYS} keys, B={batch}, {CONSUMERS} consumers (vs unordered)"
                    ),
                    ordered.rate(),
                    Unit::PerSecond,
                    unordered.rate(),
                    Target::RatioAtLeast(0.5),
                )
                .note(ordered.exhausted_note(&format!("the backlog of {backlog}"))),
            );
        }

        self.progress(format_args!(
            "publish_batch 100 keyed (ordered group) vs unkeyed"
        ));
        let keyed: Vec<OutgoingMessage> = (0..100)
            .map(|i| self.msg.clone().key(format!("k{}", i * 10)))
            .collect();
        let keyed = vec![(self.pg.clone(), Arc::new(keyed))];
        let plain = vec![(self.pg.clone(), Arc::new(vec![self.msg.clone(); 100]))];
        let (keyed, plain) = self
            .alternate(
                |w, d| run_workers(keyed.clone(), w, d, publish_keyed),
                |w, d| run_workers(plain.clone(), w, d, publish_plain),
            )
            .await?;
        cases.push(Case::compared(
            "publish_batch 100 with keys into an ordered group, 1 client (vs without keys)",
            keyed.rate(),
            Unit::PerSecond,
            plain.rate(),
            Target::RatioAtLeast(0.5),
        ));
        Ok(())
    }

    /// Publishes `count` messages over [`KEYS`] keys (round robin) to `stream`.
    async fn fill_keyed(&self, stream: &'static str, count: u64) -> Step<()> {
        self.progress(format_args!("filling {stream} with {count} keyed messages"));
        let mut sent = 0u64;
        while sent < count {
            let n = (count - sent).min(FILL_BATCH as u64);
            let batch: Vec<OutgoingMessage> = (0..n)
                .map(|i| {
                    let key = (sent + i) as usize % KEYS;
                    self.msg.clone().key(format!("k{key}"))
                })
                .collect();
            self.pg.publish_batch(stream, &batch).await?;
            sent += n;
        }
        Ok(())
    }

    async fn ordering_consumers(
        &self,
        stream: &str,
        batch: usize,
    ) -> Result<Vec<ConsumeState<pgtide::PgConsumer>>> {
        let mut consumers = vec![];
        for i in 0..CONSUMERS {
            let consumer = self
                .pg
                .consumer(stream, GROUP, &format!("bench-{i}"))
                .await?;
            consumers.push(ConsumeState::new(consumer, batch));
        }
        Ok(consumers)
    }
}

async fn publish_keyed((pg, msgs): (PgBackend, Arc<Vec<OutgoingMessage>>)) -> Result<Option<u64>> {
    pg.publish_batch(KEYED_PUBLISH, &msgs).await?;
    Ok(Some(msgs.len() as u64))
}

async fn publish_plain((pg, msgs): (PgBackend, Arc<Vec<OutgoingMessage>>)) -> Result<Option<u64>> {
    pg.publish_batch(PLAIN_PUBLISH, &msgs).await?;
    Ok(Some(msgs.len() as u64))
}
