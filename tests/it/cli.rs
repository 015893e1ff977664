//! The `pgtide` binary, driven end to end as a user would.
