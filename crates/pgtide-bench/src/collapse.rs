//! The condition of the consume collapse seen on a fresh cluster (issue 11): a large backlog,
//! fresh statistics (`ANALYZE` of the namespace's tables right before), and sessions whose plan
//! cache always uses generic plans (`plan_cache_mode = force_generic_plan` in the connection
//! options), so every engine statement runs the plan it would settle on after five calls
//! whatever the statistics say. Claim round trips (`try_fetch(10)` + `ack_batch`, backlog kept
//! constant) at the large backlog against the small one: an O(backlog) plan shows as a ratio far
//! above 1.

use pgtide::{GroupStart, StreamConfig};

use super::harness::{short, Step};
use super::report::Summary;
use super::scale::with_setting;
use super::{Bench, Case, Latency, Target, Unit, GROUP};

pub(super) const SMALL: &str = "collapse-small";
pub(super) const LARGE: &str = "collapse-large";
const SMALL_BACKLOG: u64 = 10_000;

impl Bench<'_> {
    pub(super) async fn collapse_case(
        &self,
        cases: &mut Vec<Case>,
        latencies: &mut Vec<Latency>,
    ) -> Step<()> {
        let large = self.config.large_backlog.max(SMALL_BACKLOG);
        for (stream, backlog) in [(SMALL, SMALL_BACKLOG), (LARGE, large)] {
            self.pg
                .ensure_stream(stream, &StreamConfig::default())
                .await?;
            self.pg.ensure_group(stream, GROUP, GroupStart::New).await?;
            self.fill(stream, backlog).await?;
        }
        let admin = super::raw::connect(&self.config.url).await?;
        let ns = self.ns;
        admin
            .batch_execute(&format!(
                "ANALYZE \"{ns}\".delivery_state; ANALYZE \"{ns}\".messages; ANALYZE \"{ns}\".group_counters"
            ))
            .await?;
        let url = with_setting(&self.config.url, "plan_cache_mode=force_generic_plan");
        let generic = self
            .config
            .engine(url.clone())
            .namespace(ns)
            .pool_size(4)
            .build()?;
        // What the consumer's sessions really run with (a server may refuse the option).
        let mode: String = super::raw::connect(&url)
            .await?
            .query_one("SHOW plan_cache_mode", &[])
            .await?
            .try_get(0)?;
        self.progress(format_args!(
            "collapse condition: claims at {} vs {} after ANALYZE, plan_cache_mode = {mode}",
            short(large),
            short(SMALL_BACKLOG)
        ));
        let (small, big) = self
            .alternate(
                |w, d| self.claim_samples_on(&generic, SMALL, w, d),
                |w, d| self.claim_samples_on(&generic, LARGE, w, d),
            )
            .await?;
        generic.shutdown().await;
        let (small, big) = (Summary::of(small), Summary::of(big));
        latencies.push(small.latency(
            format!(
                "claim+ack, generic plans after ANALYZE, {}",
                short(SMALL_BACKLOG)
            ),
            SMALL_BACKLOG,
        ));
        latencies.push(big.latency(
            format!("claim+ack, generic plans after ANALYZE, {}", short(large)),
            large,
        ));
        cases.push(
            Case::compared(
                format!(
                    "collapse condition: claim p50 at {} / at {}",
                    short(large),
                    short(SMALL_BACKLOG)
                ),
                big.p50_ms,
                Unit::Millis,
                small.p50_ms,
                Target::RatioAtMost(1.2),
            )
            .note(Some(format!(
                "fresh ANALYZE, plan_cache_mode = {mode} on the consumer's connections; \
                 p99 {:.2} ms vs {:.2} ms",
                big.p99_ms, small.p99_ms
            ))),
        );
        Ok(())
    }
}
