//! The examples, compiled into this binary as modules and driven through their own functions.

#[path = "../../examples/worker.rs"]
#[allow(dead_code)]
mod worker;

use crate::common::{database_url, unique};

/// `PGTIDE_BACKEND=postgres://…` is the database the worker example uses (it used to fall back
/// to `DATABASE_URL`), and `migrate()` installs the new namespace on the trait path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_example_honours_a_postgres_backend_url() {
    let url = database_url().await;
    // A URL that is not DATABASE_URL's spelling of the same server.
    let given = format!("{url}?application_name=pgtide_worker_example");
    assert_eq!(
        worker::backend_url(Some(given.clone())).await.unwrap(),
        given
    );
    let ns = unique("ex");
    let result = worker::run(&given, &ns).await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let _ = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{ns}\" CASCADE"))
        .await;
    let stats = result.unwrap();
    assert_eq!((stats.ready, stats.in_flight, stats.dead), (0, 0, 10));
}
