//! Queue names of one pgtide stream on SQS, derived from the namespace and the pgtide names.
//!
//! SQS queue names are 1-80 of `A-Za-z0-9`, `-`, `_`; pgtide names also contain `.` and a
//! namespace, stream and group together can exceed 80 bytes. [`encode`] maps `_` to `__` and
//! `.` to `_d`, so `_s_` (never produced by it: an encoded `_` is always followed by `_` or `d`)
//! can separate a stream from a group, and the encoding of the pair stays injective. The
//! namespace holds no `-`, so the first `-` ends it. A name that would pass 80 bytes keeps as
//! much of its readable part as fits and ends in 12 hex digits of a 64-bit FNV-1a hash of the
//! full name.

/// Longest SQS queue name.
const MAX_QUEUE_NAME: usize = 80;

/// Encodes a (validated) stream or group name for a queue name.
fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

/// 64-bit FNV-1a: small, stable across Rust releases (unlike `DefaultHasher`), and only used
/// to keep long names apart, not as a defence against chosen collisions.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `{namespace}-{kind}-{rest}`, shortened with a hash when longer than SQS allows.
fn queue_name(namespace: &str, kind: char, rest: &str) -> String {
    let full = format!("{namespace}-{kind}-{rest}");
    if full.len() <= MAX_QUEUE_NAME {
        return full;
    }
    let hash = format!("{:012x}", fnv1a(&full) & 0xffff_ffff_ffff);
    let head = format!("{namespace}-{kind}-");
    // `rest` is ASCII (validated names), so any byte index is a char boundary.
    let room = MAX_QUEUE_NAME.saturating_sub(head.len() + hash.len() + 1);
    format!("{head}{}-{hash}", &rest[..room.min(rest.len())])
}

/// Every queue name of one pgtide stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Names {
    namespace: String,
    stream: String,
    /// The stream's registry queue: always empty, its tags hold the stream's config and groups.
    pub registry: String,
}

impl Names {
    pub(super) fn new(namespace: &str, stream: &str) -> Self {
        let stream = encode(stream);
        Names {
            registry: queue_name(namespace, 's', &stream),
            namespace: namespace.to_owned(),
            stream,
        }
    }

    /// The queue of one group: every message of the stream is sent to it.
    pub(super) fn group(&self, group: &str) -> String {
        queue_name(
            &self.namespace,
            'g',
            &format!("{}_s_{}", self.stream, encode(group)),
        )
    }

    /// The dead-letter queue of one group (the group queue's redrive target).
    pub(super) fn dead(&self, group: &str) -> String {
        queue_name(
            &self.namespace,
            'd',
            &format!("{}_s_{}", self.stream, encode(group)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_injective_and_short() {
        let pairs = [
            ("a.b", "c"),
            ("a_b", "c"),
            ("a", "b_s_c"),
            ("a_s", "c"),
            ("a_d", "c"),
            ("a.d", "c"),
            ("a-b", "c"),
            ("a", "b-c"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (s, g) in pairs {
            let n = Names::new("shop", s);
            for q in [n.group(g), n.dead(g), n.registry.clone()] {
                assert!(q.len() <= MAX_QUEUE_NAME, "{q}");
                assert!(
                    q.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                    "{q}"
                );
                seen.insert(q);
            }
        }
        // Registry names repeat for the same stream; group and dead names never collide.
        assert!(seen.len() >= 2 * pairs.len());
        assert_eq!(
            Names::new("shop", "hook.sync").group("a.b"),
            "shop-g-hook_dsync_s_a_db"
        );
        let ns = "n".repeat(63);
        let long = "x".repeat(64);
        let a = Names::new(&ns, &long);
        let b = Names::new(&ns, &format!("{}y", "x".repeat(63)));
        assert_eq!(a.group(&long).len(), MAX_QUEUE_NAME);
        assert_ne!(a.group(&long), b.group(&long));
        assert_ne!(a.group("g1"), a.group("g2"));
        assert_ne!(a.group("g1"), a.dead("g1"));
    }
}
