//! The SQS client a URL names: endpoint, region and credentials.

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::Client;

use super::SqsOptions;
use crate::error::{Error, Result};

/// The endpoint, region and credentials a URL names.
struct Endpoint {
    url: String,
    region: Option<String>,
    credentials: Option<(String, String)>,
    /// `tls_ca=PATH`: a PEM file of the CA to trust instead of the system roots.
    tls_ca: Option<std::path::PathBuf>,
}

/// Reads `sqs://[KEY:SECRET@]HOST[:PORT][?region=R]` (plain HTTP, for local servers) or
/// `sqss://…[&tls_ca=PATH]` (HTTPS, e.g. `sqss://sqs.eu-west-1.amazonaws.com?region=eu-west-1`).
fn parse_url(text: &str) -> Result<Endpoint> {
    // Errors never repeat the URL: it may hold a secret key.
    let url = url::Url::parse(text)
        .map_err(|e| Error::InvalidConfig(format!("SQS URL is not a valid URL: {e}")))?;
    let scheme = match url.scheme() {
        "sqs" => "http",
        "sqss" => "https",
        _ => {
            return Err(Error::InvalidConfig(
                "SQS URL: use sqs://host:port (HTTP) or sqss://host (HTTPS)".into(),
            ))
        }
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Error::InvalidConfig("SQS URL has no host: use sqs://host:port".into()))?;
    let endpoint = match url.port() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    };
    let mut region = None;
    let mut tls_ca = None;
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "region" if !value.is_empty() => region = Some(value.into_owned()),
            "tls_ca" if !value.is_empty() && scheme == "https" => {
                tls_ca = Some(std::path::PathBuf::from(value.as_ref()))
            }
            "tls_ca" => {
                return Err(Error::InvalidConfig(
                    "SQS URL: tls_ca needs sqss:// (HTTPS) and the path of a PEM file".into(),
                ))
            }
            other => {
                return Err(Error::InvalidConfig(format!(
                    "SQS URL: unknown parameter {other:?} (region=… and tls_ca=… are read)"
                )))
            }
        }
    }
    let decode = |s: &str| {
        percent_decode(s).ok_or_else(|| {
            Error::InvalidConfig("SQS URL: credentials are not valid percent-encoded UTF-8".into())
        })
    };
    let credentials = match (url.username(), url.password()) {
        ("", None) => None,
        (key, Some(secret)) if !key.is_empty() => Some((decode(key)?, decode(secret)?)),
        _ => {
            return Err(Error::InvalidConfig(
                "SQS URL: give both the access key id and the secret (sqs://KEY:SECRET@host) or neither".into(),
            ))
        }
    };
    Ok(Endpoint {
        url: endpoint,
        region,
        credentials,
        tls_ca,
    })
}

/// Percent-decodes a URL's user or password.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Reads a PEM CA file, checking that it holds a certificate so that a wrong path fails here
/// and not as a puzzling handshake error.
fn read_ca(path: &std::path::Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).map_err(|e| {
        Error::InvalidConfig(format!(
            "SQS: cannot read the TLS CA file {}: {e}",
            path.display()
        ))
    })?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(Error::InvalidConfig(format!(
            "SQS: the TLS CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(pem)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A client for `url` (see [`super::SqsBackend::connect_with`]); sends nothing.
pub(super) fn client(url: &str, options: &SqsOptions) -> Result<Client> {
    let endpoint = parse_url(url)?;
    let region = options
        .region
        .clone()
        .or(endpoint.region)
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .ok_or_else(|| {
            Error::InvalidConfig(
                "SQS needs a region: add ?region=… to the URL or set AWS_REGION".into(),
            )
        })?;
    let credentials = match options.credentials.clone().or(endpoint.credentials) {
        Some((key, secret)) => Credentials::new(key, secret, None, None, "pgtide"),
        None => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(key), Some(secret)) => {
                Credentials::new(key, secret, env("AWS_SESSION_TOKEN"), None, "environment")
            }
            _ => {
                return Err(Error::InvalidConfig(
                    "SQS needs credentials: sqs://KEY:SECRET@host, SqsOptions::credentials, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
                ))
            }
        },
    };
    // rustls on ring, like every other backend (the SDK's default client builds aws-lc-rs).
    use aws_smithy_http_client::tls;
    let mut http = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(
        tls::rustls_provider::CryptoMode::Ring,
    ));
    if let Some(path) = &endpoint.tls_ca {
        let pem = read_ca(path)?;
        let trust = tls::TrustStore::empty()
            .with_native_roots(false)
            .with_pem_certificate(pem);
        let context = tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|e| {
                Error::InvalidConfig(format!("SQS: the TLS CA file {}: {e}", path.display()))
            })?;
        http = http.tls_context(context);
    }
    let http = http.build_https();
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region))
        .endpoint_url(endpoint.url)
        .credentials_provider(credentials)
        .http_client(http)
        .build();
    Ok(Client::from_conf(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = parse_url("sqs://k%2Fx:s%40y@127.0.0.1:5000?region=us-east-1").unwrap();
        assert_eq!(e.url, "http://127.0.0.1:5000");
        assert_eq!(e.region.as_deref(), Some("us-east-1"));
        assert_eq!(e.credentials, Some(("k/x".into(), "s@y".into())));
        let e = parse_url("sqss://sqs.eu-west-1.amazonaws.com").unwrap();
        assert_eq!(e.url, "https://sqs.eu-west-1.amazonaws.com");
        assert!(e.region.is_none() && e.credentials.is_none() && e.tls_ca.is_none());
        let e = parse_url("sqss://h:4566?tls_ca=/etc/ca.pem&region=r").unwrap();
        assert_eq!(
            e.tls_ca.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        let missing = client(
            "sqss://h?tls_ca=/nonexistent.pem&region=r",
            &SqsOptions::default().credentials("k", "s"),
        );
        assert!(matches!(missing, Err(Error::InvalidConfig(_))));
        for bad in [
            "sqs://",
            "http://h",
            "sqs://h?foo=1",
            "sqs://key@h",
            "sqs://:S3CR3T@h",
            "sqs://k:S3CR3T%ff@h",
            "sqs://k:S3CR3T@h?x=S3CR3T",
            "sqs://h?tls_ca=/etc/ca.pem",
        ] {
            let err = parse_url(bad).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|m| !m.contains("S3CR3T")),
                "{bad}: {err:?}"
            );
        }
    }
}
