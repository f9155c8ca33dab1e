//! Lock and alert lifecycle against the sandbox: `plan`, `apply` (as processes, reading keys
//! from the environment) and `run`'s reconciler (correcting drift made by hand).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use dweetpipe::client::{Client, Error as ClientError};
use dweetpipe::config::Config;

use crate::common::{KEY, LOCK, OTHER_KEY, OTHER_LOCK, client_for, key, sandbox, thing};
use crate::worker::{start_worker, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");
const KEY_VARIABLE: &str = "LIFECYCLE_TEST_KEY";
const HOT: &str = "if(dweet.sensors.TemperatureC > 40) return 'too hot';";
const VERY_HOT: &str = "if(dweet.sensors.TemperatureC > 60) return 'very hot';";

/// A things file for one managed thing (`manage = true`, so a missing lock or alert means
/// "none"): `lock` and `alert` (recipients, condition) optional.
fn things_file(
    dir: &Path,
    url: &str,
    name: &str,
    lock: Option<&str>,
    alert: Option<(&[&str], &str)>,
    extra: &str,
) -> PathBuf {
    let mut text = format!(
        "{extra}\n[source]\nurl = \"{url}\"\n\n[[thing]]\nname = \"{name}\"\nkey_env = \"{KEY_VARIABLE}\"\nmanage = true\n"
    );
    if let Some(lock) = lock {
        text.push_str(&format!("lock = \"{lock}\"\n"));
    }
    if let Some((to, when)) = alert {
        let to: Vec<String> = to.iter().map(|a| format!("\"{a}\"")).collect();
        text.push_str(&format!(
            "[thing.alert]\nto = [{}]\nwhen = \"{}\"\n",
            to.join(", "),
            when.replace('"', "\\\"")
        ));
    }
    let path = dir.join("things.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn dweetpipe(verb: &str, config: &Path, key: &str) -> Output {
    tokio::process::Command::new(BIN)
        .args([verb, "--config", config.to_str().unwrap()])
        .env(KEY_VARIABLE, key)
        .env("RUST_LOG", "debug")
        .output()
        .await
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn is_locked(client: &Client, name: &str) -> bool {
    match client.get_latest_dweet_for(name, None).await {
        Err(ClientError::Locked { .. }) => true,
        Ok(_) | Err(ClientError::NotFound { .. }) => false,
        Err(other) => panic!("unexpected answer: {other}"),
    }
}

async fn alert_condition(client: &Client, name: &str) -> Option<String> {
    match client.get_alert(name, &key()).await {
        Ok(alert) => Some(alert.condition),
        Err(ClientError::NotFound { .. }) => None,
        Err(other) => panic!("unexpected answer: {other}"),
    }
}

/// One managed thing's things file, rewritten and run through plan/apply step by step, with
/// everything printed kept for the key check.
struct Session {
    dir: tempfile::TempDir,
    url: String,
    name: String,
    transcript: String,
}

impl Session {
    async fn run(
        &mut self,
        verb: &str,
        lock: Option<&str>,
        alert: Option<(&[&str], &str)>,
    ) -> (bool, String) {
        let config = things_file(self.dir.path(), &self.url, &self.name, lock, alert, "");
        let output = dweetpipe(verb, &config, KEY).await;
        self.transcript.push_str(&text(&output));
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }
}

#[tokio::test]
async fn plan_changes_nothing_and_apply_converges_in_both_directions() {
    let server = sandbox().await;
    let client = client_for(&server);
    // A thing absent from the file, locked and alerted by hand: never touched.
    let bystander = thing("bystander");
    let other_key = dweetpipe::client::Key::new(OTHER_KEY);
    client
        .lock(&bystander, OTHER_LOCK, &other_key)
        .await
        .unwrap();
    client
        .set_alert(&bystander, &["x@example.com"], "return 1;", &other_key)
        .await
        .unwrap();
    let recipients: &[&str] = &["ops@example.com", "oncall@example.com"];
    let mut session = Session {
        dir: tempfile::tempdir().unwrap(),
        url: server.base_url(),
        name: thing("managed"),
        transcript: String::new(),
    };
    let name = session.name.clone();

    let (ok, plan) = session
        .run("plan", Some(LOCK), Some((recipients, HOT)))
        .await;
    assert!(ok, "{}", session.transcript);
    assert!(
        plan.contains(&format!("{name}: will lock with \"{LOCK}\"")),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("{name}: will set alert to ops@example.com")),
        "{plan}"
    );
    assert!(!is_locked(&client, &name).await, "plan must not lock");

    let (ok, applied) = session
        .run("apply", Some(LOCK), Some((recipients, HOT)))
        .await;
    assert!(ok, "{}", session.transcript);
    assert_eq!(applied.matches(": done").count(), 2, "{applied}");
    assert!(is_locked(&client, &name).await);
    let alert = client.get_alert(&name, &key()).await.unwrap();
    assert_eq!(alert.condition, HOT);
    let addresses: Vec<&str> = alert
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(addresses, recipients);

    let (ok, again) = session
        .run("apply", Some(LOCK), Some((recipients, HOT)))
        .await;
    assert!(
        ok && again.contains("Nothing to change") && !again.contains("done"),
        "{again}"
    );

    // A new condition replaces the alert.
    let (_, plan) = session
        .run("plan", Some(LOCK), Some((recipients, VERY_HOT)))
        .await;
    assert!(plan.contains("will replace alert"), "{plan}");
    let (ok, _) = session
        .run("apply", Some(LOCK), Some((recipients, VERY_HOT)))
        .await;
    assert!(ok, "{}", session.transcript);
    assert_eq!(
        alert_condition(&client, &name).await.as_deref(),
        Some(VERY_HOT)
    );

    // The alert leaves the file: removed, the lock stays.
    let (_, applied) = session.run("apply", Some(LOCK), None).await;
    assert!(applied.contains("remove alert: done"), "{applied}");
    assert_eq!(alert_condition(&client, &name).await, None);
    assert!(is_locked(&client, &name).await);

    // The lock leaves the file: unlocked.
    let (_, applied) = session.run("apply", None, None).await;
    assert!(applied.contains("unlock: done"), "{applied}");
    assert!(!is_locked(&client, &name).await);

    // And back: lock and alert in one apply from an unlocked thing.
    let (ok, _) = session
        .run("apply", Some(LOCK), Some((recipients, HOT)))
        .await;
    assert!(ok, "{}", session.transcript);
    assert!(is_locked(&client, &name).await);
    assert_eq!(alert_condition(&client, &name).await.as_deref(), Some(HOT));

    let bystander_alert = client
        .get_alert(&bystander, &other_key)
        .await
        .expect("the bystander keeps its alert");
    assert_eq!(bystander_alert.condition, "return 1;");
    assert!(is_locked(&client, &bystander).await);
    assert!(
        !session.transcript.contains(KEY),
        "a key was printed:\n{}",
        session.transcript
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_alone_is_for_reading_and_run_never_unlocks_or_removes_an_alert_unasked() {
    let server = sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    // The README's pattern: the key of a locked, alerted thing, to ingest it; beside it a
    // thing the file does manage.
    let read_only = thing("S5D9-63de");
    let managed = thing("managed");
    client.lock(&read_only, LOCK, &key()).await.unwrap();
    client
        .set_alert(&read_only, &["x@example.com"], HOT, &key())
        .await
        .unwrap();
    let path = dir.path().join("things.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\n[lifecycle]\ninterval = \"1s\"\n\n[[thing]]\nname = \"{read_only}\"\nkey_env = \"{KEY_VARIABLE}\"\n\n[[thing]]\nname = \"{managed}\"\nkey_env = \"{KEY_VARIABLE}\"\nlock = \"{OTHER_LOCK}\"\n",
            server.base_url()
        ),
    )
    .unwrap();
    let plan = dweetpipe("plan", &path, KEY).await;
    assert!(
        text(&plan).contains(&format!("{read_only}: not managed")),
        "{}",
        text(&plan)
    );
    let config = Config::load_with_env(&path, |variable| {
        (variable == KEY_VARIABLE).then(|| KEY.to_owned())
    })
    .unwrap();
    let mut config = config;
    config.parquet = Some(dweetpipe::sink::parquet::ParquetConfig::new(
        dir.path().join("parquet"),
    ));
    let (worker, metrics) = start_worker(config).await;
    // Two reconciliations at least (start, then the 1 s interval).
    wait_for("the managed thing locked", Duration::from_secs(10), || {
        metrics.value("dweetpipe_lifecycle_actions_total", &[("kind", "lock")]) >= 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(is_locked(&client, &read_only).await, "still locked");
    assert_eq!(
        alert_condition(&client, &read_only).await.as_deref(),
        Some(HOT),
        "its alert is still there"
    );
    assert_eq!(
        metrics.value(
            "dweetpipe_lifecycle_actions_total",
            &[("thing", &read_only)]
        ),
        0.0,
        "nothing was done to it"
    );
    worker.shutdown(Duration::from_secs(5)).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_wrong_master_key_is_reported_and_nothing_changes() {
    let server = sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let name = thing("wrong-key");
    client.lock(&name, LOCK, &key()).await.unwrap();
    let config = things_file(
        dir.path(),
        &server.base_url(),
        &name,
        Some(LOCK),
        Some((&["ops@example.com"], HOT)),
        "",
    );
    for verb in ["plan", "apply"] {
        let output = dweetpipe(verb, &config, OTHER_KEY).await;
        let all = text(&output);
        assert!(!output.status.success(), "{verb} must fail:\n{all}");
        assert!(
            !all.contains("Nothing to change"),
            "{verb} says nothing misleading:\n{all}"
        );
        assert!(all.contains("does not open it"), "{verb}:\n{all}");
        assert!(
            all.contains(KEY_VARIABLE),
            "names where the key came from:\n{all}"
        );
        assert!(
            !all.contains(OTHER_KEY) && !all.contains(KEY),
            "{verb} printed a key:\n{all}"
        );
    }
    assert_eq!(alert_condition(&client, &name).await, None);

    // A lock id the server does not know: apply fails with the server's reason, and says the
    // alert that needed the lock was not tried.
    let config = things_file(
        dir.path(),
        &server.base_url(),
        &thing("unknown-lock"),
        Some("no-such-lock"),
        Some((&["ops@example.com"], HOT)),
        "",
    );
    let output = dweetpipe("apply", &config, KEY).await;
    assert!(!output.status.success());
    let all = text(&output);
    assert!(all.contains("FAILED"), "{all}");
    assert!(
        all.contains("set alert") && all.contains("not tried, because lock"),
        "{all}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_reconciles_at_start_on_reload_and_corrects_drift() {
    let server = sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let name = thing("run");
    let lifecycle = "[lifecycle]\ninterval = \"1s\"\n";
    let load = |path: &Path| {
        Config::load_with_env(path, |variable| {
            (variable == KEY_VARIABLE).then(|| KEY.to_owned())
        })
        .unwrap()
    };
    let mut config = load(&things_file(
        dir.path(),
        &server.base_url(),
        &name,
        Some(LOCK),
        Some((&["ops@example.com"], HOT)),
        lifecycle,
    ));
    config.parquet = Some(dweetpipe::sink::parquet::ParquetConfig::new(
        dir.path().join("parquet"),
    ));
    let (mut worker, metrics) = start_worker(config).await;

    let set_alerts = |metrics: &dweetpipe::telemetry::Metrics| {
        metrics.value(
            "dweetpipe_lifecycle_actions_total",
            &[
                ("thing", name.as_str()),
                ("kind", "set_alert"),
                ("outcome", "ok"),
            ],
        )
    };
    wait_for("the alert set at start", Duration::from_secs(10), || {
        set_alerts(&metrics) == 1.0
    })
    .await;
    assert!(is_locked(&client, &name).await);
    assert_eq!(alert_condition(&client, &name).await.as_deref(), Some(HOT));

    // Drift by hand: the alert is removed; the next check puts it back.
    client.remove_alert(&name, &key()).await.unwrap();
    wait_for("the drift corrected", Duration::from_secs(10), || {
        set_alerts(&metrics) == 2.0
    })
    .await;
    assert_eq!(alert_condition(&client, &name).await.as_deref(), Some(HOT));
    assert_eq!(metrics.value("dweetpipe_lifecycle_problems", &[]), 0.0);

    // A reload without the alert removes it at once.
    let mut reloaded = load(&things_file(
        dir.path(),
        &server.base_url(),
        &name,
        Some(LOCK),
        None,
        lifecycle,
    ));
    reloaded.parquet = Some(dweetpipe::sink::parquet::ParquetConfig::new(
        dir.path().join("parquet"),
    ));
    worker.reload(reloaded).await.unwrap();
    wait_for(
        "the alert removed after reload",
        Duration::from_secs(10),
        || {
            metrics.value(
                "dweetpipe_lifecycle_actions_total",
                &[("kind", "remove_alert"), ("outcome", "ok")],
            ) == 1.0
        },
    )
    .await;
    assert_eq!(alert_condition(&client, &name).await, None);
    assert!(is_locked(&client, &name).await);
    let scraped = metrics.encode();
    assert!(!scraped.contains(KEY), "a key is in the metrics");
    assert!(scraped.contains("dweetpipe_lifecycle_drift "), "{scraped}");
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    server.shutdown().await;
}
