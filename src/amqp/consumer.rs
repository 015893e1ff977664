//! [`AmqpConsumer`]: fetch and settle.
//!
//! Settles that change a message (nack with delay, dead letter, hand back) publish a copy
//! carrying the attempt count and error in `pgtide-*` headers, wait for its confirm, then ack
//! the original: a crash in between can duplicate a message, never lose it (at-least-once).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;

use super::codec::{
    int, properties, text, H_ATTEMPTS, H_ATTEMPTS_MADE, H_DEAD_AT, H_ERROR, H_NOT_BEFORE, H_REASON,
};
use super::conn::broker_msg;
use super::lease::{Claimed, Shared, Token};
use super::publish::{split_delay, Outgoing, Route};
use crate::error::{Error, Result};
use crate::queue::{Delivery, QueueConsumer, SettleReport};

/// A consumer of the RabbitMQ backend: one AMQP channel, its own lease tracker and reaper.
/// Clones share them. Dropping the last clone (and every delivery it handed out) closes the
/// channel, and the broker requeues whatever was still unsettled.
#[derive(Debug, Clone)]
pub struct AmqpConsumer {
    pub(super) shared: Arc<Shared>,
}

/// Headers of a dead letter.
pub(crate) fn dead_headers(
    reason: &str,
    error: Option<&str>,
    attempts: u32,
) -> Vec<(&'static str, AMQPValue)> {
    let mut h = vec![
        (H_REASON, text(reason)),
        (H_ATTEMPTS_MADE, int(i64::from(attempts))),
        (H_DEAD_AT, int(Utc::now().timestamp_millis())),
    ];
    if let Some(e) = error {
        h.push((H_ERROR, text(e)));
    }
    h
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Deliveries of `ds` whose lease this group's consumers still hold, taken out of their
/// trackers (so the reaper cannot return them meanwhile).
fn claim<'a>(
    stream: &str,
    group: &str,
    ds: &[&'a Delivery],
) -> Vec<(&'a Delivery, &'a Token, Claimed)> {
    ds.iter()
        .filter_map(|d| {
            let token = d.token::<Token>()?;
            if token.shared.stream != stream || token.shared.group != group {
                return None;
            }
            let c = token.shared.claim(token, d.id())?;
            Some((*d, token, c))
        })
        .collect()
}

/// Acks claimed deliveries; returns the ids whose ack reached a live channel.
async fn ack_claimed(claims: &[(&Delivery, &Token, Claimed)]) -> Vec<uuid::Uuid> {
    let acks = claims.iter().map(|(d, token, c)| async move {
        let ch = token.shared.channel_of(c.generation).await?;
        match ch.basic_ack(c.tag, BasicAckOptions::default()).await {
            Ok(()) => Some(d.id()),
            // The channel died: the broker requeued the delivery, so its lease is lost.
            Err(e) => {
                tracing::debug!(error = %e, "pgtide amqp: ack failed");
                None
            }
        }
    });
    join_all(acks).await.into_iter().flatten().collect()
}

/// Replaces each claimed delivery by a copy (`copy` gives route and headers, and whether it
/// is a dead letter), then acks the originals.
async fn settle_by_copy<'a>(
    stream: &str,
    group: &str,
    ds: &[&'a Delivery],
    copy: impl Fn(&'a Delivery, &'a Token) -> (Route<'a>, Vec<(&'static str, AMQPValue)>, bool),
) -> Result<SettleReport> {
    let claims = claim(stream, group, ds);
    let Some((_, first, _)) = claims.first() else {
        return Ok(SettleReport::from_parts(ds, vec![], vec![]));
    };
    let backend = first.shared.backend.clone();
    let mut dead = std::collections::HashSet::new();
    let items = claims
        .iter()
        .map(|(d, token, _)| {
            let (route, extra, is_dead) = copy(d, token);
            if is_dead {
                dead.insert(d.id());
            }
            Outgoing {
                route,
                payload: &d.message.payload,
                props: properties(d.id(), d.is_json, &d.headers, extra),
            }
        })
        .collect();
    if let Err(e) = backend.send(items).await {
        for (_, token, c) in claims {
            token.shared.unclaim(c);
        }
        return Err(e);
    }
    // The copies are in place: whatever happens to the originals, the settle took effect.
    let ids: Vec<_> = claims.iter().map(|(d, _, _)| d.id()).collect();
    ack_claimed(&claims).await;
    let (dead_lettered, settled) = ids.into_iter().partition(|id| dead.contains(id));
    Ok(SettleReport::from_parts(ds, settled, dead_lettered))
}

/// Hands deliveries back unprocessed: visible at once, attempt unchanged.
pub(crate) async fn release(stream: &str, group: &str, ds: &[&Delivery]) -> Result<SettleReport> {
    settle_by_copy(stream, group, ds, |d, token| {
        let mut extra = vec![(H_ATTEMPTS, int(i64::from(d.attempt.saturating_sub(1))))];
        if let Some(e) = &token.last_error {
            extra.push((H_ERROR, text(e)));
        }
        let route = Route::Queue {
            queue: &token.shared.names.queue,
            delay_ms: 0,
        };
        (route, extra, false)
    })
    .await
}

impl QueueConsumer for AmqpConsumer {
    fn stream(&self) -> &str {
        &self.shared.stream
    }

    fn group(&self) -> &str {
        &self.shared.group
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    async fn lease(&self) -> Option<Duration> {
        Some(self.shared.config.lease)
    }

    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        self.fetch(max, Duration::ZERO).await
    }

    /// Cancel-safe: if this future is dropped, the fetch finishes in the background and hands
    /// back what it received, attempt unchanged.
    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        let shared = self.shared.clone();
        let stop = shared.token.child_token();
        let guard = stop.clone().drop_guard();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = shared.fetch_now(max, timeout, &stop).await;
            if let Err(Ok(orphans)) = tx.send(result) {
                let refs: Vec<&Delivery> = orphans.iter().collect();
                if let Err(e) = release(&shared.stream, &shared.group, &refs).await {
                    tracing::warn!(error = %e, "pgtide amqp: handing back a cancelled fetch failed; the leases will expire");
                }
            }
        });
        let result = rx
            .await
            .unwrap_or_else(|_| Err(broker_msg("the fetch task ended without an answer", true)));
        guard.disarm();
        result
    }

    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        let claims = claim(&self.shared.stream, &self.shared.group, ds);
        let settled = ack_claimed(&claims).await;
        Ok(SettleReport::from_parts(ds, settled, vec![]))
    }

    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        crate::limits::check_nack_delay(delay)?;
        settle_by_copy(&self.shared.stream, &self.shared.group, ds, |d, token| {
            let shared = &token.shared;
            let config = &shared.config;
            if d.attempt >= config.max_deliver {
                let route = Route::Exchange {
                    exchange: &shared.names.dead,
                    key: "",
                };
                return (route, dead_headers("max_deliver", error, d.attempt), true);
            }
            let wait = delay.unwrap_or_else(|| config.backoff.delay(d.attempt));
            let (hop, due) = split_delay(ms(wait));
            let mut extra = vec![(H_ATTEMPTS, int(i64::from(d.attempt)))];
            if let Some(e) = error {
                extra.push((H_ERROR, text(e)));
            }
            if let Some(due) = due {
                extra.push((H_NOT_BEFORE, int(due)));
            }
            let route = Route::Queue {
                queue: &shared.names.queue,
                delay_ms: hop,
            };
            (route, extra, false)
        })
        .await
    }

    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        settle_by_copy(&self.shared.stream, &self.shared.group, ds, |d, token| {
            let route = Route::Exchange {
                exchange: &token.shared.names.dead,
                key: "",
            };
            let extra = dead_headers(reason, token.last_error.as_deref(), d.attempt);
            (route, extra, true)
        })
        .await
    }

    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        crate::limits::check_lease_override(lease)?;
        let id = d.id();
        let extended = d.token::<Token>().and_then(|token| {
            let shared = &token.shared;
            let lease = lease.unwrap_or(shared.config.lease);
            let mine = shared.group == self.shared.group && shared.stream == self.shared.stream;
            (mine && shared.in_progress(token, id, lease)).then_some(lease)
        });
        match extended {
            Some(lease) => {
                d.lease_expires_at = Utc::now() + lease;
                Ok(())
            }
            None => Err(Error::LeaseLost { id }),
        }
    }

    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        release(&self.shared.stream, &self.shared.group, ds).await
    }
}
