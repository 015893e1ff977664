//! The examples, run as a user runs them (`cargo test` and `cargo nextest` build them next to
//! the test binary).

use std::path::PathBuf;
use std::time::Duration;

use crate::common::{database_url, unique};

/// The built example `name`: `target/<profile>/examples/<name>`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // The test binary is `target/<profile>/deps/it-<hash>`.
    let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run the tests with cargo test or cargo nextest, which build the examples",
        path.display()
    );
    path
}

/// `PGTIDE_BACKEND=postgres://…` is the database the worker example uses, even when
/// `DATABASE_URL` names another one, and `migrate()` installs the new namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_example_honours_a_postgres_backend_url() {
    let url = database_url().await;
    let ns = unique("ex");
    let mut run = tokio::process::Command::new(example("worker"));
    run.env("PGTIDE_BACKEND", &url)
        .env("PGTIDE_NAMESPACE", &ns)
        // Nothing listens on port 1: the example must not fall back to DATABASE_URL.
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/nowhere")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), run.output())
        .await
        .expect("the worker example did not finish")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let _ = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{ns}\" CASCADE"))
        .await;
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("backend: postgres, namespace {ns:?}")),
        "{stdout}"
    );
    assert!(stdout.contains("dead 10"), "{stdout}");
}
