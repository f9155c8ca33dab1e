//! The alert rules against real Prometheus tools: `promtool check rules` and `promtool test
//! rules` (deploy/prometheus/rules.test.yaml covers every alert), and a Prometheus server that
//! scrapes a running worker with the project's rules loaded.
//!
//! Both come with Debian's `prometheus` package, which `.ci/run` installs when missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{free_port, raw_get, thing};
use crate::worker::{WorkerProcess, big_sandbox, write_config};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/prometheus")
        .join(path)
}

fn tool(name: &str) -> PathBuf {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .expect("sh runs");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(
        !path.is_empty(),
        "{name} is needed for this test: apt-get install prometheus (scripts/test and .ci/run install it)"
    );
    PathBuf::from(path)
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let promtool = tool("promtool");
    for args in [
        vec!["check", "rules", deploy("rules.yaml").to_str().unwrap()],
        vec!["test", "rules", deploy("rules.test.yaml").to_str().unwrap()],
    ] {
        let output = std::process::Command::new(&promtool)
            .args(&args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Every alert of rules.yaml has a test case in rules.test.yaml.
#[test]
fn every_alert_has_a_unit_test() {
    let rules = std::fs::read_to_string(deploy("rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(deploy("rules.test.yaml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 9, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no promtool test"
        );
    }
}

async fn api(addr: SocketAddr, path: &str) -> Option<Value> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    let (head, body) = raw_get(addr, path).await;
    if !head.starts_with("http/1.1 200") {
        return None;
    }
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&body)?
    } else {
        body
    };
    serde_json::from_slice(&body).ok()
}

/// A chunked HTTP/1.1 body's payload.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut payload = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(payload);
        }
        payload.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

async fn wait_for_api(
    addr: SocketAddr,
    path: &str,
    what: &str,
    prometheus_log: &Path,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        if let Some(answer) = api(addr, path).await
            && done(&answer)
        {
            return answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Prometheus never showed {what}; last {path}: {:?}\nits log:\n{}",
            api(addr, path).await,
            std::fs::read_to_string(prometheus_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_worker_and_evaluates_every_rule() {
    let prometheus = tool("prometheus");
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    // One thing streams; one is on a thing name the source refuses (locked), so a stream is
    // down on purpose and DweetpipeStreamsDown has something to find.
    let (healthy, locked) = (thing("prom"), thing("prom-locked"));
    crate::common::client_for(&server)
        .lock(&locked, crate::common::LOCK, &crate::common::key())
        .await
        .unwrap();
    let config = write_config(
        dir.path(),
        &server.base_url(),
        &[(&healthy, None), (&locked, None)],
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let mut worker = WorkerProcess::spawn(&config, &[], dir.path().join("worker.log"));

    // The project's rules, with every `for:` cut to 1s so the test need not wait minutes.
    let rules = std::fs::read_to_string(deploy("rules.yaml")).unwrap();
    let quick: String = rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 1s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("rules.yaml"), quick).unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: kubernetes-pods\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let web_port = free_port();
    let log = dir.path().join("prometheus.log");
    let mut child = tokio::process::Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let web = SocketAddr::from(([127, 0, 0, 1], web_port));

    wait_for_api(
        web,
        "/api/v1/targets",
        "the worker's target up",
        &log,
        |answer| {
            answer["data"]["activeTargets"]
                .as_array()
                .is_some_and(|targets| targets.iter().any(|t| t["health"] == "up"))
        },
    )
    .await;
    let rules = wait_for_api(
        web,
        "/api/v1/rules",
        "every rule evaluated",
        &log,
        |answer| {
            let rules: Vec<&Value> = answer["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            rules.len() >= 9
                && rules
                    .iter()
                    .all(|r| r["lastEvaluation"] != "0001-01-01T00:00:00Z")
        },
    )
    .await;
    for rule in rules["data"]["groups"][0]["rules"].as_array().unwrap() {
        assert_eq!(
            rule["health"], "ok",
            "{} does not evaluate: {}",
            rule["name"], rule["lastError"]
        );
    }
    let alerts = wait_for_api(
        web,
        "/api/v1/alerts",
        "DweetpipeStreamsDown firing",
        &log,
        |answer| {
            answer["data"]["alerts"].as_array().is_some_and(|alerts| {
                alerts.iter().any(|a| {
                    a["labels"]["alertname"] == "DweetpipeStreamsDown" && a["state"] == "firing"
                })
            })
        },
    )
    .await;
    let names: Vec<&str> = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["labels"]["alertname"].as_str())
        .collect();
    assert!(
        !names.contains(&"DweetpipeDown") && !names.contains(&"DweetpipeAbsent"),
        "a scraped worker is neither down nor absent: {names:?}"
    );

    // The worker goes away: Prometheus notices whatever the job is called.
    worker.signal("-KILL");
    worker.wait().await;
    wait_for_api(web, "/api/v1/targets", "the target down", &log, |answer| {
        answer["data"]["activeTargets"]
            .as_array()
            .is_some_and(|targets| targets.iter().all(|t| t["health"] == "down"))
    })
    .await;
    let _ = child.start_kill();
    server.shutdown().await;
}
