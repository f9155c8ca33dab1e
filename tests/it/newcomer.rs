//! What a new user trips over, each reproduced as they met it: numbers a verb cannot use,
//! messages that mislead or repeat themselves, a wrong database URL, a typo in an override.

use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

use crate::common::{KEY, LOCK, OTHER_KEY, free_port, sandbox, thing};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");

fn dweetpipe() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("DWEET_SERVER")
        .env_remove("DWEET_KEY")
        .env_remove("RUST_LOG")
        .env_remove("DATABASE_URL")
        .kill_on_drop(true);
    command
}

async fn output(command: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("finished in time")
        .expect("ran")
}

async fn run(args: &[&str]) -> Output {
    output(dweetpipe().args(args)).await
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_numeric_flag_refuses_zero_negative_and_huge_values_without_a_panic() {
    let cases: &[(&[&str], &str)] = &[
        (&["demo"], "--interval"),
        (&["demo"], "--things"),
        (&["demo"], "--duration"),
        (&["simulate"], "--interval"),
        (&["simulate"], "--things"),
        (&["simulate"], "--count"),
        (&["simulate"], "--odd-every"),
        (&["listen", "t"], "--timeout"),
        (&["listen", "t"], "--idle-timeout"),
        (&["sandbox"], "--max-history"),
        (&["sandbox"], "--max-content"),
        (&["sandbox"], "--rate-limit"),
        (&["sandbox"], "--alert-memory-mib"),
        (&["sandbox"], "--retention"),
        (&["sandbox"], "--alert-time-limit"),
    ];
    for (verb, flag) in cases {
        for value in ["0", "-1", "1e300", "99999999999999999999999"] {
            // Durations are text ("24h"): only zero is a number they could get wrong.
            let duration = *flag == "--retention" || *flag == "--alert-time-limit";
            if duration && value != "0" {
                continue;
            }
            let mut args: Vec<&str> = verb.to_vec();
            let assignment = format!("{flag}={value}");
            args.push(&assignment);
            let refused = run(&args).await;
            let said = stderr(&refused);
            assert_eq!(
                refused.status.code(),
                Some(2),
                "{args:?} is a usage error: {said}"
            );
            assert!(said.contains(flag), "{args:?} names the flag: {said}");
            assert!(!said.contains("panicked"), "{args:?}: {said}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dweet_needs_content_and_says_which_thing_the_server_named() {
    let server = sandbox().await;
    let url = server.base_url();
    let empty = run(&["--server", &url, "dweet"]).await;
    assert!(!empty.status.success());
    assert!(
        stderr(&empty).contains("nothing to send"),
        "{}",
        stderr(&empty)
    );
    let named = run(&["--server", &url, "dweet", "v=1"]).await;
    assert!(named.status.success(), "{}", stderr(&named));
    assert!(
        stderr(&named).contains("the server named the thing"),
        "{}",
        stderr(&named)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hints_fit_the_call_that_failed() {
    let server = sandbox().await;
    let url = server.base_url();
    let name = thing("hints");
    let lock_unknown = run(&[
        "--server",
        &url,
        "lock",
        &name,
        "--lock",
        "no-such-lock",
        "--key",
        KEY,
    ])
    .await;
    let said = stderr(&lock_unknown);
    assert!(!lock_unknown.status.success());
    assert!(said.contains("hint: the server knows no lock"), "{said}");
    assert!(!said.contains("forgotten 24 h"), "{said}");

    let remove_unknown = run(&[
        "--server",
        &url,
        "remove-lock",
        "no-such-lock",
        "--key",
        KEY,
    ])
    .await;
    let said = stderr(&remove_unknown);
    assert!(said.contains("hint: the server knows no lock"), "{said}");

    let remove_wrong_key = run(&["--server", &url, "remove-lock", LOCK, "--key", OTHER_KEY]).await;
    let said = stderr(&remove_wrong_key);
    assert!(
        !remove_wrong_key.status.success(),
        "a wrong key removed a lock: {said}"
    );
    assert!(
        said.contains("hint: the key is not this lock's master key"),
        "{said}"
    );

    let client = crate::common::client_for(&server);
    client
        .lock(&name, LOCK, &crate::common::key())
        .await
        .unwrap();
    let no_alert = run(&["--server", &url, "alert", "get", &name, "--key", KEY]).await;
    let said = stderr(&no_alert);
    assert!(said.contains("hint: the thing has no alert"), "{said}");
    assert!(!said.contains("forgotten 24 h"), "{said}");

    let missing = run(&["--server", &url, "latest", &thing("nobody")]).await;
    assert!(stderr(&missing).contains("case-sensitive"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_condition_that_does_not_parse_is_refused_before_it_is_sent_and_by_the_sandbox() {
    let server = sandbox().await;
    let url = server.base_url();
    let name = thing("cond");
    let client = crate::common::client_for(&server);
    client
        .lock(&name, LOCK, &crate::common::key())
        .await
        .unwrap();
    for when in ["if(dweet.TemperatureC > 40 return 'hot'", ""] {
        let refused = run(&[
            "--server",
            &url,
            "alert",
            "set",
            &name,
            "--to",
            "a@example.com",
            "--when",
            when,
            "--key",
            KEY,
        ])
        .await;
        let said = stderr(&refused);
        assert_eq!(refused.status.code(), Some(2), "{when:?}: {said}");
        assert!(said.contains("--when"), "{when:?}: {said}");
        assert!(!said.contains("not a dweet.io API path"), "{said}");
    }
    // A client that skips the check meets the sandbox's refusal.
    let refused = client
        .set_alert(
            &name,
            &["a@example.com"],
            "if(dweet.TemperatureC > 40 return 'hot'",
            &crate::common::key(),
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("does not parse"), "{refused}");
    assert!(
        client
            .get_alert(&name, &crate::common::key())
            .await
            .is_err(),
        "nothing was stored"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_takes_a_prefix_without_its_slash_a_host_name_and_counts_its_locks() {
    let port = free_port();
    let listen = format!("localhost:{port}");
    let mut child = dweetpipe()
        .args([
            "sandbox",
            "--listen",
            &listen,
            "--prefix",
            "dweet",
            "--no-alert-outbox",
            "--in-memory",
        ])
        .args(["--lock", &format!("{LOCK}:{KEY}")])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/dweet");
    let client = dweetpipe::client::Client::new(&url).unwrap();
    let started = std::time::Instant::now();
    let name = thing("prefixed");
    loop {
        if client
            .dweet_for(&name, &serde_json::json!({"v": 1}), None)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the sandbox never answered under /dweet"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.start_kill().unwrap();
    let done = child.wait_with_output().await.unwrap();
    let printed = format!("{}{}", stdout(&done), stderr(&done));
    assert!(printed.contains(&format!(":{port}/dweet")), "{printed}");
    assert!(
        printed.contains("locks=1"),
        "says how many locks: {printed}"
    );
    assert!(!printed.contains(KEY), "never the keys: {printed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_a_wrong_database_and_an_unreachable_source_plainly() {
    let db = crate::postgres::TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut missing_db = reqwest::Url::parse(&db.url).unwrap();
    missing_db.set_path("/no_such_database_here");
    let config = dir.path().join("things.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"http://127.0.0.1:{}\"\n[[thing]]\nname = \"a\"\n[parquet]\ndir = \"{}\"\n[postgres]\nurl = \"{missing_db}\"\nspool_dir = \"{}\"\n",
            free_port(),
            dir.path().join("parquet").display(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let checked = run(&["check", "--config", config.to_str().unwrap()]).await;
    let said = stdout(&checked);
    assert!(!checked.status.success(), "{said}");
    assert!(
        said.contains("postgres: PROBLEM") && said.contains("does not exist"),
        "{said}"
    );
    assert!(said.contains("create the database"), "{said}");
    assert!(
        said.contains("not reachable") && !said.contains("source: reachable"),
        "{said}"
    );
    assert!(!said.contains("run: ready"), "{said}");
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_gives_up_at_once_on_a_database_it_cannot_use() {
    let admin = std::env::var("DATABASE_URL").expect("scripts/test sets DATABASE_URL");
    let mut url = reqwest::Url::parse(&admin).unwrap();
    url.set_path("/nosuchdb_for_the_demo");
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let refused = output(
        dweetpipe()
            .args([
                "demo",
                "--duration",
                "3",
                "--data",
                dir.path().to_str().unwrap(),
            ])
            .env("DATABASE_URL", url.as_str()),
    )
    .await;
    let said = stderr(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("does not exist") && said.contains("unset DATABASE_URL"),
        "{said}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_override_typo_names_the_variable_and_wrong_types_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ok.toml");
    std::fs::write(&config, "[source]\nurl = \"http://127.0.0.1:1\"\n").unwrap();
    let typo = output(
        dweetpipe()
            .args(["check", "--config", config.to_str().unwrap()])
            .env("DWEETPIPE__SOURCE__ULR", "http://x"),
    )
    .await;
    let said = stderr(&typo);
    assert!(
        said.contains("DWEETPIPE__SOURCE__ULR") && said.contains("ulr"),
        "{said}"
    );
    assert!(!said.contains("ok.toml"), "not blamed on the file: {said}");

    std::fs::write(&config, "[parquet]\ndir = 42\n").unwrap();
    let wrong = run(&["check", "--config", config.to_str().unwrap()]).await;
    let said = stderr(&wrong);
    assert!(
        said.contains("`parquet.dir`") && said.contains("integer"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn causes_are_printed_once_and_server_is_refused_where_it_is_not_used() {
    let unreachable = run(&["--server", "http://127.0.0.1:9", "latest", "t"]).await;
    let said = stderr(&unreachable);
    let error_line = said
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    let parts: Vec<&str> = error_line.split(": ").collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(part),
            "{part:?} is said twice: {error_line}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("things.toml");
    std::fs::write(&config, "[source]\nurl = \"http://127.0.0.1:1\"\n").unwrap();
    let ignored = run(&[
        "--server",
        "http://example.invalid",
        "check",
        "--config",
        config.to_str().unwrap(),
    ])
    .await;
    assert!(!ignored.status.success());
    assert!(stderr(&ignored).contains("--server is for the client verbs"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_file_wins_over_an_exported_dweet_key() {
    let server = sandbox().await;
    let url = server.base_url();
    let name = thing("keyfile");
    let client = crate::common::client_for(&server);
    client
        .lock(&name, LOCK, &crate::common::key())
        .await
        .unwrap();
    client
        .dweet_for(
            &name,
            &serde_json::json!({"v": 1}),
            Some(&crate::common::key()),
        )
        .await
        .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), KEY).unwrap();
    let read = output(
        dweetpipe()
            .args(["--server", &url, "latest", &name, "--key-file"])
            .arg(file.path())
            .env("DWEET_KEY", "some-other-exported-key"),
    )
    .await;
    assert!(read.status.success(), "{}", stderr(&read));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_prints_its_dashboard_and_with_keep_serves_it_until_ctrl_c() {
    let data = tempfile::tempdir().unwrap();
    let mut child = dweetpipe()
        .args([
            "demo",
            "--keep",
            "--things",
            "3",
            "--duration",
            "1",
            "--data",
        ])
        .arg(data.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let mut dashboard = None;
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
    {
        if let Some(rest) = line.strip_prefix("dashboard: ") {
            dashboard = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let dashboard = dashboard.expect("the demo prints the dashboard's URL");
    // Past --duration: the sandbox, its pages and the fleet are still there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let page = crate::common::get_text(&dashboard).await;
    assert!(page.contains("dweetpipe sandbox"), "{page}");
    let first = crate::common::get_text(&format!("{dashboard}get/recent/dweets")).await;
    assert!(first.contains("S5D9-0001"), "{first}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = crate::common::get_text(&format!("{dashboard}get/recent/dweets")).await;
    assert_ne!(first, later, "the fleet keeps dweeting");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "Ctrl-C ends it cleanly");
}
