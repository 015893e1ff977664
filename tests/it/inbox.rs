//! The inbox across a broker: a consumer process commits its effect and the inbox record and is
//! SIGKILLed before the ack (this test binary started again, as the fault tests do), the broker
//! redelivers after the lease, and the effect is applied once.

use std::time::Duration;

use pgtide::{GroupStart, Inbox, OutgoingMessage, Queue, QueueConsumer, StreamConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_after_commit_applies_the_effect_once() {
    let ns = crate::common::namespace().await;
    let mut pg = ns.raw().await;
    // The application's schema, unique per run so parallel runs do not meet.
    let schema = crate::common::unique("inbox_app").replace('-', "_");
    let inbox = Inbox::new(&schema, "billing").unwrap();
    inbox.install(&pg).await.unwrap();
    inbox.install(&pg).await.unwrap(); // idempotent
    pg.batch_execute(&format!(
        "CREATE TABLE \"{schema}\".balance (total bigint NOT NULL);
         INSERT INTO \"{schema}\".balance VALUES (0);"
    ))
    .await
    .unwrap();
    let inbox_sql = |sql: &str| sql.replace("inbox_app", &schema);

    let (q, cleanup) = crate::conformance::redis::fresh().await;
    let config = StreamConfig::default().lease(Duration::from_secs(1));
    q.ensure_stream("payments", &config).await.unwrap();
    q.ensure_group("payments", "billing", GroupStart::New)
        .await
        .unwrap();
    q.publish(
        "payments",
        OutgoingMessage::event("payment.made", &5u64).unwrap(),
    )
    .await
    .unwrap();

    // First consumer, a process of its own: commits, then is killed before the ack.
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "inbox::consumer_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("PGTIDE_INBOX_DATABASE_URL", &ns.url)
        .env("PGTIDE_INBOX_REDIS_NAMESPACE", &cleanup.0)
        .env("PGTIDE_INBOX_SCHEMA", &schema)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let committed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some((_, id)) = line.split_once("COMMITTED ") {
                return Some(id.trim().to_owned());
            }
        }
        None
    })
    .await
    .expect("the consumer process commits within 30 s")
    .expect("the consumer process exited before committing");
    child.kill().await.unwrap(); // SIGKILL: the ack never happens
    let (recorded, total_after_kill) = (
        pg.query_one(
            &inbox_sql("SELECT count(*) FROM inbox_app.pgtide_inbox"),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0),
        pg.query_one(&inbox_sql("SELECT total FROM inbox_app.balance"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
    );
    assert_eq!(
        (recorded, total_after_kill),
        (1, 5),
        "the killed process committed"
    );

    // The lease lapses; the broker redelivers to another consumer.
    let c2 = q.consumer("payments", "billing", "c2").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let d = loop {
        let got = c2.fetch(1, Duration::from_secs(1)).await.unwrap();
        if let Some(d) = got.into_iter().next() {
            break d;
        }
        assert!(std::time::Instant::now() < deadline, "no redelivery");
    };
    assert_eq!(d.attempt, 2, "a redelivery");
    assert_eq!(
        d.id.to_string(),
        committed,
        "of the message the killed process committed"
    );
    assert!(!handle_with(&mut pg, &inbox, &d, &inbox_sql).await);
    c2.ack(&d).await.unwrap();

    let total: i64 = pg
        .query_one(&inbox_sql("SELECT total FROM inbox_app.balance"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 5, "the effect was applied once");

    // Retention by age: a young id stays, everything goes with max_age 0.
    assert_eq!(
        inbox.prune(&pg, Duration::from_secs(3600)).await.unwrap(),
        0
    );
    assert_eq!(inbox.prune(&pg, Duration::ZERO).await.unwrap(), 1);
    pg.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

async fn handle_with(
    pg: &mut tokio_postgres::Client,
    inbox: &Inbox,
    d: &pgtide::Delivery,
    sql: &impl Fn(&str) -> String,
) -> bool {
    let event = d.event::<u64>().unwrap();
    let tx = pg.transaction().await.unwrap();
    let new = inbox.record(&tx, &event.envelope.event_id).await.unwrap();
    if new {
        tx.execute(
            &sql("UPDATE inbox_app.balance SET total = total + $1"),
            &[&(event.data as i64)],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    new
}

/// Entry point of the consumer process of the test above (does nothing when run as an ordinary
/// test): fetches the payment, commits its effect and the inbox record, prints `COMMITTED <id>`
/// and waits to be killed, never acking.
#[test]
#[ignore = "started by the inbox test as a child process"]
fn consumer_child() {
    let (Ok(url), Ok(redis_ns), Ok(schema)) = (
        std::env::var("PGTIDE_INBOX_DATABASE_URL"),
        std::env::var("PGTIDE_INBOX_REDIS_NAMESPACE"),
        std::env::var("PGTIDE_INBOX_SCHEMA"),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut pg = crate::common::raw_client(&url).await;
        let inbox = Inbox::new(&schema, "billing").unwrap();
        let q = pgtide::RedisBackend::connect(&crate::conformance::redis::url(), &redis_ns)
            .await
            .unwrap();
        let c1 = q.consumer("payments", "billing", "c1").await.unwrap();
        let d = c1.fetch(1, Duration::from_secs(10)).await.unwrap();
        assert_eq!(d.len(), 1);
        let sql = |sql: &str| sql.replace("inbox_app", &schema);
        assert!(
            handle_with(&mut pg, &inbox, &d[0], &sql).await,
            "the first delivery is new"
        );
        println!("COMMITTED {}", d[0].id);
        std::future::pending::<()>().await;
    });
}
