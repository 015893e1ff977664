//! The wake bus vocabulary: what a notification on `pgtide.<ns>` means to the local consumers
//! and to the scout, and how it is written as a NOTIFY payload.

use std::sync::Arc;

/// What a notification means to local listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wake {
    /// New ready work on this stream.
    Stream(Arc<str>),
    /// A delivery comes due at this time (epoch ms), or 0: recompute.
    Due(i64),
    /// The scout resigned: candidates should try to take over now.
    ScoutResigned,
    /// Anything may have changed (after a reconnect or a lagging receiver): fetch to catch up.
    All,
}

impl Wake {
    pub(super) fn parse(payload: &str) -> Wake {
        if payload == "!scout" {
            Wake::ScoutResigned
        } else if let Some(ms) = payload.strip_prefix('@') {
            Wake::Due(ms.parse().unwrap_or(0))
        } else {
            Wake::Stream(Arc::from(payload))
        }
    }

    pub(super) fn payload(&self) -> String {
        match self {
            Wake::Stream(s) => s.to_string(),
            Wake::Due(ms) => format!("@{ms}"),
            Wake::ScoutResigned => "!scout".to_owned(),
            Wake::All => String::new(),
        }
    }
}

/// The namespace-wide notification channel.
pub(super) fn channel(namespace: &str) -> String {
    format!("pgtide.{namespace}")
}
