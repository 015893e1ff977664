//! Development helpers for examples and tests: find a PostgreSQL to talk to, or start a
//! throwaway one.
//!
//! [`database_url`] returns, in order: `DATABASE_URL`; the server listening on 127.0.0.1:5432;
//! or a throwaway cluster it starts under `target/pgtide-postgres` (port 54329, trust auth, fsync
//! off) from the PostgreSQL server binaries on `PATH` or in `/usr/lib/postgresql/*/bin`. The
//! throwaway cluster keeps running after the process exits and is reused by the next run; stop it
//! with `pg_ctl -D target/pgtide-postgres stop`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::{Error, Result};

/// Port of the throwaway cluster.
pub const THROWAWAY_PORT: u16 = 54329;

static URL: OnceCell<String> = OnceCell::const_new();

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
        .map_err(|e| Error::InvalidConfig(format!("throwaway postgres: {e}")))?
}

fn fail(msg: impl Into<String>) -> Error {
    Error::InvalidConfig(format!(
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
    if std::net::TcpStream::connect(("127.0.0.1", THROWAWAY_PORT)).is_ok() {
        return Ok(url);
    }
    let bin = server_bin_dir()
        .ok_or_else(|| fail("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin"))?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
    let dir = std::path::absolute(Path::new(&target).join("pgtide-postgres"))
        .map_err(|e| fail(e.to_string()))?;
    let root = is_root();
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
    let opts = format!("-p {THROWAWAY_PORT} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200");
    run(
        &bin.join("pg_ctl"),
        &[
            "-D",
            &data,
            "-o",
            &opts,
            "-l",
            &format!("{data}/server.log"),
            "-w",
            "start",
        ],
        root,
    )?;
    Ok(url)
}
