//! Who may do what: writes need `--allow-writes` and the token (header `x-pgtide-token`), and
//! every response carries headers that keep other sites out (no framing, no sniffing, no
//! referrer). On a loopback address, requests must name a loopback host: a web page elsewhere
//! that rebinds its own host name to 127.0.0.1 cannot read the dashboard through it.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::error::{CliError, CliResult};

/// The header write requests carry the token in. A custom header also means a cross-site form
/// or image cannot make a write request at all.
pub(crate) const TOKEN_HEADER: &str = "x-pgtide-token";

/// Whether writes are allowed, and the token they need.
pub(crate) struct WriteAuth {
    token: Option<String>,
}

impl WriteAuth {
    /// Writes off without `allow`; with it, the given token (checked) or a random one.
    pub(crate) fn new(allow: bool, token: Option<String>) -> CliResult<WriteAuth> {
        if !allow {
            if token.is_some() {
                eprintln!("note: a token is set (--token/PGTIDE_DASHBOARD_TOKEN) but writes are off: pass --allow-writes to use it");
            }
            return Ok(WriteAuth { token: None });
        }
        let token = match token {
            Some(t) if t.len() < 16 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(CliError::usage(
                    "--token/PGTIDE_DASHBOARD_TOKEN must be 16-256 printable ASCII characters without spaces",
                ))
            }
            Some(t) => t,
            // 122 random bits from the OS.
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        Ok(WriteAuth { token: Some(token) })
    }

    /// Whether writes are allowed at all.
    pub(crate) fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// The token, when writes are allowed.
    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Ok when the request may write.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.token else {
            return Err(ApiError::forbidden(
                "writes are disabled: start the dashboard with --allow-writes",
            ));
        };
        let given = headers
            .get(TOKEN_HEADER)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if constant_time_eq(given, expected.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "missing or wrong token: send the token printed at start in the {TOKEN_HEADER} header"
            )))
        }
    }
}

/// Compares without returning early, so response times do not reveal a prefix of the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// True when a Host header names this machine: `localhost` or an IP literal, with any port.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [::1]:8080
        rest.split_once(']').map_or("", |(h, _)| h)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// The middleware in front of every route.
pub(crate) async fn guard(loopback: bool, req: Request, next: Next) -> Response {
    if loopback {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !loopback_host(host) {
            return ApiError::forbidden(
                "the dashboard listens on loopback: open it as http://127.0.0.1:PORT/ or http://localhost:PORT/",
            )
            .into_response();
        }
    }
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Scripts and styles from this server only; uPlot sizes its elements with inline styles.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1:8080",
            "localhost:1",
            "LOCALHOST",
            "[::1]:80",
            "10.0.0.1",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in ["evil.example:8080", "", "127.0.0.1.evil.example", "[::1"] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn tokens() {
        let auth = WriteAuth::new(true, Some("0123456789abcdef".into())).unwrap();
        let mut h = HeaderMap::new();
        assert!(auth.check(&h).is_err());
        h.insert(TOKEN_HEADER, HeaderValue::from_static("0123456789abcdeX"));
        assert!(auth.check(&h).is_err());
        h.insert(TOKEN_HEADER, HeaderValue::from_static("0123456789abcdef"));
        assert!(auth.check(&h).is_ok());
        assert!(WriteAuth::new(false, None).unwrap().check(&h).is_err());
        assert!(WriteAuth::new(true, Some("short".into())).is_err());
        assert_eq!(
            WriteAuth::new(true, None).unwrap().token().unwrap().len(),
            32
        );
    }
}
