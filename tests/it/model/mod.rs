//! A model-based test of the delivery lifecycle (issue 8, item 7).
//!
//! Random sequences of publish, claim (`try_fetch` by one of two consumers), `ack_and_fetch`,
//! ack, nack (no delay, a short one, or the stream's backoff), term, in_progress, release, waits
//! past leases and delays, dead-letter replay and purge run against a backend and against a
//! small reference model (`reference.rs`), on one stream with two groups (fan-out). After every
//! step: a stale handle (lapsed and re-claimed, released, settled, replayed or purged) never
//! settles; nothing is handed out while another claim's lease or a delay still hides it; a claim
//! hands out (or dead-letters on its last attempt) what is visible, earliest first; attempts go
//! up by one per claim and down only by a release; `stats()` and the dead letters match the
//! model. At the end every group is drained: all it holds is delivered.
//!
//! Why not `proptest-state-machine`: its reference model is a pure function of the transitions,
//! computed before the system runs. On Postgres time is real, so whether a lease has lapsed at
//! the instant of a claim is known only within the claim's round trip; the model here keeps
//! deadlines as windows and learns, inside them, what the backend did. So the state machine is
//! hand-rolled on proptest strategies: a case is a `Vec<Op>` (shrunk like any vector), and ops
//! name handles by position, resolved when they run.
//!
//! Runs: memory with `tokio::time::pause()` (32 cases: waits cost nothing), Postgres in real time
//! (16 cases, each in a namespace of its own). `PROPTEST_CASES` overrides the number of cases and
//! `PROPTEST_RNG_SEED` (a u64) fixes the seed; a failure prints the shrunk sequence of ops and
//! what the backend did against what the model allowed.

mod driver;
mod ops;
mod reference;

use std::future::Future;
use std::time::Duration;

use pgtide::{MemoryBackend, PgBackend, Queue};
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use uuid::Uuid;

use self::driver::Driver;

/// What the model needs of a backend beyond the [`Queue`] traits.
pub trait ModelBackend: Queue {
    /// How far the backend's clock may be from the test's (`tokio::time::Instant`).
    const SLACK: Duration;

    /// Replays dead letters, where the backend can (`None` where it cannot).
    fn replay(
        &self,
        stream: &str,
        group: &str,
        ids: Option<&[Uuid]>,
    ) -> impl Future<Output = Option<pgtide::Result<u64>>>;
}

impl ModelBackend for PgBackend {
    // The server's clock is the wall clock of this machine; deadlines are stamped inside the
    // round trip the model brackets, so only rounding (microseconds) and clock slew remain.
    const SLACK: Duration = Duration::from_millis(5);

    async fn replay(
        &self,
        stream: &str,
        group: &str,
        ids: Option<&[Uuid]>,
    ) -> Option<pgtide::Result<u64>> {
        Some(self.replay_dead(stream, group, ids).await)
    }
}

impl ModelBackend for MemoryBackend {
    // The same clock as the test's (paused); 1 ms absorbs nothing but float rounding.
    const SLACK: Duration = Duration::from_millis(1);

    async fn replay(&self, _: &str, _: &str, _: Option<&[Uuid]>) -> Option<pgtide::Result<u64>> {
        None
    }
}

/// proptest's config (which reads the `PROPTEST_*` variables) with this suite's defaults where
/// they are not set: `cases` cases, bounded shrinking, no failure files in the source tree.
fn config(cases: u32, shrink_iters: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = shrink_iters;
    }
    config.failure_persistence = None;
    config
}

fn report(result: Result<(), proptest::test_runner::TestError<Vec<ops::Op>>>) {
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn memory() {
    let mut runner = TestRunner::new(config(32, 1024));
    report(runner.run(&ops::case(), |ops| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        rt.block_on(async {
            let mut driver = Driver::new(MemoryBackend::new()).await?;
            driver.run(&ops).await
        })
        .map_err(TestCaseError::fail)
    }));
}

#[test]
fn postgres() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(config(16, 64));
    report(runner.run(&ops::case(), |ops| {
        rt.block_on(async {
            let ns = crate::common::namespace().await;
            let mut driver = Driver::new(ns.pg.clone()).await?;
            driver.run(&ops).await
        })
        .map_err(TestCaseError::fail)
    }));
}
