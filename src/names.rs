//! Name rules. Stream, group and consumer names are data (never identifiers in SQL), but they are
//! still checked so that every backend (NATS subjects, Redis keys, AMQP queues) accepts them.

use crate::error::{Error, Result};

/// Longest stream, group or consumer name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a stream, group or consumer name: 1-64 of `a-z`, `0-9`, `.`, `_`, `-`, starting with a
/// letter or digit.
pub fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            kind,
            name: name.to_owned(),
        })
    }
}

/// Longest ordering key ([`crate::OutgoingMessage::key`]), in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// Checks an ordering key: 1 to [`MAX_KEY_LEN`] bytes of text without control characters (the
/// same rule as the SQL functions' `_check_key`). Keys are data, never identifiers; the rule
/// keeps them printable in inspection output and storable as PostgreSQL `text` (no NUL).
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
        return Err(Error::InvalidKey(key.to_owned()));
    }
    Ok(())
}

/// Checks a namespace (Postgres schema) name: 1-63 of `a-z`, `0-9`, `_`, not starting with a digit
/// and not starting with `pg_`.
pub fn validate_namespace(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.as_bytes()[0].is_ascii_digit()
        && !name.starts_with("pg_")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidNamespace(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["orders", "hook.sync", "a", "0-x_y.z", &"a".repeat(64)] {
            assert!(validate_name("stream", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Orders",
            "-x",
            ".x",
            "a b",
            "a;drop",
            "é",
            &"a".repeat(65),
            "a\"b",
        ] {
            assert!(
                matches!(validate_name("stream", bad), Err(Error::InvalidName { .. })),
                "{bad}"
            );
        }
        for good in ["customer-42", "A b/c:é", &"k".repeat(MAX_KEY_LEN)] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in ["", "a\nb", "a\0b", "\u{7f}", &"k".repeat(MAX_KEY_LEN + 1)] {
            assert!(
                matches!(validate_key(bad), Err(Error::InvalidKey(_))),
                "{bad:?}"
            );
        }
        assert!(validate_namespace("pgtide").is_ok());
        assert!(validate_namespace("t_1").is_ok());
        for bad in ["", "1a", "pg_x", "a-b", "A", "a\"b"] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }
}
