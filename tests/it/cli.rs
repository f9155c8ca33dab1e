//! The `dweetpipe` binary's verbs against a sandbox, as a user types them.

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::common::{KEY, LOCK, sandbox, thing};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");

fn dweetpipe(server: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .env("DWEET_SERVER", server)
        .env_remove("DWEET_KEY")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    command
}

async fn run(server: &str, args: &[&str]) -> Output {
    tokio::time::timeout(
        Duration::from_secs(30),
        dweetpipe(server).args(args).output(),
    )
    .await
    .expect("command finished in time")
    .expect("command ran")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn ok_json(output: &Output) -> Value {
    assert!(output.status.success(), "failed: {}", stderr(output));
    serde_json::from_str(stdout(output).trim()).expect("stdout is one JSON value")
}

#[tokio::test(flavor = "multi_thread")]
async fn dweet_latest_and_history() {
    let server = sandbox().await;
    let url = server.base_url();
    let thing = thing("cli");
    let sent = ok_json(
        &run(
            &url,
            &["dweet", &thing, "TemperatureC=29", "label=hot", "id=007"],
        )
        .await,
    );
    assert_eq!(
        sent["content"],
        json!({"TemperatureC": 29, "label": "hot", "id": "007"})
    );
    assert!(sent["transaction"].is_string());
    let merged = ok_json(
        &run(
            &url,
            &[
                "dweet",
                &thing,
                "--json",
                r#"{"sensors":{"LED":1}}"#,
                "extra=1.5",
            ],
        )
        .await,
    );
    assert_eq!(
        merged["content"],
        json!({"sensors": {"LED": 1}, "extra": 1.5})
    );

    let latest = ok_json(&run(&url, &["latest", &thing]).await);
    assert_eq!(latest["created"], merged["created"]);
    assert!(latest.get("transaction").is_none());

    let history = run(&url, &["history", &thing]).await;
    assert!(history.status.success());
    let lines: Vec<Value> = stdout(&history)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "JSON Lines, one dweet each");
    assert_eq!(lines[0]["created"], merged["created"], "newest first");

    let generated = ok_json(&run(&url, &["dweet", "a=1"]).await);
    assert!(generated["thing"].as_str().unwrap().contains('-'));

    let quiet = run(&url, &["dweet", &thing, "--quietly", "q=1"]).await;
    assert!(quiet.status.success() && stdout(&quiet).is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_exit_non_zero_with_the_servers_reason() {
    let server = sandbox().await;
    let url = server.base_url();
    let missing = run(&url, &["latest", "nobody-home"]).await;
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("we couldn't find this"),
        "{}",
        stderr(&missing)
    );
    assert!(stdout(&missing).is_empty());

    let bad_args = run(&url, &["dweet", "t", "a=1", "oops"]).await;
    assert!(!bad_args.status.success());
    assert!(
        stderr(&bad_args).contains("is not KEY=VALUE"),
        "{}",
        stderr(&bad_args)
    );

    let no_key = run(&url, &["unlock", "t"]).await;
    assert!(
        stderr(&no_key).contains("--key"),
        "tells how to give a key: {}",
        stderr(&no_key)
    );

    let unreachable = run("http://127.0.0.1:9", &["latest", "t"]).await;
    assert!(!unreachable.status.success());
    assert!(
        stderr(&unreachable).contains("hint:"),
        "{}",
        stderr(&unreachable)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_alert_unlock_and_remove_lock_verbs() {
    let server = sandbox().await;
    let url = server.base_url();
    let thing = thing("cli-lock");
    assert_eq!(
        ok_json(&run(&url, &["lock", &thing, "--lock", LOCK, "--key", KEY]).await),
        json!(thing)
    );

    let locked = run(&url, &["latest", &thing]).await;
    assert!(
        stderr(&locked).contains("this thing is locked and requires a key"),
        "{}",
        stderr(&locked)
    );

    // The key from the environment, then from a file.
    let mut with_env = dweetpipe(&url);
    with_env
        .env("DWEET_KEY", KEY)
        .args(["dweet", &thing, "v=1"]);
    let output = with_env.output().await.unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), format!("{KEY}\n")).unwrap();
    let key_path = key_file.path().to_str().unwrap();
    assert_eq!(
        ok_json(&run(&url, &["latest", &thing, "--key-file", key_path]).await)["content"],
        json!({"v": 1})
    );

    let condition = "if(dweet.v > 10) return 'high';";
    let set = ok_json(
        &run(
            &url,
            &[
                "alert",
                "set",
                &thing,
                "--to",
                "a@example.com,b@example.com",
                "--when",
                condition,
                "--key-file",
                key_path,
            ],
        )
        .await,
    );
    assert_eq!(set["condition"], condition);
    assert_eq!(set["recipients"][1]["address"], "b@example.com");
    let got = ok_json(&run(&url, &["alert", "get", &thing, "--key-file", key_path]).await);
    assert_eq!(got["status"]["open"], false);
    assert_eq!(
        ok_json(&run(&url, &["alert", "remove", &thing, "--key-file", key_path]).await),
        json!({"thing": thing})
    );
    let gone = run(&url, &["alert", "get", &thing, "--key-file", key_path]).await;
    assert!(stderr(&gone).contains("we couldn't find this"));

    let wrong = run(&url, &["unlock", &thing, "--key", "wrong-key-123"]).await;
    assert!(stderr(&wrong).contains("the key you provided doesn't work with this thing"));
    assert!(
        !stderr(&wrong).contains("wrong-key-123"),
        "keys are never echoed"
    );

    assert_eq!(
        ok_json(&run(&url, &["unlock", &thing, "--key", KEY]).await),
        json!(thing)
    );
    ok_json(&run(&url, &["lock", &thing, "--lock", LOCK, "--key", KEY]).await);
    assert_eq!(
        ok_json(&run(&url, &["remove-lock", LOCK, "--key", KEY]).await),
        json!(LOCK)
    );
    let unused = run(&url, &["remove-lock", LOCK, "--key", KEY]).await;
    assert!(stderr(&unused).contains("this lock is not in use"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_prints_one_json_line_per_dweet_and_stops_at_the_timeout() {
    let server = sandbox().await;
    let url = server.base_url();
    let thing = thing("cli-listen");
    let mut child = dweetpipe(&url)
        .args(["listen", &thing, "--timeout", "4"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let client = crate::common::client_for(&server);
    let writer = crate::common::dweet_repeatedly(
        &client,
        &thing,
        30,
        Duration::from_millis(100),
        |i| json!({ "i": i }),
    );
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let dweet: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(dweet["thing"], json!(thing));
    assert!(dweet["content"]["i"].is_number());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after --timeout")
        .unwrap();
    assert!(status.success());
    assert_eq!(writer.await.unwrap(), 0, "every dweet was accepted");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_and_simulate_commands_work_together() {
    let mut sandbox = Command::new(BIN)
        .args([
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--max-history",
            "50",
            "--in-memory",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sandbox.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = banner
        .strip_prefix("listening on ")
        .expect("banner names the URL")
        .to_owned();

    let simulated = run(
        &url,
        &[
            "simulate",
            "--things",
            "3",
            "--interval",
            "0.05",
            "--count",
            "4",
            "--odd-every",
            "2",
        ],
    )
    .await;
    assert!(simulated.status.success(), "{}", stderr(&simulated));
    assert!(
        stderr(&simulated).contains("12 dweets sent, 0 failed"),
        "{}",
        stderr(&simulated)
    );
    for board in ["S5D9-0001", "S5D9-0002", "S5D9-0003"] {
        let history = run(&url, &["history", board]).await;
        let dweets: Vec<Value> = stdout(&history)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(dweets.len(), 4, "{board}");
        assert_eq!(
            dweets[3]["content"]["globals"]["application"],
            "DweetS5D9Client"
        );
    }

    // SIGTERM: a clean exit.
    let pid = sandbox.id().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), sandbox.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn help_teaches_every_verb() {
    let help = run("http://127.0.0.1:1", &["--help"]).await;
    let text = stdout(&help);
    for verb in [
        "dweet",
        "latest",
        "history",
        "listen",
        "lock",
        "unlock",
        "remove-lock",
        "alert",
        "sandbox",
        "simulate",
    ] {
        assert!(text.contains(verb), "--help mentions {verb}");
    }
    assert!(
        !text
            .lines()
            .any(|line| line.trim_start().starts_with("bench")),
        "the benchmark harness is not a user verb: {text}"
    );
    let alert = run("http://127.0.0.1:1", &["alert", "set", "--help"]).await;
    assert!(stdout(&alert).contains("--when") && stdout(&alert).contains("--to"));
}

/// Runs the demo; returns its summary.
async fn demo(data: &std::path::Path, database_url: Option<&str>) -> String {
    let mut command = dweetpipe("http://127.0.0.1:1");
    command.args([
        "demo",
        "--things",
        "4",
        "--duration",
        "2",
        "--interval",
        "0.2",
        "--data",
        data.to_str().unwrap(),
    ]);
    match database_url {
        Some(url) => command.env("DATABASE_URL", url),
        None => command.env_remove("DATABASE_URL"),
    };
    command.env_remove("DWEET_SERVER");
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    // What the demo says on stderr must match what it does.
    assert_eq!(
        stderr(&output).contains("the worker writes there too"),
        database_url.is_some(),
        "{}",
        stderr(&output)
    );
    stdout(&output)
}

/// The newest run folder the demo made under `data`.
fn run_dir(data: &std::path::Path) -> std::path::PathBuf {
    let mut runs: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    runs.sort();
    runs.pop().expect("a run folder")
}

fn number_after(summary: &str, marker: &str) -> u64 {
    let start = summary
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} in {summary}"))
        + marker.len();
    summary[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_runs_on_loopback_and_every_dweet_sent_is_stored() {
    let data = tempfile::tempdir().unwrap();
    let summary = demo(data.path(), None).await;
    let sent = number_after(&summary, "sent ");
    assert!(sent >= 8, "the fleet dweeted: {summary}");
    assert_eq!(
        number_after(&summary, "received "),
        sent,
        "every dweet sent was received: {summary}"
    );
    assert_eq!(
        number_after(&summary, "readings, "),
        sent,
        "every dweet was stored raw: {summary}"
    );
    assert!(
        !summary.contains("PostgreSQL:"),
        "no database without DATABASE_URL: {summary}"
    );
    assert!(
        summary.contains("duckdb") && summary.contains("pyarrow"),
        "says how to query: {summary}"
    );
    assert!(
        run_dir(data.path()).join("readings").is_dir(),
        "Parquet partitions written"
    );
    // The first way it offers to read the data back needs nothing else installed: run it.
    let offered = summary
        .lines()
        .skip_while(|line| !line.starts_with("read it back"))
        .nth(1)
        .unwrap_or_else(|| panic!("a query line: {summary}"));
    let words: Vec<&str> = offered.split_whitespace().collect();
    assert_eq!(words.get(1), Some(&"query"), "{offered}");
    let output = std::process::Command::new(words[0])
        .args(&words[1..])
        .args(["--format", "csv"])
        .output()
        .unwrap();
    let rows = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{offered}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        rows.lines().count() >= 2 && rows.contains("S5D9-0001,sensors.TemperatureC,"),
        "the board's temperature per minute: {rows}"
    );
    // A second run writes a folder of its own: its summary and queries are its own.
    let second = demo(data.path(), None).await;
    let folders = std::fs::read_dir(data.path()).unwrap().count();
    assert_eq!(folders, 2, "one folder per run");
    let newest = run_dir(data.path());
    assert!(
        second.contains(&newest.display().to_string()),
        "the queries point at this run's folder: {second}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_also_writes_postgresql_when_database_url_is_set() {
    let db = crate::postgres::TestDatabase::create().await;
    let data = tempfile::tempdir().unwrap();
    let summary = demo(data.path(), Some(&db.url)).await;
    let sent = number_after(&summary, "sent ");
    let postgres = &summary[summary.find("PostgreSQL:").expect("a PostgreSQL line")..];
    assert_eq!(number_after(postgres, "readings, "), sent, "{summary}");
    let mut connection = db.connect().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM dweets")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(rows as u64, sent);
    drop(connection);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_without_a_timeout_stops_cleanly_on_sigint() {
    let server = sandbox().await;
    let url = server.base_url();
    let thing = thing("cli-sigint");
    let mut child = dweetpipe(&url)
        .args(["listen", &thing])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let client = crate::common::client_for(&server);
    let writer = crate::common::dweet_repeatedly(
        &client,
        &thing,
        200,
        Duration::from_millis(20),
        |i| json!({ "i": i }),
    );
    // Dweets are flowing: the signal lands while the loop is busy.
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits on SIGINT")
        .unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "interrupted, as shells expect: {status:?}"
    );
    writer.abort();
    server.shutdown().await;
}
