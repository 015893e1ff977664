//! Throughput and latency harness (feature `bench`). Placeholder until the harness lands.
