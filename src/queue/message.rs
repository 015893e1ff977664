//! Messages as published and as delivered.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Serialize};
use uuid::Uuid;

use crate::error::Result;

/// Message headers: string keys to string values, ordered for stable output.
pub type Headers = BTreeMap<String, String>;

/// A message to publish: payload plus options.
///
/// ```
/// use std::time::Duration;
/// let msg = pgtide::OutgoingMessage::json(&serde_json::json!({"order": 7}))?
///     .header("source", "checkout")
///     .dedupe_key("order-7")
///     .key("customer-42")
///     .delay(Duration::from_secs(5));
/// # Ok::<(), pgtide::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage {
    pub(crate) payload: Bytes,
    pub(crate) is_json: bool,
    pub(crate) headers: Headers,
    pub(crate) dedupe_key: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) priority: i32,
    pub(crate) deliver_at: Option<DateTime<Utc>>,
    pub(crate) delay: Option<Duration>,
}

impl OutgoingMessage {
    /// A message with an opaque binary payload.
    pub fn bytes(payload: impl Into<Bytes>) -> Self {
        OutgoingMessage {
            payload: payload.into(),
            ..Default::default()
        }
    }

    /// A message whose payload is `value` serialized as JSON (shown as `jsonb` in SQL).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Ok(OutgoingMessage {
            payload: Bytes::from(serde_json::to_vec(value)?),
            is_json: true,
            ..Default::default()
        })
    }

    /// A message whose payload is already-encoded JSON text. It is checked to be valid JSON.
    pub fn json_text(text: impl Into<String>) -> Result<Self> {
        let text = text.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        Ok(OutgoingMessage {
            payload: Bytes::from(text),
            is_json: true,
            ..Default::default()
        })
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Replaces all headers.
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// A dedupe key: a second publish with the same key on the same stream inside the stream's
    /// dedupe window returns the first message's id and publishes nothing.
    pub fn dedupe_key(mut self, key: impl Into<String>) -> Self {
        self.dedupe_key = Some(key.into());
        self
    }

    /// The ordering key: in a group created ordered ([`crate::GroupConfig::ordered`]) the
    /// messages of one key are delivered one at a time, in publish order; other groups ignore
    /// it. A key is 1 to 256 bytes of text without control characters ([`crate::MAX_KEY_LEN`]);
    /// publish checks it and fails with [`crate::Error::InvalidKey`]. Backends without
    /// [`crate::Capabilities::ordering_keys`] (which cannot have ordered groups) accept the
    /// message and drop the key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The ordering key, if any.
    pub fn ordering_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Priority: a message with priority `p > 0` counts as ready `p` seconds before it was
    /// published, so it overtakes messages that became ready up to `p` seconds earlier. It orders
    /// the first delivery only (retries use the backoff); delayed messages ignore it. Defaults to 0.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority.max(0);
        self
    }

    /// Delivers no earlier than `delay` after the publish commits (database clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.deliver_at = None;
        self
    }

    /// Delivers no earlier than `at`.
    pub fn deliver_at(mut self, at: DateTime<Utc>) -> Self {
        self.deliver_at = Some(at);
        self.delay = None;
        self
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

/// What a publish returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The message id (UUID v7). For a duplicate, the id of the original message.
    pub id: Uuid,
    /// True when the dedupe key matched an earlier message and nothing new was stored.
    pub duplicate: bool,
}

/// A message as delivered to a consumer.
#[derive(Debug, Clone)]
pub struct Message {
    /// Message id (UUID v7, time-ordered).
    pub id: Uuid,
    /// The stream it was published to.
    pub stream: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// Whether the payload was published as JSON.
    pub is_json: bool,
    /// Headers.
    pub headers: Headers,
    /// When it was published (from the UUID v7 id).
    pub published_at: DateTime<Utc>,
    /// Its ordering key, if it was published with one (on backends that carry keys).
    pub key: Option<String>,
}

impl Message {
    /// Decodes the payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

/// The publish time encoded in a UUID v7, or the Unix epoch for other ids.
pub(crate) fn uuid_time(id: &Uuid) -> DateTime<Utc> {
    id.get_timestamp()
        .and_then(|ts| {
            let (secs, nanos) = ts.to_unix();
            DateTime::from_timestamp(secs as i64, nanos)
        })
        .unwrap_or_default()
}

#[cfg(feature = "postgres")]
pub(crate) fn headers_to_json(h: &Headers) -> Option<serde_json::Value> {
    if h.is_empty() {
        None
    } else {
        Some(serde_json::Value::Object(
            h.iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        ))
    }
}

#[cfg(feature = "postgres")]
pub(crate) fn headers_from_json(v: Option<serde_json::Value>) -> Headers {
    match v {
        Some(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => Headers::new(),
    }
}
