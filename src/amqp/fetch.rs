//! Fetching. Ready messages are pulled with pipelined `basic.get`s (up to the fetch's `max`),
//! so a consumer only holds messages it asked for. To wait on an empty queue without polling,
//! a handle keeps a "doorbell": a `basic.consume` with prefetch 1 (`basic.qos`). The broker
//! pushes the first message that arrives; the doorbell's task buffers it, wakes the waiting
//! fetches and cancels the doorbell. The doorbell is only cancelled while it holds its one
//! message (its prefetch is used up), so no delivery can cross the cancel: a crossing delivery
//! would be returned by the broker and counted in `x-delivery-count` as an attempt that never
//! happened. A fetch that times out leaves the doorbell in place for the next one; a buffered
//! message nobody fetches within a lease is handed back to the queue with its attempt
//! unchanged. When a handle is dropped while its doorbell is idle, a message crossing that
//! moment can still be counted once more (rare; documented).
//!
//! Every fetch runs in a task of its own: if the caller drops the future, the task still
//! finishes the protocol exchange and hands what it received back to the queue with the
//! attempt unchanged, so a cancelled fetch loses nothing (see [`super::AmqpConsumer`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{decode, int, properties, text, H_ATTEMPTS, H_ERROR, H_NOT_BEFORE};
use super::conn::{broker, is_not_found};
use super::lease::{Buffered, Shared, Token};
use super::publish::{split_delay, Outgoing, Route};
use crate::error::{Error, Result};
use crate::queue::{uuid_time, Delivery, Message};

/// Most `basic.get`s in flight at once.
const MAX_GETS: usize = 500;

impl Shared {
    fn group_not_found(&self) -> Error {
        Error::GroupNotFound {
            stream: self.stream.clone(),
            group: self.group.clone(),
        }
    }

    fn map_err(&self, e: lapin::Error) -> Error {
        if is_not_found(&e) {
            self.group_not_found()
        } else {
            broker(e)
        }
    }

    /// Claims up to `max` deliveries, waiting up to `timeout` for the first.
    pub(crate) async fn fetch_now(
        self: &Arc<Self>,
        max: usize,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Delivery>> {
        // Capped: a hostile timeout (Duration::MAX) must not overflow the clock.
        let deadline = Instant::now() + timeout.min(crate::MAX_DURATION);
        loop {
            // Register for the wake-up before looking, so a message buffered meanwhile counts.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let mut out = self.take_buffered(max).await?;
            if out.len() < max {
                match self.get_ready(max - out.len()).await {
                    Ok(more) => out.extend(more),
                    Err(e) if out.is_empty() => return Err(e),
                    Err(e) => tracing::debug!(error = %e, "pgtide amqp: topping up a fetch failed"),
                }
            }
            if !out.is_empty() || Instant::now() >= deadline || stop.is_cancelled() {
                return Ok(out);
            }
            self.ring_doorbell().await?;
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(vec![]),
                _ = tokio::time::sleep_until(deadline) => {}
                _ = &mut arrived => {}
            }
        }
    }

    /// Leases up to `max` buffered messages.
    async fn take_buffered(self: &Arc<Self>, max: usize) -> Result<Vec<Delivery>> {
        let taken: Vec<_> = {
            let mut b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
            let n = b.len().min(max);
            b.drain(..n).collect()
        };
        let mut out = vec![];
        let mut failed = None;
        for m in taken {
            // A replaced channel took its deliveries with it (the broker requeued them).
            let Some(ch) = self.channel_of(m.generation).await else {
                continue;
            };
            match self.accept(&ch, m.generation, m.delivery).await {
                Ok(Some(d)) => out.push(d),
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    /// Makes sure a doorbell consumer is registered on the current channel.
    async fn ring_doorbell(self: &Arc<Self>) -> Result<()> {
        let (ch, generation) = self.channel().await?;
        let mut bell = self.doorbell.lock().await;
        if matches!(&*bell, Some((g, _)) if *g == generation) {
            return Ok(());
        }
        self.prefetch(&ch, generation, 1).await?;
        let tag = self.consumer_tag();
        let consumer = ch
            .basic_consume(
                self.names.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.map_err(e))?;
        *bell = Some((generation, tag.clone()));
        let weak = Arc::downgrade(self);
        tokio::spawn(doorbell(
            weak,
            ch,
            generation,
            tag,
            consumer,
            self.token.clone(),
        ));
        Ok(())
    }

    async fn doorbell_gone(&self, generation: u64, tag: &str) {
        let mut bell = self.doorbell.lock().await;
        if matches!(&*bell, Some((g, t)) if *g == generation && t == tag) {
            *bell = None;
        }
    }

    fn buffer(&self, generation: u64, delivery: lapin::message::Delivery) {
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Buffered {
                generation,
                delivery,
                received: Instant::now(),
            });
        self.arrived.notify_waiters();
        self.wake_reaper();
    }

    /// Returns a received, never handed out message to the queue as a copy with its attempt
    /// unchanged, and acks the original.
    pub(crate) async fn hand_back(
        self: &Arc<Self>,
        generation: u64,
        raw: lapin::message::Delivery,
    ) -> Result<()> {
        let Some(ch) = self.channel_of(generation).await else {
            return Ok(()); // the broker requeued it with the channel
        };
        let m = decode(&raw.properties, raw.redelivered);
        let mut extra = vec![(H_ATTEMPTS, int(i64::from(m.attempt - 1)))];
        if let Some(e) = &m.last_error {
            extra.push((H_ERROR, text(e)));
        }
        if let Some(due) = m.not_before_ms {
            extra.push((H_NOT_BEFORE, int(due)));
        }
        let copy = Outgoing {
            route: Route::Queue {
                queue: &self.names.queue,
                delay_ms: 0,
            },
            payload: &raw.data,
            props: properties(m.id, m.is_json, &m.headers, extra),
        };
        if let Err(e) = self.backend.send(vec![copy]).await {
            // Rather than strand it here: the broker requeues it (counting one return).
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let _ = ch.basic_nack(raw.delivery_tag, requeue).await;
            return Err(e);
        }
        ch.basic_ack(raw.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(broker)
    }

    /// Pulls up to `max` ready messages.
    async fn get_ready(self: &Arc<Self>, max: usize) -> Result<Vec<Delivery>> {
        let (ch, generation) = self.channel().await?;
        let gets = (0..max.min(MAX_GETS)).map(|_| {
            ch.basic_get(
                self.names.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
        });
        let mut out = vec![];
        let mut failed = None;
        for got in join_all(gets).await {
            match got {
                Ok(Some(m)) => match self.accept(&ch, generation, m.delivery).await {
                    Ok(Some(d)) => out.push(d),
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                },
                Ok(None) => {}
                Err(e) => failed = Some(self.map_err(e)),
            }
        }
        match failed {
            // What was received is leased already: hand it out, report the error next time.
            Some(e) if out.is_empty() => Err(e),
            Some(e) => {
                tracing::debug!(error = %e, "pgtide amqp: part of a fetch failed");
                Ok(out)
            }
            None => Ok(out),
        }
    }

    /// Turns a received message into a leased delivery; or sends it round the delay topology
    /// again (delays longer than one pass), or dead-letters it (past `max_deliver`).
    async fn accept(
        self: &Arc<Self>,
        ch: &Channel,
        generation: u64,
        raw: lapin::message::Delivery,
    ) -> Result<Option<Delivery>> {
        let m = decode(&raw.properties, raw.redelivered);
        let tag = raw.delivery_tag;
        let now_ms = Utc::now().timestamp_millis();
        let mut extra = vec![];
        let route = if let Some(due) = m.not_before_ms.filter(|due| *due > now_ms) {
            let (hop, still_due) = split_delay((due - now_ms) as u64);
            extra.push((H_ATTEMPTS, int(i64::from(m.attempt - 1))));
            if let Some(e) = &m.last_error {
                extra.push((H_ERROR, text(e)));
            }
            if let Some(due) = still_due {
                extra.push((H_NOT_BEFORE, int(due)));
            }
            Route::Queue {
                queue: &self.names.queue,
                delay_ms: hop.max(1),
            }
        } else if m.attempt > self.config.max_deliver {
            let made = m.attempt - 1;
            let error = m
                .last_error
                .clone()
                .unwrap_or_else(|| format!("lease expired on attempt {made}"));
            extra = super::consumer::dead_headers("max_deliver", Some(&error), made);
            Route::Exchange {
                exchange: &self.names.dead,
                key: "",
            }
        } else {
            let lease = self.config.lease;
            if !self.track(generation, tag, m.id, lease) {
                return Ok(None); // the channel was replaced: the broker requeued it
            }
            return Ok(Some(Delivery {
                message: Message {
                    id: m.id,
                    stream: self.stream.clone(),
                    payload: raw.data.into(),
                    is_json: m.is_json,
                    headers: m.headers,
                    published_at: uuid_time(&m.id),
                    // Keys are not carried by this backend (no ordered groups here).
                    key: None,
                },
                group: self.group.clone(),
                consumer: self.name.clone(),
                attempt: m.attempt,
                lease_expires_at: Utc::now() + lease,
                token: Some(Arc::new(Token {
                    shared: self.clone(),
                    generation,
                    tag,
                    last_error: m.last_error,
                })),
            }));
        };
        let copy = Outgoing {
            route,
            payload: &raw.data,
            props: properties(m.id, m.is_json, &m.headers, extra),
        };
        if let Err(e) = self.backend.send(vec![copy]).await {
            // Not handed out and not moved: give it back rather than strand it on the channel.
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let _ = ch.basic_nack(tag, requeue).await;
            return Err(e);
        }
        ch.basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(broker)?;
        Ok(None)
    }
}

/// The doorbell's task: waits for the one message the broker may push, buffers it, then
/// cancels the consumer. Holds only a weak reference until a message comes, and stops when the
/// consumer handle is dropped.
async fn doorbell(
    shared: Weak<Shared>,
    ch: Channel,
    generation: u64,
    tag: String,
    mut consumer: lapin::Consumer,
    stop: CancellationToken,
) {
    let first = tokio::select! {
        biased;
        _ = stop.cancelled() => return,
        d = consumer.next() => d,
    };
    let Some(shared) = shared.upgrade() else {
        return;
    };
    // Unregister first, so a fetch from now on rings a new doorbell.
    shared.doorbell_gone(generation, &tag).await;
    let Some(Ok(d)) = first else {
        return; // cancelled by the server (queue deleted) or the channel closed
    };
    shared.buffer(generation, d);
    // Prefetch 1 is used up: nothing can be in flight to this consumer, the cancel races nothing.
    if let Err(e) = ch
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await
    {
        tracing::debug!(error = %e, "pgtide amqp: cancelling the doorbell failed");
        return;
    }
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await
    {
        shared.buffer(generation, d);
    }
}
