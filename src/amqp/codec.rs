//! How messages look on the wire: the id in `message_id` (UUID v7), JSON flagged by
//! `content_type`, user headers as string headers, and pgtide's own bookkeeping in `pgtide-*`
//! headers. Broker-added headers (`x-delivery-count`, `x-death`, ...) are read, never shown.

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use uuid::Uuid;

use crate::queue::Headers;

/// Attempts made before this copy of the message was published (retries republish a copy).
pub(crate) const H_ATTEMPTS: &str = "pgtide-attempts";
/// The error of the last failed attempt.
pub(crate) const H_ERROR: &str = "pgtide-error";
/// Dead letters: why (`max_deliver` or the term reason).
pub(crate) const H_REASON: &str = "pgtide-reason";
/// Dead letters: attempts made.
pub(crate) const H_ATTEMPTS_MADE: &str = "pgtide-attempts-made";
/// Dead letters: when, in Unix milliseconds.
pub(crate) const H_DEAD_AT: &str = "pgtide-dead-at";
/// Delays longer than one pass through the delay levels: due time in Unix milliseconds.
pub(crate) const H_NOT_BEFORE: &str = "pgtide-not-before";

const JSON: &str = "application/json";
const BINARY: &str = "application/octet-stream";

fn reserved(key: &str) -> bool {
    key.starts_with("pgtide-")
        || key == "x-delivery-count"
        || key == "x-death"
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
}

/// Properties of a message (or of a copy of one): persistent, with id, type and headers.
pub(crate) fn properties(
    id: Uuid,
    is_json: bool,
    headers: &Headers,
    extra: Vec<(&'static str, AMQPValue)>,
) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        if !reserved(k) {
            table.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
        }
    }
    for (k, v) in extra {
        table.insert(k.into(), v);
    }
    BasicProperties::default()
        .with_message_id(id.to_string().into())
        .with_content_type(if is_json { JSON } else { BINARY }.into())
        .with_delivery_mode(2)
        .with_timestamp(Utc::now().timestamp().max(0) as u64)
        .with_headers(table)
}

/// A string header value.
pub(crate) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// An integer header value.
pub(crate) fn int(n: i64) -> AMQPValue {
    AMQPValue::LongLongInt(n)
}

/// What pgtide reads from a received message.
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    pub id: Uuid,
    pub is_json: bool,
    pub headers: Headers,
    /// This delivery's attempt number, from 1.
    pub attempt: u32,
    pub last_error: Option<String>,
    pub not_before_ms: Option<i64>,
    pub reason: Option<String>,
    pub attempts_made: Option<u32>,
    pub dead_at: Option<DateTime<Utc>>,
}

/// Decodes a received message. The attempt is the attempts carried by the copy plus the
/// broker's count of returns of this copy (quorum queues count them in `x-delivery-count`;
/// elsewhere `redelivered` says at least one) plus this one.
pub(crate) fn decode(props: &BasicProperties, redelivered: bool) -> Incoming {
    let empty = FieldTable::default();
    let table = props.headers().as_ref().unwrap_or(&empty);
    let get = |k: &str| table.inner().get(&ShortString::from(k));
    let prior = get(H_ATTEMPTS).and_then(as_int).unwrap_or(0).max(0) as u32;
    let returned = match get("x-delivery-count").and_then(as_int) {
        Some(n) => n.max(0) as u32,
        None => u32::from(redelivered),
    };
    let headers = table
        .inner()
        .iter()
        .filter(|(k, _)| !reserved(k.as_str()))
        .map(|(k, v)| (k.as_str().to_owned(), as_text(v)))
        .collect();
    let id = props
        .message_id()
        .as_ref()
        .and_then(|m| Uuid::parse_str(m.as_str()).ok());
    let id = id.unwrap_or_else(|| {
        // Not published by pgtide: give it an id so it can be settled; it is not stable.
        tracing::warn!("pgtide amqp: message without a UUID message_id; assigning one");
        Uuid::now_v7()
    });
    Incoming {
        id,
        is_json: props.content_type().as_ref().map(|c| c.as_str()) == Some(JSON),
        headers,
        attempt: prior.saturating_add(returned).saturating_add(1),
        last_error: get(H_ERROR).map(as_text),
        not_before_ms: get(H_NOT_BEFORE).and_then(as_int),
        reason: get(H_REASON).map(as_text).or_else(|| death_reason(table)),
        attempts_made: get(H_ATTEMPTS_MADE)
            .and_then(as_int)
            .map(|n| n.max(0) as u32),
        dead_at: get(H_DEAD_AT)
            .and_then(as_int)
            .and_then(DateTime::from_timestamp_millis),
    }
}

/// The reason the broker gave when it dead-lettered a message itself (`rejected`, `expired`).
fn death_reason(table: &FieldTable) -> Option<String> {
    table
        .inner()
        .get(&ShortString::from("x-first-death-reason"))
        .map(as_text)
}

fn as_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().parse().ok(),
        _ => None,
    }
}

fn as_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        other => match as_int(other) {
            Some(n) => n.to_string(),
            None => format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = Uuid::now_v7();
        let mut h = Headers::new();
        h.insert("k".into(), "v".into());
        h.insert("pgtide-attempts".into(), "99".into());
        let p = properties(
            id,
            true,
            &h,
            vec![(H_ATTEMPTS, int(2)), (H_ERROR, text("e"))],
        );
        let m = decode(&p, false);
        assert_eq!(m.id, id);
        assert!(m.is_json);
        assert_eq!(m.attempt, 3);
        assert_eq!(m.last_error.as_deref(), Some("e"));
        assert_eq!(m.headers.len(), 1);
        assert_eq!(m.headers["k"], "v");
        let mut t = p.headers().clone().unwrap_or_default();
        t.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        assert_eq!(decode(&p.clone().with_headers(t), true).attempt, 5);
    }
}
