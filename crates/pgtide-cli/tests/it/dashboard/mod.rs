//! `pgtide dashboard`: the JSON API and its guards over HTTP as a read-only role (here), the page
//! in a real browser with writes and a token (`browser.rs`), a broker through `--backend` and a
//! restart (`backends.rs`).

mod backends;
mod browser;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;

use super::{bare_command, command, pgtide, terminate, url_as};
use crate::common::{json as message, namespace, unique, TestNs, WAIT};
use crate::operations::RoleGuard;

/// A running dashboard and where it listens.
struct Dashboard {
    child: Child,
    addr: String,
}

impl Dashboard {
    /// Starts `pgtide dashboard --listen 127.0.0.1:0 --interval 1s ARGS…` and reads the address
    /// it prints first.
    async fn start(ns: &TestNs, database_url: &str, args: &[&str]) -> Dashboard {
        let mut c = command(ns, &[]);
        c.env("DATABASE_URL", database_url);
        Dashboard::spawn(c, args).await
    }

    /// Starts `pgtide dashboard` on a broker: `--backend url` in namespace `ns`.
    async fn start_on(url: &str, ns: &str, args: &[&str]) -> Dashboard {
        let mut c = bare_command(ns);
        c.arg("--backend").arg(url);
        Dashboard::spawn(c, args).await
    }

    async fn spawn(mut c: tokio::process::Command, args: &[&str]) -> Dashboard {
        c.args(["dashboard", "--listen", "127.0.0.1:0", "--interval", "1s"])
            .args(args)
            .env_remove("PGTIDE_DASHBOARD_TOKEN")
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("pgtide binary");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the dashboard prints its address")
            .unwrap()
            .expect("the dashboard exited before serving");
        let addr = first
            .strip_prefix("http://")
            .and_then(|a| a.strip_suffix('/'))
            .unwrap_or_else(|| panic!("not an address: {first:?}"))
            .to_owned();
        // Keep reading stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Dashboard { child, addr }
    }

    /// One HTTP/1.1 request; (status, body).
    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        raw_request(&self.addr, method, path, &self.addr, headers, body).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.request("GET", path, &[], "").await;
        let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body:?}"));
        (status, v)
    }

    /// Waits until `GET path` answers 200 with a body for which `check` holds.
    async fn wait_for(&self, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let found = tokio::time::timeout(WAIT * 3, async {
            loop {
                let (status, v) = self.get(path).await;
                if status == 200 && check(&v) {
                    return v;
                }
                last = v;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{what}: last {path} was {last}"))
    }

    async fn stop(mut self) {
        terminate(self.child.id().unwrap()).await;
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
}

async fn raw_request(
    addr: &str,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = vec![];
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Bodies are small and sent whole; a chunked one is unwrapped here.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The data of the first `count` `sample` events of `/api/events`.
async fn sse_events(addr: &str, count: usize) -> Vec<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req =
        format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    let mut events = vec![];
    tokio::time::timeout(WAIT, async {
        while events.len() < count {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the stream stays open");
            // Chunked framing puts sizes on their own lines; only `data:` lines matter here.
            if let Some(data) = line.strip_prefix("data: ") {
                events.push(data.to_owned());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} events: got {events:?}"));
    events
}

/// A stream `orders` with groups `billing` and `audit`, `published` messages, and one dead letter
/// (terminated) in `billing`, whose id is returned.
async fn traffic(ns: &TestNs, published: usize) -> String {
    ns.create_stream("orders", &Default::default())
        .await
        .unwrap();
    ns.create_group("orders", "billing", Default::default())
        .await
        .unwrap();
    ns.create_group("orders", "audit", Default::default())
        .await
        .unwrap();
    for n in 0..published {
        let m = message(json!({"order": n})).header("kind", "order");
        ns.publish("orders", m).await.unwrap();
    }
    let consumer = ns.consumer("orders", "billing", "t").await.unwrap();
    let d = consumer
        .fetch(1, WAIT)
        .await
        .unwrap()
        .pop()
        .expect("a delivery");
    consumer.term(&d, "bad order").await.unwrap();
    d.id.to_string()
}

fn group<'a>(overview: &'a Value, stream: &str, group: &str) -> Option<&'a Value> {
    overview["groups"]
        .as_array()?
        .iter()
        .find(|g| g["stream"] == stream && g["group"] == group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_read_only_role_sees_counts_and_dead_letters_and_cannot_write() {
    let ns = namespace().await;
    let dead_id = traffic(&ns, 3).await;
    let role = unique("dash");
    let _role = RoleGuard {
        url: ns.url.clone(),
        role: role.clone(),
    };
    ns.raw()
        .await
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
        .await
        .unwrap();
    pgtide(&ns, &["grant", &role, "--read-only"]).await.ok();
    let dash = Dashboard::start(&ns, &url_as(&ns.url, &role), &[]).await;

    let overview = dash
        .wait_for("/api/overview", "counts of orders/billing", |o| {
            group(o, "orders", "billing").is_some_and(|g| g["dead"] == 1 && g["ready"] == 2)
        })
        .await;
    let audit = group(&overview, "orders", "audit").expect("every group is listed");
    assert_eq!(audit["ready"], 3, "{overview}");
    assert_eq!(overview["writes"], false);
    assert_eq!(overview["namespace"], ns.namespace());
    assert!(overview["listener"]["connected"].is_boolean(), "{overview}");
    assert!(overview["scout"].is_object(), "{overview}");

    let (status, list) = dash.get("/api/dead?stream=orders&group=billing").await;
    assert_eq!(status, 200, "{list}");
    let letters = list["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{list}");
    assert_eq!(letters[0]["id"], dead_id.as_str());
    assert_eq!(letters[0]["reason"], "bad order");
    let (status, one) = dash
        .get(&format!("/api/dead/orders/billing/{dead_id}"))
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["payload"], json!({"order": 0}), "{one}");
    assert_eq!(one["headers"]["kind"], "order", "{one}");

    // Live updates: the current sample at once, then one per interval with a chart point.
    let events = sse_events(&dash.addr, 2).await;
    assert!(events[0].contains("\"billing\""), "{events:?}");
    let second: Value = serde_json::from_str(&events[1]).unwrap();
    assert!(second["point"]["lag"].is_object(), "{second}");

    // Writes are off: 403, and nothing moved.
    for (path, token) in [
        ("replay", None),
        ("purge", None),
        ("replay", Some("0123456789abcdef")),
    ] {
        let headers: Vec<(&str, &str)> = token.map(|t| ("x-pgtide-token", t)).into_iter().collect();
        let (status, body) = dash
            .request(
                "POST",
                &format!("/api/dead/orders/billing/{path}"),
                &[&headers[..], &[("content-type", "application/json")]].concat(),
                r#"{"all":true}"#,
            )
            .await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("--allow-writes"), "{body}");
    }
    assert_eq!(ns.stats("orders", "billing").await.unwrap().dead, 1);

    // Hostile input: a JSON 4xx, never a 5xx.
    let long = "a".repeat(10_000);
    for path in [
        "/api/dead?stream=Bad%20Name!",
        "/api/dead?stream=orders&limit=0",
        "/api/dead?stream=orders&limit=99999999999999999999999",
        "/api/dead?stream=orders&limit=-1",
        "/api/dead?stream=orders&group=nope",
        "/api/dead?stream=nope",
        "/api/dead",
        "/api/dead?stream=%FF%FE",
        &format!("/api/dead?stream={long}"),
        "/api/dead/orders/billing/not-a-uuid",
        "/api/dead/orders/billing/00000000-0000-0000-0000-000000000000",
        "/api/dead/orders/%00/00000000-0000-0000-0000-000000000000",
        "/api/dead/%FF/billing/x",
        "/api/dead/orders/billing/x/y/z",
        "/assets/..%2F..%2Fetc%2Fpasswd",
        "/nope",
    ] {
        let (status, body) = dash.request("GET", path, &[], "").await;
        assert!((400..500).contains(&status), "{path}: {status} {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(v["error"].is_string(), "{path}: {body}");
    }
    // A host name that is not loopback (DNS rebinding) is refused on a loopback address.
    let (status, body) =
        raw_request(&dash.addr, "GET", "/api/overview", "evil.example", &[], "").await;
    assert_eq!(status, 403, "{body}");
    // The page and its files are served from the binary.
    let (status, page) = dash.request("GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("/assets/uPlot.iife.min.js"), "{page}");
    let (status, js) = dash
        .request("GET", "/assets/uPlot.iife.min.js", &[], "")
        .await;
    assert_eq!(status, 200);
    assert!(js.contains("uPlot"));
    dash.stop().await;
}
