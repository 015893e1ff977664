//! Settling through receipt handles: deletes and visibility changes ten per call, dead letters
//! copied to the group's dead-letter queue, re-sends of messages that must wait longer than SQS
//! can.

use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use chrono::Utc;
use futures_util::future::join_all;
use uuid::Uuid;

use super::api;
use super::codec::{Dead, Meta};
use super::consumer::BATCH;
use super::publish::{Outgoing, SendError};
use super::SqsConsumer;
use crate::error::Result;
use crate::queue::{Delivery, SettleReport};

/// The settle handle of a delivery: its receipt handle, and what a re-send or a dead letter
/// copies.
pub(super) struct Token {
    pub handle: String,
    pub body: String,
    pub meta: Meta,
}

/// What a settle did to one delivery.
pub(super) enum Settled {
    Done,
    Dead,
    Lost,
}

impl SqsConsumer {
    /// The delivery's token, if it is one of this consumer's group.
    pub(super) fn token<'a>(&self, d: &'a Delivery) -> Option<&'a Token> {
        if d.group != self.group || d.stream != self.stream {
            return None;
        }
        d.token::<Token>()
    }

    /// Sends a copy due at `due` (Unix ms) and deletes the one at `handle`. Used for early
    /// messages and nack delays past 12 h; the copy keeps the id and the attempts.
    pub(super) async fn resend(
        &self,
        handle: &str,
        body: &str,
        meta: Meta,
        due: i64,
    ) -> Result<bool> {
        let native = self.backend.inner.options.max_native_delay;
        let copy = Outgoing::new(body.to_owned(), meta, Some(due), native)?;
        match self.backend.send_batch(&self.url, &[&copy]).await {
            Ok(()) => {}
            Err(SendError::Gone) => return Err(self.gone()),
            Err(SendError::Failed(e)) => return Err(e),
        }
        self.delete(handle).await
    }

    /// Deletes one message; false if its handle is no longer valid.
    pub(super) async fn delete(&self, handle: &str) -> Result<bool> {
        let call = self
            .client()
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(handle);
        match self.backend.timed(async { Ok(call.send().await) }).await? {
            Ok(_) => Ok(true),
            Err(e) if api::handle_gone(api::code(&e)) => Ok(false),
            Err(e) if api::queue_missing(api::code(&e)) => Err(self.gone()),
            Err(e) => Err(api::sdk(e)),
        }
    }

    /// Sets one message's visibility; false if its handle is no longer valid.
    pub(super) async fn set_visibility(&self, handle: &str, seconds: i32) -> Result<bool> {
        let call = self
            .client()
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(handle)
            .visibility_timeout(seconds);
        match self.backend.timed(async { Ok(call.send().await) }).await? {
            Ok(_) => Ok(true),
            Err(e) if api::handle_gone(api::code(&e)) => Ok(false),
            Err(e) if api::queue_missing(api::code(&e)) => Err(self.gone()),
            Err(e) => Err(api::sdk(e)),
        }
    }

    /// Copies a message into the group's dead-letter queue with its record, then deletes it.
    pub(super) async fn bury(
        &self,
        handle: &str,
        body: &str,
        meta: &Meta,
        reason: &str,
        error: Option<&str>,
        attempts: u32,
    ) -> Result<Settled> {
        let dead_name = self.meta.names.dead(&self.group);
        let dead_url = self
            .backend
            .url(&dead_name)
            .await?
            .ok_or_else(|| self.gone())?;
        let mut meta = meta.clone();
        meta.due = None;
        meta.dead = Some(Dead {
            reason: reason.to_owned(),
            error: error.map(str::to_owned),
            attempts,
            at: Utc::now().timestamp_millis(),
        });
        let copy = Outgoing::new(body.to_owned(), meta, None, Duration::ZERO)?;
        match self.backend.send_batch(&dead_url, &[&copy]).await {
            Ok(()) => {}
            Err(SendError::Gone) => {
                self.backend.forget_url(&dead_name);
                return Err(self.gone());
            }
            Err(SendError::Failed(e)) => return Err(e),
        }
        Ok(if self.delete(handle).await? {
            Settled::Dead
        } else {
            Settled::Lost
        })
    }

    /// Runs `settle` on every delivery concurrently and reports.
    pub(super) async fn settle_each<'a, F, Fut>(
        &'a self,
        ds: &[&'a Delivery],
        settle: F,
    ) -> Result<SettleReport>
    where
        F: Fn(&'a Delivery, &'a Token) -> Fut,
        Fut: std::future::Future<Output = Result<Settled>>,
    {
        let results = join_all(ds.iter().map(|d| async {
            match self.token(d) {
                Some(t) => settle(d, t).await,
                None => Ok(Settled::Lost),
            }
        }))
        .await;
        let (mut settled, mut dead) = (vec![], vec![]);
        for (d, r) in ds.iter().zip(results) {
            match r? {
                Settled::Done => settled.push(d.id()),
                Settled::Dead => dead.push(d.id()),
                Settled::Lost => {}
            }
        }
        Ok(SettleReport::from_parts(ds, settled, dead))
    }

    /// Deletes (`visibility` None) or sets the visibility of deliveries, ten per call; the ids
    /// SQS confirmed.
    pub(super) async fn batch(
        &self,
        ds: &[&Delivery],
        visibility: Option<i32>,
    ) -> Result<Vec<Uuid>> {
        let own: Vec<(Uuid, &Token)> = ds
            .iter()
            .filter_map(|d| self.token(d).map(|t| (d.id(), t)))
            .collect();
        let mut done = vec![];
        for chunk in own.chunks(BATCH) {
            let (ok, failed) = match visibility {
                None => {
                    let mut call = self.client().delete_message_batch().queue_url(&self.url);
                    for (i, (_, t)) in chunk.iter().enumerate() {
                        call = call.entries(
                            DeleteMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .receipt_handle(&t.handle)
                                .build()
                                .map_err(|e| api::broker(e, false))?,
                        );
                    }
                    match self.backend.timed(async { Ok(call.send().await) }).await? {
                        Ok(out) => (
                            out.successful()
                                .iter()
                                .map(|s| s.id().to_owned())
                                .collect::<Vec<_>>(),
                            out.failed().to_vec(),
                        ),
                        Err(e) if api::queue_missing(api::code(&e)) => return Err(self.gone()),
                        Err(e) => return Err(api::sdk(e)),
                    }
                }
                Some(seconds) => {
                    let mut call = self
                        .client()
                        .change_message_visibility_batch()
                        .queue_url(&self.url);
                    for (i, (_, t)) in chunk.iter().enumerate() {
                        call = call.entries(
                            ChangeMessageVisibilityBatchRequestEntry::builder()
                                .id(i.to_string())
                                .receipt_handle(&t.handle)
                                .visibility_timeout(seconds)
                                .build()
                                .map_err(|e| api::broker(e, false))?,
                        );
                    }
                    match self.backend.timed(async { Ok(call.send().await) }).await? {
                        Ok(out) => (
                            out.successful()
                                .iter()
                                .map(|s| s.id().to_owned())
                                .collect::<Vec<_>>(),
                            out.failed().to_vec(),
                        ),
                        Err(e) if api::queue_missing(api::code(&e)) => return Err(self.gone()),
                        Err(e) => return Err(api::sdk(e)),
                    }
                }
            };
            if let Some(f) = failed.iter().find(|f| !api::handle_gone(Some(f.code()))) {
                return Err(api::broker(
                    format!(
                        "SQS failed a settle: {}: {}",
                        f.code(),
                        f.message().unwrap_or_default()
                    ),
                    !f.sender_fault(),
                ));
            }
            done.extend(
                ok.iter()
                    .filter_map(|id| id.parse::<usize>().ok())
                    .filter_map(|i| chunk.get(i).map(|(id, _)| *id)),
            );
        }
        Ok(done)
    }
}
