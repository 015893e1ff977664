//! The supervisor, without a database: a failing task is recorded and restarted, and shutdown
//! leaves nothing running.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::Error;

fn background() -> Background {
    // Nothing here connects: the pool opens connections lazily.
    let connect =
        crate::postgres::connect::ConnectConfig::from_url("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
    let config = connect.pg.clone();
    let manager = deadpool_postgres::Manager::new(config.clone(), connect.tls.clone());
    let pool = Pool::builder(manager)
        .max_size(1)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .unwrap();
    Background::new(Settings {
        pool,
        sql: std::sync::Arc::new(crate::postgres::statements::Statements::render(
            "t",
            crate::postgres::StatementMode::Prepared,
        )),
        namespace: "t".to_owned(),
        listen_config: config,
        tls: connect.tls,
        scout: ScoutConfig {
            ttl: Duration::from_secs(10),
            max_interval: Duration::from_secs(1),
            maintenance_interval: Duration::from_secs(60),
            vacuum: Default::default(),
        },
    })
}

#[tokio::test]
async fn a_task_that_panics_or_fails_is_recorded_and_restarted() {
    let bg = background();
    let runs = Arc::new(AtomicUsize::new(0));
    bg.spawn(Service::Listener, {
        let runs = runs.clone();
        move |_shared, token: CancellationToken| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                match run {
                    0 => panic!("first run breaks"),
                    1 => Err(Error::InvalidConfig("second run fails".to_owned())),
                    _ => {
                        token.cancelled().await;
                        Ok(())
                    }
                }
            }
        }
    });
    let mut status = bg.listener();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        status
            .wait_for(|s| s.restarts >= 2)
            .await
            .map(|s| s.clone())
    })
    .await
    .expect("both failures recorded")
    .unwrap();
    assert!(
        seen.last_error
            .as_deref()
            .is_some_and(|e| e.contains("second run fails")),
        "{seen:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("restarted after the error");

    tokio::time::timeout(Duration::from_secs(5), bg.shutdown())
        .await
        .expect("shutdown returns");
    assert_eq!(bg.running(), 0);
    assert_eq!(runs.load(Ordering::SeqCst), 3, "not restarted once stopped");
    assert_eq!(status.borrow().restarts, 2, "a clean stop is no failure");
}

#[tokio::test]
async fn nothing_starts_once_stopped() {
    let bg = background();
    bg.abort();
    bg.ensure(services::NOTIFIER | services::LISTENER | services::SCOUT);
    assert_eq!(bg.running(), 0);
    bg.shutdown().await;
}
