//! What pgtide writes into SQS: message bodies, the one `pgtide` message attribute, and the
//! registry queue's tags (stream config and groups).
//!
//! SQS limits a message to 10 attributes and its body to XML text, so the pgtide id, the JSON
//! flag, the headers, the due time, the attempts made before a re-send and the dead-letter
//! record travel as one JSON string attribute, and a payload that is not valid SQS text is
//! sent base64-encoded.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::{
    Message as SqsMessage, MessageAttributeValue, MessageSystemAttributeName,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Backoff, StreamConfig};
use crate::error::{Error, Result};
use crate::queue::{uuid_time, DeadLetter, Headers, Message};

/// The message attribute holding [`Meta`].
pub(super) const META: &str = "pgtide";

/// Tag of the registry queue naming its stream.
pub(super) const STREAM_TAG: &str = "pgtide.stream";
/// Prefix of the registry queue's config tags (`pgtide.config.00`, `.01`, ...).
const CONFIG_TAG: &str = "pgtide.config.";
/// Prefix of the registry queue's group tags (`pgtide.group.<group>`).
const GROUP_TAG: &str = "pgtide.group.";
/// SQS tag values are at most 256 characters.
const TAG_VALUE_MAX: usize = 256;
/// Config tags at most: with the stream tag, 41 tags stay for groups (SQS advises 50 at most).
const CONFIG_TAGS_MAX: usize = 8;
/// Tags per registry queue.
pub(super) const TAGS_MAX: usize = 50;

/// How the body carries the payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Enc {
    /// The payload is the body (valid SQS text).
    #[default]
    #[serde(rename = "t")]
    Text,
    /// The body is the payload in base64.
    #[serde(rename = "b")]
    Base64,
    /// The payload is empty (SQS refuses empty bodies; the body is one space).
    #[serde(rename = "e")]
    Empty,
}

/// A dead letter's record, added when pgtide moves a message to a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Dead {
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: u32,
    /// Unix milliseconds.
    pub at: i64,
}

/// pgtide's part of an SQS message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Meta {
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "is_false")]
    pub json: bool,
    #[serde(default, skip_serializing_if = "is_text")]
    pub enc: Enc,
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
    /// Due time (Unix milliseconds) of a message delayed past what SQS can delay natively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<i64>,
    /// Attempts made on earlier SQS copies of this message (a re-sent message starts its
    /// receive count again).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub base: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead: Option<Dead>,
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_text(e: &Enc) -> bool {
    *e == Enc::Text
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Whether SQS accepts `c` in a body or string attribute.
fn sqs_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | ' '..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// The body carrying `payload`, and how.
pub(super) fn body(payload: &[u8]) -> (String, Enc) {
    if payload.is_empty() {
        return (" ".to_owned(), Enc::Empty);
    }
    match std::str::from_utf8(payload) {
        Ok(text) if text.chars().all(sqs_char) => (text.to_owned(), Enc::Text),
        _ => (aws_smithy_types::base64::encode(payload), Enc::Base64),
    }
}

/// The payload of a body, or `None` if a base64 body does not decode.
fn payload(body: &str, enc: Enc) -> Option<Bytes> {
    match enc {
        Enc::Text => Some(Bytes::copy_from_slice(body.as_bytes())),
        Enc::Base64 => aws_smithy_types::base64::decode(body).ok().map(Bytes::from),
        Enc::Empty => Some(Bytes::new()),
    }
}

impl Meta {
    /// The attribute value: JSON, with the two characters serde_json leaves alone but SQS
    /// refuses (U+FFFE, U+FFFF; only possible inside strings) escaped.
    pub(super) fn attribute(&self) -> Result<MessageAttributeValue> {
        let json = serde_json::to_string(self)?
            .replace('\u{FFFE}', "\\ufffe")
            .replace('\u{FFFF}', "\\uffff");
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(json)
            .build()
            .map_err(|e| super::api::broker(e, false))
    }

    /// Size the attribute adds to a message (SQS counts name, type and value).
    pub(super) fn size(&self) -> usize {
        serde_json::to_string(self).map_or(0, |s| s.len()) + META.len() + "String".len()
    }
}

/// One received message, decoded.
pub(super) struct Received {
    pub meta: Meta,
    pub payload: Bytes,
    /// The body as received (kept for re-sends and dead-lettering).
    pub body: String,
    pub handle: String,
    /// SQS's receive count of this copy.
    pub receives: u32,
    pub sent_at: Option<DateTime<Utc>>,
}

impl Received {
    /// The delivered message.
    pub(super) fn message(&self, stream: &str) -> Message {
        Message {
            id: self.meta.id,
            stream: stream.to_owned(),
            payload: self.payload.clone(),
            is_json: self.meta.json,
            headers: self.meta.headers.clone(),
            published_at: uuid_time(&self.meta.id),
            key: None,
        }
    }
}

/// Decodes a received message. A message without a readable `pgtide` attribute (sent by
/// something else, or damaged) is still delivered: its SQS message id (a UUID) as id, its body
/// as payload, no headers. `None` only without a receipt handle (nothing could settle it).
pub(super) fn decode(m: &SqsMessage) -> Option<Received> {
    let handle = m.receipt_handle()?.to_owned();
    let body = m.body().unwrap_or_default().to_owned();
    let meta = m
        .message_attributes()
        .and_then(|a| a.get(META))
        .and_then(|v| v.string_value())
        .and_then(|s| serde_json::from_str::<Meta>(s).ok());
    let (meta, payload) = match meta.and_then(|meta| payload(&body, meta.enc).map(|p| (meta, p))) {
        Some(ok) => ok,
        None => {
            let id = m
                .message_id()
                .and_then(|id| Uuid::parse_str(id).ok())
                .unwrap_or_default();
            let meta = Meta {
                id,
                json: false,
                enc: Enc::Text,
                headers: Headers::new(),
                due: None,
                base: 0,
                dead: None,
            };
            (meta, Bytes::copy_from_slice(body.as_bytes()))
        }
    };
    let system = |name: MessageSystemAttributeName| m.attributes().and_then(|a| a.get(&name));
    let receives = system(MessageSystemAttributeName::ApproximateReceiveCount)
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let sent_at = system(MessageSystemAttributeName::SentTimestamp)
        .and_then(|ms| ms.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis);
    Some(Received {
        meta,
        payload,
        body,
        handle,
        receives,
        sent_at,
    })
}

/// A dead letter read from a group's dead-letter queue. A message without pgtide's dead
/// record was moved there by the group queue's redrive policy: its last lease expired on
/// attempt `max_deliver`.
pub(super) fn dead_letter(stream: &str, group: &str, r: Received, max_deliver: u32) -> DeadLetter {
    let (reason, error, attempts, at) = match r.meta.dead {
        Some(d) => (
            d.reason,
            d.error,
            d.attempts,
            DateTime::from_timestamp_millis(d.at),
        ),
        None => {
            let attempts = r.meta.base.saturating_add(max_deliver);
            (
                "max_deliver".to_owned(),
                Some(format!("lease expired on attempt {attempts}")),
                attempts,
                r.sent_at,
            )
        }
    };
    DeadLetter {
        stream: stream.to_owned(),
        group: group.to_owned(),
        id: r.meta.id,
        attempts,
        reason,
        error,
        dead_at: at.unwrap_or_else(Utc::now),
        payload: Some(r.payload.to_vec()),
        headers: r.meta.headers,
    }
}

fn micros(d: Duration) -> u128 {
    d.as_micros()
}

/// The registry tags recording `config` (the stream tag is added by the caller).
pub(super) fn config_tags(config: &StreamConfig) -> Result<HashMap<String, String>> {
    let mut tokens = vec![
        format!("l={}", micros(config.lease)),
        format!("m={}", config.max_deliver),
        format!("j={}", config.backoff.jitter),
        format!("r={}", micros(config.retention)),
        format!("w={}", micros(config.partition_interval)),
        format!("d={}", micros(config.dedupe_window)),
        format!("p={}", config.max_payload),
    ];
    tokens.extend(
        config
            .backoff
            .schedule
            .iter()
            .map(|s| format!("b={}", micros(*s))),
    );
    let mut chunks: Vec<String> = vec![];
    for t in tokens {
        match chunks.last_mut() {
            Some(c) if c.len() + 1 + t.len() <= TAG_VALUE_MAX => {
                c.push(' ');
                c.push_str(&t);
            }
            _ => chunks.push(t),
        }
    }
    if chunks.len() > CONFIG_TAGS_MAX {
        return Err(Error::InvalidConfig(format!(
            "the SQS backend records a stream's config in at most {CONFIG_TAGS_MAX} queue tags: use a shorter backoff schedule (at most about 100 steps)"
        )));
    }
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| (format!("{CONFIG_TAG}{i:02}"), c))
        .collect())
}

/// The config recorded in a registry queue's tags; `None` if they hold none (not pgtide's).
pub(super) fn config_of(tags: &HashMap<String, String>) -> Option<StreamConfig> {
    let mut keys: Vec<&String> = tags.keys().filter(|k| k.starts_with(CONFIG_TAG)).collect();
    if keys.is_empty() {
        return None;
    }
    keys.sort();
    let mut c = StreamConfig::default();
    let mut schedule = vec![];
    let us = |v: &str| v.parse::<u64>().ok().map(Duration::from_micros);
    for token in keys.iter().flat_map(|k| tags[*k].split(' ')) {
        let (key, value) = token.split_once('=')?;
        match key {
            "l" => c.lease = us(value)?,
            "m" => c.max_deliver = value.parse().ok()?,
            "j" => c.backoff.jitter = value.parse().ok()?,
            "r" => c.retention = us(value)?,
            "w" => c.partition_interval = us(value)?,
            "d" => c.dedupe_window = us(value)?,
            "p" => c.max_payload = value.parse().ok()?,
            "b" => schedule.push(us(value)?),
            // Written by a newer pgtide: ignored.
            _ => {}
        }
    }
    if !schedule.is_empty() {
        c.backoff = Backoff {
            schedule,
            jitter: c.backoff.jitter,
        };
    }
    Some(c)
}

/// The tag recording a group.
pub(super) fn group_tag(group: &str) -> String {
    format!("{GROUP_TAG}{group}")
}

/// The groups recorded in a registry queue's tags.
pub(super) fn groups_of(tags: &HashMap<String, String>) -> Vec<String> {
    let mut groups: Vec<String> = tags
        .keys()
        .filter_map(|k| k.strip_prefix(GROUP_TAG))
        .filter(|g| crate::names::validate_name("group", g).is_ok())
        .map(str::to_owned)
        .collect();
    groups.sort();
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_tags() {
        let config = StreamConfig::default()
            .lease(Duration::from_millis(1500))
            .max_deliver(7)
            .backoff(Backoff::schedule((1..60).map(Duration::from_millis)).jitter(0.25));
        let tags = config_tags(&config).unwrap();
        assert!(tags.len() > 1 && tags.values().all(|v| v.len() <= TAG_VALUE_MAX));
        assert_eq!(config_of(&tags), Some(config));
        assert_eq!(config_of(&HashMap::new()), None);
        let too_long =
            StreamConfig::default().backoff(Backoff::schedule((1..1000).map(Duration::from_secs)));
        assert!(matches!(
            config_tags(&too_long),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    fn bodies_carry_any_payload() {
        for p in [
            &b""[..],
            b"{\"a\":1}",
            b"\xff\x00",
            "\u{FFFE}".as_bytes(),
            b"\x01",
        ] {
            let (body, enc) = body(p);
            assert!(!body.is_empty() && body.chars().all(sqs_char));
            assert_eq!(payload(&body, enc).as_deref(), Some(p));
        }
        assert_eq!(body(b"plain").1, Enc::Text);
    }

    #[test]
    fn meta_attribute_is_sqs_text() {
        let mut headers = Headers::new();
        headers.insert("k".into(), "\u{FFFF}\u{1}".into());
        let meta = Meta {
            id: Uuid::now_v7(),
            json: true,
            enc: Enc::Text,
            headers,
            due: Some(1),
            base: 2,
            dead: None,
        };
        let value = meta.attribute().unwrap();
        let text = value.string_value().unwrap();
        assert!(text.chars().all(sqs_char), "{text}");
        assert_eq!(serde_json::from_str::<Meta>(text).unwrap(), meta);
    }
}
