//! How pgtide messages, dead letters and stream configs are carried in JetStream.
//!
//! A message is stored with its payload as is and these headers:
//!
//! | header | value |
//! |---|---|
//! | `Pgtide-Id` | the message id (UUID v7), stable across redeliveries and groups |
//! | `Pgtide-Json` | `true` when the payload was published as JSON |
//! | `Pgtide-Headers` | the message's own headers as one JSON object (absent when empty) |
//! | `Pgtide-Deliver-At` | RFC 3339 due time of a delayed message (on the delayed subject only) |
//! | `Nats-Msg-Id` | `k:<dedupe key>` for JetStream's duplicate window, or `m:<id>` on a moved delayed message |
//!
//! User headers travel as JSON rather than as NATS headers because their names are free-form
//! (NATS header names are restricted) and must never reach NATS's own `Nats-*` headers.
//! A dead letter is a copy of the message plus `Pgtide-Reason`, `Pgtide-Error`,
//! `Pgtide-Attempts` and `Pgtide-Dead-At`. Free text in header values is escaped (`\`, CR and
//! LF as `\\`, `\r`, `\n`) because header values are single lines.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Backoff, StreamConfig};
use crate::queue::{uuid_time, DeadLetter, Delivery, Headers, Message, OutgoingMessage};

pub(super) const ID: &str = "Pgtide-Id";
pub(super) const JSON: &str = "Pgtide-Json";
pub(super) const HEADERS: &str = "Pgtide-Headers";
pub(super) const DELIVER_AT: &str = "Pgtide-Deliver-At";
pub(super) const REASON: &str = "Pgtide-Reason";
pub(super) const ERROR: &str = "Pgtide-Error";
pub(super) const ATTEMPTS: &str = "Pgtide-Attempts";
pub(super) const DEAD_AT: &str = "Pgtide-Dead-At";
pub(super) const MSG_ID: &str = "Nats-Msg-Id";

/// Escapes free text for a single-line header value.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape`].
pub(super) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn get<'a>(h: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Headers of a newly published message.
pub(super) fn outgoing(
    msg: &OutgoingMessage,
    id: Uuid,
    dedupe: bool,
    deliver_at: Option<DateTime<Utc>>,
) -> crate::Result<HeaderMap> {
    let mut h = HeaderMap::new();
    h.insert(ID, id.to_string());
    if msg.is_json {
        h.insert(JSON, "true");
    }
    if !msg.headers.is_empty() {
        h.insert(HEADERS, serde_json::to_string(&msg.headers)?);
    }
    if let (true, Some(key)) = (dedupe, &msg.dedupe_key) {
        h.insert(MSG_ID, format!("k:{}", escape(key)));
    }
    if let Some(at) = deliver_at {
        h.insert(DELIVER_AT, rfc3339(at));
    }
    Ok(h)
}

/// The headers of a due delayed message as it is moved to the ready subject.
pub(super) fn moved(h: Option<&HeaderMap>, id: Option<Uuid>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [ID, JSON, HEADERS] {
        if let Some(v) = h.and_then(|h| h.get(name)) {
            out.insert(name, v.clone());
        }
    }
    if let Some(id) = id {
        out.insert(MSG_ID, format!("m:{id}"));
    }
    out
}

/// When a delayed message is due (`None` if it carries no valid due time: due now).
pub(super) fn deliver_at(h: Option<&HeaderMap>) -> Option<DateTime<Utc>> {
    get(h, DELIVER_AT).and_then(parse_time)
}

/// Whether the message carries a dedupe key.
pub(super) fn has_dedupe_key(h: Option<&HeaderMap>) -> bool {
    get(h, MSG_ID).is_some_and(|v| v.starts_with("k:"))
}

/// The pgtide id of a stored message.
pub(super) fn message_id(h: Option<&HeaderMap>) -> Option<Uuid> {
    get(h, ID).and_then(|v| v.parse().ok())
}

fn user_headers(h: Option<&HeaderMap>) -> Headers {
    get(h, HEADERS)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// A stored message as pgtide sees it. Messages published without pgtide's headers (by another
/// NATS client) get an id derived from their stream sequence, stable across redeliveries.
pub(super) fn decode(stream: &str, h: Option<&HeaderMap>, payload: Bytes, seq: u64) -> Message {
    let id = message_id(h).unwrap_or_else(|| Uuid::from_u64_pair(0, seq));
    Message {
        id,
        stream: stream.to_owned(),
        payload,
        is_json: get(h, JSON) == Some("true"),
        headers: user_headers(h),
        published_at: uuid_time(&id),
        // Keys are not carried by this backend (no ordered groups here).
        key: None,
    }
}

/// Headers of the dead-letter copy of a delivery.
pub(super) fn dead(d: &Delivery, reason: &str, error: Option<&str>, attempts: u32) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ID, d.id().to_string());
    if d.is_json {
        h.insert(JSON, "true");
    }
    if !d.headers.is_empty() {
        if let Ok(json) = serde_json::to_string(&d.headers) {
            h.insert(HEADERS, json);
        }
    }
    h.insert(REASON, escape(reason));
    if let Some(e) = error {
        h.insert(ERROR, escape(e));
    }
    h.insert(ATTEMPTS, attempts.to_string());
    h.insert(DEAD_AT, rfc3339(Utc::now()));
    // One dead letter per message and group, even if dead-lettering is retried.
    h.insert(MSG_ID, format!("{}/{}", d.group, d.id()));
    h
}

/// A dead letter read back from the dead-letter stream.
pub(super) fn decode_dead(
    stream: &str,
    group: &str,
    msg: async_nats::jetstream::message::StreamMessage,
) -> DeadLetter {
    let h = Some(&msg.headers);
    DeadLetter {
        stream: stream.to_owned(),
        group: group.to_owned(),
        id: message_id(h).unwrap_or_else(|| Uuid::from_u64_pair(0, msg.sequence)),
        attempts: get(h, ATTEMPTS).and_then(|v| v.parse().ok()).unwrap_or(0),
        reason: get(h, REASON).map(unescape).unwrap_or_default(),
        error: get(h, ERROR).map(unescape),
        dead_at: get(h, DEAD_AT).and_then(parse_time).unwrap_or_default(),
        payload: Some(msg.payload.to_vec()),
        headers: user_headers(h),
    }
}

/// The pgtide settings of a stream that JetStream has no field for, kept as JSON in the
/// stream's description (NATS 2.9 has no stream metadata).
#[derive(Debug, Serialize, Deserialize)]
struct StoredConfig {
    pgtide: u32,
    lease_ns: u64,
    max_deliver: u32,
    backoff_ns: Vec<u64>,
    jitter: f32,
    retention_ns: u64,
    dedupe_window_ns: u64,
    max_payload: usize,
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// The stream description that records `config`.
pub(super) fn describe(config: &StreamConfig) -> String {
    let stored = StoredConfig {
        pgtide: 1,
        lease_ns: nanos(config.lease),
        max_deliver: config.max_deliver,
        backoff_ns: config.backoff.schedule.iter().map(|d| nanos(*d)).collect(),
        jitter: config.backoff.jitter,
        retention_ns: nanos(config.retention),
        dedupe_window_ns: nanos(config.dedupe_window),
        max_payload: config.max_payload,
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

/// The config recorded by [`describe`]; `None` if the description is not pgtide's.
pub(super) fn config_of(description: Option<&str>) -> Option<StreamConfig> {
    let s: StoredConfig = serde_json::from_str(description?).ok()?;
    if s.pgtide != 1 || s.backoff_ns.is_empty() {
        return None;
    }
    let mut backoff = Backoff::schedule(s.backoff_ns.into_iter().map(Duration::from_nanos));
    backoff.jitter = s.jitter;
    Some(
        StreamConfig::default()
            .lease(Duration::from_nanos(s.lease_ns))
            .max_deliver(s.max_deliver)
            .backoff(backoff)
            .retention(Duration::from_nanos(s.retention_ns))
            .dedupe_window(Duration::from_nanos(s.dedupe_window_ns))
            .max_payload(s.max_payload),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips() {
        for s in [
            "plain",
            "a\\b",
            "line\nbreak\r\n",
            "\\n literal",
            "trailing\\",
        ] {
            let e = escape(s);
            assert!(!e.contains(['\r', '\n']));
            assert_eq!(unescape(&e), s);
        }
    }

    #[test]
    fn config_round_trips() {
        let config = StreamConfig::default()
            .lease(Duration::from_millis(1500))
            .max_deliver(3)
            .dedupe_window(Duration::ZERO);
        let back = config_of(Some(&describe(&config))).unwrap();
        assert_eq!(back, config);
        assert!(config_of(Some("a stream")).is_none());
        assert!(config_of(None).is_none());
    }
}
