//! TLS options shared by the broker URLs (`tls://`, `rediss://`, `amqps://`).
//!
//! The brokers' own clients do the TLS (rustls with the ring provider in all three); pgtide only
//! adds one URL parameter that the clients lack in common: `tls_ca=PATH`, a PEM file of the
//! certificate authority to trust instead of the system roots (a private CA, a test server).
//! It is taken off the URL before the client parses it, so the client never sees an unknown
//! parameter.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The URL parameter naming the CA file.
pub(crate) const CA_PARAM: &str = "tls_ca";

/// Splits `tls_ca=PATH` off `url`: the URL without it, and the path. A URL without the
/// parameter comes back unchanged (not re-serialised, so nothing the client reads is altered).
/// Errors never repeat the URL: it may hold a password.
pub(crate) fn take_ca_param(backend: &str, url: &str) -> Result<(String, Option<PathBuf>)> {
    if !url.contains(CA_PARAM) {
        return Ok((url.to_owned(), None));
    }
    let mut parsed = url::Url::parse(url)
        .map_err(|e| Error::InvalidConfig(format!("{backend} URL is not a valid URL: {e}")))?;
    let mut ca = None;
    let mut rest = Vec::new();
    for (key, value) in parsed.query_pairs() {
        if key == CA_PARAM {
            if value.is_empty() {
                return Err(Error::InvalidConfig(format!(
                    "{backend} URL: {CA_PARAM} is empty: give the path of a PEM file"
                )));
            }
            if ca.replace(PathBuf::from(value.as_ref())).is_some() {
                return Err(Error::InvalidConfig(format!(
                    "{backend} URL: {CA_PARAM} is given twice"
                )));
            }
        } else {
            rest.push((key.into_owned(), value.into_owned()));
        }
    }
    if ca.is_none() {
        // The text appeared elsewhere (a host or password): leave the URL alone.
        return Ok((url.to_owned(), None));
    }
    parsed.set_query(None);
    if !rest.is_empty() {
        parsed.query_pairs_mut().extend_pairs(rest);
    }
    Ok((parsed.into(), ca))
}

/// Reads a PEM CA file, checking that it holds at least one certificate so that a wrong path
/// fails here and not as a puzzling handshake error.
pub(crate) fn read_ca(backend: &str, path: &Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).map_err(|e| {
        Error::InvalidConfig(format!(
            "{backend}: cannot read the TLS CA file {}: {e}",
            path.display()
        ))
    })?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(Error::InvalidConfig(format!(
            "{backend}: the TLS CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(pem)
}

/// A certificate the client refused, found anywhere in an error's chain. rustls errors arrive
/// wrapped: in `io::Error`s, whose `source()` skips the wrapped error itself, and (redis) in an
/// `Arc<dyn Error>`, which a downcast to the concrete error type cannot see through.
pub(crate) fn rejected_certificate<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let wrapped: Option<&'a (dyn std::error::Error + 'static)> =
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            io.get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static))
        } else {
            error
                .downcast_ref::<Shared>()
                .map(|inner| inner.as_ref() as &(dyn std::error::Error + 'static))
        };
    wrapped
        .and_then(rejected_certificate)
        .or_else(|| error.source().and_then(rejected_certificate))
}

/// A TLS handshake the client gave up on: says what to check. Not retryable: the same
/// certificate would be refused again.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed: {reason}; check that the server's certificate is signed by the CA given in {CA_PARAM} (or by a system root) and names the host in the URL")]
pub(crate) struct HandshakeError {
    reason: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Turns a connection error into [`Error::Broker`]: a refused certificate becomes a
/// non-retryable [`HandshakeError`], anything else keeps `retryable`.
pub(crate) fn broker_error(
    backend: &'static str,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    retryable: bool,
) -> Error {
    let error = error.into();
    match rejected_certificate(error.as_ref()).map(ToString::to_string) {
        Some(reason) => Error::Broker {
            backend,
            source: Box::new(HandshakeError {
                reason,
                source: error,
            }),
            retryable: false,
        },
        None => Error::Broker {
            backend,
            source: error,
            retryable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_param_is_taken_off_and_other_parameters_stay() {
        let (url, ca) = take_ca_param(
            "amqp",
            "amqps://u:p@h:5671/%2f?heartbeat=10&tls_ca=/etc/ca%20x.pem",
        )
        .unwrap();
        assert_eq!(url, "amqps://u:p@h:5671/%2f?heartbeat=10");
        assert_eq!(ca, Some(PathBuf::from("/etc/ca x.pem")));
        let (url, ca) = take_ca_param("nats", "tls://h:4222?tls_ca=/ca.pem").unwrap();
        assert_eq!(url, "tls://h:4222");
        assert_eq!(ca, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn urls_without_the_parameter_are_untouched() {
        for url in ["nats://h:4222", "rediss://:tls_ca@h/0", "redis://h"] {
            assert_eq!(take_ca_param("x", url).unwrap(), (url.to_owned(), None));
        }
    }

    #[test]
    fn bad_parameters_are_refused_without_echoing_the_url() {
        for url in [
            "tls://secret@h?tls_ca=",
            "tls://secret@h?tls_ca=/a&tls_ca=/b",
        ] {
            let e = take_ca_param("nats", url).unwrap_err().to_string();
            assert!(!e.contains("secret"), "{e}");
        }
        let e = read_ca("nats", Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
    }
}
