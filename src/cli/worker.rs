//! `dweetpipe run` and `dweetpipe check`: the ingest worker and its dry run.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use dweetpipe::client::{self, Client};
use dweetpipe::config::Config;
use dweetpipe::sink::postgres::{self, DatabaseUrl};
use dweetpipe::worker;

use super::systemd;

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The things file (TOML). `DWEETPIPE__SECTION__KEY` variables override its values.
    #[arg(
        long,
        short,
        env = "DWEETPIPE_CONFIG",
        default_value = "things.toml",
        value_name = "PATH"
    )]
    config: PathBuf,
}

impl ConfigArgs {
    pub fn path(&self) -> &Path {
        &self.config
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// postgres://user:password@host:5432/database
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: String,
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let url = DatabaseUrl::new(args.database_url);
    let applied = postgres::migrate(&url).await?;
    println!("schema up to date ({applied} migration(s) applied now)");
    Ok(())
}

/// Runs the worker until SIGTERM or SIGINT; SIGHUP reloads the file.
pub async fn run(args: ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let shutdown_timeout = config.shutdown_timeout;
    let mut worker = worker::start(config).await?;
    if let Some(addr) = worker.metrics_addr() {
        tracing::info!("metrics on http://{addr}/metrics, health on /healthz and /readyz");
    }
    let mut hangups = hangup_signals()?;
    notify_systemd(&format!(
        "READY=1\nSTATUS=ingesting {} things",
        worker.things().count()
    ));
    // Pinged from this loop, so a stuck loop stops the pings and systemd restarts the worker.
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    // One listener for the whole run, so a signal between two turns is not missed.
    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangups.recv() => {
                notify_systemd("RELOADING=1");
                reload(&mut worker, &args.config).await;
                notify_systemd(&format!("READY=1\nSTATUS=ingesting {} things", worker.things().count()));
            }
            _ = async { watchdog.as_mut()?.tick().await; Some(()) }, if watchdog.is_some() => {
                notify_systemd("WATCHDOG=1");
            }
        }
    }
    notify_systemd("STOPPING=1");
    tracing::info!(timeout = ?shutdown_timeout, "shutting down: stopping streams and sealing sinks");
    worker.shutdown(shutdown_timeout).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Tells systemd (under `Type=notify`); a failure is logged, never fatal.
fn notify_systemd(state: &str) {
    if let Err(error) = systemd::notify(state) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

/// Validates the file first: an invalid file is reported and the running configuration kept.
async fn reload(worker: &mut worker::WorkerHandle, path: &Path) {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            worker.metrics().config_reloaded(false);
            tracing::error!("reload refused, keeping the running configuration: {error}");
            return;
        }
    };
    match worker.reload(config).await {
        Ok(report) => tracing::info!(
            added = ?report.added,
            removed = ?report.removed,
            restarted = ?report.restarted,
            unchanged = report.unchanged,
            needs_restart = ?report.ignored,
            "configuration reloaded"
        ),
        Err(error) => tracing::error!("reload refused, keeping the running configuration: {error}"),
    }
}

#[cfg(unix)]
fn hangup_signals() -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("could not listen for SIGHUP")
}

/// How many things `check` asks the source about.
const CHECK_SAMPLE: usize = 10;

pub async fn check(args: ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    println!("{}: valid", config.path.display());
    match &config.source {
        Some(source) => println!("source: {} ({:?} mode)", source.url, source.mode),
        None => println!("source: none (enough for `import`, not for `run`)"),
    }
    println!("things: {}", config.things.len());
    for thing in config.things.iter().take(20) {
        match &thing.key_source {
            Some(from) => println!("  {} (key from {from})", thing.name),
            None => println!("  {}", thing.name),
        }
    }
    if config.things.len() > 20 {
        println!("  ... and {} more", config.things.len() - 20);
    }
    if let Some(parquet) = &config.parquet {
        println!(
            "parquet: {} (sealed every {} or {} rows)",
            parquet.dir.display(),
            humantime::format_duration(parquet.rotate_after),
            parquet.max_rows
        );
    }
    if let Some(metrics) = &config.metrics {
        println!("metrics: http://{}/metrics", metrics.listen);
    }
    match worker::check_runnable(&config) {
        Ok(_) => println!("run: ready"),
        Err(error) => println!("run: not possible: {}", error.problem),
    }
    let Some(source) = &config.source else {
        return Ok(());
    };
    let client = source.client()?;
    let mut problems = 0;
    let sample: Vec<_> = config.things.iter().take(CHECK_SAMPLE).collect();
    if sample.is_empty() {
        probe(&client, "dweetpipe-check", None).await?;
    }
    for thing in sample {
        match probe(&client, &thing.name, thing.key.as_ref()).await {
            Ok(state) => println!("  {}: {state}", thing.name),
            Err(error) => {
                problems += 1;
                println!("  {}: problem: {error}", thing.name);
            }
        }
    }
    println!("source: reachable");
    if problems > 0 {
        bail!("{problems} of the things checked have a problem (see above)");
    }
    Ok(())
}

/// One read of a thing: whether the source answers, and whether our key opens it.
async fn probe(
    client: &Client,
    thing: &str,
    key: Option<&client::Key>,
) -> anyhow::Result<&'static str> {
    match client.get_latest_dweet_for(thing, key).await {
        Ok(_) => Ok("has dweets"),
        Err(client::Error::NotFound { .. }) => Ok("no dweets kept yet"),
        Err(error @ (client::Error::Transport(_) | client::Error::Status { .. })) => {
            Err(error).context(format!("the source {} is not reachable", client.base_url()))
        }
        Err(error) => Err(error.into()),
    }
}
