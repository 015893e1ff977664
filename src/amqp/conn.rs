//! The connection to RabbitMQ: one lapin connection per backend handle, reopened when it is
//! lost, plus the shared publisher channel (publisher confirms on). Channels that a server
//! error closed are not reused: callers ask again and get a fresh one.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use tokio::sync::Mutex;

use crate::error::{Error, Result};

/// The backend's name in errors.
pub(crate) const NAME: &str = "amqp";

/// A lazily (re)opened connection and the publisher channel on it.
pub(crate) struct Conn {
    url: String,
    /// The CA of the URL's `tls_ca` parameter, for `amqps://` to a private CA.
    tls: OwnedTLSConfig,
    connection: Mutex<Option<Arc<Connection>>>,
    publisher: Mutex<Option<Channel>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Conn {
    /// Takes the `tls_ca=PATH` parameter off `url` and reads that CA file; connects later.
    pub(crate) fn new(url: &str) -> Result<Self> {
        let (url, ca) = crate::broker_tls::take_ca_param(NAME, url)?;
        let cert_chain = match ca {
            None => None,
            Some(path) => {
                let pem = crate::broker_tls::read_ca(NAME, &path)?;
                Some(String::from_utf8(pem).map_err(|_| {
                    Error::InvalidConfig(format!(
                        "amqp: the TLS CA file {} is not UTF-8 PEM",
                        path.display()
                    ))
                })?)
            }
        };
        Ok(Conn {
            url,
            tls: OwnedTLSConfig {
                identity: None,
                cert_chain,
            },
            connection: Mutex::new(None),
            publisher: Mutex::new(None),
        })
    }

    /// The open connection, reconnecting if it was lost.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        let props = ConnectionProperties::default().with_connection_name("pgtide".into());
        let runtime = lapin::runtime::default_runtime().map_err(broker)?;
        let c = Arc::new(
            Connection::connect_with_config(&self.url, props, self.tls.clone(), runtime)
                .await
                .map_err(broker)?,
        );
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A new channel. The caller owns it; it closes when the last clone drops.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        let c = self.connection().await?;
        match c.create_channel().await {
            Ok(ch) => Ok(ch),
            // The connection may have died between the status check and now: one more try.
            Err(_) => self
                .connection()
                .await?
                .create_channel()
                .await
                .map_err(broker),
        }
    }

    /// Closes the publisher channel, then the connection, each waiting for the broker's
    /// close-ok: what was written before (settles, publishes) has been processed by then.
    /// The first error is returned after both were tried. A later call reconnects.
    pub(crate) async fn close(&self) -> Result<()> {
        let publisher = self.publisher.lock().await.take();
        let mut result = Ok(());
        if let Some(ch) = publisher.filter(|ch| ch.status().connected()) {
            result = close_ok("publisher channel", ch.close(200, "pgtide: closed".into())).await;
        }
        let connection = self.connection.lock().await.take();
        if let Some(c) = connection.filter(|c| c.status().connected()) {
            result =
                result.and(close_ok("connection", c.close(200, "pgtide: closed".into())).await);
        }
        result
    }

    /// The shared channel for publishes (publisher confirms on).
    pub(crate) async fn publisher(&self) -> Result<Channel> {
        let mut slot = self.publisher.lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = self.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker)?;
        *slot = Some(ch.clone());
        Ok(ch)
    }
}

/// How long a close waits for the broker's close-ok. By then the settle barrier has confirmed
/// every settle (`barrier.rs`) and publisher confirms every publish, so the close-ok only
/// tidies up; a broker that never sends it (seen on RabbitMQ 3.10 under load: about one
/// `pgtide stats` in a few hundred hung at exit) must not hang the process.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Waits for a channel's or the connection's close-ok, at most [`CLOSE_WAIT`].
pub(crate) async fn close_ok(
    what: &str,
    close: impl Future<Output = lapin::Result<()>>,
) -> Result<()> {
    match tokio::time::timeout(CLOSE_WAIT, close).await {
        Ok(r) => closed(r),
        Err(_) => {
            tracing::warn!(
                "pgtide amqp: no close-ok for the {what} within {CLOSE_WAIT:?}; \
                 everything sent on it was already confirmed, going on"
            );
            Ok(())
        }
    }
}

/// The result of a graceful close. A channel the server already closed (after a refusal such
/// as a 404 on a passive declare) reports its state while the connection closes; that channel
/// held nothing to flush, so it is not an error.
pub(crate) fn closed(r: lapin::Result<()>) -> Result<()> {
    match r {
        Err(e) if matches!(e.kind(), ErrorKind::InvalidChannelState(..)) => {
            tracing::debug!(error = %e, "pgtide amqp: a channel was already closed at close");
            Ok(())
        }
        r => r.map_err(broker),
    }
}

/// Wraps a lapin error. Lost connections and closed channels are retryable; refusals by the
/// server (access, argument mismatch, missing objects) are not.
pub(crate) fn broker(e: lapin::Error) -> Error {
    let retryable = match e.kind() {
        ErrorKind::ProtocolError(a) => matches!(
            a.kind(),
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
                | AMQPErrorKind::Hard(AMQPHardError::RESOURCEERROR)
                | AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)
        ),
        ErrorKind::InvalidProtocolVersion(_) | ErrorKind::AuthProviderError(_) => false,
        _ => true,
    };
    crate::broker_tls::broker_error(NAME, e, retryable)
}

/// A pgtide-level broker error with a message.
pub(crate) fn broker_msg(msg: impl Into<String>, retryable: bool) -> Error {
    Error::Broker {
        backend: NAME,
        source: msg.into().into(),
        retryable,
    }
}

/// True if the server answered 404 NOT_FOUND (the channel is closed by now).
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(a)
        if matches!(a.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// True if the server answered 406 PRECONDITION_FAILED (the channel is closed by now).
pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(a)
        if matches!(a.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}
