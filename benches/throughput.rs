//! Throughput and latency of pgtide against raw PostgreSQL baselines measured in the same run.
//!
//! ```text
//! cargo bench --bench throughput
//! cargo bench --bench throughput --features nats,redis,amqp   # brokers in the backends comparison
//! ```
//!
//! The harness is the `pgtide-bench` crate (a dev-dependency): this file only calls its entry
//! points. Broker features reach it through the `pgtide` CLI package, a default workspace member
//! whose `nats`/`redis`/`amqp` features also turn on the harness's.
//!
//! Environment: `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! `PGTIDE_BENCH_QUICK=1` for a short run, `PGTIDE_BENCH_BACKENDS=1` / `=0` to measure the
//! backends comparison or not (default: only in a full run; brokers at `NATS_URL`, `REDIS_URL`,
//! `AMQP_URL` when built with their feature), `PGTIDE_BENCH_JSON` for the JSON report path
//! (default `target/pgtide-bench.json`), `PGTIDE_BENCH_ONLY=statements` for the statement-mode
//! comparison alone (prepared against unnamed statements), `=scale`, `=held-xmin` or `=collapse` for
//! that case alone, `=trigger` for the publish rows, the wake-up cost and the commit → handler
//! latency, `=latency` for that latency and the delayed messages' lateness alone,
//! `PGTIDE_BENCH_PHASE=<seconds>` for longer (or shorter) phases, `=ordering` for the unordered publish and consume rows with the
//! ordered-group comparison, `PGTIDE_BENCH_CLAIM_FLOOR=0` for claims without the claim floor,
//! `PGTIDE_BENCH_SYNC_CLAIMS=1` for claims that wait for their WAL flush
//! (to compare, e.g. with `=held-xmin`). The run works in a fresh `bench_<random>` namespace and
//! drops it. The worker case starts this executable twice more as worker processes (see
//! `pgtide_bench::run_worker_process`). The cases and caveats are documented in `pgtide_bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use pgtide_bench::{run, run_worker_process, worker_process_requested, BenchConfig, Only};

fn main() -> ExitCode {
    if worker_process_requested() {
        return worker_process();
    }
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let quick = matches!(
        std::env::var("PGTIDE_BENCH_QUICK").as_deref(),
        Ok("1" | "true" | "yes")
    );
    let json_path = std::env::var_os("PGTIDE_BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/pgtide-bench.json"));
    let mut config = BenchConfig::new(url, quick);
    config.progress = true;
    // Started again with no arguments, this executable runs a worker process (see above).
    config.worker_args = Some(vec![]);
    // `PGTIDE_BENCH_PHASE=30`: seconds per side of each comparison (longer phases for a noisy
    // machine), as `pgtide bench --phase`.
    if let Some(secs) = std::env::var("PGTIDE_BENCH_PHASE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
    {
        config.phase = std::time::Duration::from_secs_f64(secs);
    }
    let only = std::env::var("PGTIDE_BENCH_ONLY");
    config.only_ordering = matches!(only.as_deref(), Ok("ordering"));
    config.only_statement_modes = matches!(only.as_deref(), Ok("statements"));
    config.only = match only.as_deref() {
        Ok("scale") => Some(Only::Scale),
        Ok("held-xmin") => Some(Only::HeldXmin),
        Ok("collapse") => Some(Only::Collapse),
        Ok("consume") => Some(Only::Consume),
        Ok("trigger") => Some(Only::Trigger),
        Ok("latency") => Some(Only::Latency),
        _ => None,
    };
    // `PGTIDE_BENCH_CLAIM_FLOOR=0`: claims that walk from the group's first entry (the claim
    // floor is on by default, as in the engine), to compare (held xmin).
    match std::env::var("PGTIDE_BENCH_CLAIM_FLOOR").as_deref() {
        Ok("1" | "true" | "yes") => config.claim_floor = true,
        Ok("0" | "false" | "no") => config.claim_floor = false,
        _ => {}
    }
    // `PGTIDE_BENCH_SYNC_CLAIMS=1`: claims that wait for their WAL flush, to compare (latency).
    match std::env::var("PGTIDE_BENCH_SYNC_CLAIMS").as_deref() {
        Ok("1" | "true" | "yes") => config.synchronous_claims = true,
        Ok("0" | "false" | "no") => config.synchronous_claims = false,
        _ => {}
    }
    match std::env::var("PGTIDE_BENCH_BACKENDS").as_deref() {
        Ok("1" | "true" | "yes") => config.backends = true,
        Ok("0" | "false" | "no") => config.backends = false,
        _ => {}
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgtide bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run(config)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("pgtide bench failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    report.print_table();
    match report.write_json(&json_path) {
        Ok(()) => eprintln!("JSON report: {}", json_path.display()),
        Err(e) => {
            eprintln!("pgtide bench: cannot write {}: {e}", json_path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// One worker process of the worker case, talking to the parent bench over stdin/stdout.
fn worker_process() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgtide bench worker: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_worker_process()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgtide bench worker failed: {e}");
            ExitCode::FAILURE
        }
    }
}
