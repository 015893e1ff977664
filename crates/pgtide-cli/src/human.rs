//! Human-friendly values: durations (`250ms`, `30s`, `5m`, `7d`, `1h30m`), sizes (`1MiB`), points
//! in time (`oldest`, `new`, RFC 3339, an age), counted nouns, timestamps (RFC 3339 UTC, the
//! one format every output uses), aligned tables and base64.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

/// Parses `250ms`, `30s`, `5m`, `2h`, `7d`, `1w`, or sums of them (`1h30m`). `0` alone is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!("invalid duration {text:?}: use a number with a unit: 250ms, 30s, 5m, 2h, 7d, 1w (or sums like 1h30m)")
    };
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        let secs = match unit {
            "ms" => 0.001,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" | "hr" | "hrs" => 3600.0,
            "d" | "day" | "days" => 86_400.0,
            "w" | "week" | "weeks" => 604_800.0,
            _ => return Err(bad()),
        };
        let part = Duration::try_from_secs_f64(number * secs).map_err(|_| bad())?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = &after[unit_len..];
    }
    // The library's one duration rule: past it timestamps overflow (see pgtide::MAX_DURATION).
    if total > pgtide::MAX_DURATION {
        return Err(format!(
            "duration {text:?} is too long: the largest pgtide accepts is 36500d (100 years)"
        ));
    }
    Ok(total)
}

/// Parses a duration that must not be zero (a refresh interval: zero would spin).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!(
            "interval {text:?} is zero: use a positive duration such as 500ms or 2s"
        )),
        d => Ok(d),
    }
}

/// Parses a count that must be at least 1.
pub fn parse_count(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err("0 would stop before the first delivery: use 1 or more (or --follow without --count for no limit)".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("invalid count {text:?}: use a whole number, 1 or more")),
    }
}

/// `n` and the noun, singular for 1: `1 message`, `2 messages`.
pub fn plural(n: u64, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// A timestamp as every output prints it: RFC 3339 in UTC with milliseconds
/// (`2024-05-01T12:00:00.000Z`), in tables, text and JSON alike.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Formats a duration compactly: `250ms`, `30s`, `5m`, `1h30m`, `7d`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    let frac = ms % 1000;
    if frac != 0 && d.as_secs() < 60 {
        out.push_str(&format!("{frac}ms"));
    }
    out
}

/// Formats an age for tables: seconds with one decimal under a minute, else compact.
pub fn format_age(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format_duration(Duration::from_secs(d.as_secs()))
    }
}

/// Parses a size: bytes, or with a unit `KB`/`KiB`/`MB`/`MiB`/`GB`/`GiB` (powers of 1024 for both).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let bad = || format!("invalid size {text:?}: use bytes or a unit, e.g. 65536, 256KiB, 1MiB");
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: usize = s[..split].parse().map_err(|_| bad())?;
    let mult: usize = match s[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// A point to start or replay a group from (the words of `GroupStart`: `oldest`, `new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Every retained message.
    Oldest,
    /// Messages published from now on.
    New,
    /// Messages published at or after this time.
    At(DateTime<Utc>),
}

/// Parses `oldest`, `new`, an RFC 3339 time, or an age (`1h` = one hour ago). The spellings of
/// earlier releases (`beginning`, `now`) and a few synonyms stay accepted.
pub fn parse_point(text: &str) -> Result<Point, String> {
    match text.trim() {
        "oldest" | "beginning" | "earliest" | "start" => Ok(Point::Oldest),
        "new" | "now" | "latest" | "end" => Ok(Point::New),
        t => {
            if let Ok(at) = DateTime::parse_from_rfc3339(t) {
                return Ok(Point::At(at.with_timezone(&Utc)));
            }
            match parse_duration(t) {
                Ok(age) => chrono::Duration::from_std(age)
                    .ok()
                    .and_then(|age| Utc::now().checked_sub_signed(age))
                    .map(Point::At)
                    .ok_or_else(|| format!("age {t:?} reaches before the earliest time pgtide handles")),
                // A well-formed age past the duration rule: say so, not "invalid point".
                Err(e) if e.contains("too long") => Err(e),
                Err(_) => Err(format!(
                    "invalid point {t:?}: use `oldest`, `new`, an RFC 3339 time such as 2024-05-01T12:00:00Z, or an age such as 1h"
                )),
            }
        }
    }
}

/// Prints rows as left-aligned columns with a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A payload as JSON output: `(value, encoding)` where encoding is `json`, `text` or `base64`.
pub fn payload_json(bytes: &[u8], is_json: Option<bool>) -> (serde_json::Value, &'static str) {
    let parsed = || serde_json::from_slice::<serde_json::Value>(bytes).ok();
    let json = match is_json {
        Some(true) => parsed(),
        Some(false) => None,
        // Unknown (dead letters): show JSON as JSON when it parses.
        None => parsed(),
    };
    if let Some(v) = json {
        return (v, "json");
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => (serde_json::Value::String(s.to_owned()), "text"),
        Err(_) => (serde_json::Value::String(base64(bytes)), "base64"),
    }
}

/// Hides the password of a database URL for messages.
pub fn redact_url(url: &str) -> String {
    // Postgres URLs and `key=value` strings: the library's reading, which also hides
    // `password=` parameters.
    if url.starts_with("postgres://") || url.starts_with("postgresql://") || !url.contains("://") {
        return pgtide::redact_url(url);
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "30", "s", "5x", "-1s", "1h30", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
        assert!(parse_interval("0s").is_err());
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn counts_plurals_times() {
        assert!(parse_count("0").is_err());
        assert!(parse_count("x").is_err());
        assert_eq!(parse_count("3"), Ok(3));
        assert_eq!(plural(1, "message", "messages"), "1 message");
        assert_eq!(plural(0, "message", "messages"), "0 messages");
        assert_eq!(plural(2, "dead letter", "dead letters"), "2 dead letters");
        let t = DateTime::parse_from_rfc3339("2024-05-01T14:00:00.5+02:00")
            .map(|t| t.with_timezone(&Utc))
            .ok();
        assert_eq!(
            t.map(format_time).as_deref(),
            Some("2024-05-01T12:00:00.500Z")
        );
    }

    #[test]
    fn sizes_points_base64() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("1XB").is_err());
        assert_eq!(parse_point("oldest"), Ok(Point::Oldest));
        assert_eq!(parse_point("new"), Ok(Point::New));
        assert_eq!(parse_point("beginning"), Ok(Point::Oldest));
        assert_eq!(parse_point("now"), Ok(Point::New));
        assert!(matches!(
            parse_point("2024-05-01T12:00:00Z"),
            Ok(Point::At(_))
        ));
        assert!(matches!(parse_point("1h"), Ok(Point::At(_))));
        assert!(parse_point("yesterday").is_err());
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0xff, 0x00, 0xfe, 0x01]), "/wD+AQ==");
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
