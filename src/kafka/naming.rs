//! Kafka-side names of one pgtide stream: its topics and the Kafka consumer group of each pgtide
//! group, all derived from the namespace and the pgtide names.
//!
//! Valid pgtide names are lower case and may contain `.`; the namespace has neither `.` nor `-`.
//! [`encode`] maps `.` to `_D` (injective: an upper-case `D` never follows a literal `_` in a
//! valid name), so `.` only ever separates the parts below, and the upper-case markers
//! (`PGTIDE`, `DELAY`, `META`, `RETRY`, `DEAD`) can never be part of an encoded name. Kafka treats
//! `.` and `_` as the same character in metric names and refuses topics that collide that way;
//! two of pgtide's topics can only collide so if their encoded names do, and they never do.

/// Encodes a (validated) stream or group name as one topic-name part.
pub(super) fn encode(name: &str) -> String {
    name.replace('.', "_D")
}

/// The longest topic name Kafka accepts.
pub(super) const MAX_TOPIC_LEN: usize = 249;

/// Every Kafka-side name of one pgtide stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Names {
    /// The topic of ready messages; every group reads it.
    pub main: String,
    /// The topic of delayed messages (each carries its due time); every group reads it and
    /// holds each record until it is due.
    pub delay: String,
    /// The stream's registry: its config, its groups and its purge marks (one partition).
    pub meta: String,
    prefix: String,
}

impl Names {
    pub(super) fn new(namespace: &str, stream: &str) -> Self {
        let prefix = format!("PGTIDE.{namespace}.{}", encode(stream));
        Names {
            main: prefix.clone(),
            delay: format!("{prefix}.DELAY"),
            meta: format!("{prefix}.META"),
            prefix,
        }
    }

    /// The topic of one group's retries (nacks with their due time).
    pub(super) fn retry(&self, group: &str) -> String {
        format!("{}.RETRY.{}", self.prefix, encode(group))
    }

    /// The topic of one group's dead letters.
    pub(super) fn dead(&self, group: &str) -> String {
        format!("{}.DEAD.{}", self.prefix, encode(group))
    }

    /// The Kafka consumer group of a pgtide group.
    pub(super) fn group_id(&self, group: &str) -> String {
        format!("{}.GROUP.{}", self.prefix, encode(group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_do_not_collide() {
        let a = Names::new("shop", "hook.sync");
        let b = Names::new("shop", "hook_sync");
        assert_eq!(a.main, "PGTIDE.shop.hook_Dsync");
        assert_ne!(a.main, b.main);
        assert_eq!(a.retry("a.b"), "PGTIDE.shop.hook_Dsync.RETRY.a_Db");
        assert_eq!(a.dead("g"), "PGTIDE.shop.hook_Dsync.DEAD.g");
        // Kafka's '.'/'_' metric collision: distinct encoded names stay distinct.
        let fold = |s: &str| s.replace('.', "_");
        assert_ne!(fold(&a.main), fold(&b.main));
        assert_ne!(
            fold(&Names::new("shop", "x").delay),
            fold(&Names::new("shop", "x.delay").main)
        );
    }
}
