//! Command-line arguments. Every global flag mirrors an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::human::{parse_duration, parse_size};

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  runtime or database error (connection refused, permission denied, ...)
  2  usage error or bad input (unknown flag, invalid name, malformed JSON, ...)
  3  not found (stream, group, dead letter, or the namespace is not installed)
  4  health check failed (`pgtide health`)
  5  already exists (`stream create`, `group create` without --if-not-exists)
  130  interrupted (SIGINT/SIGTERM) before a one-shot command finished; long-running
       commands (`scout`, `consume --follow`, `stats --watch`) exit 0 on the first signal";

/// pgtide: durable streams with consumer groups in PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "pgtide", version, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command accepts.
#[derive(Debug, Args)]
pub struct Global {
    /// PostgreSQL URL (postgres://user:password@host:port/database).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Namespace: the Postgres schema holding the pgtide installation.
    #[arg(
        long,
        env = "PGTIDE_NAMESPACE",
        global = true,
        default_value = "pgtide"
    )]
    pub namespace: String,
    /// Backend URL: postgres://, nats://, redis://, amqp:// or memory://; overrides
    /// --database-url. On backends other than Postgres: stream create|delete|purge, group
    /// create|delete, publish, consume, stats STREAM --group G and dead list --group G.
    #[arg(long, env = "PGTIDE_BACKEND", global = true, hide_env_values = true)]
    pub backend: Option<String>,
    /// Log format on stderr. Filter with PGTIDE_LOG or RUST_LOG (e.g. `debug`).
    #[arg(long, env = "PGTIDE_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464 (needs the `metrics` feature).
    #[arg(long, env = "PGTIDE_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install or upgrade the namespace (needs the right to create a schema and tables).
    Migrate {
        /// Print the SQL that installs the namespace from scratch instead of running it
        /// (for a DBA; apply with `psql -v ON_ERROR_STOP=1 -f`).
        #[arg(long)]
        print_sql: bool,
    },
    /// Grant a runtime role exactly what running needs (no DDL). Run as the namespace owner.
    Grant {
        /// An existing role.
        role: String,
    },
    /// Create, change, list, show and delete streams.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Create, list, delete and reset consumer groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Publish messages: --data, --file, or stdin with one message per line.
    Publish(PublishArgs),
    /// Fetch deliveries of a group, print them as JSON lines, and acknowledge them.
    Consume(ConsumeArgs),
    /// Depth and lag per stream and group: ready, delayed, in flight, dead, oldest age, rates.
    Stats(StatsArgs),
    /// Inspect, replay and purge dead letters.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Remove a stream's oldest messages (with their deliveries and dead letters).
    Trim {
        /// Stream name.
        stream: String,
        /// Remove messages older than this (e.g. 7d, 12h).
        #[arg(long, value_parser = parse_duration, required_unless_present = "max_len")]
        max_age: Option<Duration>,
        /// Keep only the newest N messages.
        #[arg(long)]
        max_len: Option<u64>,
    },
    /// Check database, migrations, scout and lag; exit 0 when healthy, 4 when not.
    Health {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Fail when a group's oldest ready delivery is older than this (e.g. 30s).
        #[arg(long, value_parser = parse_duration)]
        max_lag: Option<Duration>,
    },
    /// Run the scout (wake-ups for delayed work and expired leases, partitions, retention)
    /// until SIGINT or SIGTERM.
    Scout(ScoutArgs),
    /// Run the throughput/latency harness against raw PostgreSQL baselines.
    Bench(BenchArgs),
}

/// Stream settings; unset ones keep the default (create) or the current value (update).
#[derive(Debug, Args, Clone)]
pub struct StreamOptions {
    /// Lease (visibility timeout) of a delivery, e.g. 30s. Default 30s.
    #[arg(long, value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Deliveries of a message to a group before it becomes a dead letter. Default 5.
    #[arg(long)]
    pub max_deliver: Option<u32>,
    /// Retry delays after a nack, comma-separated, e.g. 1s,5s,30s. Default 1s,5s,15s,30s,60s.
    #[arg(long, value_delimiter = ',', value_parser = parse_duration)]
    pub backoff: Option<Vec<Duration>>,
    /// Relative jitter of the retry delays, 0 to 1. Default 0.1.
    #[arg(long)]
    pub backoff_jitter: Option<f32>,
    /// How long messages are kept, e.g. 7d. Default 7d.
    #[arg(long, value_parser = parse_duration)]
    pub retention: Option<Duration>,
    /// Width of one storage partition, e.g. 1d (at least 1m). Default 1d.
    #[arg(long, value_parser = parse_duration)]
    pub partition_interval: Option<Duration>,
    /// How long a dedupe key is remembered, e.g. 1h; 0s turns dedupe off. Default 1h.
    #[arg(long, value_parser = parse_duration)]
    pub dedupe_window: Option<Duration>,
    /// Largest payload, in bytes or with a unit (e.g. 256KiB, 1MiB). Default 1MiB.
    #[arg(long, value_parser = parse_size)]
    pub max_payload: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum StreamCommand {
    /// Create a stream.
    Create {
        /// Stream name: 1-64 of a-z, 0-9, '.', '_', '-'.
        name: String,
        #[command(flatten)]
        options: StreamOptions,
        /// Succeed without changes if the stream exists.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// Change settings of an existing stream.
    Update {
        /// Stream name.
        name: String,
        #[command(flatten)]
        options: StreamOptions,
    },
    /// List streams with their settings.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a stream: settings, groups and their depth.
    Show {
        /// Stream name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a stream with its groups, messages, deliveries and dead letters.
    Delete {
        /// Stream name.
        name: String,
    },
    /// Remove every message, pending delivery and dead letter of a stream; the stream and its
    /// groups stay.
    Purge {
        /// Stream name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a consumer group. Every group receives every message.
    Create {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// Where the group starts: `now` (new messages only), `beginning` (every retained
        /// message), an RFC 3339 time, or an age such as 1h.
        #[arg(long, default_value = "now")]
        from: String,
        /// Succeed without changes if the group exists.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// List groups (of one stream, or of all).
    List {
        /// Stream name.
        stream: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a group with its pending deliveries and dead letters.
    Delete {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
    },
    /// Replay a group from a point: `beginning`, `now` (skip the backlog), an RFC 3339 time, or
    /// an age such as 1h.
    Reset {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// The point to replay from.
        #[arg(long)]
        from: String,
    },
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Stream name.
    pub stream: String,
    /// One message with this payload (JSON unless --raw).
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// One message with this file's content as payload (one per line with --lines).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// With --file: one message per line (the whole file is checked before anything is published).
    #[arg(long, requires = "file")]
    pub lines: bool,
    /// Payloads are opaque bytes/text, not JSON.
    #[arg(long)]
    pub raw: bool,
    /// A header `key=value`; repeat for more.
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
    /// Deliver no earlier than this after publishing, e.g. 5s.
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// Dedupe key (one message only): a repeat inside the stream's window publishes nothing.
    #[arg(long)]
    pub dedupe_key: Option<String>,
    /// Messages per transaction when reading lines. Each batch is all or nothing.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// Check the input and publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not print message ids.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Stream name.
    pub stream: String,
    /// Group to consume from.
    #[arg(long, short)]
    pub group: String,
    /// Consumer name (unique per process). Default: cli-<pid>-<random>.
    #[arg(long)]
    pub consumer: Option<String>,
    /// Stop after this many deliveries. Default 1, or no limit with --follow.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// How long to wait for the next delivery when none is ready, e.g. 5s. Default 0s.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub wait: Duration,
    /// Keep consuming until SIGINT/SIGTERM (or --count).
    #[arg(long, short)]
    pub follow: bool,
    /// Print without acknowledging; the deliveries are released (visible again at once, the
    /// attempt not counted) when the command exits.
    #[arg(long)]
    pub no_ack: bool,
    /// Negatively acknowledge instead: retried after the stream's backoff (or --nack-delay), and
    /// dead-lettered once max_deliver is reached. For poking at retry and dead-letter handling.
    #[arg(long, conflicts_with = "no_ack")]
    pub nack: bool,
    /// With --nack: retry after this delay instead of the stream's backoff.
    #[arg(long, value_parser = parse_duration, requires = "nack")]
    pub nack_delay: Option<Duration>,
    /// Most deliveries claimed per fetch.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    /// Lease of the fetched deliveries (default: the stream's).
    #[arg(long, value_parser = parse_duration)]
    pub lease: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this stream.
    pub stream: Option<String>,
    /// Only this group of the stream (required on backends other than Postgres).
    #[arg(long, short, requires = "stream")]
    pub group: Option<String>,
    /// Print JSON (one object per line with --watch).
    #[arg(long)]
    pub json: bool,
    /// Refresh every interval (default 2s) until interrupted; shows publish/settle rates.
    #[arg(long, value_parser = parse_duration, num_args = 0..=1, default_missing_value = "2s", value_name = "INTERVAL")]
    pub watch: Option<Duration>,
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead letters.
    List {
        /// Stream name.
        stream: String,
        /// Only this group.
        #[arg(long, short)]
        group: Option<String>,
        /// At most this many per group.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload, as JSON.
    Show {
        /// Stream name.
        stream: String,
        /// Only this group.
        #[arg(long, short)]
        group: Option<String>,
        /// Message id.
        #[arg(long)]
        id: uuid::Uuid,
    },
    /// Put dead letters back into their group with a fresh attempt count.
    Replay(DeadSelection),
    /// Delete dead letters.
    Purge(DeadSelection),
}

#[derive(Debug, Args)]
pub struct DeadSelection {
    /// Stream name.
    pub stream: String,
    /// Only this group (default: every group of the stream).
    #[arg(long, short)]
    pub group: Option<String>,
    /// Message id; repeat for more.
    #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
    pub ids: Vec<uuid::Uuid>,
    /// Every dead letter (of the group, or of the stream).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct ScoutArgs {
    /// TTL of the scout lease; another process takes over at most this long after a crash.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub ttl: Duration,
    /// How often maintenance runs (partitions, retention, dedupe window).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub maintenance_interval: Duration,
    /// How often the per-group gauges are refreshed (with --metrics-listen).
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub stats_interval: Duration,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Short run (about a minute).
    #[arg(long)]
    pub quick: bool,
    /// Measured window of each case (default 5s, 2s with --quick).
    #[arg(long, value_parser = parse_duration)]
    pub phase: Option<Duration>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Exit 4 when a case misses its target.
    #[arg(long)]
    pub check: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}
