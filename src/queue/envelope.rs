//! Event envelopes: an event's id, type, schema version, producer, production time and trace
//! context, carried as ordinary message headers so that they travel unchanged on every backend
//! (and through the relay, which copies headers).
//!
//! | header | field | on read |
//! |---|---|---|
//! | `event-id` | [`Envelope::event_id`] | optional: the message id when absent |
//! | `event-type` | [`Envelope::event_type`] | required |
//! | `event-schema-version` | [`Envelope::schema_version`] | required, a decimal `u32` |
//! | `event-producer` | [`Envelope::producer`] | optional |
//! | `event-produced-at` | [`Envelope::produced_at`] | required, RFC 3339 |
//! | `traceparent` | [`Envelope::traceparent`] | optional, W3C trace context |
//! | `tracestate` | [`Envelope::tracestate`] | optional |
//!
//! The names are lower case ASCII with `-` only, so they are valid as NATS, AMQP and HTTP header
//! names alike and stay clear of every backend's reserved prefixes (`Nats-`, `pgtide-`, `x-`).
//!
//! Whose clock `produced_at` is: see [`Envelope`].

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{de::DeserializeOwned, Serialize};

use super::{Delivery, Headers, Message, OutgoingMessage};
use crate::error::{Error, Result};

/// Header of the event id.
pub const EVENT_ID_HEADER: &str = "event-id";
/// Header of the event type.
pub const EVENT_TYPE_HEADER: &str = "event-type";
/// Header of the schema version.
pub const EVENT_SCHEMA_VERSION_HEADER: &str = "event-schema-version";
/// Header of the producer.
pub const EVENT_PRODUCER_HEADER: &str = "event-producer";
/// Header of the production time (RFC 3339, UTC).
pub const EVENT_PRODUCED_AT_HEADER: &str = "event-produced-at";
/// W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// W3C trace state header.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// Longest event id, type or producer accepted (bytes): these are identifiers, not payload.
const MAX_FIELD: usize = 256;

/// The envelope of an event, read from a delivered message's headers.
///
/// # Whose clock `produced_at` is
///
/// [`OutgoingMessage::event`] stamps `event-produced-at` with the wall clock of the process that
/// builds the message, when it builds it: before the publish, and before the commit of a
/// transactional publish. It is not taken from the database, even on
/// Postgres, on purpose: the envelope must mean the same on every backend (a broker has no clock
/// to ask before the message is sent), it is the time the event happened in the producer's
/// domain (a message built now and published after a retry keeps it), and a header the engine
/// rewrote at commit could no longer be set by an upstream producer. So two producers' stamps are
/// only as comparable as their clocks are synchronized (under NTP, typically milliseconds apart;
/// a clock may also step backwards): do not order events by it, nor measure sub-second lags
/// across hosts with it. The message's own [`Message::published_at`] is the time in its UUID v7 id,
/// which is made by the publishing process too, except for messages published by the SQL
/// functions (`publish`, `publish_bytes`), whose ids come from the database's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Envelope {
    /// The event id: the `event-id` header when the producer gave one, else the message id. An
    /// inbox or a consumer deduplicates on it.
    pub event_id: String,
    /// The event type, e.g. `order.created`.
    pub event_type: String,
    /// The payload's schema version (1 unless the producer said otherwise).
    pub schema_version: u32,
    /// Who produced the event, when the producer said so.
    pub producer: Option<String>,
    /// When the event was produced, by the producer's wall clock (not the database's, even on
    /// Postgres: see [whose clock](Envelope#whose-clock-produced_at-is) before comparing it
    /// across hosts).
    pub produced_at: DateTime<Utc>,
    /// The W3C `traceparent` of the producer's span, when there was one.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that came with it.
    pub tracestate: Option<String>,
}

/// An event: its envelope and its payload decoded into `T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<T> {
    /// The envelope.
    pub envelope: Envelope,
    /// The decoded payload.
    pub data: T,
}

fn invalid(header: &'static str, problem: impl Into<String>) -> Error {
    Error::Envelope {
        header,
        problem: problem.into(),
    }
}

/// Checks an identifier-like field: non-empty, at most [`MAX_FIELD`] bytes, no control
/// characters (header values are single lines on every broker).
fn check_field(header: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(invalid(header, "is empty"));
    }
    if value.len() > MAX_FIELD {
        return Err(invalid(header, format!("is longer than {MAX_FIELD} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(header, "contains control characters"));
    }
    Ok(())
}

/// Checks the W3C `traceparent` shape: `vv-<32 hex>-<16 hex>-ff`, lower-case hex, ids not all
/// zero, version not `ff`.
fn check_traceparent(value: &str) -> Result<()> {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
        // Version 00 has exactly four fields; later versions may append more.
        && (parts.len() == 4 || parts[0] != "00");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            TRACEPARENT_HEADER,
            "is not a W3C traceparent (vv-<32 hex>-<16 hex>-ff)",
        ))
    }
}

impl Envelope {
    /// Reads the envelope from a message's headers. Fails with [`Error::Envelope`] naming the
    /// header when a required one is missing or any is malformed.
    pub fn from_message(message: &Message) -> Result<Envelope> {
        Self::from_headers(&message.headers, message.id)
    }

    fn from_headers(h: &Headers, message_id: uuid::Uuid) -> Result<Envelope> {
        let required = |name: &'static str| {
            h.get(name)
                .map(String::as_str)
                .ok_or_else(|| invalid(name, "is missing"))
        };
        let event_id = match h.get(EVENT_ID_HEADER) {
            Some(id) => {
                check_field(EVENT_ID_HEADER, id)?;
                id.clone()
            }
            None => message_id.to_string(),
        };
        let event_type = required(EVENT_TYPE_HEADER)?;
        check_field(EVENT_TYPE_HEADER, event_type)?;
        let schema_version = required(EVENT_SCHEMA_VERSION_HEADER)?
            .parse::<u32>()
            .map_err(|_| invalid(EVENT_SCHEMA_VERSION_HEADER, "is not a whole number"))?;
        let producer = h.get(EVENT_PRODUCER_HEADER).cloned();
        if let Some(p) = &producer {
            check_field(EVENT_PRODUCER_HEADER, p)?;
        }
        let produced_at = DateTime::parse_from_rfc3339(required(EVENT_PRODUCED_AT_HEADER)?)
            .map_err(|_| invalid(EVENT_PRODUCED_AT_HEADER, "is not an RFC 3339 time"))?
            .with_timezone(&Utc);
        let traceparent = h.get(TRACEPARENT_HEADER).cloned();
        if let Some(tp) = &traceparent {
            check_traceparent(tp)?;
        }
        let tracestate = h.get(TRACESTATE_HEADER).cloned();
        if let Some(ts) = &tracestate {
            if ts.chars().any(char::is_control) || ts.len() > 512 {
                return Err(invalid(
                    TRACESTATE_HEADER,
                    "is longer than 512 bytes or has control characters",
                ));
            }
        }
        Ok(Envelope {
            event_id,
            event_type: event_type.to_owned(),
            schema_version,
            producer,
            produced_at,
            traceparent,
            tracestate,
        })
    }
}

impl OutgoingMessage {
    /// An event of type `event_type` (e.g. `order.created`) whose payload is `data` as JSON,
    /// with schema version 1 and the production time set to now. Refine it with
    /// [`OutgoingMessage::schema_version`], [`OutgoingMessage::producer`] and
    /// [`OutgoingMessage::event_id`]; read it back with [`Delivery::event`].
    ///
    /// ```
    /// #[derive(serde::Serialize)]
    /// struct OrderCreated { order: u64 }
    /// let msg = pgtide::OutgoingMessage::event("order.created", &OrderCreated { order: 7 })?
    ///     .schema_version(2)
    ///     .producer("checkout");
    /// # Ok::<(), pgtide::Error>(())
    /// ```
    ///
    /// Fails with [`Error::Envelope`] when the type is empty, longer than 256 bytes or has
    /// control characters, and with [`Error::Json`] when `data` cannot be serialized.
    pub fn event<T: Serialize + ?Sized>(event_type: &str, data: &T) -> Result<Self> {
        check_field(EVENT_TYPE_HEADER, event_type)?;
        Ok(OutgoingMessage::json(data)?
            .header(EVENT_TYPE_HEADER, event_type)
            .header(EVENT_SCHEMA_VERSION_HEADER, "1")
            .header(
                EVENT_PRODUCED_AT_HEADER,
                Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            ))
    }

    /// Sets the event's schema version (default 1).
    pub fn schema_version(self, version: u32) -> Self {
        self.header(EVENT_SCHEMA_VERSION_HEADER, version.to_string())
    }

    /// Names the event's producer (a service name). Checked when read: non-empty, at most 256
    /// bytes, no control characters.
    pub fn producer(self, producer: impl Into<String>) -> Self {
        self.header(EVENT_PRODUCER_HEADER, producer)
    }

    /// Gives the event an id of its own (an upstream id, say) instead of the message id. Checked
    /// when read: non-empty, at most 256 bytes, no control characters.
    pub fn event_id(self, id: impl Into<String>) -> Self {
        self.header(EVENT_ID_HEADER, id)
    }
}

impl Message {
    /// The message's event envelope (see [`Envelope::from_message`]).
    pub fn envelope(&self) -> Result<Envelope> {
        Envelope::from_message(self)
    }
}

impl Delivery {
    /// Reads the delivery as an event: its envelope from the headers and its payload decoded
    /// from JSON into `T`. Fails with [`Error::Envelope`] when a header is missing or
    /// malformed, and with [`Error::Json`] when the payload does not decode into `T`; neither
    /// gets better on a retry (see [`crate::Worker::events`], which dead-letters such
    /// deliveries with reason `malformed`).
    pub fn event<T: DeserializeOwned>(&self) -> Result<Event<T>> {
        let envelope = self.message.envelope()?;
        let data = self.message.json()?;
        Ok(Event { envelope, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(msg: OutgoingMessage) -> Message {
        Message {
            id: uuid::Uuid::now_v7(),
            stream: "s".into(),
            payload: msg.payload.clone(),
            is_json: msg.is_json,
            headers: msg.headers,
            published_at: Utc::now(),
            key: msg.key,
        }
    }

    #[test]
    fn round_trip_and_defaults() {
        let m = message(OutgoingMessage::event("order.created", &7).unwrap());
        let e = m.envelope().unwrap();
        assert_eq!(e.event_id, m.id.to_string());
        assert_eq!(e.event_type, "order.created");
        assert_eq!(e.schema_version, 1);
        assert_eq!(e.producer, None);
        assert!((Utc::now() - e.produced_at).num_seconds() < 60);
        let m = message(
            OutgoingMessage::event("t", &7)
                .unwrap()
                .schema_version(3)
                .producer("svc")
                .event_id("up-1"),
        );
        let e = m.envelope().unwrap();
        assert_eq!(
            (e.event_id.as_str(), e.schema_version, e.producer.as_deref()),
            ("up-1", 3, Some("svc"))
        );
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let bad = |key: &str, value: &str| {
            let m = message(OutgoingMessage::event("t", &1).unwrap().header(key, value));
            match m.envelope() {
                Err(Error::Envelope { header, .. }) => assert_eq!(header, key),
                other => panic!("{key}={value:?}: {other:?}"),
            }
        };
        bad(EVENT_SCHEMA_VERSION_HEADER, "two");
        bad(EVENT_SCHEMA_VERSION_HEADER, "-1");
        bad(EVENT_PRODUCED_AT_HEADER, "yesterday");
        bad(EVENT_ID_HEADER, "");
        bad(EVENT_PRODUCER_HEADER, "a\nb");
        bad(TRACEPARENT_HEADER, "00-abc-def-01");
        bad(
            TRACEPARENT_HEADER,
            "00-00000000000000000000000000000000-0000000000000001-01",
        );
        let mut m = message(OutgoingMessage::json(&1).unwrap());
        assert!(matches!(
            m.envelope(),
            Err(Error::Envelope {
                header: EVENT_TYPE_HEADER,
                ..
            })
        ));
        m.headers.insert(
            TRACEPARENT_HEADER.into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        m.headers.insert(EVENT_TYPE_HEADER.into(), "t".into());
        m.headers
            .insert(EVENT_SCHEMA_VERSION_HEADER.into(), "1".into());
        m.headers
            .insert(EVENT_PRODUCED_AT_HEADER.into(), Utc::now().to_rfc3339());
        assert!(m.envelope().unwrap().traceparent.is_some());
        assert!(OutgoingMessage::event("", &1).is_err());
    }
}
