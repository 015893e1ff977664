//! pgtide integration tests: one binary, every test in its own namespace, against real servers.

mod common;
mod conformance;
mod examples;
mod faults;
#[cfg(feature = "redis")]
mod inbox;
mod memory;
mod model;
#[cfg(feature = "otel")]
mod otel;
mod postgres;
mod relay;
