//! The mover: a background task per stream (and process) that moves delayed messages to the
//! ready subject when they come due.
//!
//! It reads the delayed subject through the durable consumer `PGTIDE-MOVER`, shared by every
//! process (they compete, so each delayed message is moved by one of them). A message not yet
//! due is nakked with a delay until its due time, so the server, not a poll loop, wakes the
//! mover. A due message is published to the ready subject with `Nats-Msg-Id: m:<id>` (a move
//! retried after a crash is dropped as a duplicate inside the duplicate window), then acked and
//! deleted from the delayed subject (kept if it carries a dedupe key, which must stay readable
//! for duplicate publishes).
//!
//! The task never panics: errors are logged and retried with backoff. It ends when the stream
//! is deleted or the backend's last handle is dropped (cancellation token).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::api::{self, ack_info, Missing, PullEnd};
use super::naming::MOVER;
use super::{admin, codec, lock, NatsBackend, StreamMeta};
use crate::error::Result;

/// Messages per pull request, and how long one waits.
const BATCH: usize = 256;
const PULL_WAIT: Duration = Duration::from_secs(30);

/// Starts the mover of the stream in this process unless it runs already.
pub(super) fn ensure(backend: &NatsBackend, meta: &Arc<StreamMeta>) {
    let inner = &backend.inner;
    if !lock(&inner.movers).insert(meta.names.stream.clone()) {
        return;
    }
    let mover = Mover {
        client: inner.client.clone(),
        js: inner.js.clone(),
        meta: meta.clone(),
        timeout: inner.options.request_timeout,
        movers: inner.movers.clone(),
    };
    let token = inner.token.clone();
    inner.tracker.spawn(mover.run(token));
}

struct Mover {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    meta: Arc<StreamMeta>,
    timeout: Duration,
    movers: Arc<Mutex<HashSet<String>>>,
}

/// How a pass ended without an error.
enum Pass {
    /// The pull request ended; pull again.
    Again,
    /// The stream is gone.
    Gone,
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100 * 2u64.pow(failures.min(8))).min(Duration::from_secs(15))
}

impl Mover {
    async fn run(self, token: CancellationToken) {
        let stream = self.meta.names.stream.clone();
        let mut failures = 0;
        loop {
            let pass = tokio::select! {
                biased;
                _ = token.cancelled() => break,
                pass = self.pass() => pass,
            };
            match pass {
                Ok(Pass::Again) => failures = 0,
                Ok(Pass::Gone) => break,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, stream = %stream, "pgtide nats: moving delayed messages failed; retrying");
                    tokio::select! {
                        biased;
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                }
            }
        }
        lock(&self.movers).remove(&stream);
    }

    /// Makes sure the mover's consumer exists, then handles one pull request's messages.
    /// Cancel-safe: a message interrupted mid-move is redelivered and moved again (the
    /// duplicate window drops the second copy).
    async fn pass(&self) -> Result<Pass> {
        let names = &self.meta.names;
        let config = admin::mover_consumer(names);
        if let Err(Missing::Stream) = api::create_consumer(&self.js, &names.stream, &config).await?
        {
            return Ok(Pass::Gone);
        }
        let next = names.next_subject(MOVER);
        let mut pull =
            api::Pull::start(&self.client, next, BATCH, Some(PULL_WAIT), self.timeout).await?;
        loop {
            match pull.next().await {
                Ok(m) => self.handle(m).await?,
                Err(PullEnd::Done) => return Ok(Pass::Again),
                Err(PullEnd::Silent) => {
                    return Err(api::broker("no answer to the mover's pull request", true))
                }
                Err(PullEnd::Deleted) => return Ok(Pass::Again),
                Err(PullEnd::Failed(why)) => return Err(api::broker(why, true)),
            }
        }
    }

    async fn handle(&self, m: async_nats::Message) -> Result<()> {
        let Some(reply) = m.reply.clone() else {
            return Ok(());
        };
        let h = m.headers.as_ref();
        let now = Utc::now();
        if let Some(wait) = codec::deliver_at(h).and_then(|at| (at - now).to_std().ok()) {
            if !wait.is_zero() {
                // Not due: the server hands it back when it is.
                let nak = format!("-NAK {{\"delay\":{}}}", wait.as_nanos());
                self.client
                    .publish(reply, Bytes::from(nak))
                    .await
                    .map_err(|e| api::broker(e, true))?;
                return Ok(());
            }
        }
        let headers = codec::moved(h, codec::message_id(h));
        let publish = PublishMessage::build()
            .payload(m.payload.clone())
            .headers(headers);
        let names = &self.meta.names;
        self.js
            .send_publish(names.ready.clone(), publish)
            .await
            .map_err(|e| api::broker(e, true))?
            .await
            .map_err(|e| api::broker(e, true))?;
        self.client
            .request(reply.clone(), Bytes::from_static(b"+ACK"))
            .await
            .map_err(|e| api::broker(e, true))?;
        if !codec::has_dedupe_key(h) {
            if let Some((_, seq)) = ack_info(&reply) {
                // Only storage is at stake: the copy is acked and never delivered again.
                if let Err(e) = api::delete_message(&self.js, &names.stream, seq).await {
                    tracing::debug!(error = %e, stream = %names.stream, seq, "pgtide nats: deleting a moved delayed message failed");
                }
            }
        }
        Ok(())
    }
}
