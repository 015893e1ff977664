//! Certificates for TLS tests, made with the `openssl` command line tool: CAs and server
//! certificates signed by them, in a temporary directory removed on drop. Panics on failure: it
//! is test set-up.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of test CAs and certificates (ECDSA P-256, valid for two days).
pub struct Pki {
    dir: PathBuf,
}

/// The files of a server certificate made by [`Pki::localhost`] (PEM, key unencrypted).
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// The CA certificate that signed it: what a client trusts.
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl Pki {
    /// An empty directory under the system temp directory.
    pub fn new() -> Pki {
        let dir = crate::unique_temp_dir("pki");
        std::fs::create_dir_all(&dir).unwrap();
        Pki { dir }
    }

    /// The path of a file of this directory (`ca.crt`).
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Makes a self-signed CA `<name>.crt`/`<name>.key`; returns the certificate's path.
    pub fn ca(&self, name: &str) -> PathBuf {
        let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &format!("/CN=pgtide test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        self.path(&crt)
    }

    /// Makes a server certificate signed by the CA `ca` for the subject alternative names
    /// `sans` (`DNS:localhost,IP:127.0.0.1`); returns its PEM certificate and PEM key.
    pub fn server(&self, ca: &str, name: &str, sans: &str) -> (Vec<u8>, Vec<u8>) {
        let (crt, key, csr, ext) = (
            format!("{name}.crt"),
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
        );
        std::fs::write(
            self.path(&ext),
            format!(
                "subjectAltName={sans}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &ext,
        ]);
        (
            std::fs::read(self.path(&crt)).unwrap(),
            std::fs::read(self.path(&key)).unwrap(),
        )
    }

    /// Makes a CA `ca` and a server certificate `server` it signed for `localhost` and
    /// `127.0.0.1`: what a throwaway server on loopback presents.
    pub fn localhost(&self) -> ServerCert {
        let ca = self.ca("ca");
        self.server("ca", "server", "DNS:localhost,IP:127.0.0.1");
        ServerCert {
            ca,
            cert: self.path("server.crt"),
            key: self.path("server.key"),
        }
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("the openssl command line tool");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
