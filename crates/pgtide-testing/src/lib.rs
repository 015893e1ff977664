//! Development helpers for pgtide's examples, tests and benches: find a PostgreSQL to talk to,
//! or start a throwaway one. Not part of the library: it runs `initdb`, `pg_ctl` and `chown`.
//!
//! [`database_url`] returns, in order: `DATABASE_URL`; the server listening on 127.0.0.1:5432;
//! or a throwaway cluster it starts under `target/pgtide-postgres` (as root, under the system
//! temp directory instead, since the `postgres` user that must own the cluster usually cannot
//! enter root's home) from the PostgreSQL server binaries on `PATH` or in
//! `/usr/lib/postgresql/*/bin`: port 54329, TCP only, trust auth, fsync off. Concurrent processes
//! (one per test under nextest) agree through a lock file: one starts it, the others wait. The
//! cluster keeps running after the process exits and is reused by the next run; stop it with
//! `pg_ctl -D target/pgtide-postgres stop`.
//!
//! Tests that need a server of their own (crashes, TLS, passwords) start a [`Cluster`], with
//! certificates from a [`Pki`]; brokers (NATS, Redis) and PgBouncer of their own are a
//! [`Server`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod cluster;
mod pki;
mod servers;
mod tls;

pub use cluster::{Cluster, ClusterBuilder};
pub use pki::{Pki, ServerCert};
pub use servers::Server;
pub use tls::TlsCluster;

use tokio::sync::OnceCell;

/// Port of the throwaway cluster.
pub const THROWAWAY_PORT: u16 = 54329;

static URL: OnceCell<String> = OnceCell::const_new();

/// Why no database could be found or started; the message says what was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A database URL for examples and tests (see the module docs).
pub async fn database_url() -> Result<String> {
    URL.get_or_try_init(find_or_start).await.cloned()
}

async fn find_or_start() -> Result<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.is_empty() {
            return Ok(url);
        }
    }
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect("127.0.0.1:5432"),
    )
    .await;
    if matches!(probe, Ok(Ok(_))) {
        return Ok("postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    }
    tokio::task::spawn_blocking(start_throwaway)
        .await
        .map_err(|e| Error(format!("throwaway postgres: {e}")))?
}

fn fail(msg: impl Into<String>) -> Error {
    Error(format!(
        "no DATABASE_URL, nothing on 127.0.0.1:5432, and a throwaway cluster could not start: {}",
        msg.into()
    ))
}

fn server_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

/// A free loopback TCP port (free when asked; a server of the test's own takes it next).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A path under the system temp directory that no other server, PKI or process uses.
fn unique_temp_dir(kind: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "pgtide-{kind}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a server binary, as the `postgres` OS user when we are root (initdb refuses root).
fn run(bin: &Path, args: &[&str], as_postgres: bool) -> Result<()> {
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| fail(format!("{}: {e}", bin.display())))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn start_throwaway() -> Result<String> {
    let url = format!("postgres://postgres@127.0.0.1:{THROWAWAY_PORT}/postgres");
    if port_open() {
        return Ok(url);
    }
    let bin = server_bin_dir()
        .ok_or_else(|| fail("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin"))?;
    let root = is_root();
    let dir = cluster_dir(root)?;
    // Several test processes may start at once: one starts the cluster, the others wait for it.
    let lock = dir.with_extension("lock");
    let _guard = match LockFile::acquire(&lock)? {
        Some(guard) => guard,
        None => {
            return if wait_for_port(Duration::from_secs(60)) {
                Ok(url)
            } else {
                Err(fail(format!(
                    "another process holds {} but the server never came up",
                    lock.display()
                )))
            };
        }
    };
    if port_open() {
        return Ok(url);
    }
    let data = dir.to_string_lossy().to_string();
    if !dir.join("PG_VERSION").is_file() {
        std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{data}: {e}")))?;
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres", &data])
                .status();
            if !matches!(ok, Ok(s) if s.success()) {
                return Err(fail(format!("chown {data} to postgres failed")));
            }
        }
        run(
            &bin.join("initdb"),
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            root,
        )?;
    }
    // TCP only: a Unix socket path inside a deep directory can exceed the kernel's limit.
    let opts = format!(
        "-p {THROWAWAY_PORT} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off -c max_connections=200"
    );
    let log = format!("{data}/server.log");
    if let Err(e) = run(
        &bin.join("pg_ctl"),
        &["-D", &data, "-o", &opts, "-l", &log, "-w", "start"],
        root,
    ) {
        let tail = std::fs::read_to_string(&log)
            .map(|t| {
                t.lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .unwrap_or_default();
        return Err(fail(format!("{e}; server log {log}: {tail}")));
    }
    Ok(url)
}

fn port_open() -> bool {
    std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], THROWAWAY_PORT).into(),
        Duration::from_millis(500),
    )
    .is_ok()
}

fn wait_for_port(limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if port_open() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// `target/pgtide-postgres`, or under the system temp dir when running as root (the `postgres`
/// user that runs the server usually cannot enter root's home).
fn cluster_dir(root: bool) -> Result<PathBuf> {
    if root {
        return Ok(std::env::temp_dir().join("pgtide-postgres"));
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
    std::path::absolute(Path::new(&target).join("pgtide-postgres")).map_err(|e| fail(e.to_string()))
}

/// An exclusive lock file, removed on drop. A lock older than two minutes is stale.
struct LockFile(PathBuf);

impl LockFile {
    fn acquire(path: &Path) -> Result<Option<LockFile>> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| fail(format!("{}: {e}", parent.display())))?;
        }
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => return Ok(Some(LockFile(path.to_owned()))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(120))
                        .unwrap_or(false);
                    if !stale {
                        return Ok(None);
                    }
                    let _ = std::fs::remove_file(path);
                }
                Err(e) => return Err(fail(format!("{}: {e}", path.display()))),
            }
        }
        Ok(None)
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
