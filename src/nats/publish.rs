//! Publishing: ready messages to the ready subject, delayed ones to the delayed subject (for the
//! mover), dedupe through `Nats-Msg-Id`.

use std::error::Error as _;
use std::sync::Arc;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use chrono::Utc;
use uuid::Uuid;

use super::api::{self, code};
use super::{codec, mover, NatsBackend, StreamMeta};
use crate::error::{Error, Result};
use crate::queue::{OutgoingMessage, PublishReceipt};

impl NatsBackend {
    /// Publishes `msgs` pipelined (all sent, then all acknowledgements awaited); receipts in
    /// input order. If it fails part way, the messages before the failure are published:
    /// publish again with dedupe keys to make the retry idempotent.
    pub(super) async fn publish_all(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        let meta = self.meta(stream).await?;
        let limit = meta.config.max_payload;
        if let Some(m) = msgs.iter().find(|m| m.payload.len() > limit) {
            return Err(Error::PayloadTooLarge {
                stream: stream.to_owned(),
                size: m.payload.len(),
                limit,
            });
        }
        let dedupe = !meta.config.dedupe_window.is_zero();
        let mut pending = Vec::with_capacity(msgs.len());
        let mut delayed = false;
        for m in msgs {
            let (id, ack, was_delayed) = self.send(&meta, stream, m, dedupe).await?;
            delayed |= was_delayed;
            pending.push((id, ack));
        }
        if delayed {
            mover::ensure(self, &meta);
        }
        let mut receipts = Vec::with_capacity(msgs.len());
        for ((id, ack), m) in pending.into_iter().zip(msgs) {
            let ack = match ack.await {
                Ok(ack) => ack,
                Err(e) => return Err(self.publish_failed(stream, m, e).await),
            };
            if ack.duplicate {
                receipts.push(self.original(&meta, stream, m, ack.sequence).await?);
            } else {
                receipts.push(PublishReceipt {
                    id,
                    duplicate: false,
                });
            }
        }
        Ok(receipts)
    }

    /// Sends one message; returns its id, its acknowledgement, and whether it is delayed.
    async fn send(
        &self,
        meta: &Arc<StreamMeta>,
        stream: &str,
        m: &OutgoingMessage,
        dedupe: bool,
    ) -> Result<(Uuid, PublishAckFuture, bool)> {
        let id = Uuid::now_v7();
        let now = Utc::now();
        let due = match (m.deliver_at, m.delay) {
            (Some(at), _) => Some(at),
            (None, Some(d)) => chrono::Duration::from_std(d).ok().map(|d| now + d),
            (None, None) => None,
        }
        .filter(|at| *at > now);
        let subject = match due {
            Some(_) => meta.names.delayed.clone(),
            None => meta.names.ready.clone(),
        };
        let headers = codec::outgoing(m, id, dedupe, due)?;
        let publish = PublishMessage::build()
            .payload(m.payload.clone())
            .headers(headers);
        match self.inner.js.send_publish(subject, publish).await {
            Ok(ack) => Ok((id, ack, due.is_some())),
            Err(e) => Err(self.publish_failed(stream, m, e).await),
        }
    }

    /// The receipt of a duplicate: the original's id, read back from the stream. If the
    /// original is gone (purged), the message is published anew without its dedupe key, as a
    /// purge also forgets dedupe keys on the other backends.
    async fn original(
        &self,
        meta: &Arc<StreamMeta>,
        stream: &str,
        m: &OutgoingMessage,
        seq: u64,
    ) -> Result<PublishReceipt> {
        match api::get_message(&self.inner.js, &meta.names.stream, seq, None).await? {
            Some(original) => Ok(PublishReceipt {
                id: codec::message_id(Some(&original.headers))
                    .unwrap_or_else(|| Uuid::from_u64_pair(0, seq)),
                duplicate: true,
            }),
            None => {
                let (id, ack, delayed) = self.send(meta, stream, m, false).await?;
                if delayed {
                    mover::ensure(self, meta);
                }
                ack.await
                    .map_err(|e| api::broker(e, true))
                    .map(|_| PublishReceipt {
                        id,
                        duplicate: false,
                    })
            }
        }
    }

    async fn publish_failed(&self, stream: &str, m: &OutgoingMessage, e: PublishError) -> Error {
        let too_large = || Error::PayloadTooLarge {
            stream: stream.to_owned(),
            size: m.payload.len(),
            limit: self.inner.client.server_info().max_payload,
        };
        match e.kind() {
            // No responders on the subject: the stream is gone, or (in a cluster) has no leader
            // at the moment.
            PublishErrorKind::StreamNotFound => {
                self.forget(stream);
                let names = self.names(stream);
                match api::stream_info(&self.inner.js, &names.stream, None).await {
                    Ok(None) => Error::StreamNotFound(stream.to_owned()),
                    Ok(Some(_)) => api::broker(e, true),
                    Err(check) => check,
                }
            }
            PublishErrorKind::MaxPayloadExceeded => too_large(),
            PublishErrorKind::Other => {
                let server = e
                    .source()
                    .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                    .cloned();
                match server {
                    Some(js) if js.error_code().0 == code::MESSAGE_TOO_LARGE => too_large(),
                    Some(js) => api::api_error(js),
                    None => api::broker(e, true),
                }
            }
            _ => api::broker(e, true),
        }
    }
}
