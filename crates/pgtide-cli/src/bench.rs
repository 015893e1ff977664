//! `bench`: runs the harness of `pgtide_bench` and prints its ratio table.

use std::io::IsTerminal;

use pgtide_bench::BenchConfig;

use crate::cli::BenchArgs;
use crate::error::{CliError, CliResult};

/// `bench [--quick] [--phase D] [--json PATH] [--check]`.
///
/// With `backend` (a broker or memory URL from `--backend`), only the backends comparison runs,
/// for Postgres at `url` and that backend.
pub async fn run(url: &str, args: BenchArgs, backend: Option<String>) -> CliResult<u8> {
    // The worker case starts `pgtide bench --quiet` again as its worker processes.
    if pgtide_bench::worker_process_requested() {
        pgtide_bench::run_worker_process().await?;
        return Ok(crate::error::OK);
    }
    let mut config = BenchConfig::new(url, args.quick);
    config.backend = backend;
    config.worker_args = Some(vec!["bench".to_owned(), "--quiet".to_owned()]);
    if let Some(phase) = args.phase {
        config.phase = phase;
    }
    // Named here, so that an interrupted run can drop what it created.
    let id = uuid::Uuid::now_v7().simple().to_string();
    let namespace = format!("bench_{}", &id[id.len() - 8..]);
    config.namespace = Some(namespace.clone());
    config.progress = !args.quiet;
    if !args.quiet && std::io::stderr().is_terminal() {
        eprintln!(
            "pgtide bench: namespace {namespace}, {} run; progress below, the table at the end",
            if args.quick {
                "quick (about a minute and a half)"
            } else {
                "full (about five minutes)"
            }
        );
    }
    let token = crate::shutdown_signal();
    let report = tokio::select! {
        biased;
        _ = token.cancelled() => {
            drop_namespace(url, &namespace).await;
            return Err(CliError::new(crate::error::INTERRUPTED, format!("interrupted; dropped the bench namespace {namespace}")));
        }
        r = pgtide_bench::run(config) => r?,
    };
    report.print_table();
    if let Some(path) = &args.json {
        report.write_json(path).map_err(|e| {
            CliError::runtime(format!(
                "cannot write the report to {}: {e}",
                path.display()
            ))
        })?;
    }
    if args.check && !report.all_targets_met() {
        eprintln!("pgtide: some cases missed their target (marked NO)");
        return Ok(crate::error::UNHEALTHY);
    }
    Ok(crate::error::OK)
}

async fn drop_namespace(url: &str, namespace: &str) {
    if let Ok((client, conn)) = pgtide::connect_raw(url).await {
        tokio::spawn(conn);
        if let Err(e) = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{namespace}\" CASCADE"))
            .await
        {
            eprintln!("pgtide: could not drop {namespace} ({e}); drop it by hand: DROP SCHEMA {namespace} CASCADE");
        }
    }
}
