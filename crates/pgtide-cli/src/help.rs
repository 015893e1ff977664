//! The examples `--help` shows under each command (one or two lines a user can paste).

pub const MIGRATE: &str = "\
Examples:
  pgtide migrate
  pgtide migrate --print-sql > install.sql   # for a DBA: psql -v ON_ERROR_STOP=1 -f install.sql";

pub const GRANT: &str = "\
Examples:
  pgtide grant app_runtime               # publish, consume, settle, stats, scout
  pgtide grant grafana --read-only       # views and stats only
  pgtide grant old_app --revoke";

pub const STREAM: &str = "\
Examples:
  pgtide stream create orders --lease 30s --max-deliver 5
  pgtide stream list";

pub const STREAM_CREATE: &str = "\
Example:
  pgtide stream create orders --lease 30s --max-deliver 5 --backoff 1s,5s,30s --if-not-exists";

pub const STREAM_UPDATE: &str = "\
Example:
  pgtide stream update orders --retention 14d";

pub const STREAM_LIST: &str = "\
Example:
  pgtide stream list --json";

pub const STREAM_SHOW: &str = "\
Example:
  pgtide stream show orders";

pub const STREAM_DELETE: &str = "\
Example:
  pgtide stream delete orders";

pub const STREAM_PURGE: &str = "\
Example:
  pgtide stream purge orders";

pub const GROUP: &str = "\
Examples:
  pgtide group create orders billing --from oldest
  pgtide group list orders";

pub const GROUP_CREATE: &str = "\
Examples:
  pgtide group create orders billing               # new messages only
  pgtide group create orders audit --from oldest   # every retained message too
  pgtide group create orders ship --ordered        # one key at a time, in publish order
  pgtide group create orders mail --rate 100/s     # at most 100 deliveries a second, all consumers
  pgtide group create orders api --key-rate 2/s    # each key at most 2 a second, keys independent
  pgtide group create orders jobs --fair           # keys (tenants) share deliveries by weight";

pub const GROUP_WEIGHT: &str = "\
Examples:
  pgtide group weight orders jobs tenant-a 3         # tenant-a gets 3 shares to others' 1
  pgtide group weight orders jobs tenant-a default   # back to 1";

pub const GROUP_RATE: &str = "\
Examples:
  pgtide group rate orders mail 50/s --burst 10   # change the group's limit
  pgtide group rate orders api 1/s --per-key      # each key's limit
  pgtide group rate orders mail off               # remove it";

pub const GROUP_LIMIT: &str = "\
Examples:
  pgtide group limit orders mail 5                # at most 5 leased at once
  pgtide group limit orders api 2 --per-key       # at most 2 of each key at once
  pgtide group limit orders mail off              # remove it";

pub const GROUP_LIST: &str = "\
Example:
  pgtide group list orders";

pub const GROUP_KEYS: &str = "\
Example:
  pgtide group keys orders ship --limit 10   # top keys by pending count";

pub const GROUP_DELETE: &str = "\
Example:
  pgtide group delete orders billing";

pub const GROUP_RESET: &str = "\
Examples:
  pgtide group reset orders billing --from 1h   # replay the last hour
  pgtide group reset orders billing --from new  # skip the backlog";

pub const PUBLISH: &str = "\
Examples:
  pgtide publish orders --data '{\"id\": 1}' --header source=cli
  pgtide publish orders --data '{\"id\": 2}' --key customer-42   # per-key order
  pgtide publish orders < orders.jsonl            # one message per line
  pgtide publish orders --file orders.jsonl --lines --dry-run";

pub const CONSUME: &str = "\
Examples:
  pgtide consume orders --group billing --count 10
  pgtide consume orders --group billing --follow --no-ack
  pgtide consume orders --group billing --no-ack --requeue-on-exit  # peek, hand back now";

pub const STATS: &str = "\
Examples:
  pgtide stats
  pgtide stats orders --group billing --watch 5s";

pub const DEAD: &str = "\
Examples:
  pgtide dead list orders --group billing
  pgtide dead replay orders --group billing --all";

pub const DEAD_LIST: &str = "\
Example:
  pgtide dead list orders --group billing --json";

pub const DEAD_SHOW: &str = "\
Example:
  pgtide dead show orders --id 0190f1c2-7a1b-7cde-8f00-1234567890ab";

pub const DEAD_REPLAY: &str = "\
Example:
  pgtide dead replay orders --group billing --all";

pub const DEAD_PURGE: &str = "\
Example:
  pgtide dead purge orders --id 0190f1c2-7a1b-7cde-8f00-1234567890ab";

pub const TRIM: &str = "\
Examples:
  pgtide trim orders --max-age 7d
  pgtide trim orders --max-len 100000";

pub const HEALTH: &str = "\
Example:
  pgtide health --max-lag 30s --json";

pub const SCOUT: &str = "\
Example:
  pgtide scout --metrics-listen 127.0.0.1:9464";

pub const DASHBOARD: &str = "\
Examples:
  pgtide dashboard                                   # read-only, http://127.0.0.1:8080
  pgtide dashboard --listen 127.0.0.1:0 --allow-writes   # prints the address and a token
  pgtide dashboard --backend nats://127.0.0.1:4222 --group orders/billing   # a broker's groups";

pub const BENCH: &str = "\
Examples:
  pgtide bench --quick
  pgtide bench --backend nats://127.0.0.1:4222   # compare one backend with Postgres";
