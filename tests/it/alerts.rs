//! Alert evaluation in the sandbox, over TCP: conditions open and close alerts, a runaway
//! condition is stopped while the server keeps serving, notifications reach the outbox and an
//! SMTP relay, and `dweetpipe alert test` replays recorded dweets.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dweetpipe::client::{AlertStatus, Client};
use dweetpipe::sandbox::EvaluationLimits;
use dweetpipe::sandbox::notify::{LogNotifier, Notify, OutboxNotifier, SmtpNotifier};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::common::{LOCK, client_for, key, sandbox_with, thing};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");
/// The condition of the protocol page.
const PROTOCOL_EXAMPLE: &str = "if(dweet.alertValue > 10) return 'TEST: Greater than 10';";

/// A thing locked with `LOCK` carrying `condition`.
async fn alerted_thing(client: &Client, label: &str, condition: &str) -> String {
    let name = thing(label);
    client.lock(&name, LOCK, &key()).await.unwrap();
    client
        .set_alert(
            &name,
            &["ops@example.com", "oncall@example.com"],
            condition,
            &key(),
        )
        .await
        .unwrap();
    name
}

async fn status(client: &Client, name: &str) -> AlertStatus {
    client
        .get_alert(name, &key())
        .await
        .unwrap()
        .status
        .expect("get_alert has a status")
}

fn outbox_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("outbox lines are JSON"))
        .collect()
}

async fn wait_for_lines(path: &Path, count: usize) -> Vec<Value> {
    for _ in 0..200 {
        let lines = outbox_lines(path);
        if lines.len() >= count {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "the outbox never reached {count} lines: {:?}",
        outbox_lines(path)
    );
}

#[tokio::test]
async fn the_protocol_example_opens_and_closes_the_alert() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.jsonl");
    let notifier: Arc<dyn Notify> = Arc::new(OutboxNotifier::new(&outbox));
    let server =
        sandbox_with(|config| config.notifiers = vec![Arc::new(LogNotifier), notifier]).await;
    let client = client_for(&server);
    let name = alerted_thing(&client, "opens", PROTOCOL_EXAMPLE).await;
    assert_eq!(
        status(&client, &name).await,
        AlertStatus {
            message: String::new(),
            since: None,
            open: false,
            alerts_sent_today: 0,
            alerts_allowed_today: 100,
        }
    );

    let quiet = client
        .dweet_for(&name, &json!({"alertValue": 3}), Some(&key()))
        .await
        .unwrap();
    assert!(!status(&client, &name).await.open);
    let fired = client
        .dweet_for(&name, &json!({"alertValue": 11}), Some(&key()))
        .await
        .unwrap();
    let open = status(&client, &name).await;
    assert!(open.open);
    assert_eq!(open.message, "TEST: Greater than 10");
    assert_eq!(open.since.as_deref(), Some(fired.created.as_str()));
    assert_eq!(open.alerts_sent_today, 1);
    // Firing again while open sends nothing more and keeps `since`.
    client
        .dweet_for(&name, &json!({"alertValue": 12}), Some(&key()))
        .await
        .unwrap();
    let still = status(&client, &name).await;
    assert_eq!((still.open, still.alerts_sent_today), (true, 1));
    assert_eq!(still.since, open.since);
    let closed_by = client
        .dweet_for(&name, &json!({"alertValue": 1}), Some(&key()))
        .await
        .unwrap();
    let closed = status(&client, &name).await;
    assert_eq!(
        (closed.open, closed.since, closed.message.as_str()),
        (false, None, "")
    );
    assert!(quiet.created < fired.created);

    let lines = wait_for_lines(&outbox, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["kind"], "opened");
    assert_eq!(lines[0]["thing"], name.as_str());
    assert_eq!(lines[0]["message"], "TEST: Greater than 10");
    assert_eq!(lines[0]["created"], fired.created.as_str());
    assert_eq!(
        lines[0]["recipients"],
        json!(["ops@example.com", "oncall@example.com"])
    );
    assert_eq!(lines[1]["kind"], "closed");
    assert_eq!(lines[1]["created"], closed_by.created.as_str());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_condition_is_stopped_and_the_sandbox_keeps_serving() {
    let server = sandbox_with(|config| {
        config.alert_limits = EvaluationLimits {
            time: Duration::from_millis(100),
            ..EvaluationLimits::default()
        };
        config.alert_threads = 1;
    })
    .await;
    let client = client_for(&server);
    let name = alerted_thing(&client, "runaway", "while(true){}").await;
    let hungry = "var a = []; while(true) { a.push(new Array(100000).join('x')); }";
    let bystander = thing("bystander");
    for (condition, rounds) in [("while(true){}", 0..6), (hungry, 6..12)] {
        client
            .set_alert(&name, &["ops@example.com"], condition, &key())
            .await
            .unwrap();
        // Dweets to the runaway condition, all at once, while other traffic goes on.
        let runaways: Vec<_> = rounds
            .clone()
            .map(|i| {
                let client = client.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    client
                        .dweet_for(&name, &json!({ "i": i }), Some(&key()))
                        .await
                })
            })
            .collect();
        for i in rounds {
            client
                .dweet_for(&bystander, &json!({ "i": i }), None)
                .await
                .unwrap();
        }
        for runaway in runaways {
            let written = tokio::time::timeout(Duration::from_secs(30), runaway)
                .await
                .expect("a dweet to a runaway condition is answered")
                .unwrap();
            assert!(written.is_ok(), "the dweet stands: {written:?}");
        }
        assert!(!status(&client, &name).await.open, "no verdict, no change");
    }
    assert_eq!(
        client.get_dweets_for(&bystander, None).await.unwrap().len(),
        12
    );
    assert_eq!(
        client
            .get_dweets_for(&name, Some(&key()))
            .await
            .unwrap()
            .len(),
        12
    );
    // The engine still works after being interrupted and after running out of memory.
    client
        .set_alert(&name, &["ops@example.com"], "return dweet.x > 1;", &key())
        .await
        .unwrap();
    client
        .dweet_for(&name, &json!({"x": 2}), Some(&key()))
        .await
        .unwrap();
    assert_eq!(status(&client, &name).await.message, "true");
    // A condition that throws leaves the status alone too.
    client
        .set_alert(
            &name,
            &["ops@example.com"],
            "return dweet.no.such.path;",
            &key(),
        )
        .await
        .unwrap();
    client
        .dweet_for(&name, &json!({}), Some(&key()))
        .await
        .unwrap();
    assert!(!status(&client, &name).await.open);
    server.shutdown().await;
}

#[tokio::test]
async fn alerts_past_the_daily_allowance_are_recorded_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.jsonl");
    let server = sandbox_with(|config| {
        config.limits.alerts_allowed_per_day = 1;
        config.notifiers = vec![Arc::new(OutboxNotifier::new(&outbox))];
    })
    .await;
    let client = client_for(&server);
    let name = alerted_thing(&client, "allowance", PROTOCOL_EXAMPLE).await;
    for value in [11, 1, 11] {
        client
            .dweet_for(&name, &json!({"alertValue": value}), Some(&key()))
            .await
            .unwrap();
    }
    let status = status(&client, &name).await;
    assert_eq!(
        (
            status.open,
            status.alerts_sent_today,
            status.alerts_allowed_today
        ),
        (true, 1, 1)
    );
    let lines = wait_for_lines(&outbox, 3).await;
    let within: Vec<(&str, bool)> = lines
        .iter()
        .map(|line| {
            (
                line["kind"].as_str().unwrap(),
                line["within_allowance"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        within,
        [("opened", true), ("closed", true), ("opened", false)]
    );
    server.shutdown().await;
}

/// A one-connection SMTP relay that records what it is sent.
async fn fake_relay() -> (u16, tokio::task::JoinHandle<(Vec<String>, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"220 fake.relay ESMTP\r\n").await.unwrap();
        let mut recipients = Vec::new();
        let mut data = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            let command = line.to_ascii_uppercase();
            let reply: &[u8] = if command.starts_with("EHLO") || command.starts_with("HELO") {
                b"250 fake.relay\r\n"
            } else if command.starts_with("RCPT TO:") {
                recipients.push(line[8..].trim().to_owned());
                b"250 ok\r\n"
            } else if command.starts_with("DATA") {
                write.write_all(b"354 go ahead\r\n").await.unwrap();
                while let Some(body) = lines.next_line().await.unwrap() {
                    if body == "." {
                        break;
                    }
                    data.push_str(&body);
                    data.push('\n');
                }
                b"250 queued\r\n"
            } else if command.starts_with("QUIT") {
                write.write_all(b"221 bye\r\n").await.unwrap();
                break;
            } else {
                b"250 ok\r\n"
            };
            write.write_all(reply).await.unwrap();
        }
        (recipients, data)
    });
    (port, task)
}

#[tokio::test]
async fn opened_alerts_are_mailed_through_an_smtp_relay() {
    let (port, relay) = fake_relay().await;
    let smtp =
        SmtpNotifier::new(&format!("smtp://127.0.0.1:{port}"), "dweetpipe@example.com").unwrap();
    let server = sandbox_with(|config| config.notifiers = vec![Arc::new(smtp)]).await;
    let client = client_for(&server);
    let name = alerted_thing(&client, "mailed", PROTOCOL_EXAMPLE).await;
    client
        .dweet_for(&name, &json!({"alertValue": 50}), Some(&key()))
        .await
        .unwrap();
    let (recipients, data) = tokio::time::timeout(Duration::from_secs(20), relay)
        .await
        .expect("the relay got a message")
        .unwrap();
    assert_eq!(recipients, ["<ops@example.com>", "<oncall@example.com>"]);
    // Long headers are folded onto continuation lines.
    let data = data.replace("\n ", " ");
    assert!(
        data.contains(&format!(
            "Subject: dweet alert for {name}: TEST: Greater than 10"
        )),
        "{data}"
    );
    assert!(data.contains("From: dweetpipe@example.com"), "{data}");
    server.shutdown().await;
}

#[test]
fn an_smtp_url_with_a_password_is_never_repeated_in_errors() {
    let error = SmtpNotifier::new("smtp://user:hunter2@", "dweetpipe@example.com").unwrap_err();
    assert!(!error.to_string().contains("hunter2"), "{error}");
    let notifier =
        SmtpNotifier::new("smtps://user:hunter2@mail.example.com:465", "a@example.com").unwrap();
    let debug = format!("{notifier:?}");
    assert!(
        debug.contains("mail.example.com") && !debug.contains("hunter2"),
        "{debug}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn alert_test_replays_recorded_dweets() {
    let server = sandbox_with(|_| {}).await;
    let client = client_for(&server);
    let name = thing("replay");
    for value in [5, 45, 50, 30, 20, 41] {
        client
            .dweet_for(&name, &json!({"sensors": {"TemperatureC": value}}), None)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let recorded = dir.path().join("recorded.jsonl");
    let history = tokio::process::Command::new(BIN)
        .args(["--server", &server.base_url(), "history", &name])
        .output()
        .await
        .unwrap();
    assert!(history.status.success());
    let mut file = history.stdout.clone();
    file.extend_from_slice(b"this line is not a dweet\n");
    std::fs::write(&recorded, file).unwrap();

    let output = tokio::process::Command::new(BIN)
        .args(["alert", "test", "--when"])
        .arg("if(dweet.sensors.TemperatureC > 40) return 'too hot: ' + dweet.sensors.TemperatureC;")
        .arg(&recorded)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_once(name.as_str()))
        .map(|(_, event)| event.trim())
        .collect();
    // History is newest first; the replay runs oldest first.
    assert_eq!(
        events,
        ["OPEN   too hot: 45", "CLOSE", "OPEN   too hot: 41"],
        "{stdout}"
    );
    assert!(
        stdout.contains("6 dweets of 1 thing(s): fired on 3, opened 2 time(s), closed 1"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 7: not a dweet"));

    let broken = tokio::process::Command::new(BIN)
        .args(["alert", "test", "--when", "if(", recorded.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!broken.status.success());
    assert!(String::from_utf8_lossy(&broken.stderr).contains("does not parse"));
    server.shutdown().await;
}
