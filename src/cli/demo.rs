//! `dweetpipe demo`: the whole pipeline on an embedded default, in one command. A sandbox on a
//! free port, a simulated S5D9 fleet dweeting to it, and a listener per board collecting what
//! the fleet sent, with a live progress line and a summary at the end.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use dweetpipe::client::{Client, ListenOptions};
use dweetpipe::sandbox::simulator::{FleetConfig, FleetStats, run_fleet, thing_name};
use dweetpipe::sandbox::{self, SandboxConfig};
use futures_util::StreamExt;
use tokio::task::JoinSet;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many simulated boards.
    #[arg(long, default_value_t = 20)]
    things: usize,
    /// How long to run, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    duration: u64,
    /// Seconds between two dweets of one board.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    interval: f64,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let interval = super::api::seconds("--interval", args.interval)?;
    let server = sandbox::start(SandboxConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..SandboxConfig::default()
    })
    .await
    .context("could not start the sandbox on loopback")?;
    let url = server.base_url();
    eprintln!(
        "sandbox on {url}; {} simulated S5D9 boards for {} s",
        args.things, args.duration
    );
    let client = Client::new(&url)?;

    let received = Arc::new(AtomicU64::new(0));
    let mut listeners = JoinSet::new();
    for index in 1..=args.things {
        let mut stream = client
            .listen_for_dweets_from(&thing_name("S5D9-", index), None, ListenOptions::default())
            .await?;
        let received = Arc::clone(&received);
        listeners.spawn(async move {
            while let Some(Ok(_)) = stream.next().await {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let fleet_stats = Arc::new(FleetStats::default());
    let fleet_config = FleetConfig {
        things: args.things,
        interval,
        odd_every: Some(25),
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(run_fleet(
        client.clone(),
        fleet_config,
        Arc::clone(&fleet_stats),
    ));

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let live = std::io::stderr().is_terminal();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = super::shutdown_signal() => break,
        }
        let line = format!(
            "{:>4.0}s  sent {:>6}  received {:>6}  failed {}",
            started.elapsed().as_secs_f64(),
            fleet_stats.sent(),
            received.load(Ordering::Relaxed),
            fleet_stats.failed()
        );
        if live {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    if live {
        eprintln!();
    }
    fleet.abort();
    // Let in-flight dweets reach the listeners before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.shutdown().await;
    while listeners.join_next().await.is_some() {}

    println!(
        "demo: {} boards sent {} dweets, listeners received {}, {} failed",
        args.things,
        fleet_stats.sent(),
        received.load(Ordering::Relaxed),
        fleet_stats.failed()
    );
    println!(
        "next: keep a sandbox running with `dweetpipe sandbox` and follow a board with `dweetpipe --server URL listen S5D9-0001`"
    );
    Ok(())
}
