//! Fault suite: each test starts its own servers, injects crashes and kills under load, and
//! accounts for every message (see `postgres.rs`).

mod cluster;
mod postgres;
