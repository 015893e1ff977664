//! Deliveries and settle results, shared by every backend.

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Message;
use crate::error::{Error, Result};

/// One message handed to one consumer of one group, leased until `lease_expires_at`.
#[derive(Clone)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// The group it was delivered to.
    pub group: String,
    /// The consumer it was delivered to.
    pub consumer: String,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// When the lease ends and the delivery becomes visible to the group again.
    pub lease_expires_at: DateTime<Utc>,
    /// Backend-specific settle handle (broker ack subject, entry id, delivery tag, ...).
    pub(crate) token: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("attempt", &self.attempt)
            .field("lease_expires_at", &self.lease_expires_at)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// The message id.
    pub fn id(&self) -> Uuid {
        self.message.id
    }

    /// The backend's settle handle, if it is of type `T`.
    #[allow(dead_code)]
    pub(crate) fn token<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.token.as_deref().and_then(|t| t.downcast_ref::<T>())
    }
}

impl std::ops::Deref for Delivery {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.message
    }
}

/// Result of a batched settle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleReport {
    /// Deliveries settled.
    pub settled: Vec<Uuid>,
    /// Deliveries that went to the dead letters (term, or nack on the last allowed attempt).
    pub dead_lettered: Vec<Uuid>,
    /// Deliveries whose lease was lost (settled already or claimed again): nothing changed.
    pub lost: Vec<Uuid>,
}

impl SettleReport {
    /// Builds a report: whatever was requested and is in neither list was lost.
    pub(crate) fn from_parts(
        requested: &[&Delivery],
        settled: Vec<Uuid>,
        dead_lettered: Vec<Uuid>,
    ) -> Self {
        let done: HashSet<Uuid> = settled.iter().chain(&dead_lettered).copied().collect();
        let lost = requested
            .iter()
            .map(|d| d.id())
            .filter(|id| !done.contains(id))
            .collect();
        SettleReport {
            settled,
            dead_lettered,
            lost,
        }
    }

    /// `Ok` if nothing was lost, else [`Error::LeaseLost`] for `id`.
    pub(crate) fn single(self, id: Uuid) -> Result<()> {
        if self.lost.is_empty() {
            Ok(())
        } else {
            Err(Error::LeaseLost { id })
        }
    }
}
