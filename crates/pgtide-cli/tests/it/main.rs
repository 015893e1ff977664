//! End-to-end tests of the `pgtide` binary, driven as a user would: its own namespace per test
//! (dropped at the end), arguments and environment in, stdout/stderr/exit code out. One test
//! binary, in this package because `CARGO_BIN_EXE_pgtide` exists only here.

mod backends;
#[cfg(feature = "dashboard")]
mod browser;
#[cfg(feature = "dashboard")]
mod dashboard;
// The library's own test fixtures (a fresh namespace per test), shared rather than copied; the
// CLI tests use only part of them.
#[allow(dead_code)]
#[path = "../../../../tests/it/common.rs"]
mod common;
mod exit;
mod fair;
mod flow;
mod hostile;
mod limits;
#[cfg(feature = "metrics")]
mod metrics;
mod operations;
mod ordering;
mod pooler;
mod rate;
mod tls;
mod usability;

use std::process::Stdio;
use std::time::Duration;

use pgtide::PgBackend;
use tokio::io::AsyncWriteExt;

use crate::common::{database_url, unique, TestNs};

/// Longest a single CLI run may take in these tests.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A namespace the tests install through the CLI (not migrated yet); dropped on drop.
async fn fresh_namespace() -> TestNs {
    let url = database_url().await;
    let pg = PgBackend::builder(url.clone())
        .namespace(unique("t"))
        .pool_size(4)
        .build()
        .unwrap();
    TestNs { pg, url }
}

/// What one run of the binary produced.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "pgtide failed: {self:?}");
        self
    }

    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// `pgtide` in namespace `ns` with none of its settings inherited from the test's environment
/// (no database either): the caller adds the arguments and what it configures.
fn bare_command(ns: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgtide"));
    c.env("PGTIDE_NAMESPACE", ns)
        .env_remove("DATABASE_URL")
        .env_remove("PGTIDE_BACKEND")
        .env_remove("PGTIDE_LISTEN_URL")
        .env_remove("PGTIDE_METRICS_LISTEN")
        .env_remove("PGTIDE_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// `pgtide` with the namespace's database and namespace in the environment.
fn command(ns: &TestNs, args: &[&str]) -> tokio::process::Command {
    let mut c = bare_command(ns.namespace());
    c.args(args).env("DATABASE_URL", &ns.url);
    c
}

/// Runs `pgtide args...`, feeding `stdin` if given, and collects the result.
async fn run_with(mut c: tokio::process::Command, stdin: Option<Vec<u8>>) -> Run {
    if stdin.is_some() {
        c.stdin(Stdio::piped());
    }
    let mut child = c.spawn().expect("pgtide binary");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // Written concurrently with reading the output: the ids printed would fill the pipe.
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
            let _ = pipe.shutdown().await;
        });
    }
    let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .expect("pgtide timed out")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn pgtide(ns: &TestNs, args: &[&str]) -> Run {
    run_with(command(ns, args), None).await
}

async fn pgtide_stdin(ns: &TestNs, args: &[&str], stdin: impl Into<Vec<u8>>) -> Run {
    run_with(command(ns, args), Some(stdin.into())).await
}

/// `(ready, delayed, in_flight, dead)` of a group from `pgtide stats --json`.
async fn depth(ns: &TestNs, stream: &str, group: &str) -> (i64, i64, i64, i64) {
    let stats = pgtide(ns, &["stats", stream, "--json"]).await.ok().json();
    let g = stats["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == group)
        .unwrap_or_else(|| panic!("no group {group} in {stats}"))
        .clone();
    let n = |k: &str| g[k].as_i64().unwrap();
    (n("ready"), n("delayed"), n("in_flight"), n("dead"))
}

/// Sends SIGTERM to a process through the `kill` command.
async fn terminate(pid: u32) {
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

/// The database URL with `user` as the user name (trust authentication in tests).
fn url_as(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}@{host}")
}
