//! A cluster that accepts only TLS with a password: `ssl = on` with a certificate for
//! `localhost` and `127.0.0.1` signed by a test CA, `hostssl … scram-sha-256` as the only TCP
//! line of `pg_hba.conf`, and a role `app` with a password owning a database `app`.

use std::path::PathBuf;

use crate::{Cluster, Pki};

/// A TLS-only, password-only cluster (see the module docs).
pub struct TlsCluster {
    /// The server (superuser `postgres` through the Unix socket only).
    pub cluster: Cluster,
    /// The certificates.
    pub pki: Pki,
    /// The password of the role `app` (unique per cluster, so tests can look for leaks).
    pub password: String,
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
    /// A CA that did not.
    pub other_ca: PathBuf,
}

impl TlsCluster {
    /// Starts it. Panics on failure: it is test set-up.
    pub fn start() -> TlsCluster {
        let pki = Pki::new();
        let files = pki.localhost();
        let other_ca = pki.ca("other-ca");
        let read = |p: &std::path::Path| std::fs::read(p).unwrap();
        let (ca, cert, key) = (files.ca.clone(), read(&files.cert), read(&files.key));
        let cluster = Cluster::builder()
            .setting("ssl = on")
            .setting("ssl_cert_file = 'server.crt'")
            .setting("ssl_key_file = 'server.key'")
            .setting("password_encryption = 'scram-sha-256'")
            .file("server.crt", cert)
            .file("server.key", key)
            .hba([
                "local all postgres trust",
                "hostssl all all 127.0.0.1/32 scram-sha-256",
            ])
            .start();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let password = format!("Pw{nanos:x}q");
        cluster.psql(&format!("CREATE ROLE app LOGIN PASSWORD '{password}'"));
        cluster.psql("CREATE DATABASE app OWNER app");
        TlsCluster {
            cluster,
            pki,
            password,
            ca,
            other_ca,
        }
    }

    /// `postgres://app:<password>@<host>:<port>/app?<params>`.
    pub fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://app:{}@{host}:{}/app?{params}",
            self.password, self.cluster.port
        )
    }

    /// `postgres://app@<host>:<port>/app?<params>`: the password must come from elsewhere.
    pub fn url_without_password(&self, host: &str, params: &str) -> String {
        format!("postgres://app@{host}:{}/app?{params}", self.cluster.port)
    }
}
