//! The process-wide listener: one dedicated connection per [`PgBackend`](crate::PgBackend)
//! (outside the pool) LISTENs on `pgtide.<ns>` and fans notifications out to local consumers and
//! the scout through the wake bus.
//!
//! One run of [`run`] is one session. When the connection fails or the server closes it, the
//! session returns the error and the supervisor restarts it with backoff; every successful
//! (re)connect broadcasts [`Wake::All`] so each local consumer runs a catch-up fetch, since
//! notifications sent while nobody listened are lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::Utc;
use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::{Shared, Wake};
use crate::Error;

/// State of the process-wide listener connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerStatus {
    /// Whether the LISTEN connection is up.
    pub connected: bool,
    /// When the last notification arrived.
    pub last_notification_at: Option<chrono::DateTime<Utc>>,
    /// How many times the connection was re-established. It grows on every reconnect, so a
    /// waiter can tell a new connection from the one it saw before.
    pub reconnects: u64,
    /// How many times the listener task failed (connection lost, panic) and was restarted.
    pub restarts: u64,
    /// The last failure, when there was one: the listener's, or its registrar's (prefixed
    /// `registrar:`; while the registrar fails, SQL publishes reach waiting consumers only at
    /// their fallback poll).
    pub last_error: Option<String>,
}

/// Marks the listener disconnected however the session ends: error, cancellation, panic or abort.
struct Connected<'a>(&'a Shared);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.listener_pid.store(0, Ordering::Release);
        self.0.listener.send_if_modified(|s| {
            let was = s.connected;
            s.connected = false;
            was
        });
    }
}

/// One LISTEN session: returns `Ok` only when `token` is cancelled.
pub(super) async fn run(shared: Arc<Shared>, token: CancellationToken) -> crate::Result<()> {
    let mut config = shared.listen_config.clone();
    config.application_name("pgtide-listener");
    let (client, mut connection) = tokio::select! {
        biased;
        _ = token.cancelled() => return Ok(()),
        c = config.connect(shared.tls.clone()) => c?,
    };
    // The connection is polled here, in the same task, for as long as the session lasts: it
    // carries the LISTEN reply and then the notifications.
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    // The session sits idle between notifications: a server-wide idle_session_timeout
    // (PostgreSQL 14+; unknown before, hence the version check) would end it every few seconds
    // and cost a catch-up fetch in every consumer each time. LISTEN goes last, alone, so that
    // it is what pg_stat_activity shows for this session.
    let keep_alive = "SELECT set_config('idle_session_timeout', '0', false) \
                      WHERE current_setting('server_version_num')::int >= 140000";
    let listen = format!("LISTEN \"{}\"", shared.channel);
    // The session's backend pid names this process's wake-up registrations (registrar.rs).
    let Some(row) = drive(
        client.query_one("SELECT pg_backend_pid()", &[]),
        &mut messages,
        &token,
    )
    .await?
    else {
        return Ok(());
    };
    let pid: i32 = row.try_get(0)?;
    for statement in [keep_alive, &listen] {
        if drive(client.batch_execute(statement), &mut messages, &token)
            .await?
            .is_none()
        {
            return Ok(());
        }
    }
    let _connected = Connected(&shared);
    // Registrations of an earlier session are void; the catch-up below makes every fetch ask anew.
    shared.registry.reconnected();
    shared.listener_pid.store(pid, Ordering::Release);
    let reconnect = shared.listener_sessions.fetch_add(1, Ordering::Relaxed) > 0;
    shared.listener.send_modify(|s| {
        s.connected = true;
        if reconnect {
            s.reconnects += 1;
        }
    });
    if reconnect {
        tracing::info!(channel = %shared.channel, "pgtide listener reconnected");
    }
    // Notifications sent while we were not listening are lost: every local consumer catches up.
    let _ = shared.bus.send(Wake::All);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(()),
            m = messages.next() => match m {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    shared
                        .listener
                        .send_modify(|s| s.last_notification_at = Some(Utc::now()));
                    match Wake::parse(n.payload()) {
                        Wake::Stream(stream) => shared.registry.heard(stream, &shared.bus),
                        wake => {
                            let _ = shared.bus.send(wake);
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(closed()),
            },
        }
    }
}

/// Runs `request` on the session while polling its connection, which carries the reply. `None`
/// when `token` is cancelled first.
async fn drive<T, M>(
    request: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    messages: &mut M,
    token: &CancellationToken,
) -> crate::Result<Option<T>>
where
    M: futures_util::Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin,
{
    tokio::pin!(request);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(None),
            r = &mut request => return Ok(Some(r?)),
            m = messages.next() => match m {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(closed()),
            },
        }
    }
}

fn closed() -> Error {
    Error::Postgres("the server closed the listener connection".into())
}
