//! Publishing: one message, a batch in one round trip, and inside the caller's transaction
//! (tokio-postgres or sqlx). Messages without a dedupe key take a single prepared statement
//! (`sql/publish.sql`); messages with one go through `_publish()`, which owns the dedupe rule.

use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::exec::{Caller, Exec};
use super::wake::Wake;
use super::StatementMode;
use super::{micros, PgBackend};
use crate::error::{Ctx, Error, Result};
use crate::metrics;
use crate::names::validate_name;
use crate::queue::{headers_to_json, OutgoingMessage, PublishReceipt};

/// Opens a publish transaction whose inserts do not fire the NOTIFY trigger (unnamed mode).
const QUIET_BEGIN: &str = include_str!("../../sql/publish_quiet_begin.sql");

/// Column arrays for `sql/publish.sql`.
#[derive(Default)]
struct Columns {
    ids: Vec<Uuid>,
    payloads: Vec<Vec<u8>>,
    is_json: Vec<bool>,
    headers: Vec<Option<serde_json::Value>>,
    deliver_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    delay_us: Vec<Option<i64>>,
    priority: Vec<i32>,
    keys: Vec<Option<String>>,
}

impl Columns {
    fn push(&mut self, id: Uuid, m: &OutgoingMessage) {
        self.ids.push(id);
        self.payloads.push(m.payload.to_vec());
        self.is_json.push(m.is_json);
        self.headers.push(headers_to_json(&m.headers));
        self.deliver_at.push(m.deliver_at);
        self.delay_us.push(m.delay.map(micros));
        self.priority.push(m.priority);
        self.keys.push(m.key.clone());
    }

    /// Whether some message has an ordering key: then the batch takes `sql/publish_keyed.sql`,
    /// and a batch without keys keeps the unordered fast path untouched.
    fn keyed(&self) -> bool {
        self.keys.iter().any(Option::is_some)
    }
}

/// Whether every message is ready at once and takes the unordered fast path: only such a batch
/// may notify inside its transaction (`sql/publish_wake.sql`); delayed ones hint the scout
/// through the notifier, as before.
fn ready_now(msgs: &[OutgoingMessage]) -> bool {
    msgs.iter().all(|m| {
        m.dedupe_key.is_none()
            && m.key.is_none()
            && m.deliver_at.is_none()
            && m.delay.map_or(true, |d| d.is_zero())
    })
}

/// What [`PgBackend::run_publish`] wrote, and whether it notified inside the transaction.
struct Published {
    receipts: Vec<PublishReceipt>,
    notified: bool,
}

/// A batch split into the fast path and the dedupe-keyed messages, with ids assigned.
struct Plan {
    receipts: Vec<PublishReceipt>,
    fast: Columns,
    keyed: Vec<(usize, Uuid)>,
}

fn plan(msgs: &[OutgoingMessage]) -> Plan {
    let mut plan = Plan {
        receipts: Vec::with_capacity(msgs.len()),
        fast: Columns::default(),
        keyed: vec![],
    };
    for (i, m) in msgs.iter().enumerate() {
        let id = Uuid::now_v7();
        plan.receipts.push(PublishReceipt {
            id,
            duplicate: false,
        });
        if m.dedupe_key.is_some() {
            plan.keyed.push((i, id));
        } else {
            plan.fast.push(id, m);
        }
    }
    plan
}

impl PgBackend {
    /// Checks names and payload sizes before anything is written. The size check is a quick
    /// reject from the cached limit, before any round trip (and without aborting a caller's
    /// transaction); the rule itself is SQL's `_payload_ok` (`sql/functions/publish.sql`), which
    /// every publish path runs, so a stale cache never lets an oversized payload in.
    ///
    /// Because SQL is the authority, a payload within the cached limit goes on however old the
    /// entry is: only a refusal re-reads the limit first (it may have been raised since). A
    /// publisher spread over a thousand streams then reads each stream's row once, not once
    /// per stream every few seconds.
    async fn check_publish(&self, stream: &str, msgs: &[OutgoingMessage]) -> Result<()> {
        validate_name("stream", stream)?;
        crate::limits::check_messages(msgs)?;
        let too_large = |limit: usize| msgs.iter().find(|m| m.payload.len() > limit);
        let info = self.cached_stream_within(stream, Duration::MAX).await?;
        if too_large(info.config.max_payload).is_none() {
            return Ok(());
        }
        self.forget_stream(stream);
        let info = self.cached_stream(stream).await?;
        let limit = info.config.max_payload;
        if let Some(m) = too_large(limit) {
            return Err(Error::PayloadTooLarge {
                stream: stream.to_owned(),
                size: m.payload.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Publishes one message to every group of `stream`. Returns its id, or for a duplicate
    /// (same dedupe key inside the window) the original id with `duplicate: true`.
    ///
    /// The message is committed when this returns. Cancel safety: if the future is dropped, the
    /// message may or may not have been committed; publish with a dedupe key to retry safely.
    pub async fn publish(&self, stream: &str, msg: OutgoingMessage) -> Result<PublishReceipt> {
        let mut receipts = self
            .publish_batch(stream, std::slice::from_ref(&msg))
            .await?;
        Ok(receipts.remove(0))
    }

    /// Publishes many messages atomically in one round trip (all or none). Receipts are in input
    /// order.
    pub async fn publish_batch(
        &self,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        if msgs.is_empty() {
            return Ok(vec![]);
        }
        self.check_publish(stream, msgs).await?;
        // Taken before the statement, so a delayed message's hint is no later than its due time
        // (which the database computes from its own, later, now()): see `due_waker.rs`.
        let sent_ms = chrono::Utc::now().timestamp_millis();
        let msgs = crate::otel::traced(msgs);
        let msgs = &*msgs;
        // Counted from before the pool checkout, so publishers queued for a connection count as
        // concurrent. A quiet publish (alone, and the process's first in `QUIET`) notifies in
        // its transaction, as does every one alone in flight with the hidden
        // `notify_in_transaction`; the others poke the coalescing notifier. See `notifier.rs`.
        let publishing = self.inner.background.publishing();
        let options = &self.inner.options;
        let wake = (options.notifications
            && (publishing.quiet() || options.notify_in_transaction && publishing.alone())
            && ready_now(msgs))
        .then(|| self.inner.background.channel());
        let mut client = self.client().await?;
        let published = if msgs.iter().all(|m| m.dedupe_key.is_none()) {
            match self.statement_mode() {
                StatementMode::Prepared => self.run_publish(&*client, stream, msgs, wake).await?,
                StatementMode::Unnamed => {
                    self.run_publish_quiet(&client, stream, msgs, wake).await?
                }
            }
        } else {
            let tx = client.transaction().await?;
            let published = self.run_publish(&Caller(&*tx), stream, msgs, None).await?;
            tx.commit().await?;
            published
        };
        drop(client);
        drop(publishing);
        // Our pool's connections do not fire the NOTIFY trigger: unless the publish notified in
        // its transaction, wake consumers after commit.
        self.wake_after_publish(msgs, stream, &published, sent_ms);
        metrics::published(stream, &published.receipts);
        Ok(published.receipts)
    }

    /// The fast path in unnamed mode: BEGIN with the trigger turned off for this transaction
    /// only, the publish, COMMIT, pipelined (tokio-postgres sends requests in the order their
    /// futures are first polled, and `join!` polls them in order): one round trip, as in
    /// prepared mode. A failed publish aborts the transaction and COMMIT then rolls it back.
    async fn run_publish_quiet(
        &self,
        client: &deadpool_postgres::ClientWrapper,
        stream: &str,
        msgs: &[OutgoingMessage],
        wake: Option<&str>,
    ) -> Result<Published> {
        let (begun, published, committed) = tokio::join!(
            client.batch_execute(QUIET_BEGIN),
            self.run_publish(client, stream, msgs, wake),
            client.batch_execute("COMMIT"),
        );
        begun?;
        let published = published?;
        committed?;
        Ok(published)
    }

    fn wake_after_publish(
        &self,
        msgs: &[OutgoingMessage],
        stream: &str,
        published: &Published,
        sent_ms: i64,
    ) {
        let receipts = &published.receipts;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut ready = false;
        let mut due: Option<i64> = None;
        for (m, r) in msgs.iter().zip(receipts) {
            if r.duplicate {
                continue;
            }
            let at = match (m.deliver_at, m.delay) {
                (Some(at), _) => at.timestamp_millis(),
                (None, Some(d)) => sent_ms.saturating_add(micros(d) / 1000),
                (None, None) => now_ms,
            };
            // A delay counts from the database's now(), which our clock cannot see: hint it
            // to the scout even when it seems due already.
            let delayed = m.deliver_at.is_none() && m.delay.is_some_and(|d| !d.is_zero());
            if at > now_ms || delayed {
                due = Some(due.map_or(at, |d: i64| d.min(at)));
            }
            if at <= now_ms {
                ready = true;
            }
        }
        if ready && !published.notified {
            self.poke(Wake::Stream(stream.into()));
        }
        if let Some(ms) = due {
            self.poke(Wake::Due(ms));
        }
    }

    /// Publishes inside the caller's tokio-postgres transaction (or any `GenericClient`): the
    /// messages exist if and only if the caller commits. Works with a deadpool-postgres
    /// transaction through `&*tx`.
    pub async fn publish_in<C: GenericClient + Sync>(
        &self,
        client: &C,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        if msgs.is_empty() {
            return Ok(vec![]);
        }
        self.check_publish(stream, msgs).await?;
        let msgs = crate::otel::traced(msgs);
        let msgs = &*msgs;
        let receipts = self
            .run_publish(&Caller(client), stream, msgs, None)
            .await?
            .receipts;
        metrics::published(stream, &receipts);
        Ok(receipts)
    }

    /// Runs the publish statements on `client`. `wake`, the namespace's channel, asks the fast
    /// path to notify inside the transaction (`sql/publish_wake.sql`); it is ignored for keyed
    /// batches, and whether the NOTIFY was sent comes back in [`Published::notified`].
    async fn run_publish<E: Exec>(
        &self,
        client: &E,
        stream: &str,
        msgs: &[OutgoingMessage],
        wake: Option<&str>,
    ) -> Result<Published> {
        let ctx = || Ctx {
            stream: Some(stream),
            group: None,
        };
        let mut plan = plan(msgs);
        let mut notified = false;
        if !plan.fast.ids.is_empty() {
            let f = &plan.fast;
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                &stream,
                &f.ids,
                &f.payloads,
                &f.is_json,
                &f.headers,
                &f.deliver_at,
                &f.delay_us,
                &f.priority,
            ];
            let wake = wake.filter(|_| !f.keyed());
            let statement = if f.keyed() {
                params.push(&f.keys);
                &self.inner.sql.publish_keyed
            } else if let Some(channel) = &wake {
                params.push(channel);
                &self.inner.sql.publish_wake
            } else {
                &self.inner.sql.publish
            };
            let row = client
                .run_one(statement, &params)
                .await
                .map_err(|e| Error::from_pg(e, ctx()))?;
            let n: i64 = row.try_get(0)?;
            if wake.is_some() {
                notified = row.try_get(1)?;
            }
            if n == 0 {
                self.forget_stream(stream);
                return Err(Error::StreamNotFound(stream.to_owned()));
            }
        }
        for (i, id) in &plan.keyed {
            let m = &msgs[*i];
            let row = client
                .run_one(
                    &self.inner.sql.publish_one,
                    &[
                        &stream,
                        id,
                        &m.payload.as_ref(),
                        &m.is_json,
                        &headers_to_json(&m.headers),
                        &m.deliver_at,
                        &m.delay.map(micros),
                        &m.dedupe_key,
                        &m.priority,
                        &m.key,
                    ],
                )
                .await
                .map_err(|e| Error::from_pg(e, ctx()))?;
            plan.receipts[*i] = PublishReceipt {
                id: row.try_get(0)?,
                duplicate: row.try_get(1)?,
            };
        }
        Ok(Published {
            receipts: plan.receipts,
            notified,
        })
    }

    /// Publishes inside the caller's sqlx transaction (`&mut *tx`): the messages exist if and
    /// only if the caller commits.
    pub async fn publish_sqlx(
        &self,
        conn: &mut sqlx::PgConnection,
        stream: &str,
        msgs: &[OutgoingMessage],
    ) -> Result<Vec<PublishReceipt>> {
        if msgs.is_empty() {
            return Ok(vec![]);
        }
        self.check_publish(stream, msgs).await?;
        let msgs = crate::otel::traced(msgs);
        let msgs = &*msgs;
        let ctx = || Ctx {
            stream: Some(stream),
            group: None,
        };
        let mut plan = plan(msgs);
        if !plan.fast.ids.is_empty() {
            let f = &plan.fast;
            let statement = if f.keyed() {
                &self.inner.sql.publish_keyed
            } else {
                &self.inner.sql.publish
            };
            let mut query = sqlx::query_scalar(&statement.sql)
                .persistent(statement.sqlx_persistent())
                .bind(stream)
                .bind(&f.ids)
                .bind(&f.payloads)
                .bind(&f.is_json)
                .bind(&f.headers)
                .bind(&f.deliver_at)
                .bind(&f.delay_us)
                .bind(&f.priority);
            if f.keyed() {
                query = query.bind(&f.keys);
            }
            let n: i64 = query
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| Error::from_sqlx(e, ctx()))?;
            if n == 0 {
                self.forget_stream(stream);
                return Err(Error::StreamNotFound(stream.to_owned()));
            }
        }
        for (i, id) in &plan.keyed {
            let m = &msgs[*i];
            let (id, duplicate): (Uuid, bool) = sqlx::query_as(&self.inner.sql.publish_one.sql)
                .persistent(self.inner.sql.publish_one.sqlx_persistent())
                .bind(stream)
                .bind(id)
                .bind(m.payload.as_ref())
                .bind(m.is_json)
                .bind(headers_to_json(&m.headers))
                .bind(m.deliver_at)
                .bind(m.delay.map(micros))
                .bind(&m.dedupe_key)
                .bind(m.priority)
                .bind(&m.key)
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| Error::from_sqlx(e, ctx()))?;
            plan.receipts[*i] = PublishReceipt { id, duplicate };
        }
        metrics::published(stream, &plan.receipts);
        Ok(plan.receipts)
    }
}
