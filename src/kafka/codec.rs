//! How pgtide messages, dead letters and the stream registry are carried in Kafka records.
//!
//! A message is a record with its payload as is and these headers:
//!
//! | header | value |
//! |---|---|
//! | `pgtide-id` | the message id (UUID v7, text), stable across retries and groups |
//! | `pgtide-json` | `true` when the payload was published as JSON |
//! | `pgtide-headers` | the message's own headers as one JSON object (absent when empty) |
//! | `pgtide-deliver-at` | RFC 3339 due time (delay and retry topics) |
//! | `pgtide-attempt` | the attempt this record delivers (retry topics; 1 when absent) |
//! | `pgtide-error` | the error of the nack that scheduled this retry (retry topics) |
//!
//! User headers travel as one JSON object so that no user header can pass for one of pgtide's.
//! A dead letter is a copy of the message plus `pgtide-reason`, `pgtide-error`,
//! `pgtide-attempts` and `pgtide-dead-at`. Every value is read with fallible parsing: a record
//! written by another client, or damaged, decodes to defaults (an id derived from its position)
//! and never panics.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::OwnedHeaders;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Backoff, StreamConfig};
use crate::queue::{uuid_time, DeadLetter, Headers, Message};

pub(super) const ID: &str = "pgtide-id";
pub(super) const JSON: &str = "pgtide-json";
pub(super) const HEADERS: &str = "pgtide-headers";
pub(super) const DELIVER_AT: &str = "pgtide-deliver-at";
pub(super) const ATTEMPT: &str = "pgtide-attempt";
pub(super) const ERROR: &str = "pgtide-error";
pub(super) const REASON: &str = "pgtide-reason";
pub(super) const ATTEMPTS: &str = "pgtide-attempts";
pub(super) const DEAD_AT: &str = "pgtide-dead-at";

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Record headers as read: name → value (the first of a repeated name wins).
#[derive(Debug, Default, Clone)]
pub(super) struct RecordHeaders(Vec<(String, Vec<u8>)>);

impl RecordHeaders {
    /// Copies the headers of a received record.
    pub(super) fn read<H: rdkafka::message::Headers>(h: Option<&H>) -> Self {
        let mut out = Vec::new();
        if let Some(h) = h {
            for header in h.iter() {
                out.push((
                    header.key.to_owned(),
                    header.value.map(<[u8]>::to_vec).unwrap_or_default(),
                ));
            }
        }
        RecordHeaders(out)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Builds outgoing headers.
#[derive(Default)]
pub(super) struct Out(Vec<(&'static str, String)>);

impl Out {
    fn put(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.0.push((name, value.into()));
        self
    }

    /// The message part: id, JSON flag, user headers.
    pub(super) fn message(id: Uuid, is_json: bool, headers: &Headers) -> crate::Result<Self> {
        let mut out = Out::default().put(ID, id.to_string());
        if is_json {
            out = out.put(JSON, "true");
        }
        if !headers.is_empty() {
            out = out.put(HEADERS, serde_json::to_string(headers)?);
        }
        Ok(out)
    }

    /// Adds a due time.
    pub(super) fn deliver_at(self, at: DateTime<Utc>) -> Self {
        self.put(DELIVER_AT, rfc3339(at))
    }

    /// Adds the attempt number and error of a retry.
    pub(super) fn retry(self, attempt: u32, error: Option<&str>) -> Self {
        let out = self.put(ATTEMPT, attempt.to_string());
        match error {
            Some(e) => out.put(ERROR, e),
            None => out,
        }
    }

    /// Adds the dead-letter fields.
    pub(super) fn dead(self, reason: &str, error: Option<&str>, attempts: u32) -> Self {
        let mut out = self
            .put(REASON, reason)
            .put(ATTEMPTS, attempts.to_string())
            .put(DEAD_AT, rfc3339(Utc::now()));
        if let Some(e) = error {
            out = out.put(ERROR, e);
        }
        out
    }

    pub(super) fn build(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.0.len());
        for (k, v) in &self.0 {
            h = h.insert(rdkafka::message::Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        h
    }
}

/// A stable id for a record that carries none (written by another client): its position.
fn positional_id(partition: i32, offset: i64) -> Uuid {
    Uuid::from_u64_pair(partition as u32 as u64, offset as u64)
}

/// What pgtide reads from one record of the main, delay or retry topic.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub message: Message,
    pub deliver_at: Option<DateTime<Utc>>,
    pub attempt: u32,
    pub error: Option<String>,
}

/// Decodes a received record.
pub(super) fn decode(
    stream: &str,
    h: &RecordHeaders,
    payload: Bytes,
    partition: i32,
    offset: i64,
) -> Record {
    let id = h
        .get(ID)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| positional_id(partition, offset));
    Record {
        message: Message {
            id,
            stream: stream.to_owned(),
            payload,
            is_json: h.get(JSON) == Some("true"),
            headers: h
                .get(HEADERS)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default(),
            published_at: uuid_time(&id),
            key: None,
        },
        deliver_at: h.get(DELIVER_AT).and_then(parse_time),
        attempt: h
            .get(ATTEMPT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
            .max(1),
        error: h.get(ERROR).map(str::to_owned),
    }
}

/// A dead letter read back from a group's dead-letter topic.
pub(super) fn decode_dead(
    stream: &str,
    group: &str,
    h: &RecordHeaders,
    payload: Option<&[u8]>,
    partition: i32,
    offset: i64,
) -> DeadLetter {
    let record = decode(stream, h, Bytes::new(), partition, offset);
    DeadLetter {
        stream: stream.to_owned(),
        group: group.to_owned(),
        id: record.message.id,
        attempts: h.get(ATTEMPTS).and_then(|v| v.parse().ok()).unwrap_or(0),
        reason: h.get(REASON).unwrap_or_default().to_owned(),
        error: record.error,
        dead_at: h.get(DEAD_AT).and_then(parse_time).unwrap_or_default(),
        payload: Some(payload.unwrap_or_default().to_vec()),
        headers: record.message.headers,
    }
}

/// One record of a stream's registry topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum MetaRecord {
    /// The stream's settings (the first record).
    Config(StoredConfig),
    /// A group was created.
    Group {
        /// Its name.
        name: String,
    },
    /// A group was deleted; its retry and dead-letter topics stay, ignored below `marks`.
    GroupDeleted {
        /// Its name.
        name: String,
        /// Topic → end offset per partition at deletion.
        #[serde(default)]
        marks: std::collections::BTreeMap<String, Vec<i64>>,
    },
    /// The stream was deleted; its topics stay, ignored below `marks` if it is created again.
    StreamDeleted {
        /// Topic → end offset per partition at deletion.
        marks: std::collections::BTreeMap<String, Vec<i64>>,
    },
    /// The stream was purged: every record below these offsets is gone for pgtide.
    Purge {
        /// Topic → offset per partition (index = partition).
        marks: std::collections::BTreeMap<String, Vec<i64>>,
    },
}

/// The pgtide settings of a stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct StoredConfig {
    lease_ns: u64,
    max_deliver: u32,
    backoff_ns: Vec<u64>,
    jitter: f32,
    retention_ns: u64,
    max_payload: usize,
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl StoredConfig {
    pub(super) fn of(config: &StreamConfig) -> Self {
        StoredConfig {
            lease_ns: nanos(config.lease),
            max_deliver: config.max_deliver,
            backoff_ns: config.backoff.schedule.iter().map(|d| nanos(*d)).collect(),
            jitter: config.backoff.jitter,
            retention_ns: nanos(config.retention),
            max_payload: config.max_payload,
        }
    }

    /// The config, or `None` if the record is not a valid one.
    pub(super) fn config(&self) -> Option<StreamConfig> {
        if self.backoff_ns.is_empty() {
            return None;
        }
        let mut backoff =
            Backoff::schedule(self.backoff_ns.iter().copied().map(Duration::from_nanos));
        backoff.jitter = self.jitter;
        let config = StreamConfig::default()
            .lease(Duration::from_nanos(self.lease_ns))
            .max_deliver(self.max_deliver)
            .backoff(backoff)
            .retention(Duration::from_nanos(self.retention_ns))
            .max_payload(self.max_payload);
        config.validate().ok().map(|()| config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    #[test]
    fn message_headers_round_trip() {
        let id = Uuid::now_v7();
        let mut user = Headers::new();
        user.insert("pgtide-id".into(), "not mine".into());
        let out = Out::message(id, true, &user)
            .unwrap()
            .retry(3, Some("boom\nline"))
            .build();
        assert_eq!(out.count(), 5);
        let h = RecordHeaders::read(Some(&out));
        let r = decode("s", &h, Bytes::from_static(b"{}"), 0, 7);
        assert_eq!(r.message.id, id);
        assert!(r.message.is_json);
        assert_eq!(r.message.headers, user);
        assert_eq!((r.attempt, r.error.as_deref()), (3, Some("boom\nline")));
    }

    #[test]
    fn foreign_records_decode_to_defaults() {
        let h = RecordHeaders::read::<OwnedHeaders>(None);
        let r = decode("s", &h, Bytes::new(), 2, 9);
        assert_eq!(r.message.id, Uuid::from_u64_pair(2, 9));
        assert_eq!(r.attempt, 1);
        assert!(r.deliver_at.is_none() && !r.message.is_json);
    }

    #[test]
    fn config_round_trips() {
        let config = StreamConfig::default()
            .lease(Duration::from_millis(1500))
            .max_deliver(3);
        assert_eq!(StoredConfig::of(&config).config(), Some(config));
    }
}
