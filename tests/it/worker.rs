//! The ingest worker against the sandbox: streaming, backfill, restarts (clean and SIGKILL),
//! reloads, bad configuration, dead letters, and keys kept secret. Parquet output is read back
//! with the parquet crate and compared with what the sandbox accepted.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow_array::{Array, StringArray, TimestampMillisecondArray};
use dweetpipe::client::{Client, Key};
use dweetpipe::config::Config;
use dweetpipe::sandbox::simulator::{FleetConfig, FleetStats, run_fleet, thing_name};
use dweetpipe::sandbox::{self, SandboxConfig, SandboxHandle};
use dweetpipe::sink::parquet::ParquetConfig;
use dweetpipe::source::SourceConfig;
use dweetpipe::source::ThingConfig;
use dweetpipe::telemetry::Metrics;
use dweetpipe::worker::{self, WorkerHandle};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::json;
use tokio::process::{Child, Command};

use crate::common::{KEY, LOCK, OTHER_LOCK, client_for, sandbox_with, thing};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");

/// A worker config for tests: fast reconnects, no start spread, quick rotation.
pub(crate) fn test_config(url: &str, things: &[String], dir: &Path) -> Config {
    Config {
        path: PathBuf::from("(test)"),
        source: Some(SourceConfig {
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(500),
            start_spread: Duration::ZERO,
            refused_retry: Duration::from_millis(500),
            ..SourceConfig::new(url)
        }),
        things: things
            .iter()
            .map(|name| ThingConfig::unlocked(name.clone()))
            .collect(),
        parquet: Some(ParquetConfig {
            rotate_after: Duration::from_millis(500),
            ..ParquetConfig::new(dir)
        }),
        postgres: None,
        metrics: None,
        lifecycle: None,
        cluster: None,
        nats: None,
        shutdown_timeout: Duration::from_secs(10),
    }
}

pub(crate) async fn start_worker(config: Config) -> (WorkerHandle, std::sync::Arc<Metrics>) {
    let worker = worker::start(config).await.expect("the worker starts");
    let metrics = worker.metrics().clone();
    (worker, metrics)
}

pub(crate) async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn wait_streams_up(metrics: &Metrics, things: usize) {
    wait_for("streams up", Duration::from_secs(10), || {
        metrics.value("dweetpipe_stream_up", &[]) == things as f64
    })
    .await;
}

pub(crate) fn received(metrics: &Metrics) -> f64 {
    metrics.value("dweetpipe_dweets_received_total", &[])
}

/// Every finalised file of a dataset.
fn parquet_files(dir: &Path, dataset: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(partitions) = std::fs::read_dir(dir.join(dataset)) else {
        return files;
    };
    for partition in partitions.flatten() {
        for file in std::fs::read_dir(partition.path()).unwrap().flatten() {
            let path = file.path();
            if path.extension().is_some_and(|e| e == "parquet")
                && !path.file_name().unwrap().to_string_lossy().starts_with('.')
            {
                files.push(path);
            }
        }
    }
    files
}

fn leftover_temporaries(dir: &Path) -> usize {
    ["readings", "dweets", "dead_letters"]
        .iter()
        .flat_map(|dataset| {
            std::fs::read_dir(dir.join(dataset))
                .into_iter()
                .flatten()
                .flatten()
        })
        .flat_map(|partition| {
            std::fs::read_dir(partition.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|file| file.file_name().to_string_lossy().ends_with(".tmp"))
        .count()
}

/// Every record batch of a dataset's finalised files.
fn batches(dir: &Path, dataset: &str) -> Vec<arrow_array::RecordBatch> {
    parquet_files(dir, dataset)
        .iter()
        .flat_map(|path| {
            ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(|batch| batch.unwrap())
        })
        .collect()
}

fn strings<'a>(batch: &'a arrow_array::RecordBatch, column: &str) -> &'a StringArray {
    batch
        .column_by_name(column)
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap()
}

/// (thing, created ms) of every raw dweet in the Parquet output, duplicates kept.
pub(crate) fn parquet_dweets(dir: &Path) -> Vec<(String, i64)> {
    let mut keys = Vec::new();
    for batch in batches(dir, "dweets") {
        let things = strings(&batch, "thing");
        let created = batch
            .column_by_name("created")
            .unwrap()
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap();
        keys.extend(
            (0..batch.num_rows()).map(|row| (things.value(row).to_owned(), created.value(row))),
        );
    }
    keys
}

/// Rows of a dataset, as (first string column, row count) per file: enough to count.
fn parquet_rows(dir: &Path, dataset: &str) -> usize {
    parquet_files(dir, dataset)
        .iter()
        .map(|path| {
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
            builder.metadata().file_metadata().num_rows() as usize
        })
        .sum()
}

/// (thing, created as sent) of every dead letter in the Parquet output, duplicates kept.
pub(crate) fn parquet_dead_letters(dir: &Path) -> Vec<(String, String)> {
    batches(dir, "dead_letters")
        .iter()
        .flat_map(|batch| {
            let things = strings(batch, "thing");
            let created = strings(batch, "created");
            (0..batch.num_rows())
                .map(|row| (things.value(row).to_owned(), created.value(row).to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn dead_letter_reasons(dir: &Path) -> Vec<String> {
    batches(dir, "dead_letters")
        .iter()
        .flat_map(|batch| {
            let reasons = strings(batch, "reason");
            (0..reasons.len())
                .map(|i| reasons.value(i).to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What the sandbox accepted, as (thing, created ms).
pub(crate) async fn sandbox_dweets(
    client: &Client,
    things: &[String],
    key: Option<&Key>,
) -> BTreeSet<(String, i64)> {
    let mut accepted = BTreeSet::new();
    for thing in things {
        if let Ok(dweets) = client.get_dweets_for(thing, key).await {
            for dweet in dweets {
                accepted.insert((
                    thing.clone(),
                    dweet.created.to_datetime().unwrap().timestamp_millis(),
                ));
            }
        }
    }
    accepted
}

pub(crate) fn assert_exactly_once(dir: &Path, expected: &BTreeSet<(String, i64)>) {
    let stored = parquet_dweets(dir);
    let unique: BTreeSet<_> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), unique.len(), "no dweet is stored twice");
    let missing: Vec<_> = expected.difference(&unique).take(5).collect();
    let extra: Vec<_> = unique.difference(expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(leftover_temporaries(dir), 0, "no temporary files left");
}

pub(crate) async fn big_sandbox() -> SandboxHandle {
    sandbox_with(|c| c.limits.max_history = 100_000).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_streams_into_parquet_exactly_once() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("fleet"));
    let things: Vec<String> = (1..=5).map(|i| thing_name(&prefix, i)).collect();
    let (worker, metrics) =
        start_worker(test_config(&server.base_url(), &things, dir.path())).await;
    wait_streams_up(&metrics, 5).await;

    let stats = std::sync::Arc::new(FleetStats::default());
    let fleet = FleetConfig {
        things: 5,
        interval: Duration::from_millis(100),
        count: Some(8),
        prefix,
        odd_every: Some(3),
        ..FleetConfig::default()
    };
    run_fleet(client_for(&server), fleet, stats.clone()).await;
    assert_eq!(stats.sent(), 40);
    wait_for("40 dweets", Duration::from_secs(10), || {
        received(&metrics) >= 40.0
    })
    .await;
    assert_eq!(
        metrics.value("dweetpipe_dweets_received_total", &[("source", "stream")]),
        40.0
    );
    worker.shutdown(Duration::from_secs(10)).await.unwrap();

    let expected = sandbox_dweets(&client_for(&server), &things, None).await;
    assert_eq!(expected.len(), 40);
    assert_exactly_once(dir.path(), &expected);
    assert!(
        parquet_rows(dir.path(), "readings") >= 40 * 8,
        "numeric leaves become readings"
    );
    assert!(
        metrics.value(
            "dweetpipe_parquet_files_finalized_total",
            &[("dataset", "dweets")]
        ) >= 2.0,
        "rotation sealed more than one generation"
    );
    assert_eq!(
        metrics.value("dweetpipe_sink_rows_written_total", &[("table", "dweets")]),
        40.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_fills_gaps_and_a_restart_adds_no_duplicates() {
    let server = big_sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let name = thing("backfill");
    for i in 0..10 {
        client
            .dweet_for(&name, &json!({ "before": i }), None)
            .await
            .unwrap();
    }
    let things = vec![name.clone()];
    let (first, metrics) = start_worker(test_config(&server.base_url(), &things, dir.path())).await;
    wait_for("the backfill", Duration::from_secs(10), || {
        metrics.value("dweetpipe_dweets_received_total", &[("source", "backfill")]) == 10.0
    })
    .await;
    wait_streams_up(&metrics, 1).await;
    for i in 0..5 {
        client
            .dweet_for(&name, &json!({ "during": i }), None)
            .await
            .unwrap();
    }
    wait_for("15 dweets", Duration::from_secs(10), || {
        received(&metrics) == 15.0
    })
    .await;
    first.shutdown(Duration::from_secs(10)).await.unwrap();

    // Dweets while no worker runs, then a new worker on the same directory.
    for i in 0..3 {
        client
            .dweet_for(&name, &json!({ "gap": i }), None)
            .await
            .unwrap();
    }
    let (second, metrics) =
        start_worker(test_config(&server.base_url(), &things, dir.path())).await;
    wait_for("the gap", Duration::from_secs(10), || {
        received(&metrics) == 3.0
    })
    .await;
    assert_eq!(
        metrics.value("dweetpipe_duplicates_dropped_total", &[]),
        15.0,
        "the 15 already stored are recognised"
    );
    second.shutdown(Duration::from_secs(10)).await.unwrap();

    let expected = sandbox_dweets(&client, &things, None).await;
    assert_eq!(expected.len(), 18);
    assert_exactly_once(dir.path(), &expected);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_closes_and_a_sandbox_restart_are_survived() {
    let server = sandbox_with(|c| c.idle_close = Duration::from_millis(300)).await;
    let addr = server.local_addr();
    let dir = tempfile::tempdir().unwrap();
    let name = thing("idle");
    let (worker, metrics) = start_worker(test_config(
        &server.base_url(),
        std::slice::from_ref(&name),
        dir.path(),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        metrics.value(
            "dweetpipe_stream_disconnects_total",
            &[("reason", "closed")]
        ) >= 2.0,
        "idle closes happened"
    );
    let client = client_for(&server);
    client
        .dweet_for(&name, &json!({ "after": "idle" }), None)
        .await
        .unwrap();
    wait_for(
        "the dweet after idle closes",
        Duration::from_secs(10),
        || received(&metrics) >= 1.0,
    )
    .await;

    server.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = sandbox::start(SandboxConfig {
        listen: addr,
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    let client = client_for(&restarted);
    // The restarted sandbox has no history; keep dweeting until the worker reconnects.
    let started = Instant::now();
    while received(&metrics) < 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the worker reconnected to the restarted sandbox"
        );
        client
            .dweet_for(&name, &json!({ "after": "restart" }), None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    restarted.shutdown().await;
    let stored = parquet_dweets(dir.path());
    let unique: BTreeSet<_> = stored.iter().collect();
    assert_eq!(stored.len(), unique.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_dweets_and_stream_garbage_go_to_dead_letters() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let name = thing("odd");
    let (worker, metrics) = start_worker(test_config(
        &server.base_url(),
        std::slice::from_ref(&name),
        dir.path(),
    ))
    .await;
    wait_streams_up(&metrics, 1).await;
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!({ "d": deep });
    }
    let client = client_for(&server);
    client.dweet_for(&name, &deep, None).await.unwrap();
    client
        .dweet_for(
            &name,
            &json!({"fine": 1, "text": "kept raw", "none": null}),
            None,
        )
        .await
        .unwrap();
    wait_for("both dweets", Duration::from_secs(10), || {
        received(&metrics) == 2.0
    })
    .await;
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(metrics.value("dweetpipe_dead_letters_total", &[]), 1.0);
    let reasons = dead_letter_reasons(dir.path());
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("deeper than 32"), "{reasons:?}");
    assert_eq!(
        parquet_dweets(dir.path()).len(),
        1,
        "the good dweet is stored"
    );
    server.shutdown().await;

    // A clone whose stream carries garbage between frames.
    let garbage_dir = tempfile::tempdir().unwrap();
    let addr = garbage_server().await;
    let (worker, metrics) = start_worker(test_config(
        &format!("http://{addr}"),
        &["clone".to_owned()],
        garbage_dir.path(),
    ))
    .await;
    wait_for("the clone's dweet", Duration::from_secs(10), || {
        received(&metrics) >= 1.0 && metrics.value("dweetpipe_decode_errors_total", &[]) >= 1.0
    })
    .await;
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    let reasons = dead_letter_reasons(garbage_dir.path());
    assert!(
        reasons.iter().any(|r| r.contains("not JSON")),
        "{reasons:?}"
    );
}

/// A server that answers each request with what `answer` makes of its head, keeps the
/// connection `hold`, then closes it (a listen stream ends).
async fn scripted_server(answer: fn(&str) -> Vec<u8>, hold: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let _ = stream.write_all(&answer(&request)).await;
                tokio::time::sleep(hold).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A JSON answer with `body`.
fn json_answer(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers listens with a garbage line and one frame, and reads with "not found".
async fn garbage_server() -> std::net::SocketAddr {
    scripted_server(
        |request| {
            if request.contains("/listen/") {
                let mut body = b"garbage that is not json\r\n".to_vec();
                body.extend(dweetpipe::protocol::encode_stream_frame(
                    r#"{"thing":"clone","created":"2026-01-01T00:00:00.000Z","content":{"v":1}}"#,
                ));
                let mut answer = format!(
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                    body.len()
                )
                .into_bytes();
                answer.extend(body);
                answer.extend(b"\r\n");
                answer
            } else {
                json_answer(r#"{"this":"failed","with":404,"because":"we couldn't find this"}"#)
            }
        },
        // Keep the stream open a while, as a server would.
        Duration::from_secs(2),
    )
    .await
}

/// A `dweetpipe run` process with its stderr captured to a file.
pub(crate) struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    pub(crate) fn spawn(config: &Path, env: &[(&str, &str)], log: PathBuf) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "dweetpipe=debug,info")
            .stdout(File::create(log.with_extension("out")).unwrap())
            .stderr(File::create(&log).unwrap())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        WorkerProcess {
            child: command.spawn().unwrap(),
            log,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        assert!(
            std::process::Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    pub(crate) async fn wait(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exited in time")
            .unwrap()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the process printed on stdout (`run`'s summary).
    pub(crate) fn stdout(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("out")).unwrap_or_default()
    }
}

pub(crate) fn write_config(
    dir: &Path,
    url: &str,
    things: &[(&str, Option<&str>)],
    extra: &str,
) -> PathBuf {
    let mut text = format!(
        "shutdown_timeout = \"10s\"\n[source]\nurl = \"{url}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\nstart_spread = \"0s\"\n\n[parquet]\ndir = \"{}\"\nrotate_after = \"300ms\"\n{extra}\n",
        dir.join("parquet").display()
    );
    for (name, key_env) in things {
        text.push_str(&format!("[[thing]]\nname = \"{name}\"\n"));
        if let Some(variable) = key_env {
            text.push_str(&format!("key_env = \"{variable}\"\n"));
        }
    }
    let path = dir.join("things.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_on_a_running_workers_parquet_is_refused_and_touches_nothing() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("owned"));
    let things: Vec<String> = (1..=2).map(|i| thing_name(&prefix, i)).collect();
    let entries: Vec<(&str, Option<&str>)> = things.iter().map(|t| (t.as_str(), None)).collect();
    let config = write_config(dir.path(), &server.base_url(), &entries, "");
    let parquet = dir.path().join("parquet");
    let fleet_config = FleetConfig {
        things: 2,
        interval: Duration::from_millis(20),
        prefix,
        ..FleetConfig::default()
    };
    let stats = std::sync::Arc::new(FleetStats::default());
    let fleet = tokio::spawn(run_fleet(client_for(&server), fleet_config, stats));
    let mut worker = WorkerProcess::spawn(&config, &[], dir.path().join("worker.log"));
    wait_for("sealed files", Duration::from_secs(20), || {
        parquet_files(&parquet, "dweets").len() >= 2
    })
    .await;
    let before = parquet_files(&parquet, "dweets");
    let pid = worker.pid();

    let recorded = dir.path().join("recorded.jsonl");
    std::fs::write(
        &recorded,
        format!(
            "{{\"thing\":\"{}\",\"created\":\"2026-11-01T00:00:00.000Z\",\"content\":{{\"t\":1}}}}\n",
            things[0]
        ),
    )
    .unwrap();
    let import = Command::new(BIN)
        .args(["import", "--config", config.to_str().unwrap()])
        .arg(&recorded)
        .output()
        .await
        .unwrap();
    let second = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    for (what, output) in [("import", &import), ("a second run", &second)] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{what} must refuse: {stderr}");
        assert!(
            stderr.contains("in use by another dweetpipe process")
                && stderr.contains(&format!("PID {pid}")),
            "{what} names the holder: {stderr}"
        );
    }
    assert!(
        String::from_utf8_lossy(&import.stderr).contains("stop the worker"),
        "import says what to do"
    );
    let after = parquet_files(&parquet, "dweets");
    assert!(
        before.iter().all(|file| after.contains(file)),
        "no file of the running worker was removed"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.signal("-TERM");
    assert!(worker.wait().await.success(), "{}", worker.log());
    assert!(
        !worker.log().contains("No such file") && !worker.log().contains("cannot write"),
        "{}",
        worker.log()
    );
    let expected = sandbox_dweets(&client_for(&server), &things, None).await;
    assert_exactly_once(&parquet, &expected);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_generation_restarts_into_exactly_once() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("kill"));
    let things: Vec<String> = (1..=3).map(|i| thing_name(&prefix, i)).collect();
    let entries: Vec<(&str, Option<&str>)> = things.iter().map(|t| (t.as_str(), None)).collect();
    let config = write_config(dir.path(), &server.base_url(), &entries, "");
    let parquet = dir.path().join("parquet");

    let stats = std::sync::Arc::new(FleetStats::default());
    let fleet_config = FleetConfig {
        things: 3,
        interval: Duration::from_millis(20),
        prefix,
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(run_fleet(client_for(&server), fleet_config, stats.clone()));

    let mut first = WorkerProcess::spawn(&config, &[], dir.path().join("first.log"));
    wait_for("sealed files", Duration::from_secs(20), || {
        parquet_files(&parquet, "dweets").len() >= 2
    })
    .await;
    // Kill while a generation is open (rotation every 300 ms, dweets every 20 ms).
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.signal("-KILL");
    first.wait().await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    let mut second = WorkerProcess::spawn(&config, &[], dir.path().join("second.log"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.abort();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    second.signal("-TERM");
    assert!(second.wait().await.success(), "{}", second.log());

    let expected = sandbox_dweets(&client_for(&server), &things, None).await;
    assert!(
        expected.len() > 100,
        "the fleet dweeted: {}",
        expected.len()
    );
    assert_exactly_once(&parquet, &expected);
    eprintln!(
        "SIGKILL test: {} dweets accepted by the sandbox, {} in Parquet",
        expected.len(),
        parquet_dweets(&parquet).len()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_adds_and_removes_things_and_refuses_a_broken_file() {
    let server = big_sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let (kept, removed, added) = (thing("kept"), thing("removed"), thing("added"));
    let config = write_config(
        dir.path(),
        &server.base_url(),
        &[(&kept, None), (&removed, None)],
        "",
    );
    let mut process = WorkerProcess::spawn(&config, &[], dir.path().join("worker.log"));
    wait_for("both streams", Duration::from_secs(10), || {
        process.log().matches("worker started").count() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    write_config(
        dir.path(),
        &server.base_url(),
        &[(&kept, None), (&added, None)],
        "",
    );
    process.signal("-HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        process.log().contains("configuration reloaded")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    client
        .dweet_for(&kept, &json!({"k": 1}), None)
        .await
        .unwrap();
    client
        .dweet_for(&added, &json!({"a": 1}), None)
        .await
        .unwrap();
    client
        .dweet_for(&removed, &json!({"r": 1}), None)
        .await
        .unwrap();

    std::fs::write(&config, "[source]\nurl = 5\n").unwrap();
    process.signal("-HUP");
    wait_for("the refusal", Duration::from_secs(10), || {
        process.log().contains("reload refused")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    process.signal("-TERM");
    assert!(process.wait().await.success(), "{}", process.log());

    let stored: BTreeSet<String> = parquet_dweets(&dir.path().join("parquet"))
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert!(
        stored.contains(&kept) && stored.contains(&added),
        "{stored:?}"
    );
    assert!(
        !stored.contains(&removed),
        "a removed thing is no longer ingested"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_files_are_refused_with_the_file_key_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &str)> = vec![
        (
            "[source]\nurl = \"https://dweet.io\"\nbogus = 1\n",
            "unknown field `bogus`",
        ),
        (
            "[source]\nurl = \"not a url\"\n[parquet]\ndir = \"x\"\n",
            "source.url",
        ),
        (
            "[source]\nurl = \"http://127.0.0.1:1\"\n[parquet]\ndir = \"x\"\n[[thing]]\nname = \"a\"\n[[thing]]\nname = \"a\"\n",
            "thing[1].name",
        ),
        (
            "[source]\nurl = \"http://127.0.0.1:1\"\n[parquet]\ndir = \"x\"\n[[thing]]\nname = \"a\"\nkey_env = \"DWEETPIPE_TEST_UNSET\"\n",
            "DWEETPIPE_TEST_UNSET is not set",
        ),
        (
            "[source]\nurl = \"http://127.0.0.1:1\"\n[[thing]]\nname = \"a\"\n",
            "no sink is configured",
        ),
    ];
    for (index, (text, expected)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad-{index}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = Command::new(BIN)
            .args(["run", "--config", path.to_str().unwrap()])
            .env_remove("DWEETPIPE_TEST_UNSET")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
        assert!(
            stderr.contains(&format!("bad-{index}.toml")),
            "names the file: {stderr}"
        );
    }
    let missing = Command::new(BIN)
        .args(["run", "--config", "/nonexistent/things.toml"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_what_run_would_do() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let name = thing("checked");
    client_for(&server)
        .dweet_for(&name, &json!({"v": 1}), None)
        .await
        .unwrap();
    let config = write_config(
        dir.path(),
        &server.base_url(),
        &[(&name, None), ("never-dweeted", None)],
        "",
    );
    let output = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "valid",
        "things: 2",
        "run: ready",
        "has dweets",
        "no dweets kept yet",
        "source: reachable",
    ] {
        assert!(stdout.contains(expected), "{expected}: {stdout}");
    }
    server.shutdown().await;
    let unreachable = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stdout).contains("not reachable"));
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_keys_never_reach_logs_metrics_or_errors() {
    let server = big_sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let (locked, wrong) = (thing("secret"), thing("wrongkey"));
    client.lock(&locked, LOCK, &Key::new(KEY)).await.unwrap();
    client
        .lock(&wrong, OTHER_LOCK, &Key::new(crate::common::OTHER_KEY))
        .await
        .unwrap();
    let metrics_port = crate::common::free_port();
    let config = write_config(
        dir.path(),
        &server.base_url(),
        &[(&locked, Some("LOCKED_KEY")), (&wrong, Some("LOCKED_KEY"))],
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let mut process = WorkerProcess::spawn(
        &config,
        &[("LOCKED_KEY", KEY)],
        dir.path().join("worker.log"),
    );
    wait_for("the worker", Duration::from_secs(10), || {
        process.log().contains("worker started")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    client
        .dweet_for(&locked, &json!({"v": 1}), Some(&Key::new(KEY)))
        .await
        .unwrap();
    wait_for("the wrong key reported", Duration::from_secs(10), || {
        process.log().contains("doesn't work with this thing")
    })
    .await;

    let scrape = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scrape.contains("dweetpipe_dweets_received_total"),
        "{scrape}"
    );
    let check = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .env("LOCKED_KEY", KEY)
        .output()
        .await
        .unwrap();
    process.signal("-TERM");
    assert!(process.wait().await.success());

    let log = process.log();
    assert!(
        log.contains(&wrong),
        "the log talks about the things, so the search below means something"
    );
    let everything = format!(
        "{log}{scrape}{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(everything.matches(KEY).count(), 0, "the key leaked");
    let stored: HashMap<String, usize> = parquet_dweets(&dir.path().join("parquet"))
        .into_iter()
        .fold(HashMap::new(), |mut m, (t, _)| {
            *m.entry(t).or_default() += 1;
            m
        });
    assert_eq!(
        stored.get(&locked),
        Some(&1),
        "the locked thing was read with its key"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poll_mode_ingests_with_the_same_dedupe() {
    let server = big_sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let name = thing("poll");
    let mut config = test_config(&server.base_url(), std::slice::from_ref(&name), dir.path());
    if let Some(source) = config.source.as_mut() {
        source.mode = dweetpipe::source::SourceMode::Poll;
        source.poll_interval = Duration::from_millis(100);
    }
    let (worker, metrics) = start_worker(config).await;
    for i in 0..6 {
        client
            .dweet_for(&name, &json!({ "i": i }), None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    wait_for("6 polled dweets", Duration::from_secs(10), || {
        received(&metrics) == 6.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(received(&metrics), 6.0);
    assert!(
        metrics.value("dweetpipe_duplicates_dropped_total", &[]) > 0.0,
        "repeated polls see the same dweets"
    );
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_exactly_once(
        dir.path(),
        &sandbox_dweets(&client, std::slice::from_ref(&name), None).await,
    );
    server.shutdown().await;
}

/// A TCP proxy to `target` whose live connections can all be cut at once.
pub(crate) struct CuttableProxy {
    pub(crate) addr: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    pub(crate) async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let registry = connections.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                registry.lock().unwrap().push(task.abort_handle());
            }
        });
        CuttableProxy {
            addr,
            connections,
            accepting,
        }
    }

    /// Drops every connection open now; new ones are still accepted.
    pub(crate) fn cut(&self) -> usize {
        let open: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        open.iter().for_each(|c| c.abort());
        open.len()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_stream_reconnects_and_backfill_recovers_what_it_missed() {
    let server = big_sandbox().await;
    let client = client_for(&server);
    let proxy = CuttableProxy::start(server.local_addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let name = thing("cut");
    let mut config = test_config(
        &format!("http://{}", proxy.addr),
        std::slice::from_ref(&name),
        dir.path(),
    );
    if let Some(source) = config.source.as_mut() {
        // Slow reconnects, so dweets land while the stream is down.
        source.reconnect_min = Duration::from_millis(800);
        source.reconnect_max = Duration::from_millis(800);
    }
    let (worker, metrics) = start_worker(config).await;
    wait_streams_up(&metrics, 1).await;
    client
        .dweet_for(&name, &json!({"phase": "before"}), None)
        .await
        .unwrap();
    wait_for("the first dweet", Duration::from_secs(10), || {
        received(&metrics) == 1.0
    })
    .await;

    assert!(proxy.cut() >= 1, "the stream connection was cut");
    for i in 0..5 {
        client
            .dweet_for(&name, &json!({ "phase": "while cut", "i": i }), None)
            .await
            .unwrap();
    }
    wait_for("the missed dweets", Duration::from_secs(15), || {
        received(&metrics) == 6.0
    })
    .await;
    assert_eq!(
        metrics.value("dweetpipe_dweets_received_total", &[("source", "backfill")]),
        5.0,
        "backfill brought them"
    );
    client
        .dweet_for(&name, &json!({"phase": "after"}), None)
        .await
        .unwrap();
    wait_for("the stream again", Duration::from_secs(10), || {
        received(&metrics) == 7.0
    })
    .await;
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    proxy.accepting.abort();

    assert_exactly_once(
        dir.path(),
        &sandbox_dweets(&client, std::slice::from_ref(&name), None).await,
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reloaded_shutdown_timeout_is_the_one_shutdown_uses() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let things = vec![thing("timeout")];
    let config = test_config(&server.base_url(), &things, dir.path());
    let (mut worker, _) = start_worker(config.clone()).await;
    assert_eq!(worker.shutdown_timeout(), config.shutdown_timeout);
    let reloaded = Config {
        shutdown_timeout: Duration::from_secs(3),
        ..config
    };
    worker.reload(reloaded).await.unwrap();
    assert_eq!(
        worker.shutdown_timeout(),
        Duration::from_secs(3),
        "SIGHUP's new shutdown_timeout takes effect, not ignored"
    );
    worker.shutdown(Duration::from_secs(5)).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_source_is_caught_up_without_a_reconnect_storm() {
    // One request a second per thing, as dweet.io allowed; each thing has history waiting.
    let server = sandbox_with(|c| {
        c.limits.max_history = 100_000;
        c.limits.rate_limit = Some(1.0);
    })
    .await;
    let client = client_for(&server);
    let prefix = format!("{}-", thing("limited"));
    let things: Vec<String> = (1..=3).map(|i| thing_name(&prefix, i)).collect();
    for name in &things {
        for i in 0..5 {
            // The writes are limited too: wait for each second's token.
            while client
                .dweet_for(name, &json!({ "i": i }), None)
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dir = tempfile::tempdir().unwrap();
    let (worker, metrics) =
        start_worker(test_config(&server.base_url(), &things, dir.path())).await;
    wait_for(
        "every waiting dweet received",
        Duration::from_secs(30),
        || received(&metrics) >= 15.0,
    )
    .await;
    wait_streams_up(&metrics, things.len()).await;
    let attempts = metrics.value("dweetpipe_stream_connects_total", &[]);
    assert!(
        attempts <= 2.0 * things.len() as f64,
        "{attempts} connection attempts for {} things: the read waits on the open stream instead of reconnecting",
        things.len()
    );
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    server.shutdown().await;
}

/// A server whose stored dweets include one with a `created` that is not a time, and whose
/// listen streams end after half a second, so the worker reconnects and backfills again.
async fn unplaceable_server() -> std::net::SocketAddr {
    scripted_server(
        |request| {
            if request.contains("/listen/") {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
            } else {
                json_answer(r#"{"this":"succeeded","by":"getting","the":"dweets","with":[{"thing":"unplaceable","created":"yesterday at noon","content":{"v":1}},{"thing":"unplaceable","created":"2026-01-01T00:00:00.000Z","content":{"v":2}}]}"#)
            }
        },
        Duration::from_millis(500),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dweet_whose_created_is_not_a_time_is_a_dead_letter_once_however_often_it_is_backfilled()
{
    let dir = tempfile::tempdir().unwrap();
    let addr = unplaceable_server().await;
    let (worker, metrics) = start_worker(test_config(
        &format!("http://{addr}"),
        &["unplaceable".to_owned()],
        dir.path(),
    ))
    .await;
    wait_for("three backfills", Duration::from_secs(20), || {
        metrics.value("dweetpipe_stream_connects_total", &[]) >= 4.0
    })
    .await;
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(metrics.value("dweetpipe_dead_letters_total", &[]), 1.0);
    let reasons = dead_letter_reasons(dir.path());
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert_eq!(
        parquet_dweets(dir.path()).len(),
        1,
        "the dweet with a time is stored once"
    );
}
