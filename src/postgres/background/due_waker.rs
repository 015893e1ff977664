//! The due-waker (scout leader only): wakes the streams whose delayed deliveries or expired
//! leases came due. It sleeps until the earliest due time it knows (from the index, or from
//! `@<ms>` notifications of new delayed work), bounded by the scout's max interval, rather than
//! polling blindly, and NOTIFYs (through the notifier) every stream with newly visible work.
//!
//! Each check wakes the streams whose work became visible since the previous check. Work
//! committed after a check with an earlier due time (a nack's retry takes `now()` at the start
//! of its transaction; a slow commit, a lock wait or a long caller transaction can put that
//! behind the check) would fall outside every later range, so its `@<ms>` hint, sent after the
//! commit with a due time no later than the work's, reopens the range from that time. The
//! streams woken again because of the overlap cost one empty fetch each.
//!
//! It acts only while [`Shared::elected`] holds a term and stops as soon as the elector steps
//! down. A failed due check returns the error; the supervisor restarts it, and the restarted
//! task checks everything again (a duplicate wake-up costs one empty fetch, a lost one a poll
//! interval).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{wait_elected, Shared, Wake};

/// Runs until `token` is cancelled.
pub(super) async fn run(shared: Arc<Shared>, token: CancellationToken) -> crate::Result<()> {
    let mut elected = shared.elected.subscribe();
    loop {
        let Some(term) = wait_elected(&mut elected, &token).await else {
            return Ok(());
        };
        // Subscribed afresh: hints sent before this term are covered by the first check, which
        // runs at once and looks back to the epoch.
        let mut wakes = shared.bus.subscribe();
        let mut since = DateTime::<Utc>::UNIX_EPOCH;
        let mut next_check = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return Ok(()),
                changed = elected.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if *elected.borrow_and_update() != Some(term) {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(next_check) => {
                    let (streams, next_due, checked_at) = due(&shared, since).await?;
                    // Stepped down while the check ran: the next scout does this work.
                    if *elected.borrow() != Some(term) {
                        continue;
                    }
                    for s in streams {
                        shared.notifier.poke(Wake::Stream(Arc::from(s)));
                    }
                    since = checked_at;
                    shared.scout_status.send_modify(|s| s.last_check_at = Some(checked_at));
                    let mut wait = shared.scout.max_interval;
                    if let Some(due) = next_due {
                        let until = (due - checked_at).to_std().unwrap_or_default();
                        wait = wait.min(until + Duration::from_millis(1));
                    }
                    next_check = Instant::now() + wait;
                }
                wake = wakes.recv() => match wake {
                    Ok(Wake::Due(ms)) => {
                        // A hint comes after its commit and names a time no later than the due
                        // time of what it announces. If that time is already inside the range
                        // checked, the work was committed too late for that check (a nack's
                        // now() is its transaction's start): reopen the range from there.
                        if ms > 0 {
                            if let Some(at) = DateTime::<Utc>::from_timestamp_millis(ms - 1) {
                                since = since.min(at);
                            }
                        }
                        let now_ms = Utc::now().timestamp_millis();
                        let ahead = u64::try_from(ms.saturating_sub(now_ms)).unwrap_or(0);
                        // A due time too far ahead for the clock changes nothing: the periodic
                        // check covers it.
                        if let Some(at) = Instant::now().checked_add(Duration::from_millis(ahead)) {
                            next_check = next_check.min(at);
                        }
                    }
                    Ok(Wake::All) | Err(RecvError::Lagged(_)) => next_check = Instant::now(),
                    Err(RecvError::Closed) => return Ok(()),
                    Ok(_) => {}
                },
            }
        }
    }
}

/// Streams that came due since `since`, the next due time and the database's now.
async fn due(
    shared: &Shared,
    since: DateTime<Utc>,
) -> crate::Result<(Vec<String>, Option<DateTime<Utc>>, DateTime<Utc>)> {
    let client = shared.pool.get().await?;
    let row = shared.sql.scout_due.one(&client, &[&since]).await?;
    Ok((
        row.try_get::<_, Option<Vec<String>>>(0)?
            .unwrap_or_default(),
        // A due time past chrono's range (stored before the duration rule, or written around it)
        // is no reason to fail every check: treat it as nothing due soon, the periodic check
        // (`max_interval`) still runs.
        row.try_get::<_, Option<DateTime<Utc>>>(1).unwrap_or(None),
        row.try_get(2)?,
    ))
}
