//! Property test of the argument parser: arbitrary strings after every command never panic and
//! a rejection is always a clap error (exit 2 in `main`); every duration the parser accepts is
//! within the library's duration rule.

use clap::Parser;
use proptest::prelude::*;

use crate::cli::Cli;

/// Command prefixes that take durations, ages and names.
const PREFIXES: &[&[&str]] = &[
    &["stream", "create", "s"],
    &["stream", "update", "s"],
    &["group", "create", "s", "g"],
    &["group", "reset", "s", "g"],
    &["publish", "s"],
    &["consume", "s", "--group", "g"],
    &["trim", "s"],
    &["scout"],
    &["stats"],
];

const FLAGS: &[&str] = &[
    "--delay",
    "--lease",
    "--from",
    "--retention",
    "--backoff",
    "--max-age",
    "--wait",
    "--nack-delay",
    "--dedupe-window",
    "--partition-interval",
    "--watch",
    "--ttl",
    "--count",
];

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{1,25}(ms|s|m|h|d|w)",
        "[0-9.]{1,12}[a-z]{0,4}([0-9]{1,6}[a-z]{1,2})?",
        proptest::sample::select(FLAGS).prop_map(str::to_owned),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_arguments_never_panic(
        prefix in proptest::sample::select(PREFIXES),
        words in proptest::collection::vec(word(), 0..6),
    ) {
        let args = std::iter::once("pgtide")
            .chain(prefix.iter().copied())
            .chain(words.iter().map(String::as_str));
        // Ok or a typed clap error; a panic fails the test.
        let _ = Cli::try_parse_from(args);
    }

    #[test]
    fn accepted_durations_obey_the_rule(text in word()) {
        if let Ok(d) = crate::human::parse_duration(&text) {
            prop_assert!(d <= pgtide::MAX_DURATION);
        }
        let _ = crate::human::parse_point(&text);
    }
}
