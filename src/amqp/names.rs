//! Server-side names of the RabbitMQ topology.
//!
//! Stream, group and namespace names never contain `/`, `~` or `:` (see [`crate::validate_name`]),
//! so those characters separate the parts and no two objects can collide: stream `a.b` with group
//! `c` is `ns.a.b/c`, stream `a` with group `b.c` is `ns.a/b.c`.

/// Routing key of the current message format. Group queues bind with it; a future format can
/// bind a second key next to it and migrate groups one by one.
pub(crate) const ROUTING_KEY: &str = "v1";

/// Levels of the delay topology: one delay pass covers up to `2^DELAY_LEVELS - 1` ms (~74 h).
/// 28 keeps the longest routing key (28 bit words plus the longest queue name) under the
/// 255-byte limit of AMQP short strings.
pub(crate) const DELAY_LEVELS: u32 = 28;

/// Longest delay one pass through the delay topology can take, in milliseconds.
pub(crate) const MAX_DELAY_MS: u64 = (1 << DELAY_LEVELS) - 1;

/// Names of one stream's objects.
#[derive(Debug, Clone)]
pub(crate) struct StreamNames {
    /// Direct exchange every publish goes to; group queues bind to it with [`ROUTING_KEY`].
    pub exchange: String,
    /// Classic queue holding the stream's registry record (config and groups).
    pub registry: String,
    /// TTL-0 queue that turns a delayed publish back into a publish to [`Self::exchange`].
    pub landing: String,
}

impl StreamNames {
    pub(crate) fn new(ns: &str, stream: &str) -> Self {
        let exchange = format!("{ns}.{stream}");
        StreamNames {
            registry: format!("{exchange}~registry"),
            landing: format!("{exchange}~delayed"),
            exchange,
        }
    }
}

/// Names of one group's objects.
#[derive(Debug, Clone)]
pub(crate) struct GroupNames {
    /// The group's quorum queue.
    pub queue: String,
    /// The group's dead-letter exchange (fanout) and dead-letter queue share this name.
    pub dead: String,
}

impl GroupNames {
    pub(crate) fn new(ns: &str, stream: &str, group: &str) -> Self {
        let queue = format!("{ns}.{stream}/{group}");
        GroupNames {
            dead: format!("{queue}~dead"),
            queue,
        }
    }
}

/// Append-only log of the streams created in a namespace (for [`super::AmqpBackend::delete_namespace`]).
pub(crate) fn stream_log(ns: &str) -> String {
    format!("{ns}~streams")
}

/// Exchange (and queue, for `level >= 0`) of one delay level; level -1 is the final
/// "deliver" exchange that routes by destination.
pub(crate) fn delay_level(ns: &str, level: i32) -> String {
    if level < 0 {
        format!("{ns}~delay.deliver")
    } else {
        format!("{ns}~delay.{level:02}")
    }
}

/// The topic word naming a destination queue in delay routing keys (dots would split words).
pub(crate) fn destination_word(queue: &str) -> String {
    queue.replace('.', ":")
}

/// Routing key that carries a message through the delay levels: one word per level, highest
/// first (`1` = wait 2^level ms in that level's queue, `0` = skip it), then the destination.
pub(crate) fn delay_routing_key(delay_ms: u64, destination_queue: &str) -> String {
    let mut key = String::with_capacity(2 * DELAY_LEVELS as usize + destination_queue.len());
    for level in (0..DELAY_LEVELS).rev() {
        key.push(if (delay_ms >> level) & 1 == 1 {
            '1'
        } else {
            '0'
        });
        key.push('.');
    }
    key.push_str(&destination_word(destination_queue));
    key
}

/// Binding pattern of delay level `level` that matches bit value `bit` at that level.
pub(crate) fn delay_binding(level: u32, bit: char) -> String {
    let mut pattern = "*.".repeat((DELAY_LEVELS - 1 - level) as usize);
    pattern.push(bit);
    pattern.push_str(".#");
    pattern
}

/// Binding pattern of the deliver exchange for a destination queue.
pub(crate) fn deliver_binding(destination_queue: &str) -> String {
    format!("#.{}", destination_word(destination_queue))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_keys() {
        let key = delay_routing_key(5, "t.s/g");
        assert!(key.ends_with("0.1.0.1.t:s/g"), "{key}");
        assert_eq!(key.split('.').count(), DELAY_LEVELS as usize + 1);
        assert_eq!(delay_binding(DELAY_LEVELS - 1, '1'), "1.#");
        assert_eq!(delay_binding(DELAY_LEVELS - 3, '0'), "*.*.0.#");
        let longest = GroupNames::new(&"n".repeat(63), &"s".repeat(64), &"g".repeat(64));
        assert!(delay_routing_key(MAX_DELAY_MS, &longest.queue).len() <= 255);
        assert!(longest.dead.len() <= 255);
    }

    #[test]
    fn no_collisions() {
        assert_ne!(
            GroupNames::new("n", "a.b", "c").queue,
            GroupNames::new("n", "a", "b.c").queue
        );
        assert_ne!(
            GroupNames::new("n", "a", "b").dead,
            GroupNames::new("n", "a", "b.dead").queue
        );
    }
}
