//! Administration of one in-memory stream: creating it and its groups, purging, and stats.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::state::{Group, Stored, Stream};
use crate::config::{GroupConfig, GroupStart, StreamConfig};
use crate::error::{Error, Result};
use crate::queue::{uuid_time, GroupStats};

impl Stream {
    pub(super) fn new(config: StreamConfig) -> Stream {
        Stream {
            config,
            messages: HashMap::new(),
            groups: HashMap::new(),
            dedupe: HashMap::new(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Adds `group` unless it exists; returns true if it was added. From `Oldest`, every
    /// retained message is pending for it at once (in an ordered group, in its key's line, in
    /// publish order). An existing group with the other `ordered` setting is an error, as on
    /// Postgres.
    pub(super) fn add_group(
        &mut self,
        stream: &str,
        group: &str,
        config: &GroupConfig,
    ) -> Result<bool> {
        if let Some(g) = self.groups.get(group) {
            if g.fair.is_some() != config.fair_share {
                return Err(Error::InvalidConfig(format!(
                    "group {group:?} on stream {stream:?} exists and is {}: fair share is fixed when a group is created",
                    if g.fair.is_some() { "fair" } else { "not fair" }
                )));
            }
            if g.ordered != config.ordered {
                return Err(Error::InvalidConfig(format!(
                    "group {group:?} on stream {stream:?} exists and is {}: ordering is fixed when a group is created",
                    if g.ordered { "ordered" } else { "not ordered" }
                )));
            }
            return Ok(false);
        }
        config.validate()?;
        let mut g = Group {
            ordered: config.ordered,
            max_in_flight: config.max_in_flight,
            max_in_flight_per_key: config.max_in_flight_per_key,
            rate: config
                .rate_limit
                .map(|l| (l, super::state::Bucket::full(&l, Instant::now()))),
            key_rate: config.rate_limit_per_key,
            fair: config.fair_share.then(super::fair::Fair::new),
            ..Group::default()
        };
        if config.start == GroupStart::Oldest {
            let now = Instant::now();
            let mut all: Vec<&Arc<Stored>> = self.messages.values().collect();
            all.sort_by_key(|m| m.id);
            for m in all {
                g.enqueue(m.id, m.key.as_deref(), now);
            }
        }
        self.groups.insert(group.to_owned(), g);
        Ok(true)
    }

    /// Drops every message, dedupe key, pending delivery and dead letter; groups stay.
    pub(super) fn purge(&mut self) {
        self.messages.clear();
        self.dedupe.clear();
        for g in self.groups.values_mut() {
            *g = Group {
                ordered: g.ordered,
                max_in_flight: g.max_in_flight,
                max_in_flight_per_key: g.max_in_flight_per_key,
                rate: g.rate,
                key_rate: g.key_rate,
                fair: g.fair.as_ref().map(super::fair::Fair::emptied),
                ..Group::default()
            };
        }
    }

    /// Depth of `group`, which exists. Exact: it walks the group's pending deliveries.
    pub(super) fn stats(&self, stream: &str, group: &str) -> GroupStats {
        let g = &self.groups[group];
        let now = Instant::now();
        let (mut ready, mut delayed, mut in_flight) = (0, 0, 0);
        let mut oldest = None;
        for (at, _, id) in &g.order {
            if *at <= now {
                ready += 1;
                let age = (Utc::now() - uuid_time(id)).to_std().unwrap_or_default();
                oldest = Some(oldest.map_or(age, |o: Duration| o.max(age)));
            } else if g.pending[id].consumer.is_some() {
                in_flight += 1;
            } else {
                delayed += 1;
            }
        }
        GroupStats {
            stream: stream.to_owned(),
            group: Some(group.to_owned()),
            // Deliveries waiting behind their keys' heads count as ready, as on Postgres.
            ready: ready + g.waiting() as i64,
            delayed,
            in_flight,
            dead: g.dead.len() as i64,
            oldest_ready_age: oldest,
        }
    }
}
