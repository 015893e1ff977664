//! The one duration rule of pgtide: every duration a caller hands in (delay, deliver_at, lease,
//! nack delay, a group's start point, backoff steps, retention, dedupe window, partition width)
//! must be at most [`MAX_DURATION`]. Past it, timestamps leave the range chrono and PostgreSQL
//! share and arithmetic overflows; nothing useful waits a century. The SQL functions apply the
//! same bound (`_check_duration` in `sql/functions/core.sql`, PT001) and the CLI rejects larger
//! values while parsing (exit 2).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

/// The largest duration pgtide accepts anywhere: 36 500 days (100 years of 365 days).
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// Checks `d` against [`MAX_DURATION`]; with `allow_zero == false` it must also be positive
/// (a lease or a partition width of zero makes no sense). Fails with [`Error::InvalidConfig`]
/// naming `what`.
pub fn check_duration(what: &str, d: Duration, allow_zero: bool) -> Result<()> {
    if d > MAX_DURATION {
        return Err(Error::InvalidConfig(format!(
            "{what} of {}s is too long: the largest duration pgtide accepts is 36500 days (100 years)",
            d.as_secs()
        )));
    }
    if !allow_zero && d.is_zero() {
        return Err(Error::InvalidConfig(format!("{what} must be positive")));
    }
    Ok(())
}

/// Checks that the point in time `at` lies within [`MAX_DURATION`] of now, either way (a
/// `deliver_at` or a replay point). Fails with [`Error::InvalidConfig`] naming `what`.
pub fn check_time(what: &str, at: DateTime<Utc>) -> Result<()> {
    let now = Utc::now();
    let span = at
        .signed_duration_since(now)
        .abs()
        .to_std()
        .unwrap_or(Duration::MAX);
    if span > MAX_DURATION {
        return Err(Error::InvalidConfig(format!(
            "{what} {at} is more than 36500 days (100 years) from now"
        )));
    }
    Ok(())
}

/// The nack delay rule every backend applies before settling anything: at most
/// [`MAX_DURATION`] (zero retries at once).
pub(crate) fn check_nack_delay(delay: Option<Duration>) -> Result<()> {
    match delay {
        Some(d) => check_duration("nack delay", d, true),
        None => Ok(()),
    }
}

/// The rule for a lease given to `in_progress` (or a consumer's lease override): positive and
/// at most [`MAX_DURATION`], checked before anything is extended.
pub(crate) fn check_lease_override(lease: Option<Duration>) -> Result<()> {
    match lease {
        Some(l) => check_duration("lease", l, false),
        None => Ok(()),
    }
}

/// Checks the ordering key, delay and `deliver_at` of every message of a batch before anything is written, so
/// a batch is rejected whole. Every backend's publish runs it.
pub(crate) fn check_messages(msgs: &[crate::OutgoingMessage]) -> Result<()> {
    for m in msgs {
        if let Some(key) = &m.key {
            crate::names::validate_key(key)?;
        }
        if let Some(d) = m.delay {
            check_duration("delay", d, true)?;
        }
        if let Some(at) = m.deliver_at {
            check_time("deliver_at", at)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(check_duration("delay", MAX_DURATION, true).is_ok());
        assert!(check_duration("delay", Duration::ZERO, true).is_ok());
        assert!(check_duration("lease", Duration::ZERO, false).is_err());
        assert!(check_duration("delay", MAX_DURATION + Duration::from_nanos(1), true).is_err());
        assert!(check_duration("delay", Duration::MAX, true).is_err());
        assert!(check_time("deliver_at", Utc::now()).is_ok());
        assert!(check_time("deliver_at", DateTime::<Utc>::MAX_UTC).is_err());
        assert!(check_time("deliver_at", DateTime::<Utc>::MIN_UTC).is_err());
    }
}
