//! A thin layer over the JetStream API: JSON requests with typed answers, the error codes pgtide
//! acts on, and pull requests.
//!
//! Requests are built with `serde_json::json!` rather than async-nats's config structs so that
//! exactly the fields NATS 2.9 understands are sent, and answers are read into small local
//! structs holding only what pgtide uses.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, response::Response, stream};
use async_nats::{Client, StatusCode, Subscriber};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// The backend's name in errors.
pub(super) const NAME: &str = "nats";

/// JetStream API error codes pgtide acts on.
pub(super) mod code {
    pub const CONSUMER_NOT_FOUND: u64 = 10014;
    pub const NO_MESSAGE_FOUND: u64 = 10037;
    pub const MESSAGE_TOO_LARGE: u64 = 10054;
    /// Also what deleting a message that is gone answers.
    pub const MESSAGE_DELETE_FAILED: u64 = 10057;
    pub const STREAM_NAME_IN_USE: u64 = 10058;
    pub const STREAM_NOT_FOUND: u64 = 10059;
}

/// A broker error.
pub(super) fn broker(
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    retryable: bool,
) -> Error {
    Error::Broker {
        backend: NAME,
        source: e.into(),
        retryable,
    }
}

/// A JetStream API error answer: retryable when the server says the fault is on its side
/// (no leader yet, cluster unavailable, ...).
pub(super) fn api_error(e: jetstream::Error) -> Error {
    let retryable = e.code() >= 500;
    broker(e, retryable)
}

/// Sends one JetStream API request (`subject` without the `$JS.API.` prefix). The outer result
/// is the transport (timeouts and lost connections are retryable), the inner one the server's
/// answer.
pub(super) async fn request<T: DeserializeOwned>(
    js: &jetstream::Context,
    subject: String,
    body: &impl Serialize,
) -> Result<Result<T, jetstream::Error>> {
    match js.request::<_, _, Response<T>>(subject, body).await {
        Ok(Response::Ok(v)) => Ok(Ok(v)),
        Ok(Response::Err { error }) => Ok(Err(error)),
        Err(e) => Err(broker(e, true)),
    }
}

/// The body of requests that take none (the server refuses `null`).
pub(super) fn empty() -> serde_json::Value {
    serde_json::json!({})
}

/// What pgtide reads from a stream info answer.
#[derive(Debug, Deserialize)]
pub(super) struct StreamInfo {
    pub config: StreamInfoConfig,
    pub state: StreamState,
}

/// What pgtide reads from a stream's configuration.
#[derive(Debug, Deserialize)]
pub(super) struct StreamInfoConfig {
    #[serde(default)]
    pub description: Option<String>,
}

/// What pgtide reads from a stream's state.
#[derive(Debug, Deserialize)]
pub(super) struct StreamState {
    /// Message count per subject, when asked for with a subjects filter.
    #[serde(default)]
    pub subjects: Option<HashMap<String, u64>>,
}

/// What pgtide reads from a consumer info answer.
#[derive(Debug, Deserialize)]
pub(super) struct ConsumerInfo {
    pub config: ConsumerInfoConfig,
    pub delivered: SequencePair,
    pub num_ack_pending: u64,
    pub num_pending: u64,
}

/// What pgtide reads from a consumer's configuration.
#[derive(Debug, Deserialize)]
pub(super) struct ConsumerInfoConfig {
    /// Nanoseconds.
    #[serde(default)]
    pub ack_wait: u64,
}

/// A consumer's position.
#[derive(Debug, Deserialize)]
pub(super) struct SequencePair {
    pub stream_seq: u64,
}

#[derive(Deserialize)]
struct Deleted {
    #[serde(default)]
    success: bool,
}

#[derive(Deserialize)]
struct Got {
    message: stream::RawMessage,
}

/// Stream info; `None` if the stream does not exist. With `subjects`, the state carries the
/// message count of each subject matching that filter.
pub(super) async fn stream_info(
    js: &jetstream::Context,
    stream: &str,
    subjects: Option<&str>,
) -> Result<Option<StreamInfo>> {
    let body = match subjects {
        Some(filter) => serde_json::json!({ "subjects_filter": filter }),
        None => empty(),
    };
    match request(js, format!("STREAM.INFO.{stream}"), &body).await? {
        Ok(info) => Ok(Some(info)),
        Err(e) if e.error_code().0 == code::STREAM_NOT_FOUND => Ok(None),
        Err(e) => Err(api_error(e)),
    }
}

/// Creates a stream from a JSON config. Returns false if a stream of that name exists with
/// another config (an identical one is accepted by the server as a no-op and returns true).
pub(super) async fn create_stream(
    js: &jetstream::Context,
    config: &serde_json::Value,
) -> Result<bool> {
    let name = config["name"].as_str().unwrap_or_default();
    match request::<serde_json::Value>(js, format!("STREAM.CREATE.{name}"), config).await? {
        Ok(_) => Ok(true),
        Err(e) if e.error_code().0 == code::STREAM_NAME_IN_USE => Ok(false),
        Err(e) => Err(api_error(e)),
    }
}

/// Deletes a stream; false if it did not exist.
pub(super) async fn delete_stream(js: &jetstream::Context, stream: &str) -> Result<bool> {
    match request::<Deleted>(js, format!("STREAM.DELETE.{stream}"), &empty()).await? {
        Ok(d) => Ok(d.success),
        Err(e) if e.error_code().0 == code::STREAM_NOT_FOUND => Ok(false),
        Err(e) => Err(api_error(e)),
    }
}

/// Purges a stream; false if it did not exist.
pub(super) async fn purge_stream(js: &jetstream::Context, stream: &str) -> Result<bool> {
    match request::<serde_json::Value>(js, format!("STREAM.PURGE.{stream}"), &empty()).await? {
        Ok(_) => Ok(true),
        Err(e) if e.error_code().0 == code::STREAM_NOT_FOUND => Ok(false),
        Err(e) => Err(api_error(e)),
    }
}

/// Why a consumer could not be found.
#[derive(Debug)]
pub(super) enum Missing {
    Stream,
    Consumer,
}

/// Consumer info, or which of stream and consumer is missing.
pub(super) async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<Result<ConsumerInfo, Missing>> {
    let subject = format!("CONSUMER.INFO.{stream}.{durable}");
    match request(js, subject, &empty()).await? {
        Ok(info) => Ok(Ok(info)),
        Err(e) if e.error_code().0 == code::CONSUMER_NOT_FOUND => Ok(Err(Missing::Consumer)),
        Err(e) if e.error_code().0 == code::STREAM_NOT_FOUND => Ok(Err(Missing::Stream)),
        Err(e) => Err(api_error(e)),
    }
}

/// Creates a durable consumer from a JSON config (idempotent for an identical config).
pub(super) async fn create_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: &serde_json::Value,
) -> Result<Result<(), Missing>> {
    let durable = config["durable_name"].as_str().unwrap_or_default();
    let subject = format!("CONSUMER.DURABLE.CREATE.{stream}.{durable}");
    let body = serde_json::json!({ "stream_name": stream, "config": config });
    match request::<serde_json::Value>(js, subject, &body).await? {
        Ok(_) => Ok(Ok(())),
        Err(e) if e.error_code().0 == code::STREAM_NOT_FOUND => Ok(Err(Missing::Stream)),
        Err(e) => Err(api_error(e)),
    }
}

/// Deletes a consumer; false if it (or its stream) did not exist.
pub(super) async fn delete_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<bool> {
    let subject = format!("CONSUMER.DELETE.{stream}.{durable}");
    match request::<Deleted>(js, subject, &empty()).await? {
        Ok(d) => Ok(d.success),
        Err(e)
            if matches!(
                e.error_code().0,
                code::CONSUMER_NOT_FOUND | code::STREAM_NOT_FOUND
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(api_error(e)),
    }
}

/// The stored message at `seq`, or with `subject`, the first one at or after `seq` on that
/// subject. `None` if there is none.
pub(super) async fn get_message(
    js: &jetstream::Context,
    stream: &str,
    seq: u64,
    subject: Option<&str>,
) -> Result<Option<jetstream::message::StreamMessage>> {
    let body = match subject {
        Some(s) => serde_json::json!({ "seq": seq, "next_by_subj": s }),
        None => serde_json::json!({ "seq": seq }),
    };
    match request::<Got>(js, format!("STREAM.MSG.GET.{stream}"), &body).await? {
        Ok(got) => Ok(Some(
            jetstream::message::StreamMessage::try_from(got.message)
                .map_err(|e| broker(e, false))?,
        )),
        Err(e)
            if matches!(
                e.error_code().0,
                code::NO_MESSAGE_FOUND | code::STREAM_NOT_FOUND
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(api_error(e)),
    }
}

/// Deletes one stored message (best effort: a message already gone is not an error).
pub(super) async fn delete_message(js: &jetstream::Context, stream: &str, seq: u64) -> Result<()> {
    let body = serde_json::json!({ "seq": seq, "no_erase": true });
    match request::<serde_json::Value>(js, format!("STREAM.MSG.DELETE.{stream}"), &body).await? {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.error_code().0,
                code::MESSAGE_DELETE_FAILED | code::STREAM_NOT_FOUND
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(api_error(e)),
    }
}

/// How a pull request ended without a message.
#[derive(Debug)]
pub(super) enum PullEnd {
    /// The batch is complete, or the server said nothing more is available.
    Done,
    /// No answer in time, or no responders: the consumer (or its leader) is missing.
    Silent,
    /// The consumer was deleted while the request was pending.
    Deleted,
    /// Another status, with its description.
    Failed(String),
}

/// One pull request to a durable consumer: up to `batch` messages, at once (`no_wait`) or
/// waiting up to `expires` for them. Dropping it unsubscribes; messages the server sends
/// afterwards stay unacknowledged until their ack wait passes, then are redelivered.
pub(super) struct Pull {
    sub: Subscriber,
    remaining: usize,
    deadline: Instant,
}

impl Pull {
    /// Sends the request. `reply_timeout` bounds the wait for the server's closing status.
    pub(super) async fn start(
        client: &Client,
        next_subject: String,
        batch: usize,
        expires: Option<Duration>,
        reply_timeout: Duration,
    ) -> Result<Pull> {
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| broker(e, true))?;
        let body = match expires {
            None => serde_json::json!({ "batch": batch, "no_wait": true }),
            Some(w) => serde_json::json!({ "batch": batch, "expires": w.as_nanos() as u64 }),
        };
        client
            .publish_with_reply(next_subject, inbox, serde_json::to_vec(&body)?.into())
            .await
            .map_err(|e| broker(e, true))?;
        Ok(Pull {
            sub,
            remaining: batch,
            deadline: Instant::now() + expires.unwrap_or_default() + reply_timeout,
        })
    }

    /// The next message, or why the request ended. Cancel-safe.
    pub(super) async fn next(&mut self) -> Result<async_nats::Message, PullEnd> {
        loop {
            if self.remaining == 0 {
                return Err(PullEnd::Done);
            }
            let m = match tokio::time::timeout_at(self.deadline, self.sub.next()).await {
                Err(_) => return Err(PullEnd::Silent),
                Ok(None) => return Err(PullEnd::Failed("subscription closed".into())),
                Ok(Some(m)) => m,
            };
            match m.status {
                None | Some(StatusCode::OK) => {
                    self.remaining -= 1;
                    return Ok(m);
                }
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                Some(StatusCode::NOT_FOUND) | Some(StatusCode::TIMEOUT) => {
                    return Err(PullEnd::Done)
                }
                Some(StatusCode::NO_RESPONDERS) => return Err(PullEnd::Silent),
                Some(status) => {
                    let description = m.description.unwrap_or_default();
                    return Err(if description.to_ascii_lowercase().contains("deleted") {
                        PullEnd::Deleted
                    } else {
                        PullEnd::Failed(format!("pull request ended: {status} {description}"))
                    });
                }
            }
        }
    }
}

/// Delivery count and stream sequence from a JetStream ack subject: `$JS.ACK.<stream>.
/// <consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or with domain and
/// account hash after `$JS.ACK.` (ADR-15).
pub(super) fn ack_info(reply: &str) -> Option<(u64, u64)> {
    let tokens: Vec<&str> = reply.strip_prefix("$JS.ACK.")?.split('.').collect();
    let at = match tokens.len() {
        7 => 2,
        n if n >= 9 => 4,
        _ => return None,
    };
    Some((tokens[at].parse().ok()?, tokens[at + 1].parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::ack_info;

    #[test]
    fn ack_subjects() {
        assert_eq!(ack_info("$JS.ACK.S.c.3.17.9.1700000000.0"), Some((3, 17)));
        assert_eq!(
            ack_info("$JS.ACK.dom.acc.S.c.2.5.4.1700000000.0.tok"),
            Some((2, 5))
        );
        assert_eq!(ack_info("$JS.ACK.S.c.x"), None);
        assert_eq!(ack_info("_INBOX.x"), None);
    }
}
