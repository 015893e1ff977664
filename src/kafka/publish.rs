//! Publishing: ready messages to the main topic, delayed ones to the delay topic with their due
//! time; all of a batch enqueued before any acknowledgement is awaited.

use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;
use uuid::Uuid;

use super::codec::Out;
use super::{broker, KafkaBackend, NAME};
use crate::error::{Error, Result};
use crate::queue::{OutgoingMessage, PublishReceipt};

impl KafkaBackend {
    /// Publishes `msgs`; receipts in input order. If it fails part way, some messages may be
    /// published: Kafka has no dedupe keys, so a retry can store them twice.
    pub(super) async fn publish_all(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        crate::names::validate_name("stream", stream)?;
        if msgs.iter().any(|m| m.dedupe_key.is_some()) {
            return Err(Error::Unsupported {
                backend: NAME,
                what: "dedupe keys (Kafka has no per-key duplicate detection)",
            });
        }
        let meta = self.meta(stream).await?;
        let limit = meta.config.max_payload;
        if let Some(m) = msgs.iter().find(|m| m.payload.len() > limit) {
            return Err(Error::PayloadTooLarge {
                stream: stream.to_owned(),
                size: m.payload.len(),
                limit,
            });
        }
        let now = Utc::now();
        let mut pending = Vec::with_capacity(msgs.len());
        for m in msgs {
            let id = Uuid::now_v7();
            let due = match (m.deliver_at, m.delay) {
                (Some(at), _) => Some(at),
                (None, Some(d)) => chrono::Duration::from_std(d).ok().map(|d| now + d),
                (None, None) => None,
            }
            .filter(|at| *at > now);
            let mut headers = Out::message(id, m.is_json, &m.headers)?;
            let (topic, producer) = match due {
                Some(at) => {
                    headers = headers.deliver_at(at);
                    (&meta.names.delay, &self.inner.single)
                }
                None => (&meta.names.main, &self.inner.producer),
            };
            let mut record = FutureRecord::<str, [u8]>::to(topic)
                .payload(&m.payload[..])
                .headers(headers.build());
            // An ordering key is the record key, so Kafka's partitioner keeps one key's records
            // in one partition, in publish order (groups still lease them independently:
            // `ordering_keys` is false).
            if let Some(key) = m.key.as_deref() {
                record = record.key(key);
            }
            match producer.send_result(record) {
                Ok(delivery) => pending.push((id, delivery)),
                Err((e, _)) => return Err(self.publish_failed(stream, e).await),
            }
        }
        let mut receipts = Vec::with_capacity(msgs.len());
        for (id, delivery) in pending {
            match delivery.await {
                Ok(Ok(_)) => receipts.push(PublishReceipt {
                    id,
                    duplicate: false,
                }),
                Ok(Err((e, _))) => return Err(self.publish_failed(stream, e).await),
                Err(canceled) => return Err(broker(canceled, true)),
            }
        }
        Ok(receipts)
    }

    async fn publish_failed(&self, stream: &str, e: KafkaError) -> Error {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition)
            | Some(RDKafkaErrorCode::UnknownTopic) => {
                self.forget(stream);
                match self.partitions_of(&self.names(stream).main).await {
                    Ok(None) => Error::StreamNotFound(stream.to_owned()),
                    Ok(Some(_)) => broker(e, true),
                    Err(check) => check,
                }
            }
            Some(RDKafkaErrorCode::QueueFull) => broker(e, true),
            Some(RDKafkaErrorCode::MessageSizeTooLarge)
            | Some(RDKafkaErrorCode::InvalidMessageSize) => broker(e, false),
            _ => broker(e, true),
        }
    }
}
