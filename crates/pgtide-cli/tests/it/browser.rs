//! A real browser for the dashboard test: Debian's headless Chromium driven through
//! chromedriver (WebDriver) with fantoccini. The browser is started per test and ended with it.
//! Waits are on DOM state (a script's answer), polled with a deadline, never fixed sleeps.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long one DOM condition may take to hold (a busy CI machine runs a browser slowly).
pub const DOM_WAIT: Duration = Duration::from_secs(60);

/// A headless Chromium session and the chromedriver that runs it.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session of
    /// `width`×`height`. Fails the test when either is missing: `.ci/run` installs them.
    pub async fn start(width: u32, height: u32) -> Browser {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: apt-get install chromium chromium-driver (.ci/run installs them)"
            );
        }
        let mut driver = tokio::process::Command::new(CHROMEDRIVER)
            .args(["--port=0", "--allowed-ips=127.0.0.1", "--log-level=SEVERE"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        // "ChromeDriver was started successfully on port 43439."
        let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(DOM_WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.split_once("successfully on port ") {
                    return rest.1.trim_end_matches('.').parse::<u16>().ok();
                }
            }
            None
        })
        .await
        .expect("chromedriver reports its port")
        .expect("chromedriver exited before reporting its port");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--hide-scrollbars", format!("--window-size={width},{height}"),
                ],
            }),
        );
        let client = tokio::time::timeout(
            DOM_WAIT,
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("a Chromium session within the timeout")
        .expect("chromedriver starts a Chromium session");
        Browser { client, driver }
    }

    /// Evaluates `script` (a function body that `return`s) until its answer is neither null nor
    /// false, and returns that answer; fails the test with the last answer and the page's text
    /// after [`DOM_WAIT`].
    pub async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + DOM_WAIT;
        loop {
            let v = self.client.execute(script, vec![]).await.unwrap();
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: last answer {v}; the page shows:\n{}",
                    self.text().await
                );
            }
            // The next look at the DOM, not a wait for the event itself: the deadline bounds it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element `css` once it is there. The page re-renders its tables at every
    /// sample, so an element found may be replaced before the click lands: then it is found
    /// again, until the deadline.
    pub async fn click(&self, css: &str) {
        let deadline = tokio::time::Instant::now() + DOM_WAIT;
        loop {
            let e = self
                .client
                .wait()
                .at_most(DOM_WAIT)
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no element {css}: {e}"));
            match e.click().await {
                Ok(()) => return,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("click on {css} missed ({e}); finding it again");
                }
                Err(e) => panic!("cannot click {css}: {e}"),
            }
        }
    }

    /// Waits for the page's dialog (`window.confirm`), accepts it and returns its text.
    pub async fn accept_dialog(&self) -> String {
        let deadline = tokio::time::Instant::now() + DOM_WAIT;
        loop {
            match self.client.get_alert_text().await {
                Ok(text) => {
                    self.client.accept_alert().await.unwrap();
                    return text;
                }
                Err(e) if tokio::time::Instant::now() > deadline => panic!("no dialog: {e}"),
                // Not open yet: look again (the deadline bounds it).
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The page's visible text, for failure messages.
    pub async fn text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(e) => format!("(no body: {e})"),
        }
    }

    /// Ends the session and chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.close().await;
        let _ = self.driver.kill().await;
    }
}
