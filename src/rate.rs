//! [`RateLimit`]: deliveries per second with a burst, the one rule every door (Rust, SQL's
//! `_check_rate`, the CLI's `--rate 100/s`) applies.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The slowest rate accepted: one delivery a day.
const MIN_RATE: f64 = 1.0 / 86_400.0;
/// The fastest rate accepted, per second.
const MAX_RATE: f64 = 1_000_000.0;
/// The largest burst accepted.
const MAX_BURST: u32 = 1_000_000;

/// A token bucket: at most `rate` deliveries per second on average, and at most `burst` at once
/// after a quiet spell. Set on a group with [`crate::GroupConfig::rate_limit`] (the whole
/// group) or [`crate::GroupConfig::rate_limit_per_key`] (each ordering key).
///
/// Parsed from `"100/s"`, `"30/min"`, `"2/h"`, `"1/5s"` (one every five seconds), `"0.5/s"`
/// or a bare number of deliveries per second (`"100"`).
///
/// ```
/// use pgtide::RateLimit;
/// let limit: RateLimit = "600/min".parse()?;
/// assert_eq!(limit, RateLimit::per_second(10.0));
/// assert_eq!(RateLimit::per_second(10.0).burst(50).burst_size(), 50);
/// # Ok::<(), pgtide::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    per_second: f64,
    burst: Option<u32>,
}

// By bit pattern, so that the relation is reflexive whatever value was passed (a NaN never
// passes `validate`, but it must not break `Eq` either).
impl PartialEq for RateLimit {
    fn eq(&self, other: &Self) -> bool {
        self.per_second.to_bits() == other.per_second.to_bits() && self.burst == other.burst
    }
}

impl Eq for RateLimit {}

impl RateLimit {
    /// `rate` deliveries per second (fractions allowed: `0.5` is one every two seconds). The
    /// burst defaults to one second's worth, at least 1.
    pub fn per_second(rate: f64) -> Self {
        RateLimit {
            per_second: rate,
            burst: None,
        }
    }

    /// `rate` deliveries per minute.
    pub fn per_minute(rate: f64) -> Self {
        Self::per_second(rate / 60.0)
    }

    /// Sets the most deliveries allowed at once after a quiet spell (the bucket's size).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// Deliveries per second.
    pub fn rate(&self) -> f64 {
        self.per_second
    }

    /// The bucket's size: the burst given, else one second's worth (at least 1).
    pub fn burst_size(&self) -> u32 {
        match self.burst {
            Some(b) => b,
            // The cast saturates; `validate` bounds the rate anyway.
            None => (self.per_second.ceil() as u32).clamp(1, MAX_BURST),
        }
    }

    /// Checks the rule: a rate between one a day and 1 000 000 per second, a burst between 1
    /// and 1 000 000 ([`Error::InvalidConfig`] otherwise; SQL raises `PT001`).
    pub fn validate(&self) -> Result<()> {
        // Written so that NaN fails too.
        if !(self.per_second >= MIN_RATE && self.per_second <= MAX_RATE) {
            return Err(Error::InvalidConfig(format!(
                "rate {} is invalid: use between one a day (1/86400) and 1000000 deliveries per second",
                self.per_second
            )));
        }
        if let Some(b) = self.burst {
            if b == 0 || b > MAX_BURST {
                return Err(Error::InvalidConfig(format!(
                    "burst {b} is invalid: use between 1 and {MAX_BURST}"
                )));
            }
        }
        Ok(())
    }

    /// The limit as stored (deliveries per second, burst), checked.
    #[cfg(feature = "postgres")]
    pub(crate) fn from_stored(rate: f64, burst: Option<i32>) -> Option<Self> {
        let limit = RateLimit {
            per_second: rate,
            burst: burst.and_then(|b| u32::try_from(b).ok()),
        };
        limit.validate().ok().map(|_| limit)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", self.per_second)?;
        if let Some(b) = self.burst {
            write!(f, " (burst {b})")?;
        }
        Ok(())
    }
}

impl FromStr for RateLimit {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidConfig(format!(
                "rate {s:?} is invalid: write COUNT/UNIT, e.g. 100/s, 30/min, 2/h, 1/5s (UNIT: s, min, h, d)"
            ))
        };
        let (count, per) = match s.trim().split_once('/') {
            Some((count, per)) => (count.trim(), per.trim()),
            None => (s.trim(), "s"),
        };
        // Plain decimal digits only: no signs, exponents, "inf" or "NaN".
        let decimal = |t: &str| {
            !t.is_empty()
                && t.chars().all(|c| c.is_ascii_digit() || c == '.')
                && t.chars().filter(|&c| c == '.').count() <= 1
                && t.chars().any(|c| c.is_ascii_digit())
        };
        if !decimal(count) {
            return Err(bad());
        }
        let count: f64 = count.parse().map_err(|_| bad())?;
        let split = per
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (times, unit) = per.split_at(split);
        let times: f64 = match times {
            "" => 1.0,
            t if decimal(t) => t.parse().map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        let seconds = match unit {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3_600.0,
            "d" | "day" => 86_400.0,
            _ => return Err(bad()),
        };
        if times <= 0.0 {
            return Err(bad());
        }
        let limit = RateLimit::per_second(count / (times * seconds));
        limit.validate()?;
        Ok(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let rate = |s: &str| s.parse::<RateLimit>().map(|r| r.rate());
        assert_eq!(rate("100/s").ok(), Some(100.0));
        assert_eq!(rate("100").ok(), Some(100.0));
        assert_eq!(rate("30/min").ok(), Some(0.5));
        assert_eq!(rate("7200/h").ok(), Some(2.0));
        assert_eq!(rate("1/5s").ok(), Some(0.2));
        assert_eq!(rate("0.5/s").ok(), Some(0.5));
        assert_eq!(rate(" 10 / sec ").ok(), Some(10.0));
        assert_eq!(rate("1/d").ok(), Some(MIN_RATE));
    }

    #[test]
    fn refuses_hostile_rates() {
        for s in [
            "",
            "/s",
            "0/s",
            "-1/s",
            "1e3/s",
            "inf/s",
            "NaN/s",
            "1/0s",
            "1/-1s",
            "1/",
            "1/x",
            "1/s/s",
            "1..2/s",
            "1000001/s",
            "1/2d",
            "0.00001/s",
            "99999999999999999999/s",
        ] {
            assert!(
                matches!(s.parse::<RateLimit>(), Err(Error::InvalidConfig(_))),
                "{s:?} was accepted"
            );
        }
    }

    #[test]
    fn validates_rate_and_burst_at_every_door() {
        assert!(RateLimit::per_second(f64::NAN).validate().is_err());
        assert!(RateLimit::per_second(f64::INFINITY).validate().is_err());
        assert!(RateLimit::per_second(-5.0).validate().is_err());
        assert!(RateLimit::per_second(1.0).burst(0).validate().is_err());
        assert!(RateLimit::per_second(1.0)
            .burst(MAX_BURST + 1)
            .validate()
            .is_err());
        assert!(RateLimit::per_second(1.0)
            .burst(MAX_BURST)
            .validate()
            .is_ok());
        assert_eq!(RateLimit::per_second(0.1).burst_size(), 1);
        assert_eq!(RateLimit::per_second(2.5).burst_size(), 3);
        assert_eq!(
            RateLimit::per_second(f64::NAN),
            RateLimit::per_second(f64::NAN)
        );
    }
}
