//! One named consumer of a group: claims from the group runtime, settles fenced by claim number.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use tokio::time::Instant;

use super::admin::group_not_found;
use super::group::{Entry, Group, Token};
use super::{lock, KafkaBackend};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{Delivery, QueueConsumer, SettleReport};

/// What a settle did to one delivery.
enum Settled {
    Done,
    Dead,
    Lost,
}

/// A consumer of the Kafka backend: one named fetcher of its handle's runtime for the group.
/// Cheap to clone.
#[derive(Clone)]
pub struct KafkaConsumer {
    /// Keeps the handle (and so the runtime's driver) alive while the consumer is used.
    _backend: KafkaBackend,
    group: Arc<Group>,
    name: String,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("stream", &self.group.stream)
            .field("group", &self.group.group)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl KafkaConsumer {
    pub(super) async fn open(
        backend: &KafkaBackend,
        stream: &str,
        group: &str,
        name: &str,
    ) -> Result<Self> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", name)?;
        let key = (stream.to_owned(), group.to_owned());
        if let Some(g) = lock(&backend.inner.groups).get(&key) {
            if !g.token.is_cancelled() {
                return Ok(KafkaConsumer {
                    _backend: backend.clone(),
                    group: g.clone(),
                    name: name.to_owned(),
                });
            }
        }
        let meta = backend.fresh_meta(stream).await?;
        if !meta.groups.contains(group) {
            return Err(group_not_found(stream, group));
        }
        let mut groups = lock(&backend.inner.groups);
        let g = match groups.get(&key) {
            Some(g) if !g.token.is_cancelled() => g.clone(),
            _ => {
                let g = Group::start(backend, &meta, stream, group)?;
                groups.insert(key, g.clone());
                g
            }
        };
        Ok(KafkaConsumer {
            _backend: backend.clone(),
            group: g,
            name: name.to_owned(),
        })
    }

    fn gone(&self) -> Error {
        group_not_found(&self.group.stream, &self.group.group)
    }

    /// Claims up to `max` buffered records.
    fn claim(&self, max: usize) -> Vec<Delivery> {
        let g = &self.group;
        let lease = g.config.lease;
        let expires = Utc::now() + chrono(lease);
        g.lock()
            .claim(max, lease)
            .into_iter()
            .map(|(entry, claim)| Delivery {
                message: entry.record.message,
                group: g.group.clone(),
                consumer: self.name.clone(),
                attempt: entry.record.attempt,
                lease_expires_at: expires,
                token: Some(Arc::new(Token {
                    epoch: g.epoch,
                    key: entry.key,
                    claim,
                })),
            })
            .collect()
    }

    /// Takes the lease of `d` if it is still this delivery's: the entry, else `None` (lost).
    fn take(&self, d: &Delivery) -> Option<(Entry, u64, Instant)> {
        let token = d.token::<Token>()?;
        let g = &self.group;
        if token.epoch != g.epoch || d.group != g.group || d.stream != g.stream {
            return None;
        }
        let mut state = g.lock();
        match state.leased.get(&token.key) {
            Some(l) if l.claim == token.claim => state
                .leased
                .remove(&token.key)
                .map(|l| (l.entry, l.claim, l.expires)),
            _ => None,
        }
    }

    /// Puts a taken lease back after a failed write, unless its record was dropped meanwhile.
    fn put_back(&self, entry: Entry, claim: u64, expires: Instant) {
        let mut state = self.group.lock();
        state.leased.insert(
            entry.key,
            super::group::Lease {
                claim,
                expires,
                entry,
            },
        );
    }

    /// Takes each delivery's lease, runs `write` on it, and finishes its offset on success.
    async fn settle_all<'a, F, Fut>(&'a self, ds: &[&'a Delivery], write: F) -> Result<SettleReport>
    where
        F: Fn(Entry) -> Fut,
        Fut: std::future::Future<Output = Result<Settled>>,
    {
        let taken: Vec<_> = ds.iter().map(|d| self.take(d)).collect();
        let results = join_all(taken.into_iter().map(|t| {
            let write = &write;
            async move {
                let Some((entry, claim, expires)) = t else {
                    return Ok(Settled::Lost);
                };
                let key = entry.key;
                match write(entry.clone()).await {
                    Ok(s) => {
                        self.group.lock().finish(key);
                        Ok(s)
                    }
                    Err(e) => {
                        self.put_back(entry, claim, expires);
                        Err(e)
                    }
                }
            }
        }))
        .await;
        let (mut settled, mut dead) = (vec![], vec![]);
        let mut first_error = None;
        for (d, r) in ds.iter().zip(results) {
            match r {
                Ok(Settled::Done) => settled.push(d.id()),
                Ok(Settled::Dead) => dead.push(d.id()),
                Ok(Settled::Lost) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(SettleReport::from_parts(ds, settled, dead))
    }
}

impl QueueConsumer for KafkaConsumer {
    fn stream(&self) -> &str {
        &self.group.stream
    }
    fn group(&self) -> &str {
        &self.group.group
    }
    fn name(&self) -> &str {
        &self.name
    }

    async fn lease(&self) -> Option<Duration> {
        Some(self.group.config.lease)
    }

    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        if self.group.token.is_cancelled() {
            return Err(self.gone());
        }
        self.group.housekeep().await;
        Ok(self.claim(max))
    }

    /// Claims what the runtime has buffered; if nothing, waits for records, a lease expiry or a
    /// due time, up to `timeout`. Cancel-safe: nothing is claimed until the future returns.
    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        // Capped: a hostile timeout (Duration::MAX) must not overflow the clock.
        let deadline = Instant::now() + timeout.min(crate::MAX_DURATION);
        loop {
            if self.group.token.is_cancelled() {
                return Err(self.gone());
            }
            self.group.housekeep().await;
            let got = self.claim(max);
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            self.group.wait(deadline).await;
        }
    }

    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        self.settle_all(ds, |_| async { Ok(Settled::Done) }).await
    }

    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        crate::limits::check_nack_delay(delay)?;
        let g = &self.group;
        let config = &g.config;
        self.settle_all(ds, |entry| async move {
            let attempt = entry.record.attempt;
            if attempt >= config.max_deliver {
                g.dead_letter(&entry.record, "max_deliver", error, attempt)
                    .await?;
                return Ok(Settled::Dead);
            }
            let wait = delay.unwrap_or_else(|| config.backoff.delay(attempt));
            g.retry(&entry.record, attempt + 1, Utc::now() + chrono(wait), error)
                .await?;
            Ok(Settled::Done)
        })
        .await
    }

    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        let g = &self.group;
        self.settle_all(ds, |entry| async move {
            g.dead_letter(&entry.record, reason, None, entry.record.attempt)
                .await?;
            Ok(Settled::Dead)
        })
        .await
    }

    /// Moves the lease end to `lease` (or the stream's lease) from now; `LeaseLost` if this
    /// handle no longer holds the delivery.
    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        crate::limits::check_lease_override(lease)?;
        let lost = || Error::LeaseLost { id: d.id() };
        let token = d.token::<Token>().ok_or_else(lost)?;
        let g = &self.group;
        if token.epoch != g.epoch || d.group != g.group || d.stream != g.stream {
            return Err(lost());
        }
        let lease = lease.unwrap_or(g.config.lease);
        {
            let mut state = g.lock();
            match state.leased.get_mut(&token.key) {
                Some(l) if l.claim == token.claim => {
                    l.expires = Instant::now() + lease.min(crate::MAX_DURATION);
                }
                _ => return Err(lost()),
            }
        }
        d.lease_expires_at = Utc::now() + chrono(lease);
        Ok(())
    }

    /// Hands deliveries back, visible at once, without counting the attempt.
    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        let mut settled = vec![];
        for d in ds {
            if let Some((entry, _, _)) = self.take(d) {
                self.group.lock().ready.push_front(entry);
                settled.push(d.id());
            }
        }
        if !settled.is_empty() {
            self.group.notify.notify_waiters();
        }
        Ok(SettleReport::from_parts(ds, settled, vec![]))
    }
}
