//! Fault suite: each test starts its own servers, injects crashes and kills under load, and
//! accounts for every message (see `run.rs`).

#[cfg(any(feature = "nats", feature = "redis"))]
mod broker_tls;
#[cfg(any(feature = "nats", feature = "redis"))]
mod brokers;
mod claims;
mod postgres;
mod run;
mod sessions;
