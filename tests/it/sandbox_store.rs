//! The sandbox as a durable service: its state in `--data` survives a restart and a `kill -9`,
//! a damaged or foreign store stops the start with a message naming the file, histories stay
//! within their cap and retention on disk, and locked things' dweets come back by day and hour
//! (JSON and CSV), with every failure said clearly.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use dweetpipe::client::{Client, Error as ClientError, Key, StoredWindow};
use dweetpipe::sandbox::{self, Limits, SandboxConfig, SandboxHandle};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{KEY, LOCK, client_for, key, thing};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");

async fn durable(data: &Path, tune: impl FnOnce(&mut SandboxConfig)) -> SandboxHandle {
    let mut config = SandboxConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        locks: vec![(LOCK.to_owned(), Key::new(KEY))],
        data: Some(data.to_path_buf()),
        ..SandboxConfig::default()
    };
    tune(&mut config);
    sandbox::start(config).await.expect("the sandbox starts")
}

fn today() -> StoredWindow {
    StoredWindow {
        date: chrono::Utc::now().date_naive(),
        hour: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_brings_back_histories_locks_alerts_and_stored_dweets() {
    let data = tempfile::tempdir().unwrap();
    let open = thing("durable-open");
    let locked = thing("durable-locked");
    let server = durable(data.path(), |_| {}).await;
    let client = client_for(&server);
    for i in 0..3 {
        client
            .dweet_for(&open, &json!({ "i": i }), None)
            .await
            .unwrap();
    }
    client.lock(&locked, LOCK, &key()).await.unwrap();
    client
        .set_alert(
            &locked,
            &["ops@example.com"],
            "if(dweet.t > 40) return 'hot';",
            &key(),
        )
        .await
        .unwrap();
    let mut written = Vec::new();
    for t in [20, 50, 55] {
        let dweet = client
            .dweet_for(
                &locked,
                &json!({ "t": t, "place": "lab, north" }),
                Some(&key()),
            )
            .await
            .unwrap();
        written.push(dweet.created.as_str().to_owned());
    }
    let before_alert = client.get_alert(&locked, &key()).await.unwrap();
    server.shutdown().await;

    let server = durable(data.path(), |_| {}).await;
    let client = client_for(&server);
    let history = client.get_dweets_for(&open, None).await.unwrap();
    assert_eq!(history.len(), 3, "the unlocked thing's history");
    assert_eq!(history[0].content["i"], 2, "newest first, as before");
    assert!(
        matches!(
            client.get_dweets_for(&locked, None).await,
            Err(ClientError::Locked { .. })
        ),
        "the lock attached through the API is still attached"
    );
    let kept = client.get_dweets_for(&locked, Some(&key())).await.unwrap();
    assert_eq!(kept.len(), 3);
    let alert = client.get_alert(&locked, &key()).await.unwrap();
    assert_eq!(
        alert.status, before_alert.status,
        "the alert's status, open, with its count"
    );
    let status = alert.status.unwrap();
    assert!(status.open && status.alerts_sent_today == 1, "{status:?}");
    let stored = client
        .get_stored_dweets_for(&locked, &key(), today())
        .await
        .unwrap();
    let stored: Vec<&str> = stored.iter().map(|d| d.created.as_str()).collect();
    assert_eq!(stored, written, "every stored dweet, oldest first");
    let events = client
        .get_stored_alerts_for(&locked, &key(), today())
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, "opened");
    assert_eq!(events[0].created, written[1]);
    assert_eq!(events[0].message, "hot");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_dweets_by_day_and_hour_in_json_and_csv_and_every_failure_says_why() {
    let data = tempfile::tempdir().unwrap();
    let locked = thing("stored");
    let unlocked = thing("stored-open");
    let server = durable(data.path(), |_| {}).await;
    let client = client_for(&server);
    client.lock(&locked, LOCK, &key()).await.unwrap();
    let first = client
        .dweet_for(
            &locked,
            &json!({ "t": 1, "note": "say \"hi\"" }),
            Some(&key()),
        )
        .await
        .unwrap();
    client
        .dweet_for(
            &locked,
            &json!({ "t": 2, "extra": { "x": true } }),
            Some(&key()),
        )
        .await
        .unwrap();
    client
        .dweet_for(&unlocked, &json!({ "t": 1 }), None)
        .await
        .unwrap();

    let created = first.created.to_datetime().unwrap();
    let hour = u8::try_from(chrono::Timelike::hour(&created)).unwrap();
    let this_hour = StoredWindow {
        date: created.date_naive(),
        hour: Some(hour),
    };
    let other_hour = StoredWindow {
        hour: Some((hour + 1) % 24),
        ..this_hour
    };
    assert_eq!(
        client
            .get_stored_dweets_for(&locked, &key(), this_hour)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        client
            .get_stored_dweets_for(&locked, &key(), other_hour)
            .await
            .unwrap()
            .is_empty(),
        "another hour holds none of them"
    );
    let csv = client
        .get_stored_dweets_csv_for(&locked, &key(), this_hour)
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "thing,created,t,note,extra.x", "{csv}");
    assert!(
        lines[1].ends_with(",1,\"say \"\"hi\"\"\","),
        "quoted as CSV wants: {csv}"
    );
    assert!(lines[2].ends_with(",2,,true"), "{csv}");
    // A client that sends every optional parameter, empty ones too, is answered as if they
    // were absent (dweet.io did so).
    let all_params = crate::common::get_text(&format!(
        "{}/get/stored/dweets/for/{locked}?date={}&hour=&responseType=&key={KEY}",
        server.base_url(),
        created.date_naive().format("%Y-%m-%d")
    ))
    .await;
    assert!(
        all_params.starts_with(r#"{"this":"succeeded""#) && all_params.contains("\"note\""),
        "{all_params}"
    );

    // The failures, each with its reason.
    let url = server.base_url();
    let day = created.date_naive().format("%Y-%m-%d").to_string();
    for (path, because) in [
        (
            format!("/get/stored/dweets/for/{locked}?date={day}"),
            "requires a key",
        ),
        (
            format!("/get/stored/dweets/for/{locked}?date={day}&key=wrong"),
            "doesn't work",
        ),
        (
            format!("/get/stored/dweets/for/{unlocked}?date={day}&key={KEY}"),
            "not locked; stored dweets and alert events need a locked thing",
        ),
        (
            format!("/get/stored/dweets/for/{locked}?key={KEY}"),
            "date is required",
        ),
        (
            format!("/get/stored/dweets/for/{locked}?date=2026-02-30&key={KEY}"),
            "YYYY-MM-DD",
        ),
        (
            format!("/get/stored/dweets/for/{locked}?date={day}&hour=24&key={KEY}"),
            "00 to 23",
        ),
        (
            format!("/get/stored/dweets/for/{locked}?date={day}&responseType=xml&key={KEY}"),
            "json or csv",
        ),
        (
            format!("/get/stored/alerts/for/{locked}?date={day}"),
            "requires a key",
        ),
    ] {
        let text = crate::common::get_text(&format!("{url}{path}")).await;
        assert!(
            text.starts_with(r#"{"this":"failed""#) && text.contains(because),
            "{path}: {text}"
        );
        assert!(!text.contains(KEY), "no key in an answer: {text}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_history_cap_and_retention_hold_on_disk_too() {
    let data = tempfile::tempdir().unwrap();
    let capped = thing("capped");
    let server = durable(data.path(), |c| {
        c.limits = Limits {
            max_history: 5,
            ..Limits::default()
        }
    })
    .await;
    let client = client_for(&server);
    for i in 0..50 {
        client
            .dweet_for(&capped, &json!({ "i": i }), None)
            .await
            .unwrap();
    }
    server.shutdown().await;
    // Restarted with a larger cap: only what the cap kept is on disk.
    let server = durable(data.path(), |_| {}).await;
    let kept = client_for(&server)
        .get_dweets_for(&capped, None)
        .await
        .unwrap();
    assert_eq!(kept.len(), 5, "the cap held on disk");
    assert_eq!(kept[4].content["i"], 45);
    server.shutdown().await;

    let brief = thing("brief");
    let server = durable(data.path(), |c| {
        c.limits = Limits {
            retention: Duration::from_millis(300),
            ..Limits::default()
        }
    })
    .await;
    client_for(&server)
        .dweet_for(&brief, &json!({ "t": 1 }), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.shutdown().await;
    let server = durable(data.path(), |_| {}).await;
    assert!(
        matches!(
            client_for(&server).get_dweets_for(&brief, None).await,
            Err(ClientError::NotFound { .. })
        ),
        "an expired history is gone from disk, not only from memory"
    );
    server.shutdown().await;
}

/// `dweetpipe sandbox --data DIR` as a process (with its default alert outbox), with its URL.
async fn sandbox_process(data: &Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["sandbox", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(["--lock", &format!("{LOCK}:{KEY}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the sandbox prints its URL")
        .unwrap()
        .unwrap_or_default();
    let url = banner
        .strip_prefix("listening on ")
        .unwrap_or_default()
        .to_owned();
    (child, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_9_right_after_a_burst_loses_no_acknowledged_dweet() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, url) = sandbox_process(data.path()).await;
    let client = Client::new(&url).unwrap();
    let things: Arc<Vec<String>> = Arc::new((0..8).map(|i| thing(&format!("burst{i}"))).collect());
    let mut writers = Vec::new();
    for writer in 0..32 {
        let (client, things) = (client.clone(), Arc::clone(&things));
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..40 {
                let thing = &things[(writer + i) % things.len()];
                if let Ok(dweet) = client
                    .dweet_for(thing, &json!({ "w": writer, "i": i }), None)
                    .await
                {
                    acknowledged.push((thing.clone(), dweet.created.as_str().to_owned()));
                }
            }
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    // At once: no shutdown, no flush.
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_eq!(acknowledged.len(), 32 * 40, "every write was answered");

    let (_again, url) = sandbox_process(data.path()).await;
    let client = Client::new(&url).unwrap();
    let mut found = std::collections::BTreeSet::new();
    for thing in things.iter() {
        for dweet in client.get_dweets_for(thing, None).await.unwrap() {
            found.insert((thing.clone(), dweet.created.as_str().to_owned()));
        }
    }
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|a| !found.contains(*a))
        .take(5)
        .collect();
    assert!(lost.is_empty(), "acknowledged, then lost: {lost:?}");
    eprintln!(
        "sandbox kill -9: {} acknowledged dweets, all back after the restart",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_or_foreign_store_stops_the_start_naming_the_file() {
    let damaged = tempfile::tempdir().unwrap();
    let file = damaged.path().join(sandbox::disk::FILE_NAME);
    std::fs::write(
        &file,
        b"this is not a database, it was overwritten by mistake\n".repeat(200),
    )
    .unwrap();
    let foreign = tempfile::tempdir().unwrap();
    {
        let database =
            redb::Database::create(foreign.path().join(sandbox::disk::FILE_NAME)).unwrap();
        let write = database.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("orders");
            write.open_table(table).unwrap().insert("a", "b").unwrap();
        }
        write.commit().unwrap();
    }
    for (dir, expected) in [
        (&damaged, "not a dweetpipe sandbox store"),
        (&foreign, "no dweetpipe format marker"),
    ] {
        let output = Command::new(BIN)
            .args([
                "sandbox",
                "--listen",
                "127.0.0.1:0",
                "--no-alert-outbox",
                "--data",
            ])
            .arg(dir.path())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "refused: {stderr}");
        assert!(
            stderr.contains("sandbox.redb") && stderr.contains(expected),
            "{stderr}"
        );
        assert!(stderr.contains("move it away"), "says what to do: {stderr}");
    }
    let untouched = std::fs::read(&file).unwrap();
    assert!(
        untouched.starts_with(b"this is not a database"),
        "the damaged file is left as it was"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn history_date_prints_a_locked_thing_s_day_as_json_lines_or_csv() {
    let data = tempfile::tempdir().unwrap();
    let locked = thing("cli-stored");
    let server = durable(data.path(), |_| {}).await;
    let client = client_for(&server);
    client.lock(&locked, LOCK, &key()).await.unwrap();
    for t in [1, 2, 3] {
        client
            .dweet_for(&locked, &json!({ "t": t }), Some(&key()))
            .await
            .unwrap();
    }
    let day = chrono::Utc::now()
        .date_naive()
        .format("%Y-%m-%d")
        .to_string();
    let run = |extra: Vec<&'static str>| {
        let (url, locked, day) = (server.base_url(), locked.clone(), day.clone());
        async move {
            Command::new(BIN)
                .args(["--server", &url, "history", &locked, "--date", &day])
                .args(extra)
                .env("DWEET_KEY", KEY)
                .output()
                .await
                .unwrap()
        }
    };
    let lines = run(vec![]).await;
    let text = String::from_utf8_lossy(&lines.stdout);
    assert!(
        lines.status.success(),
        "{}",
        String::from_utf8_lossy(&lines.stderr)
    );
    let ts: Vec<i64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["content"]["t"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ts, [1, 2, 3], "oldest first");
    let csv = run(vec!["--csv"]).await;
    let csv = String::from_utf8_lossy(&csv.stdout);
    assert!(
        csv.starts_with("thing,created,t\n") && csv.lines().count() == 4,
        "{csv}"
    );
    let no_key = Command::new(BIN)
        .args([
            "--server",
            &server.base_url(),
            "history",
            &locked,
            "--date",
            &day,
        ])
        .env_remove("DWEET_KEY")
        .output()
        .await
        .unwrap();
    assert!(!no_key.status.success());
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("need the thing's key"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_alert_outbox_is_kept_in_the_data_directory() {
    let data = tempfile::tempdir().unwrap();
    let (_child, url) = sandbox_process(data.path()).await;
    let client = Client::new(&url).unwrap();
    let name = thing("outbox");
    client.lock(&name, LOCK, &key()).await.unwrap();
    client
        .set_alert(
            &name,
            &["ops@example.com"],
            "if(dweet.t > 40) return 'hot';",
            &key(),
        )
        .await
        .unwrap();
    client
        .dweet_for(&name, &json!({ "t": 50 }), Some(&key()))
        .await
        .unwrap();
    let outbox = data.path().join("alerts.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&outbox).unwrap_or_default();
        if text.contains(&name) || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        text.contains(&name) && text.contains("hot"),
        "{}: {text:?}",
        outbox.display()
    );
}

/// The `created` of each dweet, in the order given.
fn created_of(dweets: &[dweetpipe::client::Dweet]) -> Vec<String> {
    dweets
        .iter()
        .map(|d| d.created.as_str().to_owned())
        .collect()
}

async fn health(server: &SandboxHandle) -> (u16, String) {
    let answer = crate::common::http()
        .get(format!("{}/healthz", server.base_url()))
        .send()
        .await
        .expect("the sandbox answers /healthz");
    let status = answer.status().as_u16();
    (status, answer.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_dweets_shows_none_of_them_and_heals_when_space_returns() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let disk = match crate::faults::SmallDisk::mount(dir.path(), "3m") {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let data = disk.mount.join("data");
    let server = durable(&data, |config| {
        config.limits.max_history = 100_000;
    })
    .await;
    let client = client_for(&server);
    let name = thing("full-disk");
    let mut listener = client
        .listen_for_dweets_from(&name, None, dweetpipe::client::ListenOptions::default())
        .await
        .unwrap();
    assert_eq!(health(&server).await.0, 200);

    // Dweet until the disk has refused twenty in a row.
    let filler = disk.fill();
    let padding = "x".repeat(1500);
    let (mut accepted, mut refused, mut refused_in_a_row) = (Vec::new(), 0, 0);
    for i in 0..20_000 {
        match client
            .dweet_for(&name, &json!({ "i": i, "pad": padding }), None)
            .await
        {
            Ok(dweet) => {
                accepted.push(dweet.created.as_str().to_owned());
                refused_in_a_row = 0;
            }
            Err(error) => {
                assert!(
                    error.to_string().contains("could not store"),
                    "a full disk is said as such: {error}"
                );
                refused += 1;
                refused_in_a_row += 1;
                if refused_in_a_row == 20 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused_in_a_row, 20, "the disk never filled");
    let (status, said) = health(&server).await;
    assert_eq!(
        status, 503,
        "a store that cannot commit is unhealthy: {said}"
    );
    assert!(said.contains("cannot commit"), "{said}");

    // Nothing refused is visible: not in the history, not as the latest, not to a listener.
    let mut history = created_of(&client.get_dweets_for(&name, None).await.unwrap());
    history.reverse();
    assert_eq!(history, accepted, "{refused} refused");
    if let Some(newest) = accepted.last() {
        let latest = client.get_latest_dweet_for(&name, None).await.unwrap();
        assert_eq!(latest.created.as_str(), newest);
    }
    let mut heard = Vec::new();
    while let Ok(Some(Ok(dweet))) =
        tokio::time::timeout(Duration::from_millis(500), listener.next()).await
    {
        heard.push(dweet.created.as_str().to_owned());
    }
    assert_eq!(heard, accepted, "a listener hears only what was stored");

    // Space comes back: the store reopens by itself and writes again, with no restart.
    std::fs::remove_file(&filler).unwrap();
    let mut healed = None;
    for attempt in 0..50 {
        match client
            .dweet_for(&name, &json!({ "after": attempt }), None)
            .await
        {
            Ok(dweet) => {
                healed = Some(dweet.created.as_str().to_owned());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let healed = healed.expect("writes succeed again once the disk has room");
    accepted.push(healed);
    let (status, said) = health(&server).await;
    assert_eq!(status, 200, "healthy again: {said}");
    server.shutdown().await;

    // And what was acknowledged is what a restart finds.
    let server = durable(&data, |config| {
        config.limits.max_history = 100_000;
    })
    .await;
    let client = client_for(&server);
    let mut history = created_of(&client.get_dweets_for(&name, None).await.unwrap());
    history.reverse();
    assert_eq!(history, accepted);
    server.shutdown().await;
    drop(disk);
}
