//! Test fixtures: a fresh namespace per test, dropped when the guard goes away.

use std::ops::Deref;
use std::time::Duration;

use pgtide::{GroupStart, PgBackend, StreamConfig};

/// The database for tests: `DATABASE_URL`, else the local server or a throwaway cluster.
pub async fn database_url() -> String {
    pgtide_testing::database_url()
        .await
        .expect("no database for tests")
}

/// A migrated namespace of its own; dropped (with everything in it) on drop.
pub struct TestNs {
    pub pg: PgBackend,
    pub url: String,
}

impl Deref for TestNs {
    type Target = PgBackend;
    fn deref(&self) -> &PgBackend {
        &self.pg
    }
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
    )
}

pub async fn namespace() -> TestNs {
    let url = database_url().await;
    let pg = PgBackend::builder(url.clone())
        .namespace(unique("t"))
        .pool_size(12)
        .build()
        .unwrap();
    pg.migrate().await.unwrap();
    TestNs { pg, url }
}

impl TestNs {
    /// A stream with one group per name in `groups`.
    pub async fn stream_with_groups(&self, stream: &str, config: StreamConfig, groups: &[&str]) {
        self.pg.create_stream(stream, &config).await.unwrap();
        for g in groups {
            self.pg
                .create_group(stream, g, GroupStart::New)
                .await
                .unwrap();
        }
    }

    /// A raw tokio-postgres connection for assertions in plain SQL.
    pub async fn raw(&self) -> tokio_postgres::Client {
        raw_client(&self.url).await
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let ns = self.pg.namespace();
        execute_detached(
            &self.url,
            &format!("DROP SCHEMA IF EXISTS \"{ns}\" CASCADE"),
        );
    }
}

pub fn json(v: serde_json::Value) -> pgtide::OutgoingMessage {
    pgtide::OutgoingMessage::json(&v).unwrap()
}

pub const WAIT: Duration = Duration::from_secs(10);

/// Waits until `check` holds, polling shared state every 10 ms; panics after `limit`. For state
/// with no event to wait on (counters, the scout's status); events are awaited directly.
pub async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the watched value satisfies `check`; panics after `limit`. Returns the value.
pub async fn wait_for<T: Clone + std::fmt::Debug>(
    rx: &mut tokio::sync::watch::Receiver<T>,
    limit: Duration,
    what: &str,
    check: impl FnMut(&T) -> bool,
) -> T {
    let seen = tokio::time::timeout(limit, async {
        rx.wait_for(check).await.map(|value| value.clone())
    })
    .await;
    match seen {
        Ok(Ok(value)) => value,
        Ok(Err(_)) => panic!("the handle went away while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}; last seen {:?}", *rx.borrow()),
    }
}

/// A plain tokio-postgres connection to `url` (no TLS), its connection task spawned.
pub async fn raw_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Runs `sql` on `url` from a `Drop` (which cannot await): on a thread and runtime of its own,
/// waiting for it; errors are ignored, as clean-up is best effort.
pub fn execute_detached(url: &str, sql: &str) {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            // A namespace's DROP can lose a deadlock to a background task of a handle still
            // shutting down (the scout's partition maintenance): try again rather than leak it.
            let mut last = None;
            for _ in 0..5 {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((client, conn)) => {
                        tokio::spawn(conn);
                        match client.batch_execute(&sql).await {
                            Ok(()) => return,
                            Err(e) => last = Some(e.to_string()),
                        }
                    }
                    Err(e) => last = Some(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            eprintln!("cleanup failed: {sql}: {}", last.unwrap_or_default());
        });
    })
    .join();
}

/// Runs `sql` and returns its SQLSTATE (panics if it succeeds).
pub async fn sqlstate(raw: &tokio_postgres::Client, sql: &str) -> String {
    match raw.batch_execute(sql).await {
        Ok(()) => panic!("{sql} succeeded"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_else(|| panic!("{sql}: no SQLSTATE: {e}")),
    }
}
