//! Consumers: fetch (claim with `FOR UPDATE SKIP LOCKED`) and settle (ack, nack, term,
//! in_progress, release), one delivery or many per statement.
//!
//! Every settle is fenced by the attempt number the fetch returned: a consumer whose lease lapsed
//! and whose delivery was claimed again gets [`Error::LeaseLost`] and changes nothing.
//!
//! With the cargo feature `metrics`, every claim records `pgtide_fetch_duration_seconds`,
//! `pgtide_delivered_total`, `pgtide_redeliveries_total` (attempt above 1) and
//! `pgtide_lease_expiries_total` (claimed again after a lease ran out unsettled; labels stream,
//! group) through the `metrics` facade.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::exec::{Caller, Exec, Statement};
use super::floor::{ClaimFloor, Claiming};
use super::wake::Wake;
use super::{micros, PgBackend};
use crate::error::{Ctx, Error, Result};
use crate::metrics::{self, ClaimMetrics};
use crate::names::validate_name;
use crate::queue::{headers_from_json, uuid_time, Delivery, Message, QueueConsumer, SettleReport};

/// A named consumer of one group. Cheap to clone. Several consumers of the same group compete:
/// each delivery goes to one of them at a time.
#[derive(Debug, Clone)]
pub struct PgConsumer {
    pg: PgBackend,
    stream: String,
    group: String,
    name: String,
    group_id: i32,
    lease: Option<Duration>,
    metrics: ClaimMetrics,
    /// Where this group's claims start (shared with the group's other consumers here).
    floor: Arc<ClaimFloor>,
}

/// Whether a settle's rows say that it may let a waiting consumer claim more (column `at`,
/// `wakes`: the group has a concurrency limit or key lines, `_settle_wakes` in
/// sql/functions/delivery.sql). Only rows of settled deliveries carry it; none: nothing settled.
/// The settle has committed when this is read, so a value that does not decode must not fail
/// it: it counts as a wake-up (one empty claim at worst).
fn settle_wakes(rows: &[tokio_postgres::Row], at: usize) -> bool {
    rows.first().is_some_and(|r| {
        r.try_get::<_, Option<bool>>(at)
            .map_or(true, |w| w.unwrap_or(false))
    })
}

/// How many claimed rows report a lease that had expired unsettled (column `at`).
fn expired(rows: &[tokio_postgres::Row], at: usize) -> usize {
    rows.iter()
        .filter(|r| r.try_get::<_, Option<bool>>(at).ok().flatten() == Some(true))
        .count()
}

impl PgBackend {
    /// A consumer named `name` on `group` of `stream`. Fails if the group does not exist.
    pub async fn consumer(&self, stream: &str, group: &str, name: &str) -> Result<PgConsumer> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", name)?;
        let row = self
            .sql_row_opt(
                &self.inner.sql.group_id,
                &[&stream, &group],
                Ctx::group(stream, group),
            )
            .await?
            .ok_or_else(|| Error::GroupNotFound {
                stream: stream.to_owned(),
                group: group.to_owned(),
            })?;
        let group_id: i32 = row.try_get(0)?;
        Ok(PgConsumer {
            pg: self.clone(),
            stream: stream.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
            group_id,
            floor: self.inner.floors.of(group_id),
            lease: None,
            metrics: ClaimMetrics::new(stream, group),
        })
    }
}

/// The fence token a claim gave a delivery. Every claim draws a new random one (SQL
/// `_lease_token`), so a handle from before a release, a replay, a lapsed lease or a claim lost
/// in a crash cannot settle the next holder's delivery. A delivery without one (not claimed
/// through this engine) gets 0, which no claim ever gets: its settles are refused, never
/// unfenced.
fn lease_token(d: &Delivery) -> i64 {
    d.token::<i64>().copied().unwrap_or(0)
}

/// The fence columns of a settle: ids, attempts and lease tokens.
fn fences(ds: &[&Delivery]) -> (Vec<Uuid>, Vec<i32>, Vec<i64>) {
    (
        ds.iter().map(|d| d.id()).collect(),
        ds.iter().map(|d| d.attempt as i32).collect(),
        ds.iter().map(|d| lease_token(d)).collect(),
    )
}

impl PgConsumer {
    /// Overrides the stream's lease for deliveries this consumer fetches.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The consumer name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend handle.
    pub fn backend(&self) -> &PgBackend {
        &self.pg
    }

    /// The lease this consumer's fetches grant: its override, else the stream's.
    pub async fn lease(&self) -> Option<Duration> {
        if self.lease.is_some() {
            return self.lease;
        }
        match self.pg.cached_stream(&self.stream).await {
            Ok(info) => Some(info.config.lease),
            Err(_) => None,
        }
    }

    /// Claims up to `max` ready deliveries without waiting; returns an empty vector when there
    /// are none. Deliveries past `max_deliver` are moved to the dead letters on the way.
    ///
    /// Cancel safety: if dropped after the claim committed, the claimed deliveries become visible
    /// again when their lease expires; nothing is lost.
    pub async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        Ok(self.claim(max, false).await?.0)
    }

    /// [`PgConsumer::try_fetch`], and when a rate limit left the batch empty, how long until
    /// a claim may get something (the claim's row without an id, `flow_control.sql`).
    /// `patient`: the caller waits for work when this finds nothing (`fetch`), so a sweep after
    /// a slow one may wait (floor.rs).
    async fn claim(&self, max: usize, patient: bool) -> Result<(Vec<Delivery>, Option<Duration>)> {
        if max == 0 {
            return Ok((vec![], None));
        }
        self.check_lease()?;
        let (batch, come_back) = self.claim_once(max, false).await?;
        if batch.is_empty() && come_back.is_none() && self.floor.sweep_now(patient) {
            // Nothing from the floor up: what is ready lies below it (floor.rs).
            return self.claim_once(max, true).await;
        }
        Ok((batch, come_back))
    }

    /// One claim statement, from the group's floor or a sweep as the floor says (always a sweep
    /// when `sweep`).
    async fn claim_once(
        &self,
        max: usize,
        sweep: bool,
    ) -> Result<(Vec<Delivery>, Option<Duration>)> {
        let started = metrics::start();
        let max = max.clamp(1, 10_000) as i32;
        let client = self.pg.client().await?;
        let lease = self.lease.map(micros);
        let claim = self.floor.start(sweep);
        let no_flush = !self.pg.inner.options.synchronous_claims;
        let rows = self
            .pg
            .inner
            .sql
            .claim
            .rows(
                &client,
                &[
                    &self.group_id,
                    &max,
                    &self.name,
                    &lease,
                    &claim.floor(),
                    &no_flush,
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        self.floor_moved(claim, &rows, 0, max)?;
        let mut batch = vec![];
        let mut malformed = vec![];
        let mut come_back = None;
        for r in &rows {
            if r.try_get::<_, Option<Uuid>>(0)?.is_none() {
                let micros = r.try_get::<_, Option<i64>>(7)?.unwrap_or(0);
                come_back = Some(Duration::from_micros(micros.max(0) as u64));
                continue;
            }
            self.decode(r, 0, &mut batch, &mut malformed)?;
        }
        self.term_malformed(&*client, &malformed).await?;
        batch.sort_by_key(|d| d.message.id);
        self.metrics.claimed(started, &batch, || expired(&rows, 6));
        Ok((batch, come_back))
    }

    /// Acknowledges `done` and claims up to `max` new deliveries in one round trip and one
    /// commit: the cheapest way to consume. Does not wait.
    ///
    /// Cancel safety: as [`PgConsumer::try_fetch`]; if dropped, the acks may or may not have been
    /// applied (an unapplied ack means a redelivery, never a loss).
    pub async fn ack_and_fetch(
        &self,
        done: &[&Delivery],
        max: usize,
    ) -> Result<(SettleReport, Vec<Delivery>)> {
        if max == 0 {
            // The statement claims at least one: settle alone.
            return Ok((self.ack_batch(done).await?, vec![]));
        }
        self.check_lease()?;
        let started = metrics::start();
        let max = max.clamp(1, 10_000) as i32;
        let (ids, attempts, tokens) = fences(done);
        let client = self.pg.client().await?;
        let lease = self.lease.map(micros);
        let claim = self.floor.start(false);
        let no_flush = !self.pg.inner.options.synchronous_claims;
        let rows = self
            .pg
            .inner
            .sql
            .ack_claim
            .rows(
                &client,
                &[
                    &self.group_id,
                    &ids,
                    &attempts,
                    &max,
                    &self.name,
                    &lease,
                    &tokens,
                    &claim.floor(),
                    &no_flush,
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        self.floor_moved(claim, &rows, 1, max)?;
        let acked: Vec<Uuid> = match rows.first() {
            Some(r) => r.try_get(0)?,
            None => vec![],
        };
        let mut batch = vec![];
        let mut malformed = vec![];
        for r in &rows {
            if r.try_get::<_, Option<Uuid>>(1)?.is_some() {
                self.decode(r, 1, &mut batch, &mut malformed)?;
            }
        }
        self.term_malformed(&*client, &malformed).await?;
        batch.sort_by_key(|d| d.message.id);
        self.metrics.claimed(started, &batch, || expired(&rows, 7));
        self.room_made(!acked.is_empty() && settle_wakes(&rows, 11));
        drop(client);
        let report = SettleReport::from_parts(done, acked, vec![]);
        if batch.is_empty() && self.floor.sweep_now(true) {
            // Nothing from the floor up: what is ready lies below it (floor.rs). The acks are
            // committed: a failed sweep must not hide their report (the next claim fails too).
            return match self.claim_once(max as usize, true).await {
                Ok((batch, _)) => Ok((report, batch)),
                Err(e) => {
                    tracing::warn!(stream = %self.stream, group = %self.group, error = %e,
                        "pgtide: the sweep after ack_and_fetch failed");
                    Ok((report, vec![]))
                }
            };
        }
        Ok((report, batch))
    }

    /// Tells the group's floor what `claim` got: the rows' columns start at `at`
    /// (the id, then `due_at` nine columns on), `max` is what it asked for.
    fn floor_moved(
        &self,
        claim: Claiming<'_>,
        rows: &[tokio_postgres::Row],
        at: usize,
        max: i32,
    ) -> Result<()> {
        let mut claimed = 0;
        let mut earliest: Option<chrono::DateTime<chrono::Utc>> = None;
        for r in rows {
            if r.try_get::<_, Option<Uuid>>(at)?.is_none() {
                continue;
            }
            claimed += 1;
            let due: Option<chrono::DateTime<chrono::Utc>> = r.try_get(at + 9).unwrap_or(None);
            earliest = match (earliest, due) {
                (Some(e), Some(d)) => Some(e.min(d)),
                (e, d) => e.or(d),
            };
        }
        claim.claimed(earliest, claimed < max);
        Ok(())
    }

    /// After a settle whose statement said it `wakes` (see [`settle_wakes`]): the room it made
    /// in a capped group, or the next deliveries of the keys whose heads left, may be claimed
    /// now, and the pool's connections do not notify, so wake the group's consumers (coalesced
    /// with other wake-ups into few NOTIFYs). Read with every settle, never cached: a limit set
    /// while this consumer runs counts at once.
    fn room_made(&self, wakes: bool) {
        if wakes {
            self.pg.poke(Wake::Stream(self.stream.as_str().into()));
        }
    }

    /// The lease override obeys the duration rule ([`crate::MAX_DURATION`], positive); checked
    /// before a claim so a bad override never leaves claimed deliveries behind.
    fn check_lease(&self) -> Result<()> {
        crate::limits::check_lease_override(self.lease)
    }

    fn error(&self, e: tokio_postgres::Error) -> Error {
        Error::from_pg(
            e,
            Ctx {
                stream: Some(&self.stream),
                group: Some(&self.group),
            },
        )
    }

    /// Decodes one claim row whose columns start at `at` (id, attempt, lease end, payload,
    /// is_json, headers, lease_expired, lease token, key) into `batch`. A row whose fence columns
    /// decode but whose message does not (headers nested past serde_json's depth limit, written
    /// through SQL) goes to `malformed` instead: failing the whole fetch would leave the batch
    /// leased and let one stored message block the group on every retry.
    fn decode(
        &self,
        r: &tokio_postgres::Row,
        at: usize,
        batch: &mut Vec<Delivery>,
        malformed: &mut Vec<(Uuid, i32, i64)>,
    ) -> Result<()> {
        let id: Uuid = r.try_get(at)?;
        let attempt: i32 = r.try_get(at + 1)?;
        let token: i64 = r.try_get(at + 7)?;
        let message = (|| -> Result<Message> {
            let payload: Vec<u8> = r.try_get(at + 3)?;
            Ok(Message {
                id,
                stream: self.stream.clone(),
                payload: payload.into(),
                is_json: r.try_get(at + 4)?,
                headers: headers_from_json(r.try_get(at + 5)?),
                published_at: uuid_time(&id),
                key: r.try_get(at + 8)?,
            })
        })();
        // A lease end past chrono's range (a lease stored before the duration rule existed)
        // is still a valid claim of a good message: report it as the latest representable time.
        let lease_expires_at = r
            .try_get(at + 2)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        match message {
            Ok(message) => batch.push(Delivery {
                message,
                group: self.group.clone(),
                consumer: self.name.clone(),
                attempt: u32::try_from(attempt).unwrap_or(0),
                lease_expires_at,
                token: Some(std::sync::Arc::new(token)),
            }),
            Err(_) => malformed.push((id, attempt, token)),
        }
        Ok(())
    }

    /// Moves deliveries that could not be decoded to the dead letters with reason `malformed`,
    /// fenced by the claim that just took them.
    async fn term_malformed<E: Exec>(
        &self,
        client: &E,
        malformed: &[(Uuid, i32, i64)],
    ) -> Result<()> {
        if malformed.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = malformed.iter().map(|m| m.0).collect();
        let attempts: Vec<i32> = malformed.iter().map(|m| m.1).collect();
        let tokens: Vec<i64> = malformed.iter().map(|m| m.2).collect();
        let reasons = vec![crate::worker::MALFORMED; malformed.len()];
        let rows = client
            .run(
                &self.pg.inner.sql.term,
                &[&self.group_id, &ids, &attempts, &tokens, &reasons],
            )
            .await
            .map_err(|e| self.error(e))?;
        // Dead-lettered on the way: the room they held in a capped group is free again.
        self.room_made(settle_wakes(&rows, 1));
        Ok(())
    }

    /// Claims up to `max` deliveries, waiting up to `timeout` for the first one. While waiting it
    /// sleeps until a notification for this stream arrives (or, in poll-only mode or when
    /// notifications are missed, until the fallback poll interval passes). Returns an empty
    /// vector on timeout.
    ///
    /// Cancel safety: as [`PgConsumer::try_fetch`].
    pub async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        self.fetch_or_stop(max, timeout, None).await
    }

    /// As [`PgConsumer::fetch`], but stops waiting as soon as `stop` is cancelled, returning an
    /// empty vector. A claim already running is never interrupted: whatever it claimed is
    /// returned, so the caller can process it or hand it back with
    /// [`PgConsumer::release_batch`]. This is how a consumer stops on a signal without dropping
    /// a fetch (which could leave a committed claim leased to nobody until its lease ends).
    ///
    /// Cancel safety: as [`PgConsumer::try_fetch`].
    pub async fn fetch_until(
        &self,
        max: usize,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Delivery>> {
        self.fetch_or_stop(max, timeout, Some(stop)).await
    }

    async fn fetch_or_stop(
        &self,
        max: usize,
        timeout: Duration,
        stop: Option<&CancellationToken>,
    ) -> Result<Vec<Delivery>> {
        let stopped = || stop.is_some_and(CancellationToken::is_cancelled);
        if max == 0 || stopped() {
            return Ok(vec![]);
        }
        // Capped: a hostile timeout (Duration::MAX) must not overflow the clock.
        let deadline = tokio::time::Instant::now() + timeout.min(crate::MAX_DURATION);
        // Subscribe before the first claim so a publish between the claim and the wait still wakes us.
        let mut wakes = self.pg.subscribe();
        loop {
            let (batch, come_back) = self.claim(max, true).await?;
            let now = tokio::time::Instant::now();
            if !batch.is_empty() || now >= deadline || stopped() {
                return Ok(batch);
            }
            // A rate limit held the claim back: sleep until its next token (no wake-up comes
            // for a token), never past the poll interval or the deadline.
            let poll = match come_back {
                Some(wait) => self.pg.poll_interval().min(wait),
                None => self.pg.poll_interval(),
            };
            // A floored claim found nothing: something may be ready below the floor, which
            // only a sweep finds, so come back for it (floor.rs) rather than wait for a wake-up.
            let poll = match self.floor.sweep_in() {
                Some(sweep) => poll.min(sweep),
                None => poll,
            };
            let poll_at = (now + poll).min(deadline);
            if wakes.is_some() {
                // SQL publishes notify only streams with a waiter registered (registrar.rs).
                self.pg.before_wait(&self.stream);
            }
            let _waiting = self.pg.waiting();
            let wait = async {
                match wakes.as_mut() {
                    Some(rx) => wait_for_stream(rx, &self.stream, poll_at).await,
                    None => tokio::time::sleep_until(poll_at).await,
                }
            };
            match stop {
                Some(stop) => tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(vec![]),
                    _ = wait => {}
                },
                None => wait.await,
            }
        }
    }

    async fn run_settle<E: Exec>(
        &self,
        client: &E,
        stmt: &Statement,
        ds: &[&Delivery],
        extra: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut rows = vec![];
        {
            let (ids, attempts, tokens) = fences(ds);
            let mut params: Vec<&(dyn ToSql + Sync)> =
                vec![&self.group_id, &ids, &attempts, &tokens];
            params.extend_from_slice(extra);
            rows.extend(client.run(stmt, &params).await.map_err(|e| {
                Error::from_pg(
                    e,
                    Ctx {
                        stream: Some(&self.stream),
                        group: Some(&self.group),
                    },
                )
            })?);
        }
        Ok(rows)
    }

    /// Acknowledges many deliveries in one statement. Deliveries whose lease was lost are listed
    /// in [`SettleReport::lost`].
    pub async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        let client = self.pg.client().await?;
        let rows = self
            .run_settle(&*client, &self.pg.inner.sql.ack, ds, &[])
            .await?;
        self.room_made(settle_wakes(&rows, 1));
        Ok(SettleReport::from_parts(
            ds,
            rows.iter()
                .map(|r| r.try_get(0))
                .collect::<std::result::Result<_, _>>()?,
            vec![],
        ))
    }

    /// [`PgConsumer::ack_batch`] inside the caller's transaction: the acks commit with the
    /// caller's own writes (exactly-once effects in the same database).
    pub async fn ack_batch_in<C: GenericClient + Sync>(
        &self,
        client: &C,
        ds: &[&Delivery],
    ) -> Result<SettleReport> {
        let rows = self
            .run_settle(&Caller(client), &self.pg.inner.sql.ack, ds, &[])
            .await?;
        Ok(SettleReport::from_parts(
            ds,
            rows.iter()
                .map(|r| r.try_get(0))
                .collect::<std::result::Result<_, _>>()?,
            vec![],
        ))
    }

    /// Acknowledges one delivery: done, never delivered to this group again.
    /// Fails with [`Error::LeaseLost`] if the lease lapsed and the delivery was claimed again.
    pub async fn ack(&self, d: &Delivery) -> Result<()> {
        self.ack_batch(&[d]).await?.single(d.id())
    }

    /// [`PgConsumer::ack`] inside the caller's tokio-postgres transaction.
    pub async fn ack_in<C: GenericClient + Sync>(&self, client: &C, d: &Delivery) -> Result<()> {
        self.ack_batch_in(client, &[d]).await?.single(d.id())
    }

    /// [`PgConsumer::ack`] inside the caller's sqlx transaction (`&mut *tx`).
    pub async fn ack_sqlx(&self, conn: &mut sqlx::PgConnection, d: &Delivery) -> Result<()> {
        let ids: Vec<Uuid> = sqlx::query_scalar(&self.pg.inner.sql.ack.sql)
            .persistent(self.pg.inner.sql.ack.sqlx_persistent())
            .bind(self.group_id)
            .bind(vec![d.id()])
            .bind(vec![d.attempt as i32])
            .bind(vec![lease_token(d)])
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| {
                Error::from_sqlx(
                    e,
                    Ctx {
                        stream: Some(&self.stream),
                        group: Some(&self.group),
                    },
                )
            })?;
        if ids.is_empty() {
            return Err(Error::LeaseLost { id: d.id() });
        }
        Ok(())
    }

    /// Negative-acknowledges many deliveries: each becomes visible again after `delay`, or after
    /// the stream's backoff for its attempt when `delay` is `None`. A delivery on its last
    /// allowed attempt goes to the dead letters instead, with `error` as the last error.
    pub async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        crate::limits::check_nack_delay(delay)?;
        let client = self.pg.client().await?;
        let delays: Option<Vec<Option<i64>>> = delay.map(|d| vec![Some(micros(d)); ds.len()]);
        let errors: Option<Vec<Option<&str>>> = error.map(|e| vec![Some(e); ds.len()]);
        let rows = self
            .run_settle(&*client, &self.pg.inner.sql.nack, ds, &[&delays, &errors])
            .await?;
        let (mut settled, mut dead) = (vec![], vec![]);
        let mut at_ms = 0i64;
        for r in &rows {
            if r.try_get::<_, bool>(1)? {
                dead.push(r.try_get(0)?);
            } else {
                settled.push(r.try_get(0)?);
                at_ms = r.try_get(2)?;
            }
        }
        self.room_made(settle_wakes(&rows, 3));
        if !settled.is_empty() {
            // Sent after the commit, with a due time no later than the retries' (the nack's
            // now() plus the delay, in the database's clock): the scout then also covers a
            // retry whose due time passed before it was committed.
            self.pg.poke(match delay {
                Some(d) if d.is_zero() => Wake::Stream(self.stream.as_str().into()),
                Some(d) => Wake::Due(at_ms.saturating_add(micros(d) / 1000)),
                None => Wake::Due(at_ms),
            });
        }
        Ok(SettleReport::from_parts(ds, settled, dead))
    }

    /// Negative-acknowledges one delivery (retry later). See [`PgConsumer::nack_batch`].
    pub async fn nack(
        &self,
        d: &Delivery,
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<()> {
        self.nack_batch(&[d], delay, error).await?.single(d.id())
    }

    /// Terminates deliveries: dead letters now, with `reason`, whatever the attempt.
    pub async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        let client = self.pg.client().await?;
        let reasons = vec![reason; ds.len()];
        let rows = self
            .run_settle(&*client, &self.pg.inner.sql.term, ds, &[&reasons])
            .await?;
        self.room_made(settle_wakes(&rows, 1));
        Ok(SettleReport::from_parts(
            ds,
            vec![],
            rows.iter()
                .map(|r| r.try_get(0))
                .collect::<std::result::Result<_, _>>()?,
        ))
    }

    /// Terminates one delivery: dead letter now, with `reason`.
    pub async fn term(&self, d: &Delivery, reason: &str) -> Result<()> {
        self.term_batch(&[d], reason).await?.single(d.id())
    }

    /// Extends the lease of deliveries still being worked on, to `lease` from now (the stream's
    /// lease when `None`). Updates each delivery's `lease_expires_at`.
    pub async fn in_progress_batch(
        &self,
        ds: &mut [&mut Delivery],
        lease: Option<Duration>,
    ) -> Result<SettleReport> {
        let lease = lease.or(self.lease);
        crate::limits::check_lease_override(lease)?;
        let client = self.pg.client().await?;
        let lease = lease.map(micros);
        let refs: Vec<&Delivery> = ds.iter().map(|d| &**d).collect();
        let rows = self
            .run_settle(&*client, &self.pg.inner.sql.extend, &refs, &[&lease])
            .await?;
        let report = SettleReport::from_parts(
            &refs,
            rows.iter()
                .map(|r| r.try_get(0))
                .collect::<std::result::Result<_, _>>()?,
            vec![],
        );
        for r in &rows {
            let id: Uuid = r.try_get(0)?;
            if let Some(d) = ds.iter_mut().find(|d| d.id() == id) {
                d.lease_expires_at = r.try_get(1)?;
            }
        }
        Ok(report)
    }

    /// Extends one delivery's lease (see [`PgConsumer::in_progress_batch`]).
    pub async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        let id = d.id();
        self.in_progress_batch(&mut [d], lease).await?.single(id)
    }

    /// Hands deliveries back to be claimed again at `until` (at once if it has passed), the
    /// attempt not counted: a handler's [`crate::Outcome::PauseKey`]. In an ordered group the
    /// delivery stays its key's head, so the key waits while other keys go on.
    pub async fn pause_batch(
        &self,
        ds: &[&Delivery],
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<SettleReport> {
        crate::limits::check_time("pause until", until)?;
        let client = self.pg.client().await?;
        let rows = self
            .run_settle(&*client, &self.pg.inner.sql.pause, ds, &[&until])
            .await?;
        if !rows.is_empty() {
            // The scout wakes the group when the pause ends (the pool does not notify).
            self.pg.poke(Wake::Due(until.timestamp_millis()));
        }
        self.room_made(settle_wakes(&rows, 1));
        Ok(SettleReport::from_parts(
            ds,
            rows.iter()
                .map(|r| r.try_get(0))
                .collect::<std::result::Result<_, _>>()?,
            vec![],
        ))
    }

    /// Hands deliveries back unprocessed: visible to the group again at once, and the attempt
    /// does not count. For shutdown.
    pub async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        let client = self.pg.client().await?;
        let rows = self
            .run_settle(&*client, &self.pg.inner.sql.release, ds, &[])
            .await?;
        if !rows.is_empty() {
            self.pg.poke(Wake::Stream(self.stream.as_str().into()));
        }
        Ok(SettleReport::from_parts(
            ds,
            rows.iter()
                .map(|r| r.try_get(0))
                .collect::<std::result::Result<_, _>>()?,
            vec![],
        ))
    }
}

// The trait's methods are the inherent ones above; this impl only forwards.
impl QueueConsumer for PgConsumer {
    fn stream(&self) -> &str {
        PgConsumer::stream(self)
    }
    fn group(&self) -> &str {
        PgConsumer::group(self)
    }
    fn name(&self) -> &str {
        PgConsumer::name(self)
    }

    fn settles_wake_fetches(&self) -> bool {
        // Settles that make room poke the stream through the notifier (`room_made`); without
        // notifications nothing carries the poke, and a waiting fetch finds the room only at
        // its next poll.
        self.pg.notifications_enabled()
    }

    async fn lease(&self) -> Option<Duration> {
        PgConsumer::lease(self).await
    }

    async fn try_fetch(&self, max: usize) -> Result<Vec<Delivery>> {
        PgConsumer::try_fetch(self, max).await
    }

    async fn fetch(&self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        PgConsumer::fetch(self, max, timeout).await
    }

    async fn ack_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        PgConsumer::ack_batch(self, ds).await
    }

    async fn ack_and_fetch(
        &self,
        done: &[&Delivery],
        max: usize,
    ) -> Result<(SettleReport, Vec<Delivery>)> {
        PgConsumer::ack_and_fetch(self, done, max).await
    }

    async fn nack_batch(
        &self,
        ds: &[&Delivery],
        delay: Option<Duration>,
        error: Option<&str>,
    ) -> Result<SettleReport> {
        PgConsumer::nack_batch(self, ds, delay, error).await
    }

    async fn term_batch(&self, ds: &[&Delivery], reason: &str) -> Result<SettleReport> {
        PgConsumer::term_batch(self, ds, reason).await
    }

    async fn in_progress(&self, d: &mut Delivery, lease: Option<Duration>) -> Result<()> {
        PgConsumer::in_progress(self, d, lease).await
    }

    async fn release_batch(&self, ds: &[&Delivery]) -> Result<SettleReport> {
        PgConsumer::release_batch(self, ds).await
    }

    async fn pause_batch(
        &self,
        ds: &[&Delivery],
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<SettleReport> {
        PgConsumer::pause_batch(self, ds, until).await
    }
}

/// Waits until `rx` reports work for `stream` (or anything that calls for a catch-up), or `until`.
pub(crate) async fn wait_for_stream(
    rx: &mut tokio::sync::broadcast::Receiver<Wake>,
    stream: &str,
    until: tokio::time::Instant,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return,
            wake = rx.recv() => match wake {
                Ok(Wake::Stream(s)) if &*s == stream => return,
                Ok(Wake::All) | Err(RecvError::Lagged(_)) => return,
                Err(RecvError::Closed) => {
                    tokio::time::sleep_until(until).await;
                    return;
                }
                Ok(_) => {}
            },
        }
    }
}
