//! Key names. Every key starts with the namespace; a stream's keys share the hash tag `{stream}`
//! so that, on a cluster, each script touches one hash slot. Stream and group names cannot
//! contain `:`, `{` or `}` (see [`crate::names`]), so names never collide.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `ns:streams` | hash | stream → config (JSON): the registry, for listing |
//! | `ns:{s}:meta` | hash | the stream's config, read by the scripts |
//! | `ns:{s}:groups` | hash | group → creation info (JSON) |
//! | `ns:{s}:log` | stream | published messages; one Redis consumer group per pgtide group |
//! | `ns:{s}:delayed` | zset | delayed publishes (packed), scored by due time |
//! | `ns:{s}:wake` | stream | one-entry stream poked when a due time is added |
//! | `ns:{s}:dedupe:KEY` | string | message id, expiring after the dedupe window |
//! | `ns:{s}:g:G:retry` | stream | retry copies for group G only (deleted when settled) |
//! | `ns:{s}:g:G:later` | zset | retry copies waiting for their backoff (packed) |
//! | `ns:{s}:g:G:leases` | zset | `l`/`r` + entry id → lease expiry (ms) |
//! | `ns:{s}:g:G:dead` | stream | dead letters of group G |
//!
//! `lua/purge.lua` builds the per-group names from [`StreamKeys::group_prefix`]; keep the
//! suffixes in sync.

/// Keys of one stream.
#[derive(Debug, Clone)]
pub(super) struct StreamKeys {
    pub registry: String,
    pub meta: String,
    pub groups: String,
    pub log: String,
    pub delayed: String,
    pub wake: String,
    prefix: String,
}

/// Keys of one group of one stream.
#[derive(Debug, Clone)]
pub(super) struct GroupKeys {
    pub retry: String,
    pub later: String,
    pub leases: String,
    pub dead: String,
}

impl StreamKeys {
    pub fn new(namespace: &str, stream: &str) -> Self {
        let prefix = format!("{namespace}:{{{stream}}}:");
        StreamKeys {
            registry: format!("{namespace}:streams"),
            meta: format!("{prefix}meta"),
            groups: format!("{prefix}groups"),
            log: format!("{prefix}log"),
            delayed: format!("{prefix}delayed"),
            wake: format!("{prefix}wake"),
            prefix,
        }
    }

    /// The dedupe key for `key` (any bytes; the hash tag comes first, so it stays in the slot).
    pub fn dedupe(&self, key: &str) -> String {
        format!("{}dedupe:{key}", self.prefix)
    }

    /// A SCAN pattern matching every dedupe key of the stream (names hold no glob characters).
    pub fn dedupe_pattern(&self) -> String {
        format!("{}dedupe:*", self.prefix)
    }

    /// Prefix of the per-group keys: the group name and `:suffix` follow.
    pub fn group_prefix(&self) -> String {
        format!("{}g:", self.prefix)
    }

    pub fn group(&self, group: &str) -> GroupKeys {
        let p = format!("{}{group}:", self.group_prefix());
        GroupKeys {
            retry: format!("{p}retry"),
            later: format!("{p}later"),
            leases: format!("{p}leases"),
            dead: format!("{p}dead"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_stream_hash_tag() {
        let k = StreamKeys::new("shop", "orders.eu");
        let g = k.group("billing");
        assert_eq!(k.log, "shop:{orders.eu}:log");
        assert_eq!(g.retry, "shop:{orders.eu}:g:billing:retry");
        assert_eq!(k.dedupe("a{b}"), "shop:{orders.eu}:dedupe:a{b}");
        for key in [
            &k.meta, &k.groups, &k.delayed, &k.wake, &g.later, &g.leases, &g.dead,
        ] {
            assert!(key.starts_with("shop:{orders.eu}:"), "{key}");
        }
    }
}
