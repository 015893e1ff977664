//! Throughput and latency of pgtide against raw PostgreSQL baselines measured in the same run.
//!
//! ```text
//! cargo bench --bench throughput --features bench
//! ```
//!
//! Environment: `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! `PGTIDE_BENCH_QUICK=1` for a short run, `PGTIDE_BENCH_JSON` for the JSON report path (default
//! `target/pgtide-bench.json`). The run works in a fresh `bench_<random>` namespace and drops it.
//! The cases and caveats are documented in `pgtide::bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use pgtide::bench::{run, BenchConfig};

fn main() -> ExitCode {
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
