//! The backend a command runs on, chosen by `--backend` / `PGTIDE_BACKEND` (else `DATABASE_URL`).
//!
//! Every command runs on the Postgres engine. Other backends (`nats://`, `redis://`, `amqp://`,
//! `sqs://`, `kafka://`, `memory://`) run what the [`Queue`] traits offer: stream create/delete/purge, group
//! create/delete, publish, consume, stats of one group, the dead letters of one group, and a
//! read-only dashboard of the groups named with `--group`. The
//! rest needs what only Postgres has (a registry to list, SQL, the scout) and is refused before
//! connecting, with an error that says so (exit 2).

use std::time::Duration;

use pgtide::{AnyBackend, AnyConsumer, PgBackend, PgBackendBuilder, PgConsumer, Queue};

use crate::cli::{
    Command, ConsumeArgs, DeadCommand, Global, GroupCommand, StatsArgs, StreamCommand,
};
use crate::error::{self, CliError, CliResult};
use crate::human::{parse_point, redact_url, Point};

/// A backend URL from the command line or the environment.
#[derive(Debug, Clone)]
pub struct BackendUrl {
    /// The URL as given.
    pub url: String,
    /// `postgres`, `nats`, `redis`, `amqp`, `sqs`, `kafka` or `memory`.
    pub kind: &'static str,
    /// Where it came from, for messages.
    pub source: &'static str,
}

impl BackendUrl {
    /// True for the Postgres engine.
    pub fn is_postgres(&self) -> bool {
        self.kind == "postgres"
    }
}

/// The libpq variables that, without a URL, select a Postgres database.
const LIBPQ_VARS: &[&str] = &["PGHOST", "PGPORT", "PGUSER", "PGDATABASE"];

/// The backend URL: `--backend` when given, else `--database-url`, else the libpq variables (always Postgres: it may be a
/// `key=value` connection string too).
pub fn backend_url(global: &Global) -> CliResult<BackendUrl> {
    let url = match (&global.backend, &global.database_url) {
        (Some(b), _) if !b.is_empty() => {
            let kind = match b.split_once("://").map_or("", |(s, _)| s) {
                "postgres" | "postgresql" => "postgres",
                "redis" | "rediss" => "redis",
                "amqp" | "amqps" => "amqp",
                "sqs" | "sqss" => "sqs",
                "nats" => "nats",
                "kafka" | "kafkas" => "kafka",
                "memory" => "memory",
                _ => {
                    return Err(CliError::usage(format!(
                        "--backend/PGTIDE_BACKEND {:?} is not a backend URL: use postgres://, nats://, redis://, amqp://, sqs://, kafka:// or memory://",
                        redact_url(b)
                    )))
                }
            };
            BackendUrl {
                url: b.clone(),
                kind,
                source: "--backend/PGTIDE_BACKEND",
            }
        }
        (_, Some(url)) if !url.is_empty() => BackendUrl {
            url: url.clone(),
            kind: "postgres",
            source: "--database-url/DATABASE_URL",
        },
        // As psql does: without a URL, the libpq variables say where the database is (the
        // library fills in what they leave out, and the password from ~/.pgpass).
        _ if LIBPQ_VARS.iter().any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty())) => {
            BackendUrl {
                url: "postgres://".to_owned(),
                kind: "postgres",
                source: "PGHOST/PGPORT/PGUSER/PGDATABASE",
            }
        }
        _ => {
            return Err(CliError::usage(
                "no database: set DATABASE_URL, pass --database-url postgres://user@host:5432/db, or set PGHOST/PGDATABASE/PGUSER as for psql (or --backend nats://…, redis://…, amqp://…, sqs://…)",
            ))
        }
    };
    let _ = error::URL.set(redact_url(&url.url));
    Ok(url)
}

/// A Postgres engine builder for `url` with what every command shares: the namespace, the
/// connect timeout and the direct `--listen-url` when given (pool settings are the caller's).
pub fn pg_builder(global: &Global, url: String, connect_timeout: Duration) -> PgBackendBuilder {
    let builder = PgBackend::builder(url)
        .namespace(global.namespace.clone())
        .connect_timeout(connect_timeout);
    match global.listen_url.as_deref().filter(|u| !u.is_empty()) {
        Some(listen) => {
            let _ = error::LISTEN_URL.set(redact_url(listen));
            builder.listen_url(listen)
        }
        None => builder,
    }
}

/// The Postgres URL for a command only the Postgres engine runs (`what`, e.g. "migrate").
pub fn postgres_url(global: &Global, what: &str) -> CliResult<String> {
    let url = backend_url(global)?;
    if !url.is_postgres() {
        return Err(needs_postgres(what, &url));
    }
    Ok(url.url)
}

/// `pgtide {what}` cannot run on this backend.
pub fn needs_postgres(what: &str, url: &BackendUrl) -> CliError {
    CliError::usage(format!(
        "`pgtide {what}` is not supported by the {} backend: it needs a postgres:// backend ({} is {}; unset it to use DATABASE_URL, or pass --backend postgres://…)",
        url.kind,
        url.source,
        redact_url(&url.url)
    ))
}

/// The commands (or forms of them) only the Postgres engine runs, named as in the message.
pub fn postgres_only(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::Migrate { .. } => "migrate",
        Command::Grant { .. } => "grant",
        Command::Trim { .. } => "trim",
        Command::Health { .. } => "health",
        Command::Scout(_) => "scout",
        Command::Stream(StreamCommand::List { .. }) => "stream list",
        Command::Stream(StreamCommand::Show { .. }) => "stream show",
        Command::Stream(StreamCommand::Update { .. }) => "stream update",
        Command::Group(GroupCommand::List { .. }) => "group list",
        Command::Group(GroupCommand::Keys { .. }) => "group keys",
        Command::Group(GroupCommand::Reset { .. }) => "group reset",
        Command::Group(GroupCommand::Rate { .. }) => "group rate",
        Command::Group(GroupCommand::Weight { .. }) => "group weight",
        Command::Group(GroupCommand::Limit { .. }) => "group limit",
        Command::Group(GroupCommand::Create { from, .. })
            if matches!(parse_point(from), Ok(Point::At(_))) =>
        {
            "group create --from <time or age>"
        }
        Command::Dead(DeadCommand::List { group: None, .. }) => "dead list without --group",
        Command::Dead(DeadCommand::Show { .. }) => "dead show",
        Command::Dead(DeadCommand::Replay(_)) => "dead replay",
        Command::Dead(DeadCommand::Purge(_)) => "dead purge",
        // Without a registry to list, other backends show one named group.
        Command::Stats(StatsArgs { group: None, .. }) => "stats without STREAM --group GROUP",
        Command::Consume(ConsumeArgs { lease: Some(_), .. }) => "consume --lease",
        _ => return None,
    })
}

/// Connects to a backend other than Postgres (which the caller builds with its own pool
/// settings). A URL whose backend is not compiled in gets the library's error, naming the
/// cargo feature.
pub async fn connect(url: &BackendUrl, namespace: &str) -> CliResult<AnyBackend> {
    match AnyBackend::connect(&url.url, namespace).await {
        Ok(b) => {
            if b.kind() == "memory" {
                eprintln!("note: a memory:// backend lives in this process only: nothing is kept after the command exits");
            }
            Ok(b)
        }
        Err(e) if e.is_retryable() => Err(CliError::runtime(format!(
            "cannot connect to {}: {e}; check {} and that the server is running",
            redact_url(&url.url),
            url.source
        ))),
        Err(e) => Err(e.into()),
    }
}

/// What the commands need beyond the [`Queue`] traits.
pub trait Target: Queue {
    /// The backend's short name, for messages: `postgres`, `nats`, `redis`, `amqp`, `memory`.
    fn kind(&self) -> &'static str;

    /// The Postgres engine, for what only it has (stream settings, listings, handing back what
    /// an interrupted fetch claimed).
    fn postgres(&self) -> Option<&PgBackend>;

    /// The Postgres consumer inside `consumer`, for what only it has (a fetch that stops
    /// waiting on a signal without interrupting a claim).
    fn postgres_consumer<'a>(&self, consumer: &'a Self::Consumer) -> Option<&'a PgConsumer>;

    /// A consumer, with `lease` instead of the stream's lease (Postgres only).
    fn open_consumer(
        &self,
        stream: &str,
        group: &str,
        name: &str,
        lease: Option<Duration>,
    ) -> impl std::future::Future<Output = CliResult<Self::Consumer>> + Send;

    /// The backend as the run-time enum (a cheap clone), for what keeps it beyond one command
    /// (the dashboard's sampler).
    #[cfg(feature = "dashboard")]
    fn to_any(&self) -> AnyBackend;

    /// The Postgres engine for `pgtide {what}`, or the error saying it needs one.
    fn require_postgres(&self, what: &str) -> CliResult<&PgBackend> {
        self.postgres()
            .ok_or_else(|| unsupported(&format!("`pgtide {what}`"), self.kind()))
    }
}

/// `what` (a command or a flag) is not supported by the `kind` backend (exit 2).
pub fn unsupported(what: &str, kind: &str) -> CliError {
    CliError::usage(format!(
        "{what} is not supported by the {kind} backend: it needs a postgres:// backend"
    ))
}

impl Target for PgBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    #[cfg(feature = "dashboard")]
    fn to_any(&self) -> AnyBackend {
        AnyBackend::Postgres(self.clone())
    }

    fn postgres(&self) -> Option<&PgBackend> {
        Some(self)
    }

    fn postgres_consumer<'a>(&self, consumer: &'a PgConsumer) -> Option<&'a PgConsumer> {
        Some(consumer)
    }

    async fn open_consumer(
        &self,
        stream: &str,
        group: &str,
        name: &str,
        lease: Option<Duration>,
    ) -> CliResult<PgConsumer> {
        let consumer = self.consumer(stream, group, name).await?;
        Ok(match lease {
            Some(lease) => consumer.with_lease(lease),
            None => consumer,
        })
    }
}

impl Target for AnyBackend {
    fn kind(&self) -> &'static str {
        AnyBackend::kind(self)
    }

    #[cfg(feature = "dashboard")]
    fn to_any(&self) -> AnyBackend {
        self.clone()
    }

    fn postgres(&self) -> Option<&PgBackend> {
        match self {
            AnyBackend::Postgres(pg) => Some(pg),
            _ => None,
        }
    }

    fn postgres_consumer<'a>(&self, consumer: &'a AnyConsumer) -> Option<&'a PgConsumer> {
        match consumer {
            AnyConsumer::Postgres(c) => Some(c),
            _ => None,
        }
    }

    async fn open_consumer(
        &self,
        stream: &str,
        group: &str,
        name: &str,
        lease: Option<Duration>,
    ) -> CliResult<AnyConsumer> {
        match (self, lease) {
            (AnyBackend::Postgres(pg), _) => Ok(AnyConsumer::Postgres(
                pg.open_consumer(stream, group, name, lease).await?,
            )),
            (_, Some(_)) => Err(CliError::usage(format!(
                "--lease is not supported by the {} backend: its deliveries take the stream's lease",
                self.kind()
            ))),
            (_, None) => Ok(self.consumer(stream, group, name).await?),
        }
    }
}
