//! `pgtide dashboard`: a web page of one namespace, live (server-sent events), served by this
//! process.
//!
//! Invariants: the page reads only what `stats`, `dead list` and the `scout` view read, so a
//! `grant --read-only` role runs it; writes (replay, purge) exist only with `--allow-writes` and
//! a token the page sends in a header; the history behind the charts lives in this process and
//! is lost when it stops. On another backend (`--backend`) it shows the groups named with
//! `--group` through the `Queue` trait, read-only (see `source.rs`).

mod api;
mod assets;
mod auth;
mod error;
mod sampler;
mod source;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use pgtide::AnyBackend;

use crate::cli::DashboardArgs;
use crate::error::{CliError, CliResult};

/// What every request handler shares.
pub(crate) struct AppState {
    source: Arc<source::Source>,
    sampler: sampler::Sampler,
    auth: auth::WriteAuth,
}

/// Request bodies are a list of ids at most: anything larger is hostile.
const MAX_BODY: usize = 64 * 1024;

/// `dashboard [--listen ADDR] [--allow-writes [--token T]] [--interval D] [--group S/G]...`.
pub async fn run(backend: AnyBackend, namespace: &str, args: DashboardArgs) -> CliResult {
    if args.interval < Duration::from_secs(1) {
        return Err(CliError::usage(
            "--interval must be 1s or more: each sample runs the stats queries of every group",
        ));
    }
    let source = Arc::new(source::Source::new(backend, namespace, &args.groups)?);
    if args.allow_writes && source.postgres().is_none() {
        return Err(CliError::usage(format!(
            "--allow-writes: replay and purge are not supported by the {} backend (its Queue trait has no replay); the dashboard shows it read-only",
            source.kind()
        )));
    }
    // Fail before serving when the namespace, a stream or a group is missing, or the role
    // cannot read it.
    source.sample().await?;
    let auth = auth::WriteAuth::new(args.allow_writes, args.token)?;
    if let Some(pg) = source.postgres() {
        // The listener status the page shows is this process's own LISTEN connection: it
        // proves that notifications reach a listener of this namespace.
        pg.start_listening();
    }
    let token = crate::shutdown_signal();
    let sampler = sampler::Sampler::start(source.clone(), args.interval, token.clone());
    let state = Arc::new(AppState {
        source: source.clone(),
        sampler,
        auth,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::runtime(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::runtime(format!("cannot read the bound address: {e}")))?;
    let loopback = addr.ip().is_loopback();
    if !loopback {
        eprintln!("warning: the dashboard listens on {addr}, not on loopback: anyone who reaches it sees payloads");
    }
    let app = router(state.clone(), loopback);
    // The address on stdout (first line) lets scripts and tests that passed port 0 find it.
    println!("http://{addr}/");
    if let Some(t) = state.auth.token() {
        eprintln!(
            "writes allowed: the page asks for this token (or open http://{addr}/#token={t})"
        );
        println!("token {t}");
    }
    tracing::info!(%addr, namespace, backend = source.kind(), writes = state.auth.enabled(), "pgtide dashboard: serving");
    let stop = token.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    token.cancel();
    state.sampler.stopped().await;
    served.map_err(|e| CliError::runtime(format!("the dashboard server failed: {e}")))?;
    tracing::info!("pgtide dashboard: stopped");
    Ok(())
}

fn router(state: Arc<AppState>, loopback: bool) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{file}", get(assets::file))
        .route("/api/overview", get(api::overview))
        .route("/api/history", get(api::history))
        .route("/api/events", get(api::events))
        .route("/api/dead", get(api::dead_list))
        .route("/api/dead/{stream}/{group}/{id}", get(api::dead_show))
        .route("/api/dead/{stream}/{group}/replay", post(api::dead_replay))
        .route("/api/dead/{stream}/{group}/purge", post(api::dead_purge))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                auth::guard(loopback, req, next)
            },
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}
