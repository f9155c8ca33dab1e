//! The fault-injection suite: each test makes one ordinary fault happen to a `dweetpipe run`
//! process (PostgreSQL down at start, a full or read-only Parquet disk, a damaged spool, a
//! SIGKILL among bad dweets) and then checks every sink: each dweet and dead letter exactly
//! once, and what `/readyz` said during the fault.
//!
//! The disk tests mount a size-limited tmpfs, which needs root (CI runs as root); elsewhere
//! they print why they skip.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dweetpipe::client::Client;
use dweetpipe::sandbox::SandboxHandle;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::common::{client_for, free_port, raw_get, sandbox_with, thing};
use crate::postgres::{PrivateCluster, assert_same, stored};
use crate::worker::{
    WorkerProcess, assert_exactly_once, parquet_dead_letters, parquet_dweets, sandbox_dweets,
};

/// A worker's files and its config, in a directory of the test's own.
struct Setup {
    dir: tempfile::TempDir,
    metrics_port: u16,
    things: Vec<String>,
    /// More `[postgres]` keys, one `key = value` a line.
    postgres_extra: String,
}

impl Setup {
    fn new(label: &str, count: usize) -> Self {
        let prefix = thing(label);
        Setup {
            dir: tempfile::tempdir().unwrap(),
            metrics_port: free_port(),
            things: (1..=count).map(|i| format!("{prefix}-{i}")).collect(),
            postgres_extra: String::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes things.toml: the sandbox, Parquet under `parquet` (spool beside the test's
    /// files), PostgreSQL when `postgres` is given, and metrics.
    fn config(
        &self,
        source: &str,
        parquet: &Path,
        postgres: Option<&str>,
        memory_rows: usize,
    ) -> PathBuf {
        let mut text = format!(
            "shutdown_timeout = \"10s\"\n[source]\nurl = \"{source}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\nstart_spread = \"0s\"\n\n\
             [parquet]\ndir = \"{}\"\nrotate_after = \"300ms\"\nspool_dir = \"{}\"\nmemory_max_rows = {memory_rows}\n\n\
             [metrics]\nlisten = \"127.0.0.1:{}\"\n",
            parquet.display(),
            self.path("parquet-spool").display(),
            self.metrics_port,
        );
        if let Some(url) = postgres {
            text.push_str(&format!(
                "\n[postgres]\nurl = \"{url}\"\nspool_dir = \"{}\"\nmemory_max_rows = {memory_rows}\n{}\n",
                self.path("postgres-spool").display(),
                self.postgres_extra
            ));
        }
        for name in &self.things {
            text.push_str(&format!("\n[[thing]]\nname = \"{name}\"\n"));
        }
        let path = self.path("things.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn spawn(&self, config: &Path, log: &str) -> WorkerProcess {
        WorkerProcess::spawn(config, &[], self.path(log))
    }

    async fn get(&self, path: &str) -> Option<(String, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::net::TcpStream::connect(addr).await.ok()?;
            let (head, body) = raw_get(addr, path).await;
            Some((head, String::from_utf8_lossy(&body).into_owned()))
        })
        .await
        .ok()
        .flatten()
    }

    /// Waits until `/readyz` answers with `status` and a body containing `needle`.
    async fn wait_readyz(&self, status: &str, needle: &str, worker: &WorkerProcess) {
        let started = Instant::now();
        loop {
            if let Some((head, body)) = self.get("/readyz").await
                && head.starts_with(&format!("http/1.1 {status}"))
                && body.contains(needle)
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "/readyz never answered {status} with {needle:?}: {:?}\nlog:\n{}",
                self.get("/readyz").await,
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metric(&self, line_start: &str) -> f64 {
        let Some((_, body)) = self.get("/metrics").await else {
            return f64::NAN;
        };
        body.lines()
            .filter(|line| line.starts_with(line_start))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Every board dweets `content(i)` every `every` until `count`; returns what was accepted
/// and, separately, the dweets that must become dead letters.
async fn dweet_fleet(
    client: &Client,
    things: &[String],
    count: usize,
    every: Duration,
    bad_every: Option<usize>,
) -> (BTreeSet<(String, i64)>, BTreeSet<(String, String)>) {
    let tasks: Vec<_> = things
        .iter()
        .map(|name| {
            let client = client.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let mut good = Vec::new();
                let mut bad = Vec::new();
                for i in 0..count {
                    let is_bad = bad_every.is_some_and(|n| i % n == n - 1);
                    let content = if is_bad {
                        too_deep(i)
                    } else {
                        json!({ "i": i, "t": 20.5 })
                    };
                    if let Ok(dweet) = client.dweet_for(&name, &content, None).await {
                        let created = dweet.created.to_datetime().unwrap().timestamp_millis();
                        if is_bad {
                            bad.push((name.clone(), dweet.created.as_str().to_owned()));
                        } else {
                            good.push((name.clone(), created));
                        }
                    }
                    tokio::time::sleep(every).await;
                }
                (good, bad)
            })
        })
        .collect();
    let mut good = BTreeSet::new();
    let mut bad = BTreeSet::new();
    for task in tasks {
        let (g, b) = task.await.unwrap();
        good.extend(g);
        bad.extend(b);
    }
    (good, bad)
}

/// Content nested past normalisation's depth limit: a dead letter.
fn too_deep(i: usize) -> Value {
    let mut deep = json!(i);
    for _ in 0..40 {
        deep = json!({ "d": deep });
    }
    deep
}

async fn sandbox_on(listen: SocketAddr) -> SandboxHandle {
    sandbox_with(|config| {
        config.listen = listen;
        config.limits.max_history = 100_000;
    })
    .await
}

/// Waits until PostgreSQL holds every one of `expected` (and reports what it has).
async fn wait_postgres(url: &str, expected: &BTreeSet<(String, i64)>, worker: &WorkerProcess) {
    let started = Instant::now();
    loop {
        if let Some(rows) = postgres_rows_now(url).await {
            let rows: BTreeSet<_> = rows.into_iter().collect();
            if expected.is_subset(&rows) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "PostgreSQL has {} of {}\nlog:\n{}",
                expected.intersection(&rows).count(),
                expected.len(),
                worker.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_parquet(dir: &Path, expected: &BTreeSet<(String, i64)>, worker: &WorkerProcess) {
    let started = Instant::now();
    loop {
        let held: BTreeSet<_> = parquet_dweets(dir).into_iter().collect();
        if expected.is_subset(&held) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Parquet has {} of {}\nlog:\n{}",
            expected.intersection(&held).count(),
            expected.len(),
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn postgres_rows(url: &str) -> Vec<(String, i64)> {
    let mut connection = PgConnection::connect(url).await.unwrap();
    stored(&mut connection).await
}

/// What PostgreSQL holds, or `None` before the worker migrated it (or while it is down).
async fn postgres_rows_now(url: &str) -> Option<Vec<(String, i64)>> {
    let mut connection = PgConnection::connect(url).await.ok()?;
    sqlx::query_as::<_, (String, i64)>(
        "SELECT thing, (extract(epoch FROM created) * 1000)::bigint FROM dweets",
    )
    .fetch_all(&mut connection)
    .await
    .ok()
}

async fn postgres_dead_letters(url: &str) -> Vec<(String, String)> {
    let mut connection = PgConnection::connect(url).await.unwrap();
    sqlx::query_as("SELECT thing, created FROM dead_letters")
        .fetch_all(&mut connection)
        .await
        .unwrap()
}

/// Stops the worker with SIGTERM; returns its summary.
async fn stop(mut worker: WorkerProcess) -> String {
    worker.signal("-TERM");
    let status = worker.wait().await;
    assert!(status.success(), "{}", worker.log());
    worker.stdout()
}

/// A PostgreSQL that takes connections and never answers: what a long migration (or a
/// server stuck in recovery) looks like from the worker.
async fn silent_postgres() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            open.push(connection);
        }
    });
    (
        format!("postgres://dweetpipe@127.0.0.1:{port}/silent"),
        held,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_endpoints_answer_while_postgresql_is_connected_and_migrated() {
    let (postgres, silent) = silent_postgres().await;
    let server = sandbox_on(SocketAddr::from(([127, 0, 0, 1], free_port()))).await;
    let setup = Setup::new("migrating", 2);
    let parquet = setup.path("parquet");
    let config = setup.config(&server.base_url(), &parquet, Some(&postgres), 20);
    let worker = setup.spawn(&config, "worker.log");
    // The schema step waits on the silent server for ten seconds; the endpoints answer at once.
    let asked = Instant::now();
    let answer = loop {
        if let Some(answer) = setup.get("/readyz").await {
            break answer;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "/readyz did not answer while PostgreSQL was being migrated\nlog:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        answer.0.starts_with("http/1.1 503") && answer.1.contains("migrating"),
        "{answer:?}"
    );
    let (head, body) = setup.get("/healthz").await.expect("/healthz answers");
    assert!(head.starts_with("http/1.1 200"), "{head} {body}");
    // Once the worker gives up waiting, it runs without PostgreSQL and says so.
    setup
        .wait_readyz("503", "postgres: unreachable", &worker)
        .await;
    silent.abort();
    let _ = stop(worker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgresql_down_at_start_ingestion_goes_on_and_it_catches_up_when_it_answers() {
    let cluster = PrivateCluster::create();
    cluster.stop();
    let server = sandbox_on(SocketAddr::from(([127, 0, 0, 1], free_port()))).await;
    let mut setup = Setup::new("pg-down", 3);
    // What the spool holds drains at most 10 records a transaction.
    setup.postgres_extra = "max_rows = 10".to_owned();
    let parquet = setup.path("parquet");
    let config = setup.config(&server.base_url(), &parquet, Some(&cluster.url()), 20);
    let worker = setup.spawn(&config, "worker.log");

    let (first, _) = dweet_fleet(
        &client_for(&server),
        &setup.things,
        40,
        Duration::from_millis(25),
        None,
    )
    .await;
    // Well past the start-up patience: the worker serves and writes Parquet regardless.
    tokio::time::sleep(Duration::from_secs(4)).await;
    setup
        .wait_readyz("503", "postgres: unreachable", &worker)
        .await;
    let (head, _) = setup.get("/healthz").await.expect("/healthz answers");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    wait_parquet(&parquet, &first, &worker).await;
    assert!(
        setup
            .metric("dweetpipe_spool_bytes{sink=\"postgres\"}")
            .await
            > 0.0,
        "past the memory bound, PostgreSQL's share is spooled"
    );
    assert!(
        setup
            .metric("dweetpipe_sink_errors_total{sink=\"postgres\"}")
            .await
            > 0.0,
        "an outage that began before the worker counts as sink errors, so the alert fires"
    );

    cluster.start();
    wait_postgres(&cluster.url(), &first, &worker).await;
    let writes = setup
        .metric("dweetpipe_sink_write_duration_seconds_count{sink=\"postgres\"}")
        .await;
    assert!(
        writes >= (first.len() / 10) as f64,
        "the {} spooled records went in transactions of at most 10: {writes} writes",
        first.len()
    );
    let (second, _) = dweet_fleet(
        &client_for(&server),
        &setup.things,
        20,
        Duration::from_millis(25),
        None,
    )
    .await;
    let expected: BTreeSet<_> = first.union(&second).cloned().collect();
    wait_postgres(&cluster.url(), &expected, &worker).await;
    setup.wait_readyz("200", "ready", &worker).await;
    let summary = stop(worker).await;
    // `run` ends with what it did, per sink.
    assert!(
        summary.contains(&format!("received {} dweets", expected.len()))
            && summary.contains(&format!("postgres: {} dweets", expected.len()))
            && summary.contains(&format!("parquet: {} dweets", expected.len())),
        "{summary}"
    );

    assert_eq!(
        expected,
        sandbox_dweets(&client_for(&server), &setup.things, None).await
    );
    assert_same(postgres_rows(&cluster.url()).await, &expected);
    assert_exactly_once(&parquet, &expected);
    server.shutdown().await;
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A tmpfs of `size` mounted on a directory of its own, unmounted on drop.
pub(crate) struct SmallDisk {
    pub(crate) mount: PathBuf,
}

impl SmallDisk {
    /// Mounts one, or says why it cannot (not root, no mount).
    pub(crate) fn mount(under: &Path, size: &str) -> Result<SmallDisk, String> {
        if !is_root() {
            return Err("mounting a size-limited tmpfs needs root (CI runs as root)".to_owned());
        }
        let mount = under.join("small-disk");
        std::fs::create_dir_all(&mount).unwrap();
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(SmallDisk { mount })
    }

    /// Fills what is left with a file, so the next write fails with ENOSPC.
    pub(crate) fn fill(&self) -> PathBuf {
        let filler = self.mount.join("filler");
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .stderr(std::process::Stdio::null())
            .status();
        filler
    }
}

/// `dir` made read-only by a read-only bind mount over it (the worker's open files stay on
/// the mount beneath, so no writer blocks it); writable again on drop.
struct ReadOnly {
    dir: PathBuf,
}

impl ReadOnly {
    fn make(dir: &Path) -> ReadOnly {
        for args in [
            vec!["--bind", dir.to_str().unwrap(), dir.to_str().unwrap()],
            vec!["-o", "remount,bind,ro", dir.to_str().unwrap()],
        ] {
            let output = std::process::Command::new("mount")
                .args(&args)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "mount {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        ReadOnly {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_parquet_disk_keeps_its_records_and_catches_up_once_freed() {
    let setup = Setup::new("disk-full", 3);
    let disk = match SmallDisk::mount(setup.dir.path(), "4m") {
        Ok(disk) => disk,
        Err(reason) => {
            eprintln!(
                "skipped a_full_parquet_disk_keeps_its_records_and_catches_up_once_freed: {reason}"
            );
            return;
        }
    };
    let db = crate::postgres::TestDatabase::create().await;
    let server = sandbox_on(SocketAddr::from(([127, 0, 0, 1], free_port()))).await;
    let parquet = disk.mount.join("parquet");
    let config = setup.config(&server.base_url(), &parquet, Some(&db.url), 50);
    let worker = setup.spawn(&config, "worker.log");
    setup.wait_readyz("200", "ready", &worker).await;

    let filler = disk.fill();
    let (during, _) = dweet_fleet(
        &client_for(&server),
        &setup.things,
        100,
        Duration::from_millis(10),
        None,
    )
    .await;
    setup
        .wait_readyz("503", "parquet: cannot write", &worker)
        .await;
    wait_postgres(&db.url, &during, &worker).await;
    assert!(
        setup
            .metric("dweetpipe_spool_bytes{sink=\"parquet\"}")
            .await
            > 0.0,
        "Parquet's records wait in its spool (on another filesystem)"
    );

    std::fs::remove_file(&filler).unwrap();
    let (after, _) = dweet_fleet(
        &client_for(&server),
        &setup.things,
        10,
        Duration::from_millis(10),
        None,
    )
    .await;
    let expected: BTreeSet<_> = during.union(&after).cloned().collect();
    wait_parquet(&parquet, &expected, &worker).await;
    setup.wait_readyz("200", "ready", &worker).await;
    stop(worker).await;

    assert_exactly_once(&parquet, &expected);
    assert_same(postgres_rows(&db.url).await, &expected);
    drop(disk);
    db.drop_now().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_parquet_directory_keeps_its_records_and_catches_up_once_writable() {
    if !is_root() {
        eprintln!(
            "skipped a_read_only_parquet_directory_keeps_its_records_and_catches_up_once_writable: a read-only bind mount needs root (CI runs as root)"
        );
        return;
    }
    let setup = Setup::new("read-only", 2);
    let server = sandbox_on(SocketAddr::from(([127, 0, 0, 1], free_port()))).await;
    let parquet = setup.path("parquet");
    let config = setup.config(&server.base_url(), &parquet, None, 10);
    let worker = setup.spawn(&config, "worker.log");
    setup.wait_readyz("200", "ready", &worker).await;

    let read_only = ReadOnly::make(&parquet);
    let (during, _) = dweet_fleet(
        &client_for(&server),
        &setup.things,
        40,
        Duration::from_millis(20),
        None,
    )
    .await;
    setup
        .wait_readyz("503", "parquet: cannot write", &worker)
        .await;
    drop(read_only);
    wait_parquet(&parquet, &during, &worker).await;
    setup.wait_readyz("200", "ready", &worker).await;
    stop(worker).await;
    assert_exactly_once(&parquet, &during);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_spool_loses_only_the_damaged_record_and_reports_it() {
    let cluster = PrivateCluster::create();
    cluster.stop();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server = sandbox_on(listen).await;
    let setup = Setup::new("damaged-spool", 2);
    let parquet = setup.path("parquet");
    let config = setup.config(&server.base_url(), &parquet, Some(&cluster.url()), 0);
    let worker = setup.spawn(&config, "first.log");
    let (sent, _) = dweet_fleet(
        &client_for(&server),
        &setup.things,
        60,
        Duration::from_millis(10),
        None,
    )
    .await;
    wait_parquet(&parquet, &sent, &worker).await;
    stop(worker).await;

    // The spool in the middle of its one segment takes a flipped byte.
    let segments: Vec<PathBuf> = std::fs::read_dir(setup.path("postgres-spool"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "spool"))
        .collect();
    assert!(!segments.is_empty(), "PostgreSQL's share was spooled");
    let biggest = segments
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(biggest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(biggest, bytes).unwrap();

    // The source restarts and forgets: nothing can be backfilled.
    server.shutdown().await;
    let server = sandbox_on(listen).await;
    cluster.start();
    let worker = setup.spawn(&config, "second.log");
    let started = Instant::now();
    let rows = loop {
        let rows = postgres_rows_now(&cluster.url()).await.unwrap_or_default();
        if rows.len() + 1 >= sent.len() || started.elapsed() > Duration::from_secs(30) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let corrupt = setup
        .metric("dweetpipe_spool_corrupt_records_total{sink=\"postgres\"}")
        .await;
    stop(worker).await;
    let unique: BTreeSet<_> = rows.iter().cloned().collect();
    assert_eq!(unique.len(), rows.len(), "nothing twice");
    assert!(unique.is_subset(&sent));
    assert_eq!(
        sent.len() - unique.len(),
        1,
        "only the damaged record is missing"
    );
    assert_eq!(corrupt, 1.0, "and it is counted");
    let log = std::fs::read_to_string(setup.path("second.log")).unwrap();
    assert!(
        log.contains("a damaged spool record is skipped") && log.contains("offset"),
        "and logged with its segment and offset:\n{log}"
    );
    assert_exactly_once(&parquet, &sent);
    server.shutdown().await;
}

/// Starts a worker whose PostgreSQL (at `postgres`) is away, with room for 150 records in
/// memory and about 30 in its spool; once its streams are up, sends `count` dweets per thing,
/// and waits until the spool overflowed and Parquet holds every dweet. The dweets sent.
async fn overflow_the_postgres_spool(
    setup: &mut Setup,
    server: &SandboxHandle,
    postgres: &str,
    count: usize,
) -> (WorkerProcess, BTreeSet<(String, i64)>) {
    setup.postgres_extra = "spool_max = \"4KiB\"".to_owned();
    let parquet = setup.path("parquet");
    let config = setup.config(&server.base_url(), &parquet, Some(postgres), 150);
    let worker = setup.spawn(&config, "worker.log");
    // Streaming first, so every dweet arrives (not only what a backfill brings).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // NaN (no answer yet) is not "up" either.
        if setup.metric("dweetpipe_stream_up{").await >= setup.things.len() as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "streams up\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, _) = dweet_fleet(
        &client_for(server),
        &setup.things,
        count,
        Duration::from_millis(10),
        None,
    )
    .await;
    setup
        .wait_readyz("503", "postgres: its spool cannot take records", &worker)
        .await;
    wait_parquet(&parquet, &sent, &worker).await;
    (worker, sent)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_is_counted_makes_the_worker_unready_and_heals_once_the_sink_drains() {
    let cluster = PrivateCluster::create();
    cluster.stop();
    let server = sandbox_on(SocketAddr::from(([127, 0, 0, 1], free_port()))).await;
    let mut setup = Setup::new("full-spool", 2);
    let parquet = setup.path("parquet");
    // 200 dweets overflow while PostgreSQL is away, and one thing's backfill of 100 fits once
    // it is back.
    let (worker, sent) =
        overflow_the_postgres_spool(&mut setup, &server, &cluster.url(), 100).await;
    let dropped = setup
        .metric("dweetpipe_spool_dropped_records_total{sink=\"postgres\"}")
        .await;
    assert!(dropped > 0.0, "the loss is counted");

    // PostgreSQL returns: once its backlog drained, the dropped things are backfilled again
    // from the source, and the worker is ready without a restart.
    cluster.start();
    wait_postgres(&cluster.url(), &sent, &worker).await;
    setup.wait_readyz("200", "ready", &worker).await;
    assert_eq!(
        setup.metric("dweetpipe_refill_gaps_total").await,
        0.0,
        "the source kept all that was dropped: no gap"
    );
    stop(worker).await;
    assert_exactly_once(&parquet, &sent);
    let stored = postgres_rows_now(&cluster.url())
        .await
        .expect("PostgreSQL answers");
    assert_eq!(stored.len(), sent.len(), "each dweet once in PostgreSQL");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refill_that_cannot_reach_back_to_what_was_dropped_counts_the_gap() {
    let cluster = PrivateCluster::create();
    cluster.stop();
    // The source keeps a thing's last 30 dweets.
    let server = sandbox_with(|config| {
        config.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        config.limits.max_history = 30;
    })
    .await;
    let mut setup = Setup::new("refill-gap", 2);
    // 150 each: the backlog drops from about the 90th of each on.
    let (worker, _) = overflow_the_postgres_spool(&mut setup, &server, &cluster.url(), 150).await;
    cluster.start();
    setup.wait_readyz("200", "ready", &worker).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut gaps = 0.0;
    while gaps < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        gaps = setup.metric("dweetpipe_refill_gaps_total").await;
    }
    assert!(
        (1.0..=2.0).contains(&gaps),
        "each thing whose dropped records the source no longer keeps is counted once: {gaps}\n{}",
        worker.log()
    );
    assert!(
        worker
            .log()
            .contains("this thing's history has a gap there for good"),
        "and said in the log"
    );
    stop(worker).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_dweets_across_a_sigkill_are_dead_letters_once_in_both_sinks() {
    let db = crate::postgres::TestDatabase::create().await;
    let server = sandbox_on(SocketAddr::from(([127, 0, 0, 1], free_port()))).await;
    let setup = Setup::new("dead-kill", 3);
    let parquet = setup.path("parquet");
    let config = setup.config(&server.base_url(), &parquet, Some(&db.url), 1000);
    let client = client_for(&server);

    let first = setup.spawn(&config, "first.log");
    setup.wait_readyz("200", "ready", &first).await;
    let fleet = {
        let client = client.clone();
        let things = setup.things.clone();
        tokio::spawn(async move {
            dweet_fleet(&client, &things, 80, Duration::from_millis(20), Some(4)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(900)).await;
    first.signal("-KILL");
    let mut first = first;
    first.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = setup.spawn(&config, "second.log");
    let (good, bad) = fleet.await.unwrap();
    assert!(bad.len() >= 30, "{} bad dweets", bad.len());
    wait_postgres(&db.url, &good, &second).await;
    wait_parquet(&parquet, &good, &second).await;
    // The last dweets' seal and commit.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop(second).await;

    assert_same(postgres_rows(&db.url).await, &good);
    assert_exactly_once(&parquet, &good);
    let in_postgres = postgres_dead_letters(&db.url).await;
    let in_parquet = parquet_dead_letters(&parquet);
    for (sink, letters) in [("PostgreSQL", in_postgres), ("Parquet", in_parquet)] {
        let unique: BTreeSet<_> = letters.iter().cloned().collect();
        assert_eq!(unique.len(), letters.len(), "{sink}: each dead letter once");
        assert_eq!(unique, bad, "{sink}: every bad dweet is a dead letter");
    }
    db.drop_now().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigterm_during_the_start_shuts_down_in_order() {
    // PostgreSQL down: the start waits for it a few seconds, and the SIGTERM comes meanwhile.
    let cluster = PrivateCluster::create();
    cluster.stop();
    let server = sandbox_on(SocketAddr::from(([127, 0, 0, 1], free_port()))).await;
    let setup = Setup::new("term-at-start", 1);
    let parquet = setup.path("parquet");
    let config = setup.config(&server.base_url(), &parquet, Some(&cluster.url()), 0);
    let worker = setup.spawn(&config, "worker.log");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let summary = stop(worker).await;
    assert!(
        summary.contains("run: "),
        "the summary is printed: {summary}"
    );
    let log = std::fs::read_to_string(setup.path("worker.log")).unwrap();
    assert!(
        log.contains("stopped cleanly"),
        "a signal during the start is kept for the end of it:\n{log}"
    );
    server.shutdown().await;
}
