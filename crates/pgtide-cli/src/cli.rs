//! Command-line arguments. Every global flag mirrors an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pgtide::RateLimit;

use crate::help;
use crate::human::{parse_count, parse_duration, parse_interval, parse_size};

const AFTER_HELP: &str = "\
Examples:
  pgtide migrate
  pgtide stream create orders && pgtide group create orders billing
  echo '{\"id\": 1}' | pgtide publish orders
  pgtide consume orders --group billing --count 10
  pgtide <COMMAND> --help    # the command's own options and an example

Exit codes:
  0  success
  1  runtime or database error (connection refused, permission denied, ...)
  2  usage error or bad input (unknown flag, invalid name, malformed JSON, ...)
  3  not found (stream, group, dead letter, or the namespace is not installed)
  4  health check failed (`pgtide health`)
  5  already exists (`stream create`, `group create` without --if-not-exists)
  A closed stdout (output piped into `head`, ...) ends any command quietly with 0.
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

/// Flags every command accepts, shown apart from each command's own options.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// PostgreSQL URL (postgres://user:password@host:port/database).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Direct PostgreSQL URL (no pooler) for what needs a session: the LISTEN connection that
    /// wakes consumers, and `migrate`. Set it when --database-url goes through a pooler in
    /// transaction mode (with ?pgtide_statements=unnamed); defaults to --database-url.
    #[arg(long, env = "PGTIDE_LISTEN_URL", global = true, hide_env_values = true)]
    pub listen_url: Option<String>,
    /// Namespace: the Postgres schema holding the pgtide installation.
    #[arg(
        long,
        env = "PGTIDE_NAMESPACE",
        global = true,
        default_value = "pgtide"
    )]
    pub namespace: String,
    /// Backend URL: postgres://, nats://, redis://, amqp://, sqs:// or memory://; overrides
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
    #[command(after_help = help::MIGRATE)]
    Migrate {
        /// Print the SQL that installs the namespace from scratch instead of running it
        /// (for a DBA; apply with `psql -v ON_ERROR_STOP=1 -f`).
        #[arg(long)]
        print_sql: bool,
    },
    /// Grant a runtime role exactly what running needs: functions and views, no table. Run as
    /// the namespace owner.
    #[command(after_help = help::GRANT)]
    Grant {
        /// An existing role.
        role: String,
        /// Only what dashboards need: the views and the stats functions (downgrades a runtime
        /// role).
        #[arg(long, conflicts_with = "revoke")]
        read_only: bool,
        /// Take back everything the role holds in the namespace.
        #[arg(long)]
        revoke: bool,
    },
    /// Create, change, list, show and delete streams.
    #[command(subcommand, after_help = help::STREAM)]
    Stream(StreamCommand),
    /// Create, list, delete and reset consumer groups.
    #[command(subcommand, after_help = help::GROUP)]
    Group(GroupCommand),
    /// Publish messages: --data, --file, or stdin with one message per line.
    #[command(after_help = help::PUBLISH)]
    Publish(PublishArgs),
    /// Fetch deliveries of a group, print them as JSON lines, and acknowledge them.
    #[command(after_help = help::CONSUME)]
    Consume(ConsumeArgs),
    /// Depth and lag per stream and group: ready, delayed, in flight, dead, oldest age, rates.
    #[command(after_help = help::STATS)]
    Stats(StatsArgs),
    /// Inspect, replay and purge dead letters.
    #[command(subcommand, after_help = help::DEAD)]
    Dead(DeadCommand),
    /// Remove a stream's oldest messages (with their deliveries and dead letters).
    #[command(after_help = help::TRIM)]
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
    #[command(after_help = help::HEALTH)]
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
    #[command(after_help = help::SCOUT)]
    Scout(ScoutArgs),
    /// Serve a live web dashboard of the namespace: counts, rates, lag, the scout, dead letters
    /// (needs the `dashboard` feature; read-only unless --allow-writes).
    #[command(after_help = help::DASHBOARD)]
    Dashboard(DashboardArgs),
    /// Run the throughput/latency harness against raw PostgreSQL baselines.
    #[command(after_help = help::BENCH)]
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
    #[command(after_help = help::STREAM_CREATE)]
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
    #[command(after_help = help::STREAM_UPDATE)]
    Update {
        /// Stream name.
        name: String,
        #[command(flatten)]
        options: StreamOptions,
    },
    /// List streams with their settings.
    #[command(after_help = help::STREAM_LIST)]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a stream: settings, groups and their depth.
    #[command(after_help = help::STREAM_SHOW)]
    Show {
        /// Stream name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a stream with its groups, messages, deliveries and dead letters.
    #[command(after_help = help::STREAM_DELETE)]
    Delete {
        /// Stream name.
        name: String,
    },
    /// Remove every message, pending delivery and dead letter of a stream; the stream and its
    /// groups stay.
    #[command(after_help = help::STREAM_PURGE)]
    Purge {
        /// Stream name.
        name: String,
    },
}

/// `--rate`: the library's own rule ([`RateLimit`]'s `FromStr`), as a usage error.
fn parse_rate(s: &str) -> Result<RateLimit, String> {
    s.parse::<RateLimit>().map_err(|e| e.to_string())
}

/// `group rate`'s value: a rate, or `off`.
#[derive(Debug, Clone, Copy)]
pub enum RateSetting {
    /// Set this limit.
    Limit(RateLimit),
    /// Remove the limit.
    Off,
}

/// `group limit`'s value: a count, or `off`.
#[derive(Debug, Clone, Copy)]
pub enum LimitSetting {
    /// Set this limit.
    Limit(u32),
    /// Remove the limit.
    Off,
}

/// Digits only (no sign, no spaces), 1 to 2147483647 (what Postgres stores), or `off`.
fn parse_limit_or_off(s: &str) -> Result<LimitSetting, String> {
    if s == "off" {
        return Ok(LimitSetting::Off);
    }
    match s.parse::<u32>() {
        Ok(n) if s.bytes().all(|b| b.is_ascii_digit()) && (1..=2_147_483_647).contains(&n) => {
            Ok(LimitSetting::Limit(n))
        }
        _ => Err(format!(
            "limit {s:?} is invalid: use a whole number from 1 to 2147483647, or `off`"
        )),
    }
}

fn parse_rate_or_off(s: &str) -> Result<RateSetting, String> {
    if s == "off" {
        return Ok(RateSetting::Off);
    }
    parse_rate(s).map(RateSetting::Limit)
}

/// A key's weight, or back to the default.
#[derive(Debug, Clone, Copy)]
pub enum WeightSetting {
    /// This weight.
    Weight(f64),
    /// The default, 1.
    Default,
}

/// The library's key rule (`pgtide::validate_key`).
fn parse_key(s: &str) -> Result<String, String> {
    pgtide::validate_key(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// Plain decimal numbers only (no signs, exponents, `inf` or `NaN`), within the library's
/// bounds (`pgtide::validate_weight`).
fn parse_weight(s: &str) -> Result<WeightSetting, String> {
    if s == "default" {
        return Ok(WeightSetting::Default);
    }
    let plain = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && s.bytes().filter(|&b| b == b'.').count() <= 1
        && s.bytes().any(|b| b.is_ascii_digit());
    let weight: f64 = s.parse().ok().filter(|_| plain).ok_or_else(|| {
        format!("{s:?} is not a weight: use a number such as 3 or 0.5, or `default`")
    })?;
    pgtide::validate_weight(weight).map_err(|e| e.to_string())?;
    Ok(WeightSetting::Weight(weight))
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a consumer group. Every group receives every message.
    #[command(after_help = help::GROUP_CREATE)]
    Create {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// Where the group starts: `new` (messages published from now on), `oldest` (every
        /// retained message), an RFC 3339 time, or an age such as 1h. (`now` and `beginning`
        /// are accepted for `new` and `oldest`.)
        #[arg(long, default_value = "new")]
        from: String,
        /// Succeed without changes if the group exists.
        #[arg(long)]
        if_not_exists: bool,
        /// Per-key order: the messages of one key (`publish --key`) go one at a time, in
        /// publish order, across every consumer. Fixed at creation (Postgres and memory).
        #[arg(long)]
        ordered: bool,
        /// At most this many deliveries of the group leased at once, across every consumer and
        /// process (Postgres and memory).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2_147_483_647))]
        max_in_flight: Option<u32>,
        /// At most this many deliveries of one ordering key (`publish --key`) at once, across
        /// every consumer and process; the key's others wait, other keys go on (Postgres and
        /// memory). Only 1 with --ordered, which already means one per key.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2_147_483_647))]
        max_in_flight_per_key: Option<u32>,
        /// Rate limit of the group, shared by every consumer and process: COUNT/UNIT such as
        /// 100/s, 30/min, 2/h, 1/5s (Postgres and memory).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<RateLimit>,
        /// Most deliveries at once after a quiet spell (the bucket of --rate). Defaults to one
        /// second's worth, at least 1.
        #[arg(long, requires = "rate", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        burst: Option<u32>,
        /// Rate limit of each ordering key (`publish --key`): a key out of tokens waits while
        /// the others go on. Same syntax as --rate.
        #[arg(long, value_parser = parse_rate)]
        key_rate: Option<RateLimit>,
        /// The bucket size of --key-rate. Defaults to one second's worth, at least 1.
        #[arg(long, requires = "key_rate", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        key_burst: Option<u32>,
        /// Weighted fair share: while several keys (tenants) have work, each gets deliveries in
        /// proportion to its weight (`group weight`, 1 by default). Not with --ordered. Fixed
        /// at creation (Postgres and memory).
        #[arg(long, conflicts_with = "ordered")]
        fair: bool,
    },
    /// Set a key's weight in a fair group (`group create --fair`): its share of deliveries
    /// while several keys have work, against 1 for every other key (Postgres).
    #[command(after_help = help::GROUP_WEIGHT)]
    Weight {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// The ordering key (`publish --key`).
        #[arg(value_parser = parse_key)]
        key: String,
        /// A number between 0.01 and 1000, or `default` (1).
        #[arg(value_parser = parse_weight)]
        weight: WeightSetting,
    },
    /// Set or remove a group's rate limit (or, with --per-key, each key's) (Postgres).
    #[command(after_help = help::GROUP_RATE)]
    Rate {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// COUNT/UNIT such as 100/s, 30/min, 2/h, 1/5s; `off` removes the limit.
        #[arg(value_parser = parse_rate_or_off)]
        rate: RateSetting,
        /// Most deliveries at once after a quiet spell. Defaults to one second's worth, at
        /// least 1.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        burst: Option<u32>,
        /// The limit of each ordering key instead of the group's.
        #[arg(long)]
        per_key: bool,
    },
    /// Set or remove a group's concurrency limit (or, with --per-key, each key's) (Postgres).
    #[command(after_help = help::GROUP_LIMIT)]
    Limit {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// At most this many deliveries leased at once (1 to 2147483647); `off` removes the
        /// limit.
        #[arg(value_parser = parse_limit_or_off)]
        limit: LimitSetting,
        /// The limit of each ordering key instead of the group's.
        #[arg(long)]
        per_key: bool,
    },
    /// List groups (of one stream, or of all).
    #[command(after_help = help::GROUP_LIST)]
    List {
        /// Stream name.
        stream: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The ordering keys of an ordered group with pending deliveries, most pending first:
    /// waiting count, head state, resume time of a paused key, holder (Postgres).
    #[command(after_help = help::GROUP_KEYS)]
    Keys {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// Show at most this many keys.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a group with its pending deliveries and dead letters.
    #[command(after_help = help::GROUP_DELETE)]
    Delete {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
    },
    /// Replay a group from a point: `oldest`, `new` (skip the backlog), an RFC 3339 time, or
    /// an age such as 1h.
    #[command(after_help = help::GROUP_RESET)]
    Reset {
        /// Stream name.
        stream: String,
        /// Group name.
        group: String,
        /// The point to replay from: `oldest`, `new`, an RFC 3339 time, or an age such as 1h
        /// (`beginning` and `now` are accepted for `oldest` and `new`).
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
    /// Ordering key of every message published: ordered groups (`group create --ordered`)
    /// deliver one key's messages one at a time, in publish order. 1-256 bytes, no control
    /// characters.
    #[arg(long)]
    pub key: Option<String>,
    /// Messages per transaction when reading lines. Each batch is all or nothing.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// Check the input and print each message that would be published (as a JSON line);
    /// publish nothing.
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
    /// Stop after this many deliveries (1 or more). Default 1, or no limit with --follow.
    #[arg(long, short = 'n', value_parser = parse_count)]
    pub count: Option<u64>,
    /// How long to wait for the next delivery when none is ready, e.g. 5s. Default 0s.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub wait: Duration,
    /// Keep consuming until SIGINT/SIGTERM (or --count).
    #[arg(long, short)]
    pub follow: bool,
    /// Print without acknowledging. Printed deliveries stay leased when the command exits:
    /// they are redelivered after the lease, and the attempt counts toward max_deliver (on
    /// RabbitMQ they come back when the connection closes, the attempt counted too).
    #[arg(long)]
    pub no_ack: bool,
    /// With --no-ack: hand the printed deliveries back when the command exits, visible again
    /// at once, the attempt counted (a nack with no delay: on the last allowed attempt they
    /// become dead letters).
    #[arg(long, requires = "no_ack")]
    pub requeue_on_exit: bool,
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
    /// Refresh every interval (default 2s, more than 0) until interrupted; shows publish/settle
    /// rates.
    #[arg(long, value_parser = parse_interval, num_args = 0..=1, default_missing_value = "2s", value_name = "INTERVAL")]
    pub watch: Option<Duration>,
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead letters.
    #[command(after_help = help::DEAD_LIST)]
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
    #[command(after_help = help::DEAD_SHOW)]
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
    #[command(after_help = help::DEAD_REPLAY)]
    Replay(DeadSelection),
    /// Delete dead letters.
    #[command(after_help = help::DEAD_PURGE)]
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
    /// How often the scout checks whether the hot tables need a VACUUM that autovacuum does not
    /// run (see docs/production.md, Vacuum).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub vacuum_interval: Duration,
    /// Never VACUUM the hot tables, even where autovacuum is off (leave it to a job of yours).
    #[arg(long)]
    pub no_vacuum: bool,
    /// How often the per-group gauges are refreshed (with --metrics-listen).
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub stats_interval: Duration,
}

#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Address to serve on. Loopback by default: the page shows payloads, so put it behind an
    /// authenticating proxy before exposing it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Allow replaying and purging dead letters from the page. The page must send a token:
    /// --token, PGTIDE_DASHBOARD_TOKEN, or a random one printed at start.
    #[arg(long)]
    pub allow_writes: bool,
    /// The token write requests must carry (header `x-pgtide-token`), with --allow-writes.
    #[arg(long, env = "PGTIDE_DASHBOARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How often the dashboard samples stats (the page updates as often); 1s or more.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub interval: Duration,
    /// A group to show, as STREAM/GROUP (repeatable): required with --backend nats://,
    /// redis://, amqp://, whose streams cannot be listed. Postgres shows every group.
    #[arg(long = "group", value_name = "STREAM/GROUP")]
    pub groups: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Short run (about eight minutes; a full run takes about twelve).
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
    /// Run only this case (and what it needs).
    #[arg(long, value_enum)]
    pub only: Option<BenchCase>,
    /// Streams of the scale case, 2 groups each (default 1000, 250 with --quick; at least 200).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub streams: Option<u32>,
    /// How long the held-xmin case holds its snapshot (default 2m, 30s with --quick).
    #[arg(long, value_parser = parse_duration)]
    pub held_xmin: Option<Duration>,
    /// Run only a soak: steady load at half the measured maximum for this long (e.g. 30m),
    /// reporting claim latency and table sizes a minute.
    #[arg(long, value_parser = parse_duration)]
    pub soak: Option<Duration>,
}

/// A case `pgtide bench --only` runs alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchCase {
    /// Many streams: create, maintain, spread publish, idle consumers (needs CREATE DATABASE).
    Scale,
    /// Steady load while another session holds a REPEATABLE READ snapshot.
    HeldXmin,
    /// Claims at a large vs a small backlog after ANALYZE, with generic plans.
    Collapse,
    /// Consume at batch 10 and 100 against the raw DELETE loop, then the worker drain.
    Consume,
    /// The publish rows against raw INSERTs, the wake-up cost, then the latency cases.
    Trigger,
    /// Publish commit → handler start at 500 msg/s, and delayed messages' lateness.
    Latency,
}
