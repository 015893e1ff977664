//! The page in a real browser: headless Chromium through chromedriver (`../browser.rs`), with
//! writes allowed and a token.

use serde_json::json;

use super::{group, traffic, Dashboard};
use crate::browser::Browser;
use crate::common::{json as message, namespace, WAIT};

/// The page in headless Chromium against a namespace with traffic: the streams, the counts, the
/// scout and three drawn charts are in the DOM; a Replay clicked without the token is refused
/// and moves nothing; with the token typed into the page, the click moves the dead letter back
/// (checked in the database and the API), a Purge (confirmed in the browser's dialog) deletes
/// the other one, and the page's counts follow over the live stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_browser_shows_counts_and_charts_and_replays_a_dead_letter() {
    let ns = namespace().await;
    let dead_id = traffic(&ns, 5).await;
    // A second dead letter in billing, for the purge.
    let c = ns.consumer("orders", "billing", "t2").await.unwrap();
    let d = c.fetch(1, WAIT).await.unwrap().pop().expect("a delivery");
    c.term(&d, "stale order").await.unwrap();
    let purge_id = d.id.to_string();
    // A scout in this process, so the page has a holder and term to show.
    ns.start_scout();
    let token = "test-token-0123456789";
    let dash = Dashboard::start(&ns, &ns.url, &["--allow-writes", "--token", token]).await;
    dash.wait_for("/api/overview", "the scout holder", |o| {
        o["scout"]["holder"].is_string() && o["writes"] == true
    })
    .await;

    // The write endpoint refuses a wrong or missing token and bad bodies; nothing moves.
    let replay = "/api/dead/orders/billing/replay";
    let body = json!({ "ids": [dead_id] }).to_string();
    let json_header = ("content-type", "application/json");
    for headers in [
        &[json_header, ("x-pgtide-token", "wrong-token-0123456789")][..],
        &[json_header][..],
    ] {
        let (status, answer) = dash.request("POST", replay, headers, &body).await;
        assert_eq!(status, 403, "{answer}");
    }
    for bad in [
        r#"{"ids":["nope"]}"#,
        r#"{"ids":[]}"#,
        r#"{"all":true,"ids":["x"]}"#,
        r#"{"bogus":1}"#,
        "not json",
        "[]",
    ] {
        let (status, answer) = dash
            .request(
                "POST",
                replay,
                &[json_header, ("x-pgtide-token", token)],
                bad,
            )
            .await;
        assert!((400..500).contains(&status), "{bad}: {status} {answer}");
    }
    assert_eq!(ns.stats("orders", "billing").await.unwrap().dead, 2);

    // More traffic, and two samples at least, so the charts have points and a rate.
    for n in 0..5 {
        ns.publish("orders", message(json!({"more": n})))
            .await
            .unwrap();
    }
    dash.wait_for("/api/history", "two chart points", |h| {
        h["points"].as_array().is_some_and(|p| p.len() >= 2)
    })
    .await;
    dash.wait_for("/api/overview", "the new counts", |o| {
        group(o, "orders", "billing").is_some_and(|g| g["ready"] == 8)
            && group(o, "orders", "audit").is_some_and(|g| g["ready"] == 10)
    })
    .await;

    let b = Browser::start(1280, 1150).await;
    b.client
        .goto(&format!("http://{}/", dash.addr))
        .await
        .unwrap();
    let row = |group: &str| format!(r#"tr[data-stream="orders"][data-group="{group}"]"#);
    // True once the cell shows `n` (the page may first show a sample from before the last
    // publishes).
    let cell_is = |group: &str, class: &str, n: &str| {
        format!(
            "return document.querySelector('{} td.{class}')?.textContent === '{n}';",
            row(group)
        )
    };
    b.until(
        "the live connection",
        "return document.getElementById('status').textContent === 'live';",
    )
    .await;
    // billing: 5 + 5 published, 2 dead; audit: all 10 ready.
    let want = [
        ("billing", "ready", "8"),
        ("billing", "dead", "2"),
        ("audit", "ready", "10"),
    ];
    for (group, class, n) in want {
        b.until(&format!("{group} {class} = {n}"), &cell_is(group, class, n))
            .await;
    }
    let term = b
        .until(
            "the scout's term",
            "return document.getElementById('scout-term')?.textContent ?? null;",
        )
        .await;
    assert!(
        term.as_str().is_some_and(|t| t.parse::<i64>().is_ok()),
        "{term}"
    );
    for chart in ["publish", "ack", "lag"] {
        // Two points at least, and a canvas uPlot drew them on.
        b.until(
            &format!("the {chart} chart"),
            &format!(
                "const c = document.getElementById('chart-{chart}'); \
                 return Number(c.dataset.points) >= 2 && c.querySelector('canvas') !== null;"
            ),
        )
        .await;
    }
    let series = b
        .until(
            "the publish chart's series",
            "return document.getElementById('chart-publish').dataset.series || null;",
        )
        .await;
    assert_eq!(series, "orders", "the publish chart plots the stream");

    // Open billing's dead letters from its count.
    b.click(&format!("{} td.dead button", row("billing"))).await;
    let letter = format!(r#"#dead-letters tr[data-id="{dead_id}"]"#);
    let reason = b
        .until(
            "the dead letter listed",
            &format!("return document.querySelector('{letter} td.reason')?.textContent ?? null;"),
        )
        .await;
    assert_eq!(reason, "bad order");
    if let Ok(path) = std::env::var("PGTIDE_DASHBOARD_SCREENSHOT") {
        let png = b.client.screenshot().await.unwrap();
        assert!(png.len() > 10_000, "a screenshot of the page");
        std::fs::write(&path, png).unwrap();
    }

    // Replay clicked without the token: refused, on the page and in the database.
    let replay_button = format!(r#"{letter} button[data-action="replay"]"#);
    b.click(&replay_button).await;
    let msg = b
        .until(
            "the refusal",
            "const m = document.getElementById('dead-msg').textContent; \
             return m.startsWith('replay failed') ? m : null;",
        )
        .await;
    assert!(msg.as_str().unwrap().contains("token"), "{msg}");
    assert_eq!(ns.stats("orders", "billing").await.unwrap().dead, 2);

    // With the token typed into the page, the click replays it.
    let input = b
        .client
        .find(fantoccini::Locator::Id("token"))
        .await
        .unwrap();
    input.send_keys(token).await.unwrap();
    b.click(&replay_button).await;
    b.until(
        "the replay",
        "return document.getElementById('dead-msg').textContent === 'replayed 1';",
    )
    .await;
    b.until(
        "the dead letter gone from the list",
        &format!("return document.querySelector('{letter}') === null;"),
    )
    .await;
    let stats = ns.stats("orders", "billing").await.unwrap();
    assert_eq!(
        (stats.dead, stats.ready),
        (1, 9),
        "the dead letter is back: {stats:?}"
    );
    let (status, list) = dash.get("/api/dead?stream=orders&group=billing").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["dead_letters"][0]["id"], purge_id.as_str(), "{list}");

    // Purge the other one: the page asks for a confirmation first.
    let other = format!(r#"#dead-letters tr[data-id="{purge_id}"]"#);
    b.click(&format!(r#"{other} button[data-action="purge"]"#))
        .await;
    let asked = b.accept_dialog().await;
    assert!(asked.contains("for good"), "{asked}");
    b.until(
        "the purge",
        "return document.getElementById('dead-msg').textContent === 'purged 1';",
    )
    .await;
    let stats = ns.stats("orders", "billing").await.unwrap();
    assert_eq!((stats.dead, stats.ready), (0, 9), "purged: {stats:?}");
    let (status, list) = dash.get("/api/dead?stream=orders&group=billing").await;
    assert_eq!((status, list["dead_letters"].clone()), (200, json!([])));

    // The page follows without a reload: a later sample shows the new counts.
    for (group, class, n) in [("billing", "ready", "9"), ("billing", "dead", "0")] {
        b.until(&format!("{group} {class} = {n}"), &cell_is(group, class, n))
            .await;
    }
    b.close().await;
    dash.stop().await;
}
