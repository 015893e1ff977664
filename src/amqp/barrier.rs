//! The settle barrier run before a consumer channel closes.
//!
//! Why it is needed (found on RabbitMQ 3.10.8): a quorum queue's client state inside the
//! broker's channel process sends each `basic.ack` to the queue as a Raft command, and once 32
//! commands (`quorum_commands_soft_limit`) are unapplied it goes "slow" and *stashes* further
//! settles in the channel process, sending them only when the queue reports earlier commands
//! applied. `channel.close-ok` does not wait for that: a channel closed right after a batch of
//! 100 acks drops the stash, and the queue returns those messages as if never acked (the CLI
//! lost up to one batch of `consume -n 500 --batch 100` in about half the runs; they came back
//! with attempt 2).
//!
//! The barrier: `basic.consume` then `basic.cancel` on the same channel and queue, in rounds.
//! On a quorum queue both are synchronous Raft commands (the broker answers after the queue
//! applied them, so after every settle sent before them), and the channel handles the queue's
//! "applied" notifications, which flush the stash, before any frame that follows the reply. One
//! round gets the stash sent, the next waits until the queue applied it. The barrier consumer
//! asks for no messages (`x-credit` with 0 credit, RabbitMQ's credit-mode consumer argument);
//! should a broker ignore that and push one anyway (prefetch 1), it is handed back with its
//! attempt unchanged and the rounds start over, so that hand-back is covered too.

use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;

use super::conn::{broker, is_not_found};
use super::lease::Shared;
use crate::error::Result;
use std::sync::Arc;

/// Consecutive rounds without a pushed message that make the barrier; see the module docs.
const ROUNDS: usize = 2;

/// Most rounds in all, should a broker keep pushing messages to the barrier consumer.
const MAX_ROUNDS: usize = 8;

impl Shared {
    /// Returns once the group queue applied every settle written on `ch` (the channel of
    /// `generation`) before this call.
    pub(crate) async fn settle_barrier(
        self: &Arc<Self>,
        ch: &Channel,
        generation: u64,
    ) -> Result<()> {
        self.prefetch(ch, generation, 1).await?;
        let mut clean = 0;
        for _ in 0..MAX_ROUNDS {
            if clean == ROUNDS {
                return Ok(());
            }
            let tag = self.consumer_tag();
            let mut credit = FieldTable::default();
            // RabbitMQ reads `credit` as a 64-bit `long` ('l'); any other type is ignored.
            credit.insert("credit".into(), AMQPValue::LongLongInt(0));
            credit.insert("drain".into(), AMQPValue::Boolean(false));
            let mut args = FieldTable::default();
            args.insert("x-credit".into(), AMQPValue::FieldTable(credit));
            let consumed = ch
                .basic_consume(
                    self.names.queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await;
            let mut consumer = match consumed {
                Ok(c) => c,
                // The queue was deleted (the 404 closed the channel): nothing left to settle.
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(broker(e)),
            };
            ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
                .map_err(broker)?;
            // A push precedes the cancel-ok on the wire, so it is queued in the consumer by now.
            clean += 1;
            while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
                tracing::debug!(
                    "pgtide amqp: the settle barrier was pushed a message; handing it back"
                );
                self.hand_back(generation, d).await?;
                clean = 0;
            }
        }
        Ok(())
    }
}
