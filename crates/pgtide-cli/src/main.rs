//! The `pgtide` command-line tool: provisioning (migrate, grant), streams and groups, publish and
//! consume from a shell, stats, dead letters, trim, health, the scout, and the bench harness.
//! Every command runs on Postgres; the ones the `Queue` traits cover also run on the other
//! backends (see `backend.rs`).
//!
//! Every failure prints one line on stderr and exits with a documented code (see `error.rs`);
//! data goes to stdout, everything else (progress, logs) to stderr.

// Every command's output goes through `out::write`, which ends the command quietly when the
// reader closes the pipe (see `out.rs`). These shadow std's macros for every module below.
macro_rules! println {
    () => {
        $crate::out::write(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*), true)
    };
}
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*), false)
    };
}

mod admin;
mod backend;
mod bench;
mod cli;
#[cfg(test)]
mod cli_fuzz;
mod consume;
#[cfg(feature = "dashboard")]
mod dashboard;
mod dead;
mod error;
mod help;
mod human;
mod out;
mod publish;
mod stats;
mod telemetry;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pgtide::{CancellationToken, PgBackend};

use crate::backend::{BackendUrl, Target};
use crate::cli::{Cli, Command, Global, LogFormat};
use crate::error::{CliError, CliResult};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgtide: cannot start the async runtime: {e}");
            return ExitCode::from(error::RUNTIME);
        }
    };
    let result = runtime.block_on(run(cli));
    // Background tasks (listener, notifier) were shut down by the commands; do not wait for
    // stragglers such as a blocked stdin reader.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pgtide: {e}");
            ExitCode::from(e.code)
        }
    }
}

/// Prints clap's help or version as is, and a usage error as one line (exit 2).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                error::USAGE
            } else {
                error::OK
            },
        );
    }
    let rendered = e.render().to_string();
    let mut parts = vec![];
    let mut usage = None;
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage: ") {
            usage = Some(u.to_owned());
        } else if !line.starts_with("For more information") {
            parts.push(line.trim_start_matches("error: ").to_owned());
        }
    }
    let mut message = parts.join(" ");
    if let Some(u) = usage {
        message.push_str(&format!("; usage: {u} (see --help)"));
    }
    eprintln!("pgtide: {message}");
    ExitCode::from(error::USAGE)
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    // Long-running commands report leadership and shutdown at info; one-shot commands stay quiet.
    let long_running = matches!(
        &cli.command,
        Command::Scout(_)
            | Command::Dashboard(_)
            | Command::Consume(cli::ConsumeArgs { follow: true, .. })
    );
    // lapin logs failures the amqp backend handles or reports itself (a passive declare of a
    // missing queue closes its channel) at ERROR: keep them off the one line an error gets.
    // async-nats logs every connection event at INFO.
    let default = if long_running {
        "info,lapin=off,async_nats=warn"
    } else {
        "warn,lapin=off"
    };
    let filter = EnvFilter::try_from_env("PGTIDE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cli.global.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

async fn run(cli: Cli) -> CliResult<u8> {
    let global = cli.global;
    pgtide::validate_namespace(&global.namespace).map_err(CliError::from)?;
    let _ = error::NAMESPACE.set(global.namespace.clone());
    telemetry::install(global.metrics_listen)?;
    match cli.command {
        Command::Migrate { print_sql: true } => admin::print_sql(&global.namespace),
        Command::Bench(args) => {
            let url = backend::backend_url(&global)?;
            if url.is_postgres() {
                bench::run(&url.url, args, None).await
            } else {
                // The comparison runs Postgres beside the backend: it needs DATABASE_URL too.
                let pg = global.database_url.clone().ok_or_else(|| {
                    error::CliError::usage(format!(
                        "`pgtide bench --backend {}` compares it with Postgres: set DATABASE_URL (or --database-url) as well",
                        url.kind
                    ))
                })?;
                bench::run(&pg, args, Some(url.url)).await
            }
        }
        Command::Health { json, max_lag } => stats::health(&global, json, max_lag).await,
        command => {
            let url = backend::backend_url(&global)?;
            if url.is_postgres() {
                let pg = postgres(&global, &command, &url)?;
                let result = dispatch(&pg, &global.namespace, command).await;
                // Flushes pending wake-ups (publish, replay) and resigns a scout role.
                pg.shutdown().await;
                return result.map(|()| error::OK);
            }
            // Refused before connecting: nothing to do on the server.
            if let Some(what) = backend::postgres_only(&command) {
                return Err(backend::needs_postgres(what, &url));
            }
            let queue = backend::connect(&url, &global.namespace).await?;
            let result = dispatch(&queue, &global.namespace, command).await;
            // On every path: the last settles reach the broker before the process exits.
            let closed = pgtide::Queue::close(&queue).await.map_err(|e| {
                CliError::from(e).prefixed("closing the connection failed; the last settles may not have reached the server")
            });
            result.and(closed).map(|()| error::OK)
        }
    }
}

async fn dispatch<B: Target>(b: &B, namespace: &str, command: Command) -> CliResult {
    match command {
        Command::Migrate { .. } => admin::migrate(b.require_postgres("migrate")?).await,
        Command::Grant {
            role,
            read_only,
            revoke,
        } => admin::grant(b.require_postgres("grant")?, &role, read_only, revoke).await,
        Command::Stream(c) => admin::stream(b, c).await,
        Command::Group(c) => admin::group(b, c).await,
        Command::Trim {
            stream,
            max_age,
            max_len,
        } => admin::trim(b.require_postgres("trim")?, &stream, max_age, max_len).await,
        Command::Publish(args) => publish::run(b, args).await,
        Command::Consume(args) => consume::run(b, args).await,
        Command::Stats(args) => stats::run(b, args).await,
        Command::Dead(c) => dead::run(b, c).await,
        Command::Scout(args) => stats::scout(b.require_postgres("scout")?, args).await,
        #[cfg(feature = "dashboard")]
        Command::Dashboard(args) => dashboard::run(b.to_any(), namespace, args).await,
        #[cfg(not(feature = "dashboard"))]
        Command::Dashboard(_) => {
            let _ = namespace; // only the dashboard needs it
            Err(CliError::usage(
                "`pgtide dashboard` is not in this build: install it with `cargo install pgtide-cli --features dashboard`",
            ))
        }
        Command::Health { .. } | Command::Bench(_) => unreachable!("handled before connecting"),
    }
}

fn postgres(global: &Global, command: &Command, url: &BackendUrl) -> CliResult<PgBackend> {
    let mut builder = backend::pg_builder(global, url.url.clone(), Duration::from_secs(10));
    match command {
        Command::Scout(args) => {
            builder = builder
                .pool_size(4)
                .scout_ttl(args.ttl)
                .maintenance_interval(args.maintenance_interval)
                .vacuum_interval(args.vacuum_interval)
                .scout_vacuum(!args.no_vacuum)
        }
        // `consume` too: its claims share the pool with this process's scout and notifier, and
        // an interrupted fetch needs no statement order on one connection (see `consume.rs`).
        _ => builder = builder.pool_size(4),
    }
    Ok(builder.build()?)
}

/// A token cancelled on the first SIGINT or SIGTERM. A second signal exits at once (code 130).
/// The handlers are installed before this returns, so no signal is missed after it.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let mut signals = Signals::install();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("pgtide: shutting down (signal again to exit at once)");
        cancel.cancel();
        signals.recv().await;
        eprintln!("pgtide: interrupted");
        std::process::exit(i32::from(error::INTERRUPTED));
    });
    token
}

#[cfg(unix)]
struct Signals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    async fn recv(&mut self) {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.interrupt) => {}
            _ = next(&mut self.terminate) => {}
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Signals {
        Signals
    }

    async fn recv(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
