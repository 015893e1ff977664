//! What a backend reports about a group: its depth and its dead letters.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Headers;

/// Depth of one group (or of a stream without groups, with `group: None`).
///
/// Whether the counts are exact depends on the backend ([`super::Capabilities::exact_stats`]).
/// On Postgres they come from counters and the non-ready part of the claim index: reading them
/// never walks the ready backlog.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    /// Stream name.
    pub stream: String,
    /// Group name; `None` for a stream that has no group yet.
    pub group: Option<String>,
    /// Deliveries that can be fetched now.
    pub ready: i64,
    /// Deliveries waiting for their delay or retry backoff.
    pub delayed: i64,
    /// Deliveries leased to a consumer.
    pub in_flight: i64,
    /// Dead letters.
    pub dead: i64,
    /// Age of the oldest ready delivery (its time since publish), if any is ready.
    pub oldest_ready_age: Option<Duration>,
}

/// A dead letter: a message one group gave up on.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Stream name.
    pub stream: String,
    /// Group name.
    pub group: String,
    /// Message id.
    pub id: Uuid,
    /// Attempts made.
    pub attempts: u32,
    /// Why: `max_deliver`, or the reason given to `term`.
    pub reason: String,
    /// The last error reported by a nack, if any.
    pub error: Option<String>,
    /// When it became a dead letter.
    pub dead_at: DateTime<Utc>,
    /// Payload (absent if retention already dropped the message).
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Headers,
}
