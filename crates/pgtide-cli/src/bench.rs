//! `bench`: runs the harness of `pgtide_bench` and prints its ratio table.

use std::io::IsTerminal;

use pgtide_bench::{BenchConfig, Only};

use crate::cli::{BenchArgs, BenchCase};
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
    config.only = args.only.map(|c| match c {
        BenchCase::Scale => Only::Scale,
        BenchCase::HeldXmin => Only::HeldXmin,
        BenchCase::Collapse => Only::Collapse,
        BenchCase::Consume => Only::Consume,
        BenchCase::Trigger => Only::Trigger,
        BenchCase::Latency => Only::Latency,
    });
    if let Some(n) = args.streams {
        config.scale_streams = n as usize;
    }
    if let Some(hold) = args.held_xmin {
        config.held_xmin = hold;
    }
    config.soak = args.soak;
    // Named here, so that an interrupted run can drop what it created.
    let id = uuid::Uuid::now_v7().simple().to_string();
    let namespace = format!("bench_{}", &id[id.len() - 8..]);
    config.namespace = Some(namespace.clone());
    config.progress = !args.quiet;
    if !args.quiet && std::io::stderr().is_terminal() {
        eprintln!(
            "pgtide bench: namespace {namespace}, {} run; progress below, the table at the end",
            match (args.soak, args.quick) {
                (Some(_), _) => "soak",
                (None, true) => "quick (about eight minutes)",
                (None, false) => "full (about twelve minutes)",
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
        // The scale case's database, if the run got that far.
        let db = format!("{namespace}_scale");
        if let Err(e) = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await
        {
            eprintln!("pgtide: could not drop the database {db} ({e}); drop it by hand: DROP DATABASE {db} WITH (FORCE)");
        }
    }
}
