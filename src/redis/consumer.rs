//! Consumers: fetch (one claim script, then a blocking wake-up read) and fenced settles.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::Value;
use tokio::time::Instant;

use super::admin::{load_config, parse_headers};
use super::keys::{GroupKeys, StreamKeys};
use super::{array, bad_reply, broker, bytes, int, script_error, text, RedisBackend};
use crate::config::StreamConfig;
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::queue::{uuid_time, Delivery, Message, QueueConsumer, SettleReport};

/// A consumer of the Redis Streams backend: one Redis consumer of the group's log and retry
/// streams. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RedisConsumer {
    backend: RedisBackend,
    stream: String,
    group: String,
    name: String,
    keys: Arc<(StreamKeys, GroupKeys)>,
    config: Arc<StreamConfig>,
}

/// Settle handle of a delivery: where its pending entry is and which delivery of it this is.
#[derive(Debug)]
struct Token {
    /// The log key, naming namespace and stream.
    log: String,
    /// `l` (the log) or `r` (the group's retry stream).
    src: String,
    entry: String,
    count: i64,
}

/// What one claim returned.
struct Claim {
    deliveries: Vec<Delivery>,
    now_ms: i64,
    next_due_ms: Option<i64>,
    lease: Duration,
    /// Last entry ids of the log, the retry stream and the wake stream (empty if any delivery).
    last_ids: Vec<String>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl RedisConsumer {
    pub(super) async fn new(
        backend: &RedisBackend,
        stream: &str,
        group: &str,
        name: &str,
    ) -> Result<Self> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", name)?;
        let config = load_config(backend, stream, group).await?;
        let keys = backend.keys(stream);
        let group_keys = keys.group(group);
        Ok(RedisConsumer {
            backend: backend.clone(),
            stream: stream.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
            keys: Arc::new((keys, group_keys)),
            config: Arc::new(config),
        })
    }

    async fn claim(&self, max: usize) -> Result<Claim> {
        let (k, g) = &*self.keys;
        let reply: Value = self
            .backend
            .inner
            .scripts
            .fetch
            .key(&k.meta)
            .key(&k.groups)
            .key(&k.log)
            .key(&k.delayed)
            .key(&g.retry)
            .key(&g.later)
            .key(&g.leases)
            .key(&g.dead)
            .key(&k.wake)
            .arg(&self.group)
            .arg(&self.name)
            .arg(max)
            .invoke_async(&mut self.backend.conn())
            .await
            .map_err(|e| script_error(e, &self.stream, Some(&self.group)))?;
        let mut it = array(reply)?.into_iter();
        let mut next = || it.next().ok_or_else(|| bad_reply("fetch"));
        let now_ms = int(&next()?)?;
        let next_due_ms = Some(int(&next()?)?).filter(|at| *at >= 0);
        let lease = Duration::from_millis(u64::try_from(int(&next()?)?).unwrap_or(1));
        let last_ids = array(next()?)?
            .into_iter()
            .map(text)
            .collect::<Result<_>>()?;
        let deliveries = array(next()?)?
            .into_iter()
            .map(|row| self.delivery(row))
            .collect::<Result<_>>()?;
        Ok(Claim {
            deliveries,
            now_ms,
            next_due_ms,
            lease,
            last_ids,
        })
    }

    /// A delivery from a claim row: src, entry id, delivery count, attempt, lease expiry (ms),
    /// message id, payload, json flag, headers.
    fn delivery(&self, row: Value) -> Result<Delivery> {
        let mut f = array(row)?.into_iter();
        let mut next = || f.next().ok_or_else(|| bad_reply("delivery"));
        let src = text(next()?)?;
        let entry = text(next()?)?;
        let count = int(&next()?)?;
        let attempt = u32::try_from(int(&next()?)?).unwrap_or(u32::MAX);
        let expires = DateTime::from_timestamp_millis(int(&next()?)?).unwrap_or_else(Utc::now);
        let id = text(next()?)?
            .parse()
            .map_err(|_| bad_reply("message id is not a UUID"))?;
        let payload = bytes(next()?)?;
        let is_json = text(next()?)? == "1";
        let headers = parse_headers(Some(&bytes(next()?)?));
        Ok(Delivery {
            message: Message {
                id,
                stream: self.stream.clone(),
                payload: payload.into(),
                is_json,
                headers,
                published_at: uuid_time(&id),
                // Keys are not carried by this backend (no ordered groups here).
                key: None,
            },
            group: self.group.clone(),
            consumer: self.name.clone(),
            attempt,
            lease_expires_at: expires,
            token: Some(Arc::new(Token {
                log: self.keys.0.log.clone(),
                src,
                entry,
                count,
            })),
        })
    }

    /// Waits until something may have become claimable: a new entry in the log, the group's
    /// retry stream or the wake stream after `last_ids`, or `wait`.
    async fn block(&self, last_ids: &[String], wait: Duration) -> Result<()> {
        let (k, g) = &*self.keys;
        // A dropped future drops this connection too, so a read still blocked on the server
        // never delays anyone else.
        let mut conn = self.backend.blocking_conn().await?;
        let read = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(ms(wait).max(1))
            .arg("STREAMS")
            .arg(&k.log)
            .arg(&g.retry)
            .arg(&k.wake)
            .arg(last_ids)
            .query_async::<Value>(&mut conn)
            .await;
        match read {
            Ok(_) => {
                self.backend.reuse_blocking_conn(conn);
                Ok(())
            }
            Err(e) => {
                self.backend.drop_blocking_conns();
                Err(broker(e))
            }
        }
    }

    /// Runs the settle script for `op` on the deliveries that are this group's; returns each
    /// one's status (0 lost, 1 settled, 2 dead-lettered; the lease expiry for `in_progress`).
    async fn settle<'d>(
        &self,
        op: &str,
        ds: &[&'d Delivery],
        text: Option<&str>,
        lease: Option<Duration>,
        delay: impl Fn(&Delivery) -> Duration,
    ) -> Result<Vec<(&'d Delivery, i64)>> {
        let (k, g) = &*self.keys;
        let mine: Vec<(&Delivery, &Token)> = ds
            .iter()
            .filter_map(|d| {
                let t = d.token::<Token>()?;
                (t.log == k.log && d.group == self.group).then_some((*d, t))
            })
            .collect();
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.backend.inner.scripts.settle.prepare_invoke();
        call.key(&k.meta)
            .key(&k.log)
            .key(&g.retry)
            .key(&g.later)
            .key(&g.leases)
            .key(&g.dead)
            .key(&k.wake)
            .arg(op)
            .arg(&self.group)
            .arg(text.map_or_else(String::new, |t| format!("={t}")))
            .arg(lease.map_or_else(String::new, |l| ms(l).max(1).to_string()));
        for (d, t) in &mine {
            call.arg(&t.src)
                .arg(&t.entry)
                .arg(t.count)
                .arg(d.id().to_string())
                .arg(&d.consumer)
                .arg(ms(delay(d)));
        }
        let reply: Value = call
            .invoke_async(&mut self.backend.conn())
            .await
            .map_err(|e| script_error(e, &self.stream, Some(&self.group)))?;
        let status = array(reply)?;
        if status.len() != mine.len() {
            return Err(bad_reply("one settle status per delivery"));
        }
        mine.into_iter()
            .zip(status)
            .map(|((d, _), s)| Ok((d, int(&s)?)))
            .collect()
    }

    async fn report(
        &self,
        op: &str,
        ds: &[&Delivery],
        text: Option<&str>,
        delay: impl Fn(&Delivery) -> Duration,
    ) -> Result<SettleReport> {
        let (mut settled, mut dead) = (Vec::new(), Vec::new());
        for (d, status) in self.settle(op, ds, text, None, delay).await? {
            match status {
                1 => settled.push(d.id()),
                2 => dead.push(d.id()),
                _ => {}
            }
        }
        Ok(SettleReport::from_parts(ds, settled, dead))
    }
}

impl QueueConsumer for RedisConsumer {
    fn stream(&self) -> &str {
        &self.stream
    }

    fn group(&self) -> &str {
        &self.group
    }

    fn name(&self) -> &str {
        &self.name
    }

    async fn lease(&self) -> Option<Duration> {
        Some(self.config.lease)
    }

    /// Claims what is ready. If dropped while the claim runs, the claimed deliveries are
    /// redelivered after their lease.
    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        Ok(self.claim(max).await?.deliveries)
    }

    /// Claims, then waits on the server (no polling) until new entries, a wake-up, the next due
    /// time or `timeout`, and claims again. Cancel-safe as [`QueueConsumer::try_fetch`].
    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(vec![]);
        }
        // Capped: a hostile timeout (Duration::MAX) must not overflow the clock.
        let deadline = Instant::now() + timeout.min(crate::MAX_DURATION);
        loop {
            let claim = self.claim(max).await?;
            let now = Instant::now();
            if !claim.deliveries.is_empty() || now >= deadline {
                return Ok(claim.deliveries);
            }
            // Bounded by the lease too: a lease taken by another consumer after this read
            // started expires no earlier than one lease from now.
            let mut wait = (deadline - now).min(claim.lease);
            if let Some(at) = claim.next_due_ms {
                let due_in = u64::try_from(at - claim.now_ms).unwrap_or(0);
                wait = wait.min(Duration::from_millis(due_in + 1));
            }
            if claim.last_ids.len() != 3 {
                return Err(bad_reply("fetch without wake-up ids"));
            }
            match tokio::time::timeout(
                wait + Duration::from_secs(5),
                self.block(&claim.last_ids, wait),
            )
            .await
            {
                Ok(r) => r?,
                // The server did not answer a bounded read: the connection is dropped with
                // the future; the next claim reports real trouble.
                Err(_) => tracing::warn!(
                    stream = %self.stream,
                    group = %self.group,
                    "pgtide redis: blocking read timed out"
                ),
            }
        }
    }

    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        self.report("ack", ds, None, |_| Duration::ZERO).await
    }

    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        crate::limits::check_nack_delay(delay)?;
        let config = self.config.clone();
        self.report("nack", ds, error, move |d| {
            delay.unwrap_or_else(|| config.backoff.delay(d.attempt))
        })
        .await
    }

    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        self.report("term", ds, Some(reason), |_| Duration::ZERO)
            .await
    }

    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        crate::limits::check_lease_override(lease)?;
        let result = self
            .settle("in_progress", &[&*d], None, lease, |_| Duration::ZERO)
            .await?;
        match result.first() {
            Some((_, expires)) if *expires > 0 => {
                if let Some(at) = DateTime::from_timestamp_millis(*expires) {
                    d.lease_expires_at = at;
                }
                Ok(())
            }
            _ => Err(Error::LeaseLost { id: d.id() }),
        }
    }

    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        self.report("release", ds, None, |_| Duration::ZERO).await
    }
}
