//! The chaos suite: a simulated fleet streams through a `dweetpipe run` process into
//! PostgreSQL and Parquet while, in a seeded random order, stream connections are cut, the
//! sandbox restarts, PostgreSQL stops and starts (the disk spool takes the backlog), the
//! Parquet disk fills up and is freed (as root: Parquet lives on a small tmpfs), and the
//! worker is SIGKILLed and restarted. Every seventh dweet of a board is too deep to normalise.
//! At the end every dweet the sandbox accepted is in both sinks exactly once, and every odd
//! one is a dead letter exactly once in both.
//!
//! The sandbox keeps history in memory only, so a restart forgets what it held; like an
//! operator upgrading it, the test restarts it once the worker has everything it accepted.
//! `CHAOS_SEED=N` replays an order (the seed is printed).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dweetpipe::client::Client;
use dweetpipe::sandbox::SandboxHandle;
use dweetpipe::sandbox::simulator::{S5d9Board, thing_name};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::{Connection, PgConnection};

use crate::common::{client_for, sandbox_with, thing};
use crate::faults::SmallDisk;
use crate::postgres::{PrivateCluster, assert_same, stored};
use crate::worker::{
    CuttableProxy, WorkerProcess, assert_exactly_once, parquet_dead_letters, parquet_dweets,
};

const THINGS: usize = 10;
const DWEET_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    CutStreams,
    RestartSandbox,
    StopPostgres,
    KillWorker,
    FillParquetDisk,
}

/// Every this-many-th dweet of a board nests too deep: a dead letter.
const ODD_EVERY: u64 = 7;

fn too_deep(i: u64) -> serde_json::Value {
    let mut deep = serde_json::json!(i);
    for _ in 0..40 {
        deep = serde_json::json!({ "d": deep });
    }
    deep
}

fn is_too_deep(content: &serde_json::Value) -> bool {
    let mut depth = 0;
    let mut at = content;
    while let Some(inner) = at.get("d") {
        depth += 1;
        at = inner;
    }
    depth > 32
}

/// What the sandbox holds: good dweets as (thing, created ms), odd ones as (thing, created).
async fn sandbox_history(client: &Client, things: &[String]) -> (Dweets, Letters) {
    let (mut good, mut odd) = (BTreeSet::new(), BTreeSet::new());
    for thing in things {
        for dweet in client.get_dweets_for(thing, None).await.unwrap_or_default() {
            if is_too_deep(&dweet.content) {
                odd.insert((thing.clone(), dweet.created.as_str().to_owned()));
            } else {
                let created = dweet.created.to_datetime().unwrap().timestamp_millis();
                good.insert((thing.clone(), created));
            }
        }
    }
    (good, odd)
}

async fn start_sandbox(listen: SocketAddr) -> SandboxHandle {
    sandbox_with(|config| {
        config.listen = listen;
        config.limits.max_history = 100_000;
    })
    .await
}

/// Each board dweets every `DWEET_EVERY` unless paused; failures (the sandbox is restarting)
/// are simply not accepted, and the sandbox's own history says what was.
fn run_pausable_fleet(
    client: Client,
    things: Vec<String>,
    paused: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    things
        .into_iter()
        .enumerate()
        .map(|(index, name)| {
            let client = client.clone();
            let paused = Arc::clone(&paused);
            tokio::spawn(async move {
                let mut board = S5d9Board::new(index as u64);
                let mut sent = 0u64;
                loop {
                    if !paused.load(Ordering::Relaxed) {
                        sent += 1;
                        let content = if sent.is_multiple_of(ODD_EVERY) {
                            too_deep(sent)
                        } else {
                            board.next_payload()
                        };
                        let _ = client.dweet_for(&name, &content, None).await;
                    }
                    tokio::time::sleep(DWEET_EVERY).await;
                }
            })
        })
        .collect()
}

/// What PostgreSQL holds, or `None` while it does not answer.
async fn postgres_dweets(url: &str) -> Option<BTreeSet<(String, i64)>> {
    let mut connection = PgConnection::connect(url).await.ok()?;
    Some(stored(&mut connection).await.into_iter().collect())
}

/// Dweets as (thing, created ms).
type Dweets = BTreeSet<(String, i64)>;
/// Dead letters as (thing, created as sent).
type Letters = BTreeSet<(String, String)>;

/// The dead letters PostgreSQL holds as (thing, created), or `None` while it does not answer.
async fn postgres_letters(url: &str) -> Option<BTreeSet<(String, String)>> {
    let mut connection = PgConnection::connect(url).await.ok()?;
    let letters: Vec<(String, String)> = sqlx::query_as("SELECT thing, created FROM dead_letters")
        .fetch_all(&mut connection)
        .await
        .ok()?;
    Some(letters.into_iter().collect())
}

/// Waits until both sinks hold every one of `expected` and of the `odd` ones' dead letters.
async fn wait_until_stored(
    url: &str,
    parquet: &std::path::Path,
    (expected, odd): (&Dweets, &Letters),
    timeout: Duration,
) {
    let started = Instant::now();
    loop {
        let in_postgres = postgres_dweets(url).await.unwrap_or_default();
        let in_parquet: BTreeSet<_> = parquet_dweets(parquet).into_iter().collect();
        let letters_in_postgres = postgres_letters(url).await.unwrap_or_default();
        let letters_in_parquet: BTreeSet<_> = parquet_dead_letters(parquet).into_iter().collect();
        if expected.is_subset(&in_postgres)
            && expected.is_subset(&in_parquet)
            && odd.is_subset(&letters_in_postgres)
            && odd.is_subset(&letters_in_parquet)
        {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "the sinks did not catch up: {} of {} in PostgreSQL, {} in Parquet; dead letters {} of {} in PostgreSQL, {} in Parquet",
            expected.intersection(&in_postgres).count(),
            expected.len(),
            expected.intersection(&in_parquet).count(),
            odd.intersection(&letters_in_postgres).count(),
            odd.len(),
            odd.intersection(&letters_in_parquet).count(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Scrapes the worker's metrics through a fault lasting at least `at_least`, and
/// until `series` is non-zero or 15 s have passed: a worker restarted just before
/// the fault may take a while to reach it (a busy machine, a catch-up), and one
/// scrape at the end of the window would then miss what the fault did.
async fn watch_for_nonzero(metrics_port: u16, series: &str, at_least: Duration) -> bool {
    let started = tokio::time::Instant::now();
    let mut seen = false;
    while started.elapsed() < at_least || (!seen && started.elapsed() < Duration::from_secs(15)) {
        if let Ok(answer) = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await {
            let text = answer.text().await.unwrap_or_default();
            seen |= text.lines().any(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .is_some_and(|value| value.trim() != "0")
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_survives_chaos_exactly_once() {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut events = vec![
        Event::CutStreams,
        Event::RestartSandbox,
        Event::StopPostgres,
        Event::KillWorker,
        Event::FillParquetDisk,
    ];
    let extras = [
        Event::CutStreams,
        Event::StopPostgres,
        Event::KillWorker,
        Event::RestartSandbox,
        Event::FillParquetDisk,
    ];
    for _ in 0..4 {
        events.push(extras[rng.random_range(0..extras.len())]);
    }
    events.shuffle(&mut rng);
    eprintln!("chaos seed {seed}: {events:?}");

    let cluster = PrivateCluster::create();
    let listen = SocketAddr::from(([127, 0, 0, 1], crate::common::free_port()));
    let mut server = start_sandbox(listen).await;
    let proxy = CuttableProxy::start(listen).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("chaos"));
    let things: Vec<String> = (1..=THINGS).map(|i| thing_name(&prefix, i)).collect();
    let metrics_port = crate::common::free_port();
    let disk = match SmallDisk::mount(dir.path(), "32m") {
        Ok(disk) => Some(disk),
        Err(reason) => {
            eprintln!("chaos: no Parquet disk-full events: {reason}");
            None
        }
    };
    let parquet = disk
        .as_ref()
        .map_or(dir.path().to_path_buf(), |d| d.mount.clone())
        .join("parquet");
    let mut text = format!(
        "shutdown_timeout = \"10s\"\n[source]\nurl = \"http://{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"1s\"\nstart_spread = \"0s\"\n\n[parquet]\ndir = \"{}\"\nrotate_after = \"300ms\"\nspool_dir = \"{}\"\nmemory_max_rows = 50\n\n[postgres]\nurl = \"{}\"\nmemory_max_rows = 50\nspool_dir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        proxy.addr,
        parquet.display(),
        dir.path().join("parquet-spool").display(),
        cluster.url(),
        dir.path().join("spool").display(),
    );
    for name in &things {
        text.push_str(&format!("[[thing]]\nname = \"{name}\"\n"));
    }
    let config = dir.path().join("things.toml");
    std::fs::write(&config, text).unwrap();
    let spawn_worker = |generation: usize| {
        WorkerProcess::spawn(
            &config,
            &[],
            dir.path().join(format!("worker-{generation}.log")),
        )
    };
    let mut generation = 0;
    let mut worker = spawn_worker(generation);
    let paused = Arc::new(AtomicBool::new(false));
    let client = client_for(&server);
    let fleet = run_pausable_fleet(client.clone(), things.clone(), Arc::clone(&paused));

    // What earlier sandbox instances accepted (each is forgotten at its restart).
    let mut accepted_before: BTreeSet<(String, i64)> = BTreeSet::new();
    let mut odd_before: BTreeSet<(String, String)> = BTreeSet::new();
    let (mut cuts, mut spooled, mut parquet_failed) = (0, false, false);
    for event in &events {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2500))).await;
        match event {
            Event::CutStreams => cuts += proxy.cut(),
            Event::RestartSandbox => {
                paused.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (held, odd) = sandbox_history(&client, &things).await;
                wait_until_stored(
                    &cluster.url(),
                    &parquet,
                    (&held, &odd),
                    Duration::from_secs(60),
                )
                .await;
                server.shutdown().await;
                accepted_before.extend(held);
                odd_before.extend(odd);
                server = start_sandbox(listen).await;
                paused.store(false, Ordering::Relaxed);
            }
            Event::StopPostgres => {
                cluster.stop();
                let outage = Duration::from_millis(rng.random_range(1500..3000));
                spooled |= watch_for_nonzero(
                    metrics_port,
                    "dweetpipe_spool_bytes{sink=\"postgres\"}",
                    outage,
                )
                .await;
                cluster.start();
            }
            Event::FillParquetDisk => {
                if let Some(disk) = &disk {
                    let filler = disk.fill();
                    let full = Duration::from_millis(rng.random_range(1500..3000));
                    parquet_failed |= watch_for_nonzero(
                        metrics_port,
                        "dweetpipe_sink_errors_total{sink=\"parquet\"}",
                        full,
                    )
                    .await;
                    std::fs::remove_file(filler).unwrap();
                }
            }
            Event::KillWorker => {
                worker.signal("-KILL");
                worker.wait().await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                generation += 1;
                worker = spawn_worker(generation);
            }
        }
        eprintln!("chaos: {event:?} done");
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    paused.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut expected, mut odd) = sandbox_history(&client, &things).await;
    expected.extend(accepted_before);
    odd.extend(odd_before);
    wait_until_stored(
        &cluster.url(),
        &parquet,
        (&expected, &odd),
        Duration::from_secs(90),
    )
    .await;
    worker.signal("-TERM");
    assert!(worker.wait().await.success(), "{}", worker.log());
    fleet.iter().for_each(|board| board.abort());

    let mut connection = PgConnection::connect(&cluster.url()).await.unwrap();
    assert_same(stored(&mut connection).await, &expected);
    assert_exactly_once(&parquet, &expected);
    let letters_in_postgres: Vec<(String, String)> =
        sqlx::query_as("SELECT thing, created FROM dead_letters")
            .fetch_all(&mut connection)
            .await
            .unwrap();
    for (sink, letters) in [
        ("PostgreSQL", letters_in_postgres),
        ("Parquet", parquet_dead_letters(&parquet)),
    ] {
        let unique: BTreeSet<_> = letters.iter().cloned().collect();
        assert_eq!(unique.len(), letters.len(), "{sink}: each dead letter once");
        assert_eq!(unique, odd, "{sink}: every odd dweet is a dead letter");
    }
    assert!(
        parquet_failed || disk.is_none() || !events.contains(&Event::FillParquetDisk),
        "a full disk made Parquet writes fail"
    );
    assert!(
        cuts > 0 || !events.contains(&Event::CutStreams),
        "a cut found connections"
    );
    assert!(
        spooled || !events.contains(&Event::StopPostgres),
        "an outage used the disk spool"
    );
    eprintln!(
        "chaos seed {seed}: {} dweets accepted over {} sandbox instances, {} worker processes, {cuts} connections cut; \
         PostgreSQL {} rows, Parquet {} rows, each dweet exactly once; {} dead letters in both",
        expected.len(),
        1 + events
            .iter()
            .filter(|e| **e == Event::RestartSandbox)
            .count(),
        generation + 1,
        expected.len(),
        parquet_dweets(&parquet).len(),
        odd.len(),
    );
    server.shutdown().await;
}
