//! The dashboard on a broker (`--backend redis://…`, the groups named with `--group`, read-only),
//! and what a restart keeps (the counts, read from the backend) and loses (the chart history).

use serde_json::{json, Value};

use super::{group, sse_events, traffic, Dashboard};
use crate::common::{namespace, WAIT};

/// Seconds since the Unix epoch, as the chart points' `t`.
fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

/// A restarted dashboard starts with empty charts (every point it serves was sampled after the
/// restart) and the same counts, which come from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_restart_keeps_the_counts_and_loses_the_chart_history() {
    let ns = namespace().await;
    traffic(&ns, 4).await;
    let counts = |o: &Value| {
        group(o, "orders", "billing").is_some_and(|g| g["ready"] == 3 && g["dead"] == 1)
            && group(o, "orders", "audit").is_some_and(|g| g["ready"] == 4)
    };
    let dash = Dashboard::start(&ns, &ns.url, &[]).await;
    dash.wait_for("/api/overview", "the counts", counts).await;
    dash.wait_for("/api/history", "two chart points", |h| {
        h["points"].as_array().is_some_and(|p| p.len() >= 2)
    })
    .await;
    dash.stop().await;

    let restarted_at = unix_now();
    let dash = Dashboard::start(&ns, &ns.url, &[]).await;
    dash.wait_for("/api/overview", "the same counts after the restart", counts)
        .await;
    let (status, history) = dash.get("/api/history").await;
    assert_eq!(status, 200);
    let points = history["points"].as_array().unwrap();
    assert!(
        points
            .iter()
            .all(|p| p["t"].as_f64().unwrap() >= restarted_at),
        "only points sampled since the restart (at {restarted_at}): {history}"
    );
    dash.stop().await;
}

/// `--backend redis://… --group S/G`: the counts, the lag chart and the dead letters of the
/// groups named, through the `Queue` trait; no rates, scout or listener (the page says why) and
/// no writes. Without `--group`, with `--allow-writes` or a bad `--group`, it refuses to start.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_on_redis_shows_the_groups_named_read_only() {
    use pgtide::{GroupStart, OutgoingMessage, Queue, QueueConsumer, StreamConfig};

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let ns = crate::common::unique("t");
    let q = pgtide::AnyBackend::connect(&url, &ns).await.unwrap();
    let _cleanup = DeleteStream {
        url: url.clone(),
        ns: ns.clone(),
        stream: "orders",
    };
    q.ensure_stream("orders", &StreamConfig::default())
        .await
        .unwrap();
    for g in ["billing", "audit"] {
        q.ensure_group("orders", g, GroupStart::New).await.unwrap();
    }
    for n in 0..3 {
        let m = OutgoingMessage::json(&json!({"order": n}))
            .unwrap()
            .header("kind", "order");
        q.publish("orders", m).await.unwrap();
    }
    let c = q.consumer("orders", "billing", "t").await.unwrap();
    let d = c.fetch(1, WAIT).await.unwrap().pop().expect("a delivery");
    c.term(&d, "bad order").await.unwrap();
    let dead_id = d.id.to_string();

    // Refused before serving, exit 2.
    let refused: [(&[&str], &str); 4] = [
        (&[], "--group STREAM/GROUP"),
        (
            &["--group", "orders/billing", "--allow-writes"],
            "not supported by the redis backend",
        ),
        (&["--group", "orders"], "is not STREAM/GROUP"),
        (&["--group", "orders/Bad Name!"], "group name"),
    ];
    for (args, says) in refused {
        let mut c = crate::bare_command(&ns);
        c.args(["--backend", &url, "dashboard", "--listen", "127.0.0.1:0"])
            .args(args);
        let r = crate::run_with(c, None).await;
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains(says), "{args:?}: {r:?}");
        assert!(r.stdout.is_empty(), "nothing served: {r:?}");
    }

    let dash = Dashboard::start_on(
        &url,
        &ns,
        &["--group", "orders/billing", "--group", "orders/audit"],
    )
    .await;
    let overview = dash
        .wait_for("/api/overview", "the counts of both groups", |o| {
            group(o, "orders", "billing").is_some_and(|g| g["ready"] == 2 && g["dead"] == 1)
                && group(o, "orders", "audit").is_some_and(|g| g["ready"] == 3)
        })
        .await;
    assert_eq!(overview["backend"], "redis", "{overview}");
    assert_eq!(overview["namespace"], ns.as_str(), "{overview}");
    assert_eq!(overview["rates"], false, "{overview}");
    assert_eq!(overview["writes"], false, "{overview}");
    for card in ["scout", "listener"] {
        assert!(
            overview[card]["unavailable"]
                .as_str()
                .is_some_and(|s| s.contains("redis backend")),
            "{overview}"
        );
    }
    let audit = group(&overview, "orders", "audit").unwrap();
    assert!(
        audit["oldest_ready_age_secs"].as_f64().is_some(),
        "{overview}"
    );

    // The lag chart has points; the rate charts have no series.
    let history = dash
        .wait_for("/api/history", "a chart point", |h| {
            h["points"].as_array().is_some_and(|p| !p.is_empty())
        })
        .await;
    let p = &history["points"][0];
    assert!(p["lag"]["orders/billing"].is_number(), "{history}");
    assert!(p["lag"]["orders/audit"].is_number(), "{history}");
    assert_eq!(p["publish"], json!({}), "{history}");
    let events = sse_events(&dash.addr, 1).await;
    assert!(events[0].contains("\"redis\""), "{events:?}");

    // Dead letters of a group shown: list (one group or the stream's), inspect.
    for path in [
        "/api/dead?stream=orders&group=billing",
        "/api/dead?stream=orders",
    ] {
        let (status, list) = dash.get(path).await;
        assert_eq!(status, 200, "{path}: {list}");
        let letters = list["dead_letters"].as_array().unwrap();
        assert_eq!(letters.len(), 1, "{path}: {list}");
        assert_eq!(letters[0]["id"], dead_id.as_str());
        assert_eq!(letters[0]["reason"], "bad order");
    }
    let (status, one) = dash
        .get(&format!("/api/dead/orders/billing/{dead_id}"))
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["payload"], json!({"order": 0}), "{one}");
    assert_eq!(one["headers"]["kind"], "order", "{one}");
    // A group not named at start, an id that is not a dead letter: 404.
    for path in [
        "/api/dead?stream=orders&group=shipping".to_owned(),
        "/api/dead?stream=payments".to_owned(),
        "/api/dead/orders/billing/00000000-0000-0000-0000-000000000000".to_owned(),
    ] {
        let (status, body) = dash.get(&path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    // No writes on a broker.
    let (status, body) = dash
        .request(
            "POST",
            "/api/dead/orders/billing/replay",
            &[
                ("content-type", "application/json"),
                ("x-pgtide-token", "0123456789abcdef"),
            ],
            r#"{"all":true}"#,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(q.stats("orders", "billing").await.unwrap().dead, 1);

    // The page says what the backend cannot show, and offers no writes.
    let b = crate::browser::Browser::start(1280, 900).await;
    b.client
        .goto(&format!("http://{}/", dash.addr))
        .await
        .unwrap();
    let billing = r#"tr[data-stream="orders"][data-group="billing"]"#;
    let ready = b
        .until(
            "billing's counts",
            &format!("return document.querySelector('{billing} td.ready')?.textContent ?? null;"),
        )
        .await;
    assert_eq!(ready, "2");
    for (id, says) in [
        ("rates-note", "not available on the redis backend"),
        ("scout", "none on the redis backend"),
        ("listener", "none on the redis backend"),
    ] {
        b.until(
            &format!("#{id} says {says:?}"),
            &format!(
                "const e = document.getElementById('{id}'); \
                 return !e.hidden && e.textContent.includes('{says}');"
            ),
        )
        .await;
    }
    b.until(
        "the lag chart",
        "const c = document.getElementById('chart-lag'); \
         return Number(c.dataset.points) >= 1 && c.dataset.series === 'orders/audit,orders/billing';",
    )
    .await;
    b.click(&format!("{billing} td.dead button")).await;
    let row = format!(r#"#dead-letters tr[data-id="{dead_id}"]"#);
    let reason = b
        .until(
            "the dead letter listed",
            &format!("return document.querySelector('{row} td.reason')?.textContent ?? null;"),
        )
        .await;
    assert_eq!(reason, "bad order");
    let writes = b
        .client
        .execute(
            &format!(
                "return [document.querySelectorAll('{row} button[data-action]').length, \
                 document.getElementById('writes').hidden];"
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(writes, json!([0, true]), "no replay or purge on a broker");
    b.close().await;
    dash.stop().await;
}

/// Deletes the test's stream on the broker when the test ends, also after a failure.
#[cfg(feature = "redis")]
struct DeleteStream {
    url: String,
    ns: String,
    stream: &'static str,
}

#[cfg(feature = "redis")]
impl Drop for DeleteStream {
    fn drop(&mut self) {
        let (url, ns, stream) = (self.url.clone(), self.ns.clone(), self.stream);
        // Drop cannot await, and the test's runtime may be gone: a runtime and a connection of
        // its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    if let Ok(q) = pgtide::AnyBackend::connect(&url, &ns).await {
                        let _ = pgtide::Queue::delete_stream(&q, stream).await;
                    }
                })
                .await;
            });
        })
        .join();
    }
}
