//! Changing a group's limits at run time, as [`crate::PgBackend`] does (`set_max_in_flight`,
//! `set_max_in_flight_per_key`, `set_rate_limit`, `set_rate_limit_per_key`): same checks, same
//! errors. Every change wakes the stream's waiting consumers, which recompute what they may
//! claim (a raised or removed limit can make room at once).

use tokio::time::Instant;

use super::state::{Bucket, Group};
use super::MemoryBackend;
use crate::config::{check_fair_key_limit, check_key_limit, GroupConfig};
use crate::error::Result;
use crate::names::validate_name;
use crate::RateLimit;

impl MemoryBackend {
    /// Sets (`Some`) or removes (`None`) the group's concurrency limit
    /// ([`GroupConfig::max_in_flight`]). Deliveries already leased keep their leases; new claims
    /// wait for room. Fails with [`crate::Error::GroupNotFound`] if the group does not exist,
    /// [`crate::Error::InvalidConfig`] for 0 or a value above `i32::MAX`.
    pub async fn set_max_in_flight(
        &self,
        stream: &str,
        group: &str,
        limit: Option<u32>,
    ) -> Result<()> {
        GroupConfig::check_max_in_flight(limit)?;
        self.change_group(stream, group, |g| {
            g.max_in_flight = limit;
            Ok(())
        })
    }

    /// Sets (`Some`) or removes (`None`) the group's per-key concurrency limit
    /// ([`GroupConfig::max_in_flight_per_key`]). Deliveries already leased keep their leases
    /// (a key above a lowered limit takes no more until it is below it). Errors as
    /// [`MemoryBackend::set_max_in_flight`], and [`crate::Error::InvalidConfig`] for more than
    /// 1 on an ordered group.
    pub async fn set_max_in_flight_per_key(
        &self,
        stream: &str,
        group: &str,
        limit: Option<u32>,
    ) -> Result<()> {
        check_key_limit(false, limit)?;
        self.change_group(stream, group, |g| {
            check_key_limit(g.ordered, limit)?;
            check_fair_key_limit(g.fair.is_some(), limit)?;
            g.max_in_flight_per_key = limit;
            Ok(())
        })
    }

    /// Sets (`Some`) or removes (`None`) the group's rate limit ([`GroupConfig::rate_limit`]);
    /// the new bucket starts full. Fails with [`crate::Error::GroupNotFound`] if the group does
    /// not exist, [`crate::Error::InvalidConfig`] for a rate or burst out of bounds
    /// ([`RateLimit::validate`]).
    pub async fn set_rate_limit(
        &self,
        stream: &str,
        group: &str,
        limit: Option<RateLimit>,
    ) -> Result<()> {
        if let Some(l) = &limit {
            l.validate()?;
        }
        self.change_group(stream, group, |g| {
            g.rate = limit.map(|l| (l, Bucket::full(&l, Instant::now())));
            Ok(())
        })
    }

    /// Sets (`Some`) or removes (`None`) the rate limit of each key of the group
    /// ([`GroupConfig::rate_limit_per_key`]); every key's bucket starts full again. Errors as
    /// [`MemoryBackend::set_rate_limit`].
    pub async fn set_rate_limit_per_key(
        &self,
        stream: &str,
        group: &str,
        limit: Option<RateLimit>,
    ) -> Result<()> {
        if let Some(l) = &limit {
            l.validate()?;
        }
        self.change_group(stream, group, |g| {
            g.key_rate = limit;
            g.key_buckets.clear();
            Ok(())
        })
    }

    fn change_group(
        &self,
        stream: &str,
        group: &str,
        f: impl FnOnce(&mut Group) -> Result<()>,
    ) -> Result<()> {
        validate_name("stream", stream)?;
        validate_name("group", group)?;
        self.with_group(stream, group, |s, group| {
            if let Some(g) = s.groups.get_mut(group) {
                f(g)?;
            }
            s.wake.notify_waiters();
            Ok(())
        })
    }
}
