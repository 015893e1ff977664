//! The throwaway cluster lives in `pgtide-testing`, shared with the CLI's tests.

pub use pgtide_testing::Cluster;
