//! Declaring and deleting the RabbitMQ objects. Every declare is idempotent (same arguments
//! every time), so publishers, consumers and admin calls can all repeat them safely.
//!
//! Per stream: direct exchange `<ns>.<stream>`; per group: quorum queue `<ns>.<stream>/<group>`
//! bound with the versioned routing key, fanout dead-letter exchange and classic dead-letter
//! queue `<ns>.<stream>/<group>~dead`. Per namespace (created on first use): the delay levels
//! (see [`declare_delay_levels`]).

use futures_util::future::try_join_all;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::codec::{int, text};
use super::conn::broker;
use super::names::{
    delay_binding, delay_level, deliver_binding, GroupNames, StreamNames, DELAY_LEVELS, ROUTING_KEY,
};
use crate::error::Result;

fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(k.into(), v);
    }
    t
}

const DURABLE_EXCHANGE: ExchangeDeclareOptions = ExchangeDeclareOptions {
    passive: false,
    durable: true,
    auto_delete: false,
    internal: false,
    nowait: false,
};

const DURABLE_QUEUE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<()> {
    ch.exchange_declare(name.into(), kind, DURABLE_EXCHANGE, FieldTable::default())
        .await
        .map_err(broker)
}

async fn queue(ch: &Channel, name: &str, args: FieldTable) -> Result<()> {
    ch.queue_declare(name.into(), DURABLE_QUEUE, args)
        .await
        .map(|_| ())
        .map_err(broker)
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<()> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(broker)
}

/// The stream exchange and its registry queue.
pub(crate) async fn declare_stream(ch: &Channel, s: &StreamNames) -> Result<()> {
    exchange(ch, &s.exchange, ExchangeKind::Direct).await?;
    queue(ch, &s.registry, FieldTable::default()).await
}

/// The stream exchange alone (what publishers re-declare).
pub(crate) async fn declare_stream_exchange(ch: &Channel, s: &StreamNames) -> Result<()> {
    exchange(ch, &s.exchange, ExchangeKind::Direct).await
}

/// A group's queue, bindings and dead-letter exchange and queue.
pub(crate) async fn declare_group(ch: &Channel, s: &StreamNames, g: &GroupNames) -> Result<()> {
    exchange(ch, &g.dead, ExchangeKind::Fanout).await?;
    queue(ch, &g.dead, FieldTable::default()).await?;
    bind(ch, &g.dead, &g.dead, "").await?;
    // Quorum: replicated, and it counts returns in `x-delivery-count` (the attempt number).
    let args = table(vec![
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text(&g.dead)),
    ]);
    queue(ch, &g.queue, args).await?;
    bind(ch, &g.queue, &s.exchange, ROUTING_KEY).await
}

/// The delay topology of a namespace: for each level `k` (0..28) a topic exchange and a classic
/// queue whose queue-level TTL is `2^k` ms and whose dead-letter exchange is level `k-1` (the
/// last level dead-letters into the deliver exchange). A message's routing key holds one bit
/// word per level: a level routes `1` into its queue (wait `2^k` ms) and `0` straight on to the
/// next level (exchange-to-exchange binding). The deliver exchange routes on the final word,
/// the destination queue. Every message in a level queue has the same TTL, so expiry order is
/// queue order: no head-of-line blocking, unlike per-message TTL in one queue.
pub(crate) async fn declare_delay_levels(ch: &Channel, ns: &str) -> Result<()> {
    let names: Vec<String> = (-1..DELAY_LEVELS as i32)
        .map(|l| delay_level(ns, l))
        .collect();
    try_join_all(names.iter().map(|n| exchange(ch, n, ExchangeKind::Topic))).await?;
    try_join_all((0..DELAY_LEVELS).map(|level| {
        let args = table(vec![
            ("x-message-ttl", int(1i64 << level)),
            (
                "x-dead-letter-exchange",
                text(&delay_level(ns, level as i32 - 1)),
            ),
        ]);
        queue(ch, &names[level as usize + 1], args)
    }))
    .await?;
    let names = &names;
    try_join_all((0..DELAY_LEVELS).map(|level| async move {
        let this = &names[level as usize + 1];
        let next = &names[level as usize];
        bind(ch, this, this, &delay_binding(level, '1')).await?;
        ch.exchange_bind(
            next.as_str().into(),
            this.as_str().into(),
            delay_binding(level, '0').as_str().into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker)
    }))
    .await?;
    Ok(())
}

/// Lets the delay topology deliver to `queue` (a group queue or a stream's landing queue).
pub(crate) async fn route_delayed_to(ch: &Channel, ns: &str, queue: &str) -> Result<()> {
    bind(ch, queue, &delay_level(ns, -1), &deliver_binding(queue)).await
}

/// The landing queue of delayed publishes: TTL 0, dead-lettering into the stream exchange with
/// the versioned routing key, so a delayed message reaches every group when it comes due.
pub(crate) async fn declare_landing(ch: &Channel, ns: &str, s: &StreamNames) -> Result<()> {
    let args = table(vec![
        ("x-message-ttl", int(0)),
        ("x-dead-letter-exchange", text(&s.exchange)),
        ("x-dead-letter-routing-key", text(ROUTING_KEY)),
    ]);
    queue(ch, &s.landing, args).await?;
    route_delayed_to(ch, ns, &s.landing).await
}

async fn delete_queue(ch: &Channel, name: &str) -> Result<()> {
    ch.queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .map(|_| ())
        .map_err(broker)
}

async fn delete_exchange(ch: &Channel, name: &str) -> Result<()> {
    ch.exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await
        .map_err(broker)
}

/// Deletes a group's objects (missing ones are fine).
pub(crate) async fn delete_group(ch: &Channel, g: &GroupNames) -> Result<()> {
    delete_queue(ch, &g.queue).await?;
    delete_queue(ch, &g.dead).await?;
    delete_exchange(ch, &g.dead).await
}

/// Deletes a stream's own objects (not its groups; missing ones are fine).
pub(crate) async fn delete_stream(ch: &Channel, s: &StreamNames) -> Result<()> {
    delete_queue(ch, &s.landing).await?;
    delete_exchange(ch, &s.exchange).await?;
    delete_queue(ch, &s.registry).await
}

/// Deletes the namespace's delay topology (messages still in it are lost).
pub(crate) async fn delete_delay_levels(ch: &Channel, ns: &str) -> Result<()> {
    try_join_all((0..DELAY_LEVELS as i32).map(|l| async move {
        let name = delay_level(ns, l);
        delete_queue(ch, &name).await?;
        delete_exchange(ch, &name).await
    }))
    .await?;
    delete_exchange(ch, &delay_level(ns, -1)).await
}
