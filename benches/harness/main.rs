//! `dweetpipe bench`: figures that need whole processes, printed, never asserted. The sandbox
//! and the simulator run as child processes so the worker's own memory and CPU are measured
//! alone.

mod cluster;
mod copy_text;
mod history;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dweetpipe::config::Config;
use dweetpipe::sandbox::simulator::thing_name;
use dweetpipe::sink::parquet::ParquetConfig;
use dweetpipe::source::SourceConfig;
use dweetpipe::telemetry::Metrics;
use dweetpipe::worker;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The worker runs in this process: the allocator the `dweetpipe` binary ships with, so its
/// CPU and memory are what `dweetpipe run` spends.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Many things subscribed from one worker: RSS and CPU idle and under load.
    Fanin(FaninArgs),
    /// Importing S5D9 dweets into PostgreSQL, beside `psql \copy` of the same rows.
    Import(ImportBenchArgs),
    /// Dweet accepted by the sandbox → row visible in PostgreSQL: p50/p99 with default batching.
    Latency(LatencyArgs),
    /// The sandbox alone: dweets/s accepted, and delivered to listeners, on loopback.
    Sandbox(SandboxBenchArgs),
    /// Catch-up after an outage: every thing has `--per-thing` dweets waiting when the worker
    /// starts; the time until all are in PostgreSQL and Parquet and every stream is live.
    Catchup(CatchupArgs),
    /// Several members sharing one fleet through NATS JetStream: RSS and CPU per member, the
    /// JetStream output's dweets/s, and the time from a member's kill to its things streaming
    /// elsewhere.
    Cluster(cluster::ClusterArgs),
    /// Reading history at two fleet sizes: buffers and time of the documented queries and the
    /// dashboard panels, bytes per dweet in each sink, the rollups' cost, compaction and
    /// retention.
    History(history::HistoryArgs),
    /// Writes the import's input, dweets of the simulator's boards as JSON Lines, and stops:
    /// for counting `dweetpipe import` on them (`scripts/bench` does, beside its own input).
    S5d9Lines(S5d9LinesArgs),
}

#[derive(Debug, Args)]
pub struct S5d9LinesArgs {
    /// Dweets to write (20 boards, one dweet per board per second).
    #[arg(long, default_value_t = 20_000)]
    dweets: usize,
    /// The file to write.
    #[arg(long, value_name = "FILE")]
    out: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct CatchupArgs {
    /// Things, each with dweets waiting.
    #[arg(long, default_value_t = 1000)]
    things: usize,
    /// Dweets waiting per thing (dweet.io kept 500).
    #[arg(long, default_value_t = 500)]
    per_thing: usize,
    /// The sandbox's rate limit (requests per second per thing); off when not given.
    #[arg(long, value_name = "PER_SECOND")]
    rate_limit: Option<f64>,
    /// `[postgres] max_rows`: records per transaction (the default when not given).
    #[arg(long, value_name = "ROWS")]
    max_rows: Option<usize>,
    /// Both sinks' `memory_max_rows`: records held in memory before their backlogs spool
    /// (the default when not given).
    #[arg(long, value_name = "RECORDS")]
    memory_max_rows: Option<usize>,
    /// A server to create a scratch database on.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: String,
}

#[derive(Debug, Args)]
pub struct LatencyArgs {
    /// Things dweeting once a second each.
    #[arg(long, default_value_t = 1000)]
    things: usize,
    /// Seconds measured (after 5 s of warm-up).
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// A server to create a scratch database on.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: String,
}

#[derive(Debug, Args)]
pub struct SandboxBenchArgs {
    /// Concurrent writers, each dweeting as fast as answers come (keep-alive).
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Things written to, each with one listener.
    #[arg(long, default_value_t = 100)]
    things: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    secs: u64,
}

#[derive(Debug, Args)]
pub struct ImportBenchArgs {
    /// Dweets to import (20 boards).
    #[arg(long, default_value_t = 200_000)]
    dweets: usize,
    /// A server to create a scratch database on (the URL's database is only used to connect).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: String,
}

#[derive(Debug, Args)]
pub struct FaninArgs {
    /// Things subscribed (each a listen stream).
    #[arg(long, default_value_t = 10_000)]
    things: usize,
    /// Seconds measured with every stream up and no dweets.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Seconds measured while every thing dweets once a second.
    #[arg(long, default_value_t = 10)]
    load_secs: u64,
    /// Streams followed the dweepy way (a Python thread per listen_for_dweets_from), measured
    /// after the worker; 0 skips it. Needs `pip install dweepy`.
    #[arg(long, default_value_t = 1000)]
    dweepy_streams: usize,
}

/// The Python side of the comparisons, shipped inside the binary.
const DWEEPY_IMPORT: &str = include_str!("../python/dweepy_import.py");
const DWEEPY_LISTENERS: &str = include_str!("../python/dweepy_listeners.py");

/// Writes `script` into `dir` and returns a `python3` command for it, or why it cannot run.
fn python_script(
    dir: &std::path::Path,
    name: &str,
    script: &str,
    modules: &str,
) -> Result<Command, String> {
    let probe = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|status| status.success()) {
        return Err(format!(
            "needs python3 with {modules}: pip install {}",
            modules
                .replace("psycopg", "'psycopg[binary]'")
                .replace(',', " ")
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, script).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let mut command = Command::new("python3");
    command.arg(path).kill_on_drop(true);
    Ok(command)
}

/// Whole-process benchmarks: `cargo bench --bench harness -- <fanin|import|latency|sandbox>`.
#[derive(Debug, clap::Parser)]
#[command(name = "harness")]
struct Harness {
    #[command(subcommand)]
    command: BenchCommand,
}

/// The `dweetpipe` binary the benchmarks start as sandbox and simulator (built by cargo with
/// the bench profile).
const DWEETPIPE: &str = env!("CARGO_BIN_EXE_dweetpipe");

fn main() -> std::process::ExitCode {
    use clap::Parser;
    // `cargo bench` appends `--bench`; it is not ours.
    let args = std::env::args().filter(|arg| arg != "--bench");
    let harness = Harness::parse_from(args);
    // reqwest is built without a default TLS provider; the library installs ring for its
    // clients, and the harness's own scrapes need it too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(harness.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Fanin(args) => fanin(args).await,
        BenchCommand::Import(args) => import(args).await,
        BenchCommand::Latency(args) => latency(args).await,
        BenchCommand::Sandbox(args) => sandbox_throughput(args).await,
        BenchCommand::Catchup(args) => catchup(args).await,
        BenchCommand::Cluster(args) => cluster::cluster(args).await,
        BenchCommand::History(args) => history::history(args).await,
        BenchCommand::S5d9Lines(args) => write_s5d9_lines(&args.out, args.dweets),
    }
}

/// Resident memory and CPU time of this process, from /proc.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_bytes: u64,
    cpu_seconds: f64,
    at: Instant,
}

fn usage() -> anyhow::Result<Usage> {
    usage_of("self")
}

/// Like `usage`, for another process (`pid`) or `self`.
fn usage_of(pid: &str) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (Linux only)"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    let spent = cpu_spent(pid)?;
    Ok(Usage {
        rss_bytes: rss_kib * 1024,
        cpu_seconds: spent.user + spent.system,
        at: Instant::now(),
    })
}

/// The fields of `/proc/{pid}/stat` after the command name (which may hold spaces), from the
/// process state on: the state is field 0, minor faults 7, user and system ticks 11 and 12.
fn stat_fields(pid: &str) -> anyhow::Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// A process's CPU seconds so far, in user mode and in the kernel, and its minor page
/// faults: a phase's are the difference of two.
#[derive(Debug, Clone, Copy)]
struct CpuSpent {
    user: f64,
    system: f64,
    faults: u64,
}

fn cpu_spent(pid: &str) -> anyhow::Result<CpuSpent> {
    let fields = stat_fields(pid)?;
    let seconds = |index: usize| {
        fields
            .get(index)
            .and_then(|ticks| ticks.parse::<f64>().ok())
            .map_or(0.0, |ticks| ticks / 100.0)
    };
    let faults = fields
        .get(7)
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    Ok(CpuSpent {
        user: seconds(11),
        system: seconds(12),
        faults,
    })
}

fn cpu_percent(from: Usage, to: Usage) -> f64 {
    let wall = to.at.duration_since(from.at).as_secs_f64().max(1e-9);
    100.0 * (to.cpu_seconds - from.cpu_seconds) / wall
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn spawn_sandbox() -> anyhow::Result<(Child, String)> {
    spawn_sandbox_with(&["--max-history", "10", "--in-memory"]).await
}

/// [`spawn_sandbox`] with other sandbox flags.
async fn spawn_sandbox_with(extra: &[&str]) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(DWEETPIPE)
        .args([
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--idle-close",
            "1h",
            "--no-alert-outbox",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the sandbox")?;
    let stdout = child.stdout.take().context("sandbox stdout")?;
    let banner = BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .context("the sandbox printed no URL")?;
    let url = banner
        .strip_prefix("listening on ")
        .context("unexpected sandbox banner")?
        .to_owned();
    Ok((child, url))
}

/// The simulator as a child process: `things` boards, one dweet a second each, `count` each.
fn spawn_simulator(url: &str, things: usize, count: u64) -> anyhow::Result<Child> {
    Command::new(DWEETPIPE)
        .args(["--server", url, "simulate", "--things", &things.to_string()])
        .args(["--interval", "1", "--count", &count.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the simulator")
}

/// The simulator's own count of dweets the sandbox accepted, read from the progress line it
/// logs every 5 s: what the first stage of a fan-in delivered.
#[derive(Clone, Default)]
struct SimulatorCount(Arc<std::sync::Mutex<Option<(Instant, u64)>>>);

impl SimulatorCount {
    /// [`spawn_simulator`], following the simulator's progress.
    fn spawn(url: &str, things: usize, count: u64) -> anyhow::Result<(Child, SimulatorCount)> {
        let mut child = Command::new(DWEETPIPE)
            .args(["--server", url, "simulate", "--things", &things.to_string()])
            .args(["--interval", "1", "--count", &count.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the simulator")?;
        let counted = SimulatorCount::default();
        let mut lines = BufReader::new(child.stderr.take().context("simulator stderr")?).lines();
        let latest = Arc::clone(&counted.0);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let sent = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("sent=")?.parse::<u64>().ok());
                if let Some(sent) = sent {
                    *latest.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), sent));
                }
            }
        });
        Ok((child, counted))
    }

    fn latest(&self) -> Option<(Instant, u64)> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The worker's histogram of a dweet's `created` (the sandbox's clock, as it accepted it) to
/// its arrival: the fan-in's end-to-end latency.
const INGEST_DELAY: &str = "dweetpipe_ingest_delay_seconds";

/// The `q` quantile of what a histogram counted between two readings of its cumulative
/// buckets, interpolated within its bucket as Prometheus' `histogram_quantile` does.
fn quantile(from: &[(f64, u64)], to: &[(f64, u64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, u64)> = to
        .iter()
        .zip(
            from.iter()
                .map(|(_, count)| *count)
                .chain(std::iter::repeat(0)),
        )
        .map(|((upper, later), earlier)| (*upper, later.saturating_sub(earlier)))
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for (upper, cumulative) in counts {
        if cumulative as f64 >= rank {
            let within = (cumulative - below) as f64;
            let share = if within > 0.0 {
                (rank - below as f64) / within
            } else {
                1.0
            };
            return Some(lower + (upper - lower) * share);
        }
        (lower, below) = (upper, cumulative);
    }
    // Beyond the last finite bucket: its bound is all that is known.
    Some(lower)
}

/// Dweets per second between two progress readings.
fn sent_rate(from: Option<(Instant, u64)>, to: Option<(Instant, u64)>) -> Option<f64> {
    let ((from_at, from_sent), (to_at, to_sent)) = (from?, to?);
    let secs = to_at.duration_since(from_at).as_secs_f64();
    (secs > 0.0).then(|| to_sent.saturating_sub(from_sent) as f64 / secs)
}

fn streams_up(metrics: &Metrics) -> usize {
    metrics.value("dweetpipe_stream_up", &[]) as usize
}

/// Waits (three minutes at most) until the worker has `things` streams up.
async fn wait_for_streams(metrics: &Metrics, things: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    while streams_up(metrics) < things {
        if started.elapsed() > Duration::from_secs(180) {
            bail!(
                "only {} of {things} streams came up in 180 s",
                streams_up(metrics)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn fanin(args: FaninArgs) -> anyhow::Result<()> {
    let before = usage()?;
    let (mut sandbox, url) = spawn_sandbox().await?;
    let data = std::env::temp_dir().join(format!("dweetpipe-bench-{}", std::process::id()));
    let config = Config::for_simulated_fleet(
        SourceConfig {
            start_spread: Duration::from_secs(3),
            ..SourceConfig::new(url.clone())
        },
        (1..=args.things).map(|i| thing_name("S5D9-", i)),
        ParquetConfig::new(&data),
    );
    let started = Instant::now();
    let worker = worker::start(config).await?;
    let metrics = Arc::clone(worker.metrics());
    wait_for_streams(&metrics, args.things).await?;
    let all_up = started.elapsed();

    let idle_from = usage()?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_to = usage()?;

    let received_before = metrics.value("dweetpipe_dweets_received_total", &[]);
    let (mut simulator, simulated) = SimulatorCount::spawn(&url, args.things, args.load_secs + 8)?;
    // Past the simulator's first progress line, so the sent rate spans the same load.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let stages = |pid: Option<u32>| pid.and_then(|pid| usage_of(&pid.to_string()).ok());
    let (sandbox_pid, simulator_pid) = (sandbox.id(), simulator.id());
    let load_from = usage()?;
    let stage_from = (
        stages(sandbox_pid),
        stages(simulator_pid),
        simulated.latest(),
    );
    let received_from = metrics.value("dweetpipe_dweets_received_total", &[]);
    let delays_from = metrics.buckets(INGEST_DELAY);
    let backfilled_from =
        metrics.value("dweetpipe_dweets_received_total", &[("source", "backfill")]);
    let ended_from = metrics.value("dweetpipe_stream_disconnects_total", &[]);
    tokio::time::sleep(Duration::from_secs(args.load_secs)).await;
    let load_to = usage()?;
    let stage_to = (
        stages(sandbox_pid),
        stages(simulator_pid),
        simulated.latest(),
    );
    let received_to = metrics.value("dweetpipe_dweets_received_total", &[]);
    let delays_to = metrics.buckets(INGEST_DELAY);
    let backfilled_to = metrics.value("dweetpipe_dweets_received_total", &[("source", "backfill")]);
    let ended_to = metrics.value("dweetpipe_stream_disconnects_total", &[]);
    let _ = simulator.kill().await;

    worker.shutdown(Duration::from_secs(30)).await?;
    let dweepy = if args.dweepy_streams > 0 {
        std::fs::create_dir_all(&data)?;
        Some(dweepy_fanin(&url, &data, args.dweepy_streams, &args).await)
    } else {
        None
    };
    let _ = sandbox.kill().await;
    let _ = std::fs::remove_dir_all(&data);

    println!(
        "fan-in: {} listen streams from one worker process (sandbox and simulator in other processes)",
        args.things
    );
    println!(
        "  all streams up after        {:>8.1} s",
        all_up.as_secs_f64()
    );
    println!(
        "  RSS before the worker        {:>8.1} MiB",
        mib(before.rss_bytes)
    );
    println!(
        "  RSS idle, all streams up     {:>8.1} MiB   CPU {:>5.1}% of one core",
        mib(idle_to.rss_bytes),
        cpu_percent(idle_from, idle_to)
    );
    println!(
        "  RSS at 1 dweet/s per thing   {:>8.1} MiB   CPU {:>5.1}% of one core   {:.0} dweets/s received",
        mib(load_to.rss_bytes),
        cpu_percent(load_from, load_to),
        (received_to - received_from) / load_to.at.duration_since(load_from.at).as_secs_f64()
    );
    println!(
        "  dweets received in all       {:>8.0}",
        received_to - received_before
    );
    // Each stage under the same load: what the simulator got the sandbox to accept, what
    // each process spent, and what reached the worker by stream or by backfill.
    let percent = |from: Option<Usage>, to: Option<Usage>| match (from, to) {
        (Some(from), Some(to)) => format!("{:.1}%", cpu_percent(from, to)),
        _ => "?".to_owned(),
    };
    println!(
        "  stages: simulator sent {} dweets/s (CPU {} of one core); sandbox CPU {}; worker CPU {:.1}%, {:.0} received/s ({:.0} of them by backfill), {:.0} streams ended",
        sent_rate(stage_from.2, stage_to.2).map_or("?".to_owned(), |rate| format!("{rate:.0}")),
        percent(stage_from.1, stage_to.1),
        percent(stage_from.0, stage_to.0),
        cpu_percent(load_from, load_to),
        (received_to - received_from) / load_to.at.duration_since(load_from.at).as_secs_f64(),
        backfilled_to - backfilled_from,
        ended_to - ended_from
    );
    let delay = |q: f64| {
        quantile(&delays_from, &delays_to, q).map_or("?".to_owned(), |s| format!("{:.1}", s * 1e3))
    };
    println!(
        "  end to end (accepted by the sandbox → received by the worker, its ingest-delay histogram): p50 {} ms, p99 {} ms",
        delay(0.5),
        delay(0.99)
    );
    match dweepy {
        None => {}
        Some(Err(why)) => println!("dweepy's model: skipped ({why})"),
        Some(Ok(figures)) => {
            println!(
                "dweepy's model: {} streams, a Python thread each (dweepy {}), one process",
                args.dweepy_streams, figures.version
            );
            println!(
                "  RSS idle, all threads up     {:>8.1} MiB   CPU {:>5.1}% of one core",
                mib(figures.idle.1.rss_bytes),
                cpu_percent(figures.idle.0, figures.idle.1)
            );
            println!(
                "  RSS at 1 dweet/s per thing   {:>8.1} MiB   CPU {:>5.1}% of one core   {:.0} dweets/s received",
                mib(figures.load.1.rss_bytes),
                cpu_percent(figures.load.0, figures.load.1),
                figures.received_per_second
            );
        }
    }
    Ok(())
}

struct DweepyFigures {
    version: String,
    idle: (Usage, Usage),
    load: (Usage, Usage),
    received_per_second: f64,
}

/// Follows `streams` things with dweepy's thread-per-listen model in a Python process, and
/// measures that process idle and at 1 dweet/s per thing.
async fn dweepy_fanin(
    url: &str,
    dir: &std::path::Path,
    streams: usize,
    args: &FaninArgs,
) -> Result<DweepyFigures, String> {
    let failed = |e: &dyn std::fmt::Display| e.to_string();
    let mut command = python_script(dir, "dweepy_listeners.py", DWEEPY_LISTENERS, "dweepy")?;
    let mut child = command
        .args([url, &streams.to_string(), "S5D9-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| failed(&e))?;
    let pid = child.id().ok_or("python exited at once")?.to_string();
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let started = lines.next_line().await.map_err(|e| failed(&e))?;
    if started.as_deref() != Some("started") {
        return Err("the listener script did not start".to_owned());
    }
    let mut received = async || -> Result<f64, String> {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(b"?\n").await.map_err(|e| failed(&e))?;
        let line = lines.next_line().await.map_err(|e| failed(&e))?;
        line.and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| "no count from python".to_owned())
    };
    // dweepy gives no signal once subscribed; its threads connect within a few seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_from = usage_of(&pid).map_err(|e| failed(&e))?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_to = usage_of(&pid).map_err(|e| failed(&e))?;
    let mut simulator =
        spawn_simulator(url, streams, args.load_secs + 2).map_err(|e| failed(&e))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load_from = usage_of(&pid).map_err(|e| failed(&e))?;
    let count_from = received().await?;
    tokio::time::sleep(Duration::from_secs(args.load_secs)).await;
    let load_to = usage_of(&pid).map_err(|e| failed(&e))?;
    let count_to = received().await?;
    let _ = simulator.kill().await;
    let _ = child.kill().await;
    let version = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('dweepy'))",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Ok(DweepyFigures {
        version,
        idle: (idle_from, idle_to),
        load: (load_from, load_to),
        received_per_second: (count_to - count_from)
            / load_to.at.duration_since(load_from.at).as_secs_f64(),
    })
}

/// A scratch database on the server of `admin_url`, dropped by `drop`.
struct ScratchDatabase {
    admin: String,
    name: String,
    url: String,
}

impl ScratchDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<Self> {
        Self::create_labelled(admin_url, "").await
    }

    /// A scratch database whose name also carries `label` (several in one run).
    async fn create_labelled(admin_url: &str, label: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        let name = format!("dweetpipe_bench_{}{label}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(admin_url)
            .await
            .context("connecting with --database-url")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}"
        )))
        .execute(&mut admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        let mut url = reqwest::Url::parse(admin_url).context("--database-url is not a URL")?;
        url.set_path(&format!("/{name}"));
        Ok(ScratchDatabase {
            admin: admin_url.to_owned(),
            name,
            url: url.to_string(),
        })
    }

    async fn drop(self) {
        use sqlx::Connection;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

async fn truncate(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await?;
    sqlx::query(
        "TRUNCATE dweets, readings, readings_1m, readings_1h, rollup_pending, dead_letters, things",
    )
    .execute(&mut connection)
    .await?;
    sqlx::query("CHECKPOINT")
        .execute(&mut connection)
        .await
        .ok();
    Ok(())
}

/// The import's input: `dweets` S5D9 dweets from the simulator's boards as JSON Lines, 20
/// boards, one dweet per board per second.
fn write_s5d9_lines(path: &std::path::Path, dweets: usize) -> anyhow::Result<()> {
    use dweetpipe::client::{Created, Dweet};
    use dweetpipe::sandbox::simulator::S5d9Board;

    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    const BOARDS: usize = 20;
    let mut boards: Vec<S5d9Board> = (0..BOARDS as u64).map(S5d9Board::new).collect();
    let start = 1_795_000_000_000i64;
    for i in 0..dweets {
        let dweet = Dweet {
            thing: format!("S5D9-{:04}", i % BOARDS + 1),
            created: Created::from_datetime(dweetpipe::record::ms_to_datetime(
                start + (i / BOARDS) as i64 * 1000,
            )),
            content: boards[i % BOARDS].next_payload(),
            transaction: None,
        };
        serde_json::to_writer(&mut out, &dweet)?;
        std::io::Write::write_all(&mut out, b"\n")?;
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}

async fn import(args: ImportBenchArgs) -> anyhow::Result<()> {
    use dweetpipe::import::Imported;
    use dweetpipe::record::Record;
    use dweetpipe::sink::postgres::{DatabaseUrl, PostgresConfig, PostgresSink};

    let scratch = ScratchDatabase::create(&args.database_url).await?;
    let url = DatabaseUrl::new(scratch.url.clone());
    dweetpipe::sink::postgres::migrate(&url).await?;
    let work = tempfile_dir()?;

    // The input: a JSON Lines file of S5D9 dweets from the simulator's boards.
    let jsonl = work.join("dweets.jsonl");
    write_s5d9_lines(&jsonl, args.dweets)?;

    // dweetpipe: read, normalise, COPY in batches with watermarks (what `import` does).
    let metrics = Arc::new(dweetpipe::telemetry::Metrics::new()?);
    let before_reading = cpu_spent("self")?;
    let started = Instant::now();
    let mut imported = Imported::default();
    imported.read(
        "bench",
        std::io::BufReader::new(std::fs::File::open(&jsonl)?),
        0,
    )?;
    let (records, _) = imported.into_records(0);
    let parsed = started.elapsed();
    // Whether a slow read was this process working longer or waiting for a core.
    let after_reading = cpu_spent("self")?;
    let sink_config = PostgresConfig {
        spool_dir: work.join("spool"),
        ..PostgresConfig::new(url.clone())
    };
    let mut sink =
        PostgresSink::connect(&sink_config, Arc::clone(&metrics), Duration::from_secs(10))
            .await?
            .for_bulk_load();
    let written =
        dweetpipe::import::write_to_sinks(&records, None, Some(&mut sink), |_| {}).await?;
    let ours = started.elapsed();
    let stored = metrics.value("dweetpipe_sink_rows_written_total", &[("table", "dweets")]);
    if stored as usize != args.dweets {
        bail!("only {stored} of {} dweets were stored", args.dweets);
    }

    // The reference: the same rows, pre-normalised, loaded with psql \copy; then the same
    // split by thing into two halves loaded by two psql at once (PostgreSQL's own ceiling
    // for two sessions on this machine).
    let things: Vec<&str> = {
        let mut things: Vec<&str> = records.iter().filter_map(Record::thing).collect();
        things.sort_unstable();
        things.dedup();
        things
    };
    let half_of = |record: &Record| {
        record
            .thing()
            .and_then(|t| things.binary_search(&t).ok())
            .map_or(0, |index| index % 2)
    };
    let files = |name: &str| work.join(name);
    {
        let mut outputs = Vec::new();
        for name in [
            "dweets.copy",
            "readings.copy",
            "dweets.0",
            "readings.0",
            "dweets.1",
            "readings.1",
        ] {
            outputs.push(std::io::BufWriter::new(std::fs::File::create(files(name))?));
        }
        for batch in records.chunks(10_000) {
            let dweets = batch.iter().filter(|r| matches!(r, Record::Dweet(_)));
            let rows = copy_text::CopyRows::of(dweets.clone());
            std::io::Write::write_all(&mut outputs[0], rows.dweets.as_bytes())?;
            std::io::Write::write_all(&mut outputs[1], rows.readings.as_bytes())?;
            for half in 0..2 {
                let rows = copy_text::CopyRows::of(dweets.clone().filter(|r| half_of(r) == half));
                std::io::Write::write_all(&mut outputs[2 + 2 * half], rows.dweets.as_bytes())?;
                std::io::Write::write_all(&mut outputs[3 + 2 * half], rows.readings.as_bytes())?;
            }
        }
        for mut output in outputs {
            std::io::Write::flush(&mut output)?;
        }
    }
    let psql_copy =
        |dweets: &str, readings: &str| psql_copy_in(&scratch.url, &files(dweets), &files(readings));
    truncate(&scratch.url).await?;
    let started = Instant::now();
    let status = psql_copy("dweets.copy", "readings.copy")
        .status()
        .await
        .context("running psql (apt-get install postgresql-client)")?;
    let reference = started.elapsed();
    if !status.success() {
        bail!("psql \\copy failed");
    }
    truncate(&scratch.url).await?;
    let started = Instant::now();
    let (first, second) = tokio::join!(
        psql_copy("dweets.0", "readings.0").status(),
        psql_copy("dweets.1", "readings.1").status()
    );
    let two_sessions = started.elapsed();
    if !(first?.success() && second?.success())
        || count_dweets(&scratch.url).await? as usize != args.dweets
    {
        bail!("two psql \\copy sessions failed");
    }

    // A dweepy user's pipeline: json.loads, flatten in Python, psycopg batched INSERTs.
    truncate(&scratch.url).await?;
    let python = match python_script(&work, "dweepy_import.py", DWEEPY_IMPORT, "psycopg") {
        Err(why) => Err(why),
        Ok(mut command) => {
            let started = Instant::now();
            let output = command.arg(&scratch.url).arg(&jsonl).output().await?;
            if !output.status.success() {
                bail!(
                    "the Python pipeline failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let elapsed = started.elapsed();
            let stored = count_dweets(&scratch.url).await?;
            if stored as usize != args.dweets {
                bail!(
                    "the Python pipeline stored {stored} of {} dweets",
                    args.dweets
                );
            }
            Ok(elapsed)
        }
    };
    let _ = std::fs::remove_dir_all(&work);
    scratch.drop().await;

    let rate = |elapsed: Duration| args.dweets as f64 / elapsed.as_secs_f64();
    println!(
        "import of {} S5D9 dweets (13 readings each) into PostgreSQL:",
        args.dweets
    );
    println!(
        "  dweetpipe (parse, normalise, COPY with watermarks)  {:>8.1} s  {:>8.0} dweets/s",
        ours.as_secs_f64(),
        rate(ours)
    );
    println!(
        "  of which reading and normalising the file           {:>8.1} s   (CPU {:.2} s user, {:.2} s system; {} page faults)",
        parsed.as_secs_f64(),
        after_reading.user - before_reading.user,
        after_reading.system - before_reading.system,
        after_reading.faults - before_reading.faults
    );
    println!(
        "  of which the rollups after the last batch           {:>8.1} s",
        written.rollups_took.as_secs_f64()
    );
    println!(
        "  of which re-keying {} closed partition(s) by board   {:>8.1} s",
        written.partitions_arranged.len(),
        written.arranging_took.as_secs_f64()
    );
    println!(
        "  psql \\copy of the same pre-normalised rows          {:>8.1} s  {:>8.0} dweets/s",
        reference.as_secs_f64(),
        rate(reference)
    );
    println!(
        "  two psql \\copy at once, the rows split by thing     {:>8.1} s  {:>8.0} dweets/s",
        two_sessions.as_secs_f64(),
        rate(two_sessions)
    );
    println!(
        "  ratio to one psql (target >= 1.5)                   {:>8.2}   (two psql: {:.2})",
        rate(ours) / rate(reference),
        rate(two_sessions) / rate(reference)
    );
    println!(
        "  ratio to two psql, history work included (>= 0.95)  {:>8.2}",
        rate(ours) / rate(two_sessions)
    );
    match python {
        Ok(elapsed) => {
            println!(
                "  Python: json + psycopg executemany, 1,000 a commit {:>8.1} s  {:>8.0} dweets/s",
                elapsed.as_secs_f64(),
                rate(elapsed)
            );
            println!(
                "  dweetpipe / Python (target >= 5)                    {:>8.1}",
                rate(ours) / rate(elapsed)
            );
        }
        Err(why) => println!("  Python pipeline: skipped ({why})"),
    }
    Ok(())
}

async fn count_dweets(url: &str) -> anyhow::Result<i64> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM dweets")
        .fetch_one(&mut connection)
        .await?)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("dweetpipe-bench-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts a worker with PostgreSQL (a scratch database) and Parquet on default batching, has
/// `things` boards dweet once a second, and times each row's commit against the sandbox's
/// `created` (a trigger notifies; PostgreSQL delivers notifications at commit).
async fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    use dweetpipe::sink::postgres::{DatabaseUrl, PostgresConfig};
    use sqlx::Connection;

    let scratch = ScratchDatabase::create(&args.database_url).await?;
    let (mut sandbox, url) = spawn_sandbox().await?;
    let data = tempfile_dir()?;
    let mut config = Config::for_simulated_fleet(
        SourceConfig {
            start_spread: Duration::from_secs(2),
            ..SourceConfig::new(url.clone())
        },
        (1..=args.things).map(|i| thing_name("S5D9-", i)),
        ParquetConfig::new(data.join("parquet")),
    );
    config.postgres = Some(PostgresConfig {
        spool_dir: data.join("spool"),
        ..PostgresConfig::new(DatabaseUrl::new(scratch.url.clone()))
    });
    // Every committed dweet notifies its created time; notifications are delivered at commit,
    // so arrival time minus created is "accepted by the sandbox -> committed".
    dweetpipe::sink::postgres::migrate(&DatabaseUrl::new(scratch.url.clone())).await?;
    {
        let mut connection = sqlx::PgConnection::connect(&scratch.url).await?;
        sqlx::raw_sql(
            "CREATE FUNCTION bench_notify_committed() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_notify('dweet_committed', ((extract(epoch FROM NEW.created) * 1000)::bigint)::text); RETURN NULL; END $$; \
             CREATE TRIGGER bench_notify_committed AFTER INSERT ON dweets FOR EACH ROW EXECUTE FUNCTION bench_notify_committed();",
        )
        .execute(&mut connection)
        .await?;
    }
    let worker = worker::start(config).await?;
    let metrics = Arc::clone(worker.metrics());
    wait_for_streams(&metrics, args.things).await?;
    let mut simulator = spawn_simulator(&url, args.things, args.secs + 8)?;

    let mut listener = sqlx::postgres::PgListener::connect(&scratch.url).await?;
    listener.listen("dweet_committed").await?;
    let warm_until = Instant::now() + Duration::from_secs(5);
    let stop_at = warm_until + Duration::from_secs(args.secs);
    let mut latencies_ms: Vec<i64> = Vec::new();
    while let Ok(notification) = tokio::time::timeout_at(stop_at.into(), listener.recv()).await {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let created_ms: i64 = notification?
            .payload()
            .parse()
            .context("a notification that is not a created time")?;
        if Instant::now() >= warm_until {
            latencies_ms.push(now_ms - created_ms);
        }
    }
    let _ = simulator.kill().await;
    let stages = Stages::read(&metrics);
    worker.shutdown(Duration::from_secs(30)).await?;
    let _ = sandbox.kill().await;
    let _ = std::fs::remove_dir_all(&data);
    scratch.drop().await;
    print_latency(&args, latencies_ms)?;
    println!(
        "  where it goes (means): created -> received by the worker {:.1} ms; one PostgreSQL write transaction {:.1} ms ({} of them); one Parquet write {:.1} ms",
        stages.received_ms,
        stages.postgres_write_ms,
        stages.postgres_writes,
        stages.parquet_write_ms
    );
    Ok(())
}

/// Mean time per pipeline stage, from the worker's own histograms.
struct Stages {
    received_ms: f64,
    postgres_write_ms: f64,
    postgres_writes: u64,
    parquet_write_ms: f64,
}

impl Stages {
    fn read(metrics: &Metrics) -> Self {
        let mean = |histogram: &prometheus::Histogram| {
            1000.0 * histogram.get_sample_sum() / (histogram.get_sample_count().max(1) as f64)
        };
        let postgres = metrics.sink_write_duration(dweetpipe::telemetry::SinkName::Postgres);
        Stages {
            received_ms: mean(&metrics.ingest_delay),
            postgres_write_ms: mean(&postgres),
            postgres_writes: postgres.get_sample_count(),
            parquet_write_ms: mean(
                &metrics.sink_write_duration(dweetpipe::telemetry::SinkName::Parquet),
            ),
        }
    }
}

fn print_latency(args: &LatencyArgs, mut latencies_ms: Vec<i64>) -> anyhow::Result<()> {
    if latencies_ms.is_empty() {
        bail!("no rows became visible while measuring");
    }
    latencies_ms.sort_unstable();
    let at = |q: f64| latencies_ms[((latencies_ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "latency: {} things x 1 dweet/s, dweet accepted by the sandbox -> row committed in PostgreSQL (default batching, Parquet too)",
        args.things
    );
    println!("  rows measured   {:>8}", latencies_ms.len());
    println!("  p50             {:>8} ms", at(0.50));
    println!("  p90             {:>8} ms", at(0.90));
    println!("  p99             {:>8} ms   (target < 250 ms)", at(0.99));
    println!(
        "  max             {:>8} ms",
        latencies_ms[latencies_ms.len() - 1]
    );
    println!(
        "  (commit seen through LISTEN/NOTIFY by a client on the same machine; created has ms resolution)"
    );
    Ok(())
}

/// Writers dweet to `things` things as fast as the sandbox answers, one listener per thing
/// counts deliveries. The writers and listeners share this process (and the 2 cores) with
/// nothing else; the sandbox is its own process.
async fn sandbox_throughput(args: SandboxBenchArgs) -> anyhow::Result<()> {
    let data = tempfile_dir()?.join("sandbox-data");
    let data_arg = data.display().to_string();
    for (mode, flags) in [
        (
            "durable (--data: each write committed, group commit, before it is answered)",
            vec!["--max-history", "10", "--data", data_arg.as_str()],
        ),
        ("--in-memory", vec!["--max-history", "10", "--in-memory"]),
    ] {
        println!("sandbox {mode}:");
        sandbox_run(&args, &flags).await?;
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// One sandbox with `flags`, measured as [`sandbox_throughput`] says.
async fn sandbox_run(args: &SandboxBenchArgs, flags: &[&str]) -> anyhow::Result<()> {
    use dweetpipe::client::{Client, ListenOptions};
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let (mut sandbox, url) = spawn_sandbox_with(flags).await?;
    let sandbox_pid = sandbox.id().context("sandbox pid")?.to_string();
    let client = Client::new(&url)?;
    let names: Vec<String> = (1..=args.things)
        .map(|i| dweetpipe::sandbox::simulator::thing_name("bench-", i))
        .collect();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut listeners = Vec::new();
    for name in &names {
        let mut stream = client
            .listen_for_dweets_from(name, None, ListenOptions::default())
            .await?;
        let delivered = Arc::clone(&delivered);
        listeners.push(tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if item.is_ok() {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let accepted = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    let writer_count = args.writers;
    for writer in 0..args.writers {
        let (client, names) = (client.clone(), names.clone());
        let (accepted, running) = (Arc::clone(&accepted), Arc::clone(&running));
        writers.push(tokio::spawn(async move {
            let mut board = dweetpipe::sandbox::simulator::S5d9Board::new(writer as u64);
            let mut i = writer;
            while running.load(Ordering::Relaxed) {
                let name = &names[i % names.len()];
                if client
                    .dweet_quietly_for(name, &board.next_payload(), None)
                    .await
                    .is_ok()
                {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                i += writer_count;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (accepted_from, delivered_from) = (
        accepted.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
    );
    let sandbox_from = usage_of(&sandbox_pid)?;
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let sandbox_to = usage_of(&sandbox_pid)?;
    let (accepted_to, delivered_to) = (
        accepted.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
    );
    running.store(false, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.await;
    }
    listeners.iter().for_each(|l| l.abort());
    let _ = sandbox.kill().await;
    let wall = sandbox_to.at.duration_since(sandbox_from.at).as_secs_f64();
    println!(
        "sandbox: {} writers (dweet_quietly_for, keep-alive) over {} things, one listener each, loopback",
        args.writers, args.things
    );
    println!(
        "  accepted        {:>8.0} dweets/s",
        (accepted_to - accepted_from) as f64 / wall
    );
    println!(
        "  delivered       {:>8.0} dweets/s to listeners",
        (delivered_to - delivered_from) as f64 / wall
    );
    println!(
        "  sandbox CPU     {:>8.1}% of one core, RSS {:.1} MiB (writers and listeners run in another process on the same 2 cores)",
        cpu_percent(sandbox_from, sandbox_to),
        mib(sandbox_to.rss_bytes)
    );
    Ok(())
}

/// SIGTERM, and the wait for the process to end.
async fn stop_gently(child: &mut Child) -> anyhow::Result<()> {
    let pid = child.id().context("the process already ended")?.to_string();
    Command::new("kill").args(["-TERM", &pid]).status().await?;
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .context("it did not stop within 20 s")??;
    Ok(())
}

/// Fills a sandbox with `per_thing` dweets for each thing (32 writers), starts a worker with
/// both sinks, and times its catch-up.
async fn catchup(args: CatchupArgs) -> anyhow::Result<()> {
    use dweetpipe::sandbox::simulator::S5d9Board;
    let history = args.per_thing.max(10).to_string();
    // With a rate limit the fleet's backlog is written without it (into a sandbox that keeps
    // its state), and the sandbox restarted with it: the limit applies to the catch-up, not to
    // filling (500 dweets a thing at one a second would take 500 s).
    let state = tempfile_dir()?.join("catchup-sandbox");
    let state_arg = state.display().to_string();
    let mut flags = vec!["--max-history", history.as_str()];
    match args.rate_limit {
        Some(_) => flags.extend(["--data", state_arg.as_str()]),
        None => flags.push("--in-memory"),
    }
    let (mut sandbox, mut url) = spawn_sandbox_with(&flags).await?;
    let scratch = ScratchDatabase::create(&args.database_url).await?;
    let things: Vec<String> = (1..=args.things).map(|i| thing_name("S5D9-", i)).collect();

    // The outage: the fleet dweets while no worker runs.
    let filled = Instant::now();
    let client = dweetpipe::client::Client::new(&url)?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = args.things * args.per_thing;
    let writers: Vec<_> = (0..32)
        .map(|writer| {
            let (client, things, next) = (client.clone(), things.clone(), Arc::clone(&next));
            tokio::spawn(async move {
                let mut board = S5d9Board::new(writer);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let thing = &things[i % things.len()];
                    // A rate-limited sandbox refuses some; try again, the fleet would too.
                    while client
                        .dweet_for(thing, &board.next_payload(), None)
                        .await
                        .is_err()
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await?;
    }
    let fill_secs = filled.elapsed().as_secs_f64();
    let rate = args.rate_limit.map(|r| r.to_string());
    if let Some(rate) = &rate {
        stop_gently(&mut sandbox).await?;
        flags.extend(["--rate-limit", rate.as_str()]);
        (sandbox, url) = spawn_sandbox_with(&flags).await?;
    }

    let data = tempfile_dir()?;
    let mut config = Config::for_simulated_fleet(
        SourceConfig::new(url.clone()),
        things.iter().cloned(),
        ParquetConfig {
            spool_dir_setting: Some(data.join("parquet-spool")),
            ..ParquetConfig::new(data.join("parquet"))
        },
    );
    let mut postgres = dweetpipe::sink::postgres::PostgresConfig::new(
        dweetpipe::sink::postgres::DatabaseUrl::new(scratch.url.clone()),
    );
    postgres.spool_dir = data.join("spool");
    if let Some(rows) = args.max_rows {
        postgres.max_rows = rows;
    }
    if let Some(records) = args.memory_max_rows {
        postgres.memory_max_rows = records;
        if let Some(parquet) = config.parquet.as_mut() {
            parquet.memory_max_rows = records;
        }
    }
    config.postgres = Some(postgres);
    let before = usage()?;
    let started = Instant::now();
    let worker = worker::start(config).await?;
    let metrics = Arc::clone(worker.metrics());
    let written = |sink: &str| {
        metrics.value(
            "dweetpipe_sink_rows_written_total",
            &[("sink", sink), ("table", "dweets")],
        )
    };
    let (mut postgres_at, mut live_at) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    // Where the time goes: every half second, what each stage has done so far.
    let mut timeline: Vec<CatchupSample> = Vec::new();
    // Parquet seals every 5 minutes by default: its catch-up is "received", sealed at the
    // next rotation; PostgreSQL's is committed rows.
    while postgres_at.is_none() || live_at.is_none() {
        if Instant::now() > deadline {
            bail!(
                "no catch-up within 10 minutes: {} of {total} in PostgreSQL, {} streams up",
                written("postgres"),
                streams_up(&metrics)
            );
        }
        if postgres_at.is_none() && written("postgres") >= total as f64 {
            postgres_at = Some(started.elapsed());
        }
        if live_at.is_none() && streams_up(&metrics) == args.things {
            live_at = Some(started.elapsed());
        }
        let at = started.elapsed();
        if timeline
            .last()
            .is_none_or(|last| at >= last.at + Duration::from_millis(500))
        {
            timeline.push(CatchupSample {
                at,
                streams_up: streams_up(&metrics),
                by_stream: metrics
                    .value("dweetpipe_dweets_received_total", &[("source", "stream")]),
                by_backfill: metrics
                    .value("dweetpipe_dweets_received_total", &[("source", "backfill")]),
                postgres: written("postgres"),
                parquet_held: metrics.value("dweetpipe_sink_buffer_rows", &[("sink", "parquet")]),
                postgres_waiting: metrics
                    .value("dweetpipe_sink_buffer_rows", &[("sink", "postgres")]),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = metrics.value("dweetpipe_dweets_received_total", &[]);
    let after = usage()?;
    let attempts = metrics.value("dweetpipe_stream_connects_total", &[]);
    let refused = metrics.value("dweetpipe_stream_connects_total", &[("outcome", "refused")])
        + metrics.value("dweetpipe_stream_connects_total", &[("outcome", "failed")]);
    worker.shutdown(Duration::from_secs(60)).await?;
    let parquet_rows = written("parquet");
    let _ = sandbox.kill().await;
    let ceiling = two_session_ceiling(&scratch.url, &data).await;
    scratch.drop().await;
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&state);

    println!(
        "catch-up: {} things x {} dweets waiting ({total} dweets; sandbox filled in {fill_secs:.1} s{})",
        args.things,
        args.per_thing,
        args.rate_limit
            .map_or(String::new(), |r| format!(", rate limit {r}/s per thing"))
    );
    println!(
        "  every stream live after      {:>8.1} s",
        live_at.unwrap_or_default().as_secs_f64()
    );
    println!(
        "  every dweet in PostgreSQL    {:>8.1} s   ({:.0} dweets/s)",
        postgres_at.unwrap_or_default().as_secs_f64(),
        total as f64 / postgres_at.unwrap_or_default().as_secs_f64().max(0.001)
    );
    println!(
        "  Parquet at shutdown          {:>8.0} dweets sealed   received {received:.0}",
        parquet_rows
    );
    println!(
        "  worker CPU                   {:>8.1}% of one core   RSS {:.1} MiB",
        cpu_percent(before, after),
        mib(after.rss_bytes)
    );
    println!(
        "  refused or failed connects   {refused:>8.0}   ({:.1} connection attempts per thing in all)",
        attempts / args.things as f64
    );
    match ceiling {
        Ok(ceiling) => println!(
            "  the same rows by two psql \\copy at once, split by thing, into tables of the same shape: {:.1} s; the catch-up took {:.2}x that",
            ceiling.as_secs_f64(),
            postgres_at.unwrap_or_default().as_secs_f64() / ceiling.as_secs_f64().max(0.001)
        ),
        Err(why) => println!("  two-session ceiling: skipped ({why:#})"),
    }
    println!(
        "  timeline (s: streams up, received by stream + by backfill, in PostgreSQL, held by the Parquet and PostgreSQL sinks):"
    );
    for sample in timeline.iter().step_by(2) {
        println!(
            "    {:>5.1}  {:>5} up  {:>7.0} + {:>7.0} received  {:>7.0} in PostgreSQL  {:>7.0} / {:>7.0} held",
            sample.at.as_secs_f64(),
            sample.streams_up,
            sample.by_stream,
            sample.by_backfill,
            sample.postgres,
            sample.parquet_held,
            sample.postgres_waiting
        );
    }
    Ok(())
}

/// One reading of a catch-up's progress.
struct CatchupSample {
    at: Duration,
    streams_up: usize,
    by_stream: f64,
    by_backfill: f64,
    postgres: f64,
    parquet_held: f64,
    postgres_waiting: f64,
}

/// The reference for a catch-up: the rows it stored, exported, emptied out and loaded again
/// by two `psql \copy` sessions at once (the things split between them) into the same
/// tables: PostgreSQL's own ceiling for those rows on this machine, in the same run.
async fn two_session_ceiling(url: &str, work: &std::path::Path) -> anyhow::Result<Duration> {
    let file = |table: &str, half: u8| work.join(format!("{table}.{half}"));
    let half_of = |half: u8| format!("abs(hashtext(thing)) % 2 = {half}");
    for half in 0..2 {
        let status = psql(
            url,
            &[
                format!(
                    "\\copy (SELECT {DWEETS_COLUMNS} FROM dweets WHERE {}) TO '{}'",
                    half_of(half),
                    file("dweets", half).display()
                ),
                format!(
                    "\\copy (SELECT {READINGS_COLUMNS} FROM readings WHERE {}) TO '{}'",
                    half_of(half),
                    file("readings", half).display()
                ),
            ],
        )
        .status()
        .await
        .context("running psql (apt-get install postgresql-client)")?;
        if !status.success() {
            bail!("psql could not export the stored rows");
        }
    }
    truncate(url).await?;
    let load =
        |half: u8| psql_copy_in(url, &file("dweets", half), &file("readings", half)).status();
    let started = Instant::now();
    let (first, second) = tokio::join!(load(0), load(1));
    let elapsed = started.elapsed();
    if !(first?.success() && second?.success()) {
        bail!("the two psql \\copy sessions failed");
    }
    Ok(elapsed)
}

/// The columns `psql \\copy` moves, in the order `copy_text` writes them.
const DWEETS_COLUMNS: &str = "thing, created, received_at, content";
const READINGS_COLUMNS: &str = "time, thing, sensor, value";

/// `psql` running `commands` against `url`, stopping at the first that fails.
fn psql(url: &str, commands: &[String]) -> Command {
    let mut command = Command::new("psql");
    command.arg(url).args(["-v", "ON_ERROR_STOP=1", "-q"]);
    for sql in commands {
        command.arg("-c").arg(sql);
    }
    command
}

/// One `psql` session loading a dweets file and a readings file (COPY text) into their tables.
fn psql_copy_in(url: &str, dweets: &std::path::Path, readings: &std::path::Path) -> Command {
    psql(
        url,
        &[
            format!(
                "\\copy dweets ({DWEETS_COLUMNS}) FROM '{}'",
                dweets.display()
            ),
            format!(
                "\\copy readings ({READINGS_COLUMNS}) FROM '{}'",
                readings.display()
            ),
        ],
    )
}
