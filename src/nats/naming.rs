//! Server-side names of one pgtide stream: JetStream stream names, subjects and durable consumer
//! names, all derived from the namespace and the pgtide names.
//!
//! JetStream forbids `.` in stream and consumer names (and `.` separates subject tokens), while
//! pgtide names may contain it. [`encode`] maps `.` to `_D`. Valid pgtide names are lower case,
//! so an upper-case `D` never follows a literal `_` and the encoding stays injective; upper-case
//! markers (`PGTIDE-`, `-DEAD`, [`MOVER`]) can never collide with an encoded name either. The
//! namespace contains no `-`, so the first `-` after `PGTIDE-` ends it.

/// Durable name of the consumer that moves due delayed messages (never a valid group name).
pub(super) const MOVER: &str = "PGTIDE-MOVER";

/// Encodes a (validated) stream or group name as one NATS name / subject token.
pub(super) fn encode(name: &str) -> String {
    name.replace('.', "_D")
}

/// Every server-side name of one pgtide stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Names {
    /// The JetStream stream holding the messages (ready and delayed).
    pub stream: String,
    /// The JetStream stream holding the dead letters of every group.
    pub dead: String,
    /// Subject of messages ready for delivery; every group's consumer filters on it.
    pub ready: String,
    /// Subject of delayed messages waiting for the mover.
    pub delayed: String,
    /// Wildcard subject of the dead-letter stream.
    pub dead_all: String,
    prefix: String,
}

impl Names {
    pub(super) fn new(namespace: &str, stream: &str) -> Self {
        let enc = encode(stream);
        let prefix = format!("pgtide.{namespace}.{enc}");
        Names {
            stream: format!("PGTIDE-{namespace}-{enc}"),
            dead: format!("PGTIDE-{namespace}-{enc}-DEAD"),
            ready: format!("{prefix}.ready"),
            delayed: format!("{prefix}.delayed"),
            dead_all: format!("{prefix}.dead.*"),
            prefix,
        }
    }

    /// Subject of one group's dead letters.
    pub(super) fn dead_subject(&self, group: &str) -> String {
        format!("{}.dead.{}", self.prefix, encode(group))
    }

    /// Durable consumer name of a group.
    pub(super) fn durable(group: &str) -> String {
        encode(group)
    }

    /// The subject a pull request for `durable` is sent to.
    pub(super) fn next_subject(&self, durable: &str) -> String {
        format!("$JS.API.CONSUMER.MSG.NEXT.{}.{durable}", self.stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_injective_on_valid_names() {
        let names = [
            "a.b",
            "a_b",
            "a_.b",
            "a._b",
            "a__b",
            "a-b",
            "a.d",
            "a_d",
            "hook.sync",
        ];
        let encoded: std::collections::HashSet<_> = names.iter().map(|n| encode(n)).collect();
        assert_eq!(encoded.len(), names.len());
        assert!(encoded.iter().all(|e| !e.contains('.')));
        assert_eq!(encode("hook.sync"), "hook_Dsync");
    }

    #[test]
    fn names() {
        let n = Names::new("shop", "hook.sync");
        assert_eq!(n.stream, "PGTIDE-shop-hook_Dsync");
        assert_eq!(n.dead, "PGTIDE-shop-hook_Dsync-DEAD");
        assert_eq!(n.ready, "pgtide.shop.hook_Dsync.ready");
        assert_eq!(n.dead_subject("a.b"), "pgtide.shop.hook_Dsync.dead.a_Db");
        assert_ne!(
            Names::new("shop", "x-dead").stream,
            Names::new("shop", "x").dead
        );
    }
}
