//! `dweetpipe demo`: the whole pipeline on an embedded default, in one command. A sandbox on a
//! free port, a simulated S5D9 fleet dweeting to it, and the ingest worker writing Parquet,
//! with a live progress line, a summary, and how to query the output.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use dweetpipe::client::Client;
use dweetpipe::config::Config;
use dweetpipe::sandbox::simulator::{FleetConfig, FleetStats, run_fleet, thing_name};
use dweetpipe::sandbox::{self, SandboxConfig};
use dweetpipe::sink::parquet::ParquetConfig;
use dweetpipe::sink::postgres::{DatabaseUrl, PostgresConfig};
use dweetpipe::source::SourceConfig;
use dweetpipe::telemetry::{Metrics, MetricsConfig};
use dweetpipe::worker;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many simulated boards.
    #[arg(long, default_value_t = 20, value_parser = super::numbers::whole(1, 10_000))]
    things: usize,
    /// How long the fleet dweets, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 20, value_parser = super::numbers::whole_u64(1, 86_400))]
    duration: u64,
    /// Seconds between two dweets of one board.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = super::numbers::interval_seconds)]
    interval: f64,
    /// Where the output goes: each run writes into a fresh folder of its own under DIR
    /// (named by its start time), so the summary and the suggested queries match.
    #[arg(long, value_name = "DIR", default_value = "data/demo")]
    data: PathBuf,
    /// Keep the sandbox, its dashboard and the fleet running after --duration, until Ctrl-C,
    /// to look at the boards in a browser.
    #[arg(long)]
    keep: bool,
}

/// The figures the progress line and the summary show.
struct Progress {
    received: f64,
    rows: f64,
    files: f64,
}

impl Progress {
    fn read(metrics: &Metrics) -> Self {
        Progress {
            received: metrics.value("dweetpipe_dweets_received_total", &[]),
            rows: metrics.value("dweetpipe_sink_rows_written_total", &[]),
            files: metrics.value("dweetpipe_parquet_files_finalized_total", &[]),
        }
    }
}

pub async fn run(mut args: DemoArgs) -> anyhow::Result<()> {
    let interval = super::api::seconds("--interval", args.interval)?;
    args.data = args.data.join(
        chrono::Utc::now()
            .format("run-%Y%m%dT%H%M%S%.3fZ")
            .to_string(),
    );
    let database_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .map(DatabaseUrl::new);
    if let Some(url) = &database_url {
        // A demo that waits forever for a database is no demo: say what is wrong at once.
        dweetpipe::sink::postgres::probe(url, Duration::from_secs(10))
            .await
            .context(
                "DATABASE_URL is set, but PostgreSQL cannot be used; fix it, or unset DATABASE_URL to run the demo with Parquet only",
            )?;
    }
    let server = sandbox::start(SandboxConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..SandboxConfig::default()
    })
    .await
    .context("could not start the sandbox on loopback")?;
    let url = server.base_url();

    let config = demo_config(&args, &url, database_url);
    let postgres = config.postgres.is_some();
    let worker = worker::start(config).await?;
    let metrics = Arc::clone(worker.metrics());
    announce(&args, &url, worker.metrics_addr(), postgres);
    // Let the subscriptions open before the boards start dweeting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let client = Client::new(&url)?;
    let fleet_stats = Arc::new(FleetStats::default());
    let fleet_config = FleetConfig {
        things: args.things,
        interval,
        odd_every: Some(25),
        ..FleetConfig::default()
    };
    let mut fleet = tokio::spawn(run_fleet(client, fleet_config, Arc::clone(&fleet_stats)));
    let interrupted = watch(&args, &metrics, &fleet_stats).await;
    // Boards finish the dweet they are sending, so the count of what was sent is whole.
    fleet_stats.stop();
    if tokio::time::timeout(Duration::from_secs(10), &mut fleet)
        .await
        .is_err()
    {
        fleet.abort();
    }
    // The last dweets are in flight; give the streams a moment to deliver them.
    if !interrupted {
        let sent = fleet_stats.sent() as f64;
        let settle = Instant::now();
        while Progress::read(&metrics).received < sent && settle.elapsed() < Duration::from_secs(3)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    worker.shutdown(Duration::from_secs(10)).await?;
    server.shutdown().await;
    summarise(&args, &metrics, &fleet_stats, postgres);
    Ok(())
}

/// The embedded configuration: the simulated boards into Parquet under `args.data`, and into
/// PostgreSQL when `DATABASE_URL` names one.
fn demo_config(args: &DemoArgs, url: &str, database_url: Option<DatabaseUrl>) -> Config {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let postgres = database_url.map(|url| PostgresConfig {
        spool_dir: args.data.join("spool").join("postgres"),
        ..PostgresConfig::new(url)
    });
    Config {
        metrics: Some(MetricsConfig::new(loopback)),
        postgres,
        ..Config::for_simulated_fleet(
            SourceConfig {
                start_spread: Duration::from_millis(200),
                ..SourceConfig::new(url.to_owned())
            },
            (1..=args.things).map(|i| thing_name("S5D9-", i)),
            ParquetConfig {
                rotate_after: Duration::from_secs(5),
                spool_dir_setting: Some(args.data.join("spool").join("parquet")),
                ..ParquetConfig::new(&args.data)
            },
        )
    }
}

/// Where to look while the demo runs.
fn announce(args: &DemoArgs, url: &str, metrics_addr: Option<SocketAddr>, postgres: bool) {
    eprintln!(
        "sandbox on {url}; {} simulated S5D9 boards for {}",
        args.things,
        if args.keep {
            "as long as you like (Ctrl-C stops them)".to_owned()
        } else {
            format!("{} s", args.duration)
        }
    );
    eprintln!(
        "dashboard: {url}/  (one board live: {url}/follow/{})",
        thing_name("S5D9-", 1)
    );
    if let Some(addr) = metrics_addr {
        eprintln!(
            "worker metrics on http://{addr}/metrics; Parquet into {}",
            args.data.display()
        );
    }
    if postgres {
        eprintln!(
            "PostgreSQL: DATABASE_URL is set, so the worker writes there too (tables dweets, readings, dead_letters)"
        );
    }
}

/// Shows progress until the demo's time is up or Ctrl-C; whether it was interrupted.
async fn watch(args: &DemoArgs, metrics: &Metrics, fleet_stats: &FleetStats) -> bool {
    let started = Instant::now();
    let deadline = (!args.keep).then(|| started + Duration::from_secs(args.duration));
    let live = std::io::stderr().is_terminal();
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    let mut interrupted = false;
    // One listener for the whole loop, so a signal between two turns is not missed.
    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    while deadline.is_none_or(|deadline| Instant::now() < deadline) {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut shutdown => { interrupted = true; break }
        }
        if live {
            let now = Progress::read(metrics);
            eprint!(
                "\r{:>4.0}s  dweets sent {:>6}  received {:>6}  rows written {:>7}  files finalised {:>3}",
                started.elapsed().as_secs_f64(),
                fleet_stats.sent(),
                now.received,
                now.rows,
                now.files
            );
            let _ = std::io::stderr().flush();
        }
    }
    if live {
        eprintln!();
    }
    interrupted
}

/// What was sent, received and stored, and how to read it back.
fn summarise(args: &DemoArgs, metrics: &Metrics, fleet_stats: &FleetStats, postgres: bool) {
    let done = Progress::read(metrics);
    let rows = |sink: &str, table: &str| {
        metrics.value(
            "dweetpipe_sink_rows_written_total",
            &[("sink", sink), ("table", table)],
        )
    };
    println!(
        "demo: {} boards sent {} dweets ({} failed); the worker received {}",
        args.things,
        fleet_stats.sent(),
        fleet_stats.failed(),
        done.received
    );
    println!(
        "  Parquet: {} readings, {} raw dweets, {} dead letters in {} files under {}",
        rows("parquet", "readings"),
        rows("parquet", "dweets"),
        rows("parquet", "dead_letters"),
        done.files,
        args.data.display()
    );
    if postgres {
        println!(
            "  PostgreSQL: {} readings, {} raw dweets, {} dead letters",
            rows("postgres", "readings"),
            rows("postgres", "dweets"),
            rows("postgres", "dead_letters")
        );
    }
    let dir = args.data.display();
    // The first line works on a fresh machine: the binary that just ran is all it needs.
    let this = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            std::env::current_dir()
                .ok()
                .map(|cwd| relative_to(&exe, &cwd))
        })
        .unwrap_or_else(|| "dweetpipe".to_owned());
    println!(
        "read it back (one board's temperature per minute over the run):\n  {this} query {} --dir {dir} --sensor sensors.TemperatureC --every 1m --since 1h",
        thing_name("S5D9-", 1)
    );
    println!("query it with DuckDB (pip install duckdb-cli):");
    println!(
        "  duckdb -c \"SELECT thing, sensor, round(avg(value), 2) AS avg FROM read_parquet('{dir}/readings/**/*.parquet', hive_partitioning = true) WHERE sensor = 'sensors.TemperatureC' GROUP BY ALL ORDER BY thing\""
    );
    if postgres {
        println!("or in PostgreSQL (psql \"$DATABASE_URL\"):");
        println!(
            "  SELECT thing, round(avg(temperature_c)::numeric, 2) FROM s5d9_readings GROUP BY thing ORDER BY thing;"
        );
    }
    println!("or with pyarrow (pip install pyarrow):");
    println!(
        "  python3 -c \"import pyarrow.dataset as ds; t = ds.dataset('{dir}/readings', format='parquet', partitioning='hive').to_table(); print(t.num_rows, t.schema)\""
    );
}

/// `path` relative to `base` when it lies inside it (`target/release/dweetpipe`), else whole.
fn relative_to(path: &std::path::Path, base: &std::path::Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .display()
        .to_string()
}
