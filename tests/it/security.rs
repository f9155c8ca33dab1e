//! Secrets in a full run: every log line, metric, health answer, error and plan/apply/check/
//! migrate output of a worker with locked things, managed alerts and PostgreSQL is searched
//! for the lock keys and the database password.

use std::time::Duration;

use dweetpipe::client::Key;
use serde_json::json;
use tokio::process::Command;

use crate::common::{KEY, LOCK, OTHER_KEY, OTHER_LOCK, client_for, sandbox_with, thing};
use crate::postgres::TestDatabase;
use crate::worker::{WorkerProcess, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");
/// A key configured for a thing it does not open: it must stay as secret as a right one.
const WRONG_KEY: &str = "wrong-key-5e1f0a77";

/// `url` with a password: its own if it has one, else an invented one (trust authentication,
/// as on the test servers, ignores it; the point is that it is present everywhere a URL goes).
fn with_password(url: &str) -> (String, String) {
    let mut parsed = reqwest::Url::parse(url).expect("a database URL");
    if let Some(password) = parsed.password() {
        return (url.to_owned(), password.to_owned());
    }
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    parsed
        .set_password(Some(&password))
        .expect("a URL with a host");
    (parsed.to_string(), password)
}

fn collect(transcript: &mut String, output: &std::process::Output) {
    transcript.push_str(&String::from_utf8_lossy(&output.stdout));
    transcript.push_str(&String::from_utf8_lossy(&output.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_run_never_prints_keys_or_the_database_password() {
    let db = TestDatabase::create().await;
    let (database_url, password) = with_password(&db.url);
    // The source URL carries a password too (a proxy or a server behind basic auth).
    let source_password = format!("src-{}", uuid::Uuid::new_v4().simple());
    let server = sandbox_with(|_| {}).await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let (managed, foreign, plain) = (thing("managed"), thing("foreign"), thing("plain"));
    client
        .lock(&foreign, OTHER_LOCK, &Key::new(OTHER_KEY))
        .await
        .unwrap();
    let metrics_port = crate::common::free_port();
    let source_url =
        server
            .base_url()
            .replacen("http://", &format!("http://probe:{source_password}@"), 1);
    let config = dir.path().join("things.toml");
    std::fs::write(
        &config,
        format!(
            r#"shutdown_timeout = "10s"
[source]
url = "{url}"
reconnect_min = "50ms"
reconnect_max = "500ms"
start_spread = "0s"

[[thing]]
name = "{managed}"
lock = "{LOCK}"
key_env = "MANAGED_KEY"
[thing.alert]
to = ["ops@example.com"]
when = "if(dweet.v > 10) return 'high';"

[[thing]]
name = "{foreign}"
key_env = "FOREIGN_KEY"
manage = true

[[thing]]
name = "{plain}"

[lifecycle]
interval = "1s"

[parquet]
dir = "{parquet}"
rotate_after = "300ms"

[postgres]
url_env = "SECRET_DATABASE_URL"
spool_dir = "{spool}"

[metrics]
listen = "127.0.0.1:{metrics_port}"
"#,
            url = source_url,
            parquet = dir.path().join("parquet").display(),
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let env = [
        ("MANAGED_KEY", KEY),
        ("FOREIGN_KEY", WRONG_KEY),
        ("SECRET_DATABASE_URL", database_url.as_str()),
    ];
    let cli = |args: &[&str]| {
        let mut command = Command::new(BIN);
        command.args(args).env("RUST_LOG", "debug");
        for (name, value) in env {
            command.env(name, value);
        }
        command
    };
    let config_arg = config.to_str().unwrap();
    let mut transcript = String::new();
    for verb in ["check", "plan", "apply", "plan"] {
        let output = cli(&[verb, "--config", config_arg]).output().await.unwrap();
        collect(&mut transcript, &output);
    }
    let migrate = cli(&["migrate"])
        .env("DATABASE_URL", &database_url)
        .output()
        .await
        .unwrap();
    assert!(migrate.status.success());
    collect(&mut transcript, &migrate);
    // A server that is not there: the error names the host, never the password.
    let unreachable = format!("postgres://dweetpipe:{password}@127.0.0.1:1/nowhere");
    let failed = cli(&["migrate"])
        .env("DATABASE_URL", &unreachable)
        .output()
        .await
        .unwrap();
    assert!(!failed.status.success());
    collect(&mut transcript, &failed);

    let mut worker = WorkerProcess::spawn(&config, &env, dir.path().join("worker.log"));
    wait_for("the worker", Duration::from_secs(20), || {
        worker.log().contains("worker started")
    })
    .await;
    for v in 0..5 {
        client
            .dweet_for(&managed, &json!({ "v": v * 5 }), Some(&Key::new(KEY)))
            .await
            .unwrap();
        client
            .dweet_for(&plain, &json!({ "v": v }), None)
            .await
            .unwrap();
    }
    // Drift by hand, corrected by the running worker.
    client.remove_alert(&managed, &Key::new(KEY)).await.unwrap();
    wait_for("the drift corrected", Duration::from_secs(20), || {
        worker.log().matches("lifecycle change made").count() >= 1
            && worker.log().contains("set_alert")
    })
    .await;
    worker.signal("-HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        worker.log().contains("configuration reloaded")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for path in ["metrics", "healthz", "readyz"] {
        let answer = reqwest::get(format!("http://127.0.0.1:{metrics_port}/{path}"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        transcript.push_str(&answer);
    }
    worker.signal("-TERM");
    assert!(worker.wait().await.success());
    let log = worker.log();
    transcript.push_str(&log);

    // The search means something only if the run did what it should.
    assert!(
        transcript.contains(&foreign) && transcript.contains("does not open it"),
        "the foreign thing was reported"
    );
    assert!(transcript.contains("lifecycle_actions_total"));
    assert!(log.contains(&managed));
    let mut connection = db.connect().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM dweets")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(
        rows, 10,
        "the password-bearing URL was used to store the dweets"
    );
    drop(connection);

    for secret in [
        KEY,
        OTHER_KEY,
        WRONG_KEY,
        password.as_str(),
        source_password.as_str(),
    ] {
        let hits: Vec<&str> = transcript
            .lines()
            .filter(|line| line.contains(secret))
            .collect();
        assert!(hits.is_empty(), "{secret} leaked in:\n{}", hits.join("\n"));
    }
    eprintln!(
        "searched {} lines ({} bytes) for 5 secrets: 0 hits",
        transcript.lines().count(),
        transcript.len()
    );
    server.shutdown().await;
    db.drop_now().await;
}
