//! The sandbox's pages in a real browser: Debian's headless Chromium driven over WebDriver by
//! `chromedriver` (a few JSON calls, so no client crate). Each test owns its sandbox and its
//! browser. Set DWEETPIPE_SCREENSHOTS=DIR to save the README's screenshots.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use dweetpipe::sandbox::SandboxHandle;
use dweetpipe::sandbox::simulator::S5d9Board;
use serde_json::{Value, json};

use crate::common::{KEY, LOCK, client_for, free_port, key, sandbox_with, thing};

fn binary(variable: &str, candidates: &[&str], package: &str) -> PathBuf {
    if let Ok(path) = std::env::var(variable) {
        return PathBuf::from(path);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} was not found: install Debian's {package} (apt-get install chromium chromium-driver; \
                 scripts/test and .ci/run do) or set {variable}",
                candidates[0]
            )
        })
}

/// A chromedriver process and one headless Chromium session.
struct Browser {
    driver: tokio::process::Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let chromium = binary(
            "DWEETPIPE_CHROMIUM",
            &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
            "chromium",
        );
        let chromedriver = binary(
            "DWEETPIPE_CHROMEDRIVER",
            &["/usr/bin/chromedriver"],
            "chromium-driver",
        );
        let port = free_port();
        let driver = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = crate::common::http();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        // As root, in a closed network: no sandbox, and none of Chromium's own traffic.
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": chromium, "args": args },
                "goog:loggingPrefs": { "browser": "ALL" },
            }}
        });
        let answer: Value = http
            .post(format!("{base}/session"))
            .header("content-type", "application/json")
            .body(capabilities.to_string())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null))
            .unwrap();
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
            http,
            _profile: profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let request = self.http.request(method, url);
        let request = if body.is_null() {
            request
        } else {
            request
                .header("content-type", "application/json")
                .body(body.to_string())
        };
        let body = request.send().await.unwrap().bytes().await.unwrap();
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    async fn run(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    async fn text(&self) -> String {
        self.run("return document.body.innerText;")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the page's text contains `wanted`; returns how long it took.
    async fn wait_for_text(&self, wanted: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let text = self.text().await;
            if text.contains(wanted) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "the page did not show {wanted:?} within {within:?}; it shows:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the page logged at SEVERE (errors, failed loads).
    async fn console_errors(&self) -> Vec<String> {
        let logs = self
            .call(
                reqwest::Method::POST,
                "/se/log",
                json!({ "type": "browser" }),
            )
            .await;
        logs.as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e["level"] == "SEVERE")
                    .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn assert_no_console_errors(&self) {
        let errors = self.console_errors().await;
        assert!(errors.is_empty(), "console errors: {errors:?}");
    }

    /// Every address the page fetched.
    async fn requested(&self) -> Vec<String> {
        self.run("return performance.getEntriesByType('resource').map((e) => e.name).concat([location.href]);")
            .await
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// The page's load time as the browser measured it (navigation start to load end), ms.
    async fn load_ms(&self) -> f64 {
        self.run("const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;")
            .await
            .as_f64()
            .unwrap_or(f64::NAN)
    }

    async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("DWEETPIPE_SCREENSHOTS") else {
            return;
        };
        let png = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let bytes = base64_decode(png.as_str().unwrap_or_default());
        std::fs::write(Path::new(&dir).join(name), bytes).unwrap();
    }

    async fn quit(mut self) {
        self.call(reqwest::Method::DELETE, "", Value::Null).await;
        let _ = self.driver.kill().await;
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0);
    for byte in text.bytes() {
        let Some(value) = ALPHABET.iter().position(|&c| c == byte) else {
            continue;
        };
        buffer = (buffer << 6) | value as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

async fn fleet(things: &[String]) -> SandboxHandle {
    let server = sandbox_with(|_| {}).await;
    let client = client_for(&server);
    for (i, name) in things.iter().enumerate() {
        let mut board = S5d9Board::new(i as u64);
        client
            .dweet_for(name, &board.next_payload(), None)
            .await
            .unwrap();
    }
    server
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_page_shows_every_board_and_a_new_dweet_within_two_seconds() {
    let things: Vec<String> = (1..=3).map(|i| format!("{}-{i}", thing("S5D9"))).collect();
    let server = fleet(&things).await;
    let browser = Browser::start().await;
    browser.open(&format!("{}/", server.base_url())).await;
    for name in &things {
        browser.wait_for_text(name, Duration::from_secs(5)).await;
    }
    assert!(
        browser.text().await.contains("temperature"),
        "the board layout"
    );
    let mut board = S5d9Board::new(99);
    let mut payload = board.next_payload();
    payload["sensors"]["TemperatureC"] = json!(77);
    client_for(&server)
        .dweet_for(&things[0], &payload, None)
        .await
        .unwrap();
    let seen = browser.wait_for_text("77 °C", Duration::from_secs(2)).await;
    eprintln!(
        "fleet page: a new dweet shown after {seen:?}; page loaded in {:.0} ms",
        browser.load_ms().await
    );
    browser.screenshot("dashboard.png").await;
    browser.assert_no_console_errors().await;
    browser.quit().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_follow_page_streams_new_values_charts_them_and_shows_the_raw_dweet() {
    let name = format!("{}-0001", thing("S5D9"));
    let server = fleet(std::slice::from_ref(&name)).await;
    let client = client_for(&server);
    let mut board = S5d9Board::new(1);
    for _ in 0..10 {
        client
            .dweet_for(&name, &board.next_payload(), None)
            .await
            .unwrap();
    }
    let browser = Browser::start().await;
    browser
        .open(&format!("{}/follow/{name}", server.base_url()))
        .await;
    browser.wait_for_text("Live:", Duration::from_secs(5)).await;
    browser
        .wait_for_text("sensors.TemperatureC", Duration::from_secs(2))
        .await;
    let charts = browser
        .run("return document.querySelectorAll('svg.chart polyline').length;")
        .await;
    assert!(
        charts.as_u64().unwrap_or(0) >= 5,
        "a chart per numeric field: {charts}"
    );
    client
        .dweet_for(
            &name,
            &json!({ "sensors": { "TemperatureC": 63 }, "note": "café" }),
            None,
        )
        .await
        .unwrap();
    let seen = browser.wait_for_text("café", Duration::from_secs(2)).await;
    let raw = browser
        .run("return document.getElementById('raw').textContent;")
        .await;
    assert!(
        raw.as_str()
            .unwrap_or_default()
            .contains("\"TemperatureC\": 63"),
        "{raw}"
    );
    eprintln!(
        "follow page: a new dweet shown after {seen:?}; page loaded in {:.0} ms",
        browser.load_ms().await
    );
    browser.screenshot("follow.png").await;
    browser.assert_no_console_errors().await;
    browser.quit().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_thing_s_page_shows_nothing_without_its_key_and_never_puts_the_key_in_an_address()
{
    let name = thing("locked-page");
    let server = sandbox_with(|_| {}).await;
    let client = client_for(&server);
    client.lock(&name, LOCK, &key()).await.unwrap();
    client
        .dweet_for(&name, &json!({ "secret_reading": 4242 }), Some(&key()))
        .await
        .unwrap();
    let browser = Browser::start().await;
    browser
        .open(&format!("{}/follow/{name}", server.base_url()))
        .await;
    browser
        .wait_for_text("This thing is locked", Duration::from_secs(5))
        .await;
    assert!(
        !browser.text().await.contains("4242"),
        "nothing of the data without the key"
    );
    browser
        .run(&format!(
            "document.getElementById('key').value = {KEY:?}; document.getElementById('key-form').requestSubmit(); return true;"
        ))
        .await;
    browser.wait_for_text("4242", Duration::from_secs(5)).await;
    client
        .dweet_for(&name, &json!({ "secret_reading": 4343 }), Some(&key()))
        .await
        .unwrap();
    browser.wait_for_text("4343", Duration::from_secs(2)).await;
    let addresses = browser.requested().await;
    assert!(!addresses.is_empty());
    assert!(
        addresses.iter().all(|a| !a.contains(KEY)),
        "the key is in no address: {addresses:?}"
    );
    // Failed loads of a locked thing are answers, not errors; nothing else went wrong.
    browser.assert_no_console_errors().await;
    let recent = browser
        .run("return fetch(BASE + '/get/recent/dweets').then((r) => r.text());")
        .await;
    assert!(
        !recent.as_str().unwrap_or_default().contains("4242"),
        "a locked thing is not on the public pages"
    );
    browser.quit().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_see_and_play_pages_list_dweets_and_endpoints_and_play_tries_a_call() {
    let name = thing("see-page");
    let server = fleet(std::slice::from_ref(&name)).await;
    let browser = Browser::start().await;
    browser.open(&format!("{}/see", server.base_url())).await;
    browser.wait_for_text(&name, Duration::from_secs(5)).await;
    browser.open(&format!("{}/play", server.base_url())).await;
    browser
        .wait_for_text("/get/stored/dweets/for/{thing}", Duration::from_secs(5))
        .await;
    browser
        .run(&format!(
            "document.getElementById('path').value = '/get/latest/dweet/for/{name}'; document.getElementById('try').requestSubmit(); return true;"
        ))
        .await;
    browser
        .wait_for_text("\"this\":\"succeeded\"", Duration::from_secs(5))
        .await;
    browser.assert_no_console_errors().await;
    // The check itself sees an error when there is one.
    browser
        .run("console.error('probe-error'); return true;")
        .await;
    let errors = browser.console_errors().await;
    assert!(
        errors.iter().any(|e| e.contains("probe-error")),
        "{errors:?}"
    );
    browser.quit().await;
    server.shutdown().await;
}
