//! The inbox: exactly-once effects for handlers that consume from a broker (NATS, Redis,
//! RabbitMQ) and write to PostgreSQL. The handler records the event id in the same transaction
//! as its writes; a redelivery (the broker never saw the ack: the process died between commit
//! and ack, or the lease lapsed) finds the id and skips the effects, and is acked.
//!
//! The inbox table belongs to the application, not to a pgtide namespace: it is written in the
//! application's own transaction, with the application's role, next to the application's tables,
//! so it lives in a schema the application owns and needs no pgtide grant. The engine's
//! least-privilege rule (runtime roles reach pgtide's tables only through SECURITY DEFINER
//! functions) is about pgtide's own tables and is unaffected.

use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::error::{Error, Result};
use crate::names::{validate_name, validate_namespace};

/// Processed event ids of one consumer (one handler), in the table `<schema>.pgtide_inbox`.
///
/// ```no_run
/// # async fn demo(pg: &mut tokio_postgres::Client, d: pgtide::Delivery) -> pgtide::Result<()> {
/// let inbox = pgtide::Inbox::new("app", "billing")?;
/// inbox.install(&*pg).await?; // once, at startup, with a role that may create in `app`
/// let event_id = d.envelope()?.event_id;
/// let tx = pg.transaction().await?;
/// if inbox.record(&tx, &event_id).await? {
///     tx.execute("UPDATE app.accounts SET charged = true WHERE id = 7", &[]).await?;
/// }
/// tx.commit().await?; // then ack the delivery, whether or not it was new
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Inbox {
    schema: String,
    consumer: String,
}

/// Longest event id stored (bytes), as the envelope allows.
const MAX_EVENT_ID: usize = 256;

impl Inbox {
    /// The inbox of `consumer` (a handler's name, pgtide's naming rule) in `schema` (a plain
    /// lower-case identifier). Several consumers share one table, each with its own ids.
    pub fn new(schema: &str, consumer: &str) -> Result<Inbox> {
        validate_namespace(schema)?;
        validate_name("consumer", consumer)?;
        Ok(Inbox {
            schema: schema.to_owned(),
            consumer: consumer.to_owned(),
        })
    }

    /// Creates the schema and table unless they exist; idempotent.
    pub async fn install<C: GenericClient + Sync>(&self, client: &C) -> Result<()> {
        let s = &self.schema;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{s}\";
                 CREATE TABLE IF NOT EXISTS \"{s}\".pgtide_inbox (
                     consumer     text NOT NULL,
                     event_id     text NOT NULL,
                     processed_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (consumer, event_id)
                 );
                 CREATE INDEX IF NOT EXISTS pgtide_inbox_processed_at
                     ON \"{s}\".pgtide_inbox (processed_at);"
            ))
            .await?;
        Ok(())
    }

    /// Records `event_id` as processed, inside the caller's transaction. True when it is new:
    /// apply the effects in the same transaction, then commit. False when it was processed
    /// before: skip the effects. Either way, ack the delivery after the commit. A concurrent
    /// transaction recording the same id waits for the first to end (primary key), so two
    /// consumers holding the same event never both see true.
    pub async fn record<C: GenericClient + Sync>(&self, tx: &C, event_id: &str) -> Result<bool> {
        if event_id.is_empty() || event_id.len() > MAX_EVENT_ID {
            return Err(Error::InvalidConfig(format!(
                "inbox event id must be 1-{MAX_EVENT_ID} bytes"
            )));
        }
        let n = tx
            .execute(
                &format!(
                    "INSERT INTO \"{}\".pgtide_inbox (consumer, event_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    self.schema
                ),
                &[&self.consumer, &event_id],
            )
            .await?;
        Ok(n == 1)
    }

    /// Forgets ids processed more than `max_age` ago; returns how many. Keep `max_age` well
    /// above the longest time a broker may redeliver (its lease times the delivery attempts,
    /// plus downtime): an id forgotten earlier makes a late redelivery look new.
    pub async fn prune<C: GenericClient + Sync>(
        &self,
        client: &C,
        max_age: Duration,
    ) -> Result<u64> {
        crate::limits::check_duration("inbox max_age", max_age, true)?;
        let secs = max_age.as_secs_f64();
        let n = client
            .execute(
                &format!(
                    "DELETE FROM \"{}\".pgtide_inbox
                     WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2)",
                    self.schema
                ),
                &[&self.consumer, &secs],
            )
            .await?;
        Ok(n)
    }
}
