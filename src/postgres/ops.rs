//! Operations used by the CLI: group reset, trim, grants, health.
