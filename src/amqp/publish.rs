//! Publishing: new messages to a stream (directly or through the delay topology) and copies of
//! received messages (retries, dead letters, hand-backs). Every publish waits for its
//! publisher confirm; a batch is sent in one go and its confirms awaited together.

use chrono::Utc;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use uuid::Uuid;

use super::codec::{int, properties, H_NOT_BEFORE};
use super::conn::{broker, broker_msg, is_not_found};
use super::names::{delay_level, delay_routing_key, DELAY_LEVELS, MAX_DELAY_MS, ROUTING_KEY};
use super::{topology, AmqpBackend};
use crate::error::{Error, Result};
use crate::queue::{OutgoingMessage, PublishReceipt};

/// Where a message goes.
pub(crate) enum Route<'a> {
    /// An exchange with a routing key.
    Exchange { exchange: &'a str, key: &'a str },
    /// One queue (through the default exchange), after `delay_ms` (0: now).
    Queue { queue: &'a str, delay_ms: u64 },
}

/// One message to send.
pub(crate) struct Outgoing<'a> {
    pub route: Route<'a>,
    pub payload: &'a [u8],
    pub props: BasicProperties,
}

/// Splits a delay into what one pass through the delay levels covers and, for longer delays,
/// the due time (Unix ms) the consumer checks to send the message round again.
pub(crate) fn split_delay(delay_ms: u64) -> (u64, Option<i64>) {
    if delay_ms > MAX_DELAY_MS {
        let due = Utc::now().timestamp_millis() + delay_ms.min(i64::MAX as u64 / 2) as i64;
        (MAX_DELAY_MS, Some(due))
    } else {
        (delay_ms, None)
    }
}

/// True for a broker 404 (the exchange or queue does not exist).
pub(crate) fn not_found(e: &Error) -> bool {
    match e {
        Error::Broker { source, .. } => source
            .downcast_ref::<lapin::Error>()
            .is_some_and(is_not_found),
        _ => false,
    }
}

impl AmqpBackend {
    /// Publishes and waits for every confirm.
    pub(crate) async fn send(&self, items: Vec<Outgoing<'_>>) -> Result<()> {
        for it in &items {
            if let Route::Queue { queue, delay_ms } = it.route {
                if delay_ms > 0 {
                    self.route_delayed(queue).await?;
                }
            }
        }
        let top = delay_level(&self.inner.ns, DELAY_LEVELS as i32 - 1);
        let ch = self.inner.conn.publisher().await?;
        let mut confirms = Vec::with_capacity(items.len());
        for it in items {
            let (exchange, key) = match it.route {
                Route::Exchange { exchange, key } => (exchange.to_owned(), key.to_owned()),
                Route::Queue { queue, delay_ms: 0 } => (String::new(), queue.to_owned()),
                Route::Queue { queue, delay_ms } => (
                    top.clone(),
                    delay_routing_key(delay_ms.min(MAX_DELAY_MS), queue),
                ),
            };
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    it.payload,
                    it.props,
                )
                .await
                .map_err(broker)?;
            confirms.push(confirm);
        }
        let mut refused = false;
        for c in confirms {
            refused |= c.await.map_err(broker)?.is_nack();
        }
        if refused {
            return Err(broker_msg(
                "RabbitMQ refused a publish (negative publisher confirm); publish again",
                true,
            ));
        }
        Ok(())
    }

    /// Makes sure the delay topology exists and delivers to `queue`.
    pub(crate) async fn route_delayed(&self, queue: &str) -> Result<()> {
        if self.delay_route_known(queue) {
            return Ok(());
        }
        self.delay_levels().await?;
        let ch = self.inner.conn.channel().await?;
        topology::route_delayed_to(&ch, &self.inner.ns, queue).await?;
        self.remember_delay_route(queue);
        Ok(())
    }

    async fn delay_levels(&self) -> Result<()> {
        let inner = &self.inner;
        inner
            .delay_levels
            .get_or_try_init(|| async {
                let ch = inner.conn.channel().await?;
                topology::declare_delay_levels(&ch, &inner.ns).await
            })
            .await?;
        Ok(())
    }

    /// Publishes to every group of `stream` (see [`crate::Queue::publish_batch`]).
    pub(crate) async fn publish_messages(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        crate::names::validate_name("stream", stream)?;
        if msgs.iter().any(|m| m.dedupe_key.is_some()) {
            return Err(Error::Unsupported {
                backend: super::conn::NAME,
                what: "dedupe keys (RabbitMQ has no message deduplication)",
            });
        }
        let s = self.stream_names(stream);
        let record = self.publisher_record(stream, &s).await?;
        let limit = record.config.to_config().max_payload;
        if let Some(m) = msgs.iter().find(|m| m.payload.len() > limit) {
            return Err(Error::PayloadTooLarge {
                stream: stream.to_owned(),
                size: m.payload.len(),
                limit,
            });
        }
        let now = Utc::now();
        let mut receipts = Vec::with_capacity(msgs.len());
        let mut items = Vec::with_capacity(msgs.len());
        for m in msgs {
            let id = Uuid::now_v7();
            let delay_ms = match (m.deliver_at, m.delay) {
                (Some(at), _) => (at - now).num_milliseconds().max(0) as u64,
                (None, Some(d)) => d.as_millis().min(u128::from(u64::MAX)) as u64,
                (None, None) => 0,
            };
            let (hop, due) = split_delay(delay_ms);
            let extra = due
                .map(|t| vec![(H_NOT_BEFORE, int(t))])
                .unwrap_or_default();
            let route = if delay_ms == 0 {
                Route::Exchange {
                    exchange: &s.exchange,
                    key: ROUTING_KEY,
                }
            } else {
                self.ensure_landing(&s).await?;
                Route::Queue {
                    queue: &s.landing,
                    delay_ms: hop,
                }
            };
            items.push(Outgoing {
                route,
                payload: &m.payload,
                props: properties(id, m.is_json, &m.headers, extra),
            });
            receipts.push(PublishReceipt {
                id,
                duplicate: false,
            });
        }
        match self.send(items).await {
            Ok(()) => Ok(receipts),
            Err(e) if not_found(&e) => {
                self.forget(stream);
                Err(Error::StreamNotFound(stream.to_owned()))
            }
            Err(e) => Err(e),
        }
    }

    /// The landing queue of delayed publishes, declared once per handle.
    async fn ensure_landing(&self, s: &super::names::StreamNames) -> Result<()> {
        if self.delay_route_known(&s.landing) {
            return Ok(());
        }
        self.delay_levels().await?;
        let ch = self.inner.conn.channel().await?;
        topology::declare_landing(&ch, &self.inner.ns, s).await?;
        self.remember_delay_route(&s.landing);
        Ok(())
    }
}
