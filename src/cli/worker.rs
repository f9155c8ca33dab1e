//! `dweetpipe run` and `dweetpipe check`: the ingest worker and its dry run.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use dweetpipe::client::{self, Client};
use dweetpipe::config::Config;
use dweetpipe::sink::postgres::{self, DatabaseUrl};
use dweetpipe::worker;

use super::systemd;

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
/// How often the worker looks whether a sink that dropped records has caught up.
const HEAL_EVERY: Duration = Duration::from_secs(5);

pub async fn run(args: super::ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let started = std::time::Instant::now();
    // One listener for the whole run, from before the start: a SIGTERM during a long start
    // (a migration) shuts down in order once the start is done, and none between two turns
    // is missed.
    let mut shutdown = super::ShutdownSignal::listen();
    let mut worker = worker::start(config).await?;
    if let Some(addr) = worker.metrics_addr() {
        tracing::info!("metrics on http://{addr}/metrics, health on /healthz and /readyz");
    }
    let mut hangups = hangup_signals()?;
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    // READY once every thing has subscribed (or its first attempt failed); the watchdog is
    // fed meanwhile, since start-up is not a hang.
    let mut interrupted = false;
    loop {
        tokio::select! {
            () = shutdown.recv() => { interrupted = true; break }
            () = worker.subscribed() => break,
            _ = async { watchdog.as_mut()?.tick().await; Some(()) }, if watchdog.is_some() => {
                ping_watchdog(&worker);
            }
        }
    }
    if !interrupted {
        notify_systemd(&ready_status(&worker));
        let mut heal = tokio::time::interval(HEAL_EVERY);
        loop {
            tokio::select! {
                () = shutdown.recv() => break,
                _ = heal.tick() => worker.heal().await,
                _ = hangups.recv() => {
                    notify_systemd("RELOADING=1");
                    reload(&mut worker, &args.config).await;
                    notify_systemd(&ready_status(&worker));
                }
                _ = async { watchdog.as_mut()?.tick().await; Some(()) }, if watchdog.is_some() => {
                    ping_watchdog(&worker);
                }
                () = worker.cluster_turn() => {
                    if let Err(error) = worker.rebalance().await {
                        tracing::error!(%error, "could not follow the cluster's ownership; will retry at its next change");
                    }
                }
            }
        }
    }
    notify_systemd("STOPPING=1");
    let shutdown_timeout = worker.shutdown_timeout();
    tracing::info!(timeout = ?shutdown_timeout, "shutting down: stopping streams and sealing sinks");
    let metrics = std::sync::Arc::clone(worker.metrics());
    let shut_down = worker.shutdown(shutdown_timeout).await;
    print_summary(&metrics, started.elapsed());
    shut_down?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// What the run did, as `import` and `demo` say it: dweets received, and per sink what it
/// stored, what waits in its spool for the next start, and what it lost.
fn print_summary(metrics: &dweetpipe::telemetry::Metrics, took: Duration) {
    let value = |name: &str, labels: &[(&str, &str)]| metrics.value(name, labels);
    let received = |source: &str| value("dweetpipe_dweets_received_total", &[("source", source)]);
    println!(
        "run: {} s; received {} dweets (stream {}, backfill {}, poll {}), {} dead letters",
        took.as_secs(),
        value("dweetpipe_dweets_received_total", &[]),
        received("stream"),
        received("backfill"),
        received("poll"),
        value("dweetpipe_dead_letters_total", &[])
    );
    for sink in ["parquet", "postgres"] {
        let rows = |table: &str| {
            value(
                "dweetpipe_sink_rows_written_total",
                &[("sink", sink), ("table", table)],
            )
        };
        let declared = metrics
            .encode()
            .contains(&format!("dweetpipe_sink_errors_total{{sink=\"{sink}\"}}"));
        if !declared {
            continue;
        }
        println!(
            "  {sink}: {} dweets, {} readings, {} dead letters stored; {} bytes spooled for the next start; {} records dropped",
            rows("dweets"),
            rows("readings"),
            rows("dead_letters"),
            value("dweetpipe_spool_bytes", &[("sink", sink)]),
            value("dweetpipe_spool_dropped_records_total", &[("sink", sink)])
        );
    }
}

/// READY with a STATUS line saying what is up.
fn ready_status(worker: &worker::WorkerHandle) -> String {
    let states = worker.health().stream_states();
    let up = states.iter().filter(|(_, up)| *up).count();
    format!(
        "READY=1\nSTATUS=ingesting {} things, {up} streams up",
        worker.things().count()
    )
}

/// Pings only while every loop of the worker turns: a stuck loop stops the pings, and
/// systemd restarts the worker.
fn ping_watchdog(worker: &worker::WorkerHandle) {
    match worker.health().liveness() {
        Ok(()) => notify_systemd("WATCHDOG=1"),
        Err(why) => tracing::error!(%why, "not pinging the systemd watchdog"),
    }
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

/// Things asked about at once by `check`.
const CHECK_CONCURRENCY: usize = 8;
/// Up to this many things, `check` prints a line for each.
const CHECK_LIST_UP_TO: usize = 50;

pub async fn check(args: super::ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    println!("{}: valid", config.path.display());
    let mut problems = Vec::new();
    match &config.source {
        Some(source) => println!(
            "source: {} ({:?} mode)",
            dweetpipe::settings::redact_url(&source.url),
            source.mode
        ),
        None => println!("source: none (enough for `import`, not for `run`)"),
    }
    println!("things: {}", config.things.len());
    if let Some(parquet) = &config.parquet {
        println!(
            "parquet: {} (sealed every {} or {} rows; spool {})",
            parquet.dir.display(),
            humantime::format_duration(parquet.rotate_after),
            parquet.max_rows,
            parquet.spool_dir().display()
        );
    }
    if let Some(postgres_config) = &config.postgres
        && let Some(url) = &postgres_config.url
        && !check_postgres(url).await
    {
        problems.push("PostgreSQL".to_owned());
    }
    if let Some(metrics) = &config.metrics {
        println!("metrics: http://{}/metrics", metrics.listen);
    }
    if let Some(nats) = &config.nats {
        println!(
            "nats: publishing to stream {} at {}",
            nats.stream,
            dweetpipe::nats::redact_urls(nats.url.as_deref().unwrap_or_default())
        );
    }
    if let Some(cluster) = &config.cluster
        && !print_cluster(cluster, &config.things).await
    {
        problems.push("the cluster's NATS".to_owned());
    }
    if let Some(source) = &config.source {
        problems.extend(check_source(&config, source).await?);
    }
    match worker::check_runnable(&config) {
        Ok(_) if problems.is_empty() => println!("run: ready"),
        Ok(_) => println!(
            "run: would start, but see the problems above ({})",
            problems.join(", ")
        ),
        Err(error) => println!("run: not possible: {}", error.problem),
    }
    if !problems.is_empty() {
        bail!(
            "check found problems with {} (see above)",
            problems.join(", ")
        );
    }
    Ok(())
}

/// Whether PostgreSQL answers at `url`, and which schema it has; false when it does not.
async fn check_postgres(url: &postgres::DatabaseUrl) -> bool {
    match postgres::probe(url, Duration::from_secs(10)).await {
        Ok(version) => {
            let schema = match version {
                Some(v) if v >= postgres::schema_version() => "schema up to date".to_owned(),
                Some(v) => format!("schema at version {v}; `run` or `migrate` upgrades it"),
                None => "no schema yet; `run` or `migrate` creates it".to_owned(),
            };
            println!("postgres: reachable, {schema}");
            true
        }
        Err(error) => {
            println!("postgres: PROBLEM: {error}");
            false
        }
    }
}

/// Asks the source about every thing (and, with a lifecycle, what `run` would change);
/// the problems found.
async fn check_source(
    config: &Config,
    source: &dweetpipe::source::SourceConfig,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    {
        let client = source.client()?;
        match probe_things(&client, &config.things).await {
            Err(error) => {
                println!("source: PROBLEM: not reachable: {error:#}");
                problems.push("the source".to_owned());
            }
            Ok(answers) => {
                let troubled = answers.iter().filter(|(_, a)| a.is_err()).count();
                println!(
                    "source: reachable; asked about all {} thing(s), {troubled} with a problem",
                    answers.len()
                );
                let list_all = answers.len() <= CHECK_LIST_UP_TO;
                for (thing, answer) in &answers {
                    match answer {
                        Ok(state) if list_all => println!("  {}: {state}", thing.name),
                        Ok(_) => {}
                        Err(error) => println!("  {}: PROBLEM: {error}", thing.name),
                    }
                }
                if troubled > 0 {
                    problems.push(format!("{troubled} thing(s)"));
                }
                if config.lifecycle.is_some() {
                    let plan = dweetpipe::lifecycle::plan(&client, &config.things).await;
                    let changes = plan.changes();
                    println!("lifecycle: `run` would make {changes} change(s) at start");
                    super::lifecycle::print_plan(&plan, false);
                    if plan.problems() > 0 {
                        problems.push(format!("{} lifecycle problem(s)", plan.problems()));
                    }
                }
            }
        }
    }
    Ok(problems)
}

/// The cluster's members, its leader and who owns what; false when NATS cannot be asked.
async fn print_cluster(
    cluster: &dweetpipe::cluster::ClusterConfig,
    things: &[dweetpipe::source::ThingConfig],
) -> bool {
    let nats = dweetpipe::nats::redact_urls(cluster.nats_url.as_deref().unwrap_or_default());
    println!(
        "cluster: {} at {nats}, this member {:?}, lease {}",
        cluster.name,
        cluster.member(),
        humantime::format_duration(cluster.lease)
    );
    let survey =
        tokio::time::timeout(Duration::from_secs(10), dweetpipe::cluster::survey(cluster)).await;
    let found = match survey {
        Ok(Ok(found)) => found,
        Ok(Err(error)) => {
            println!("cluster: PROBLEM: {error}");
            return false;
        }
        Err(_) => {
            println!("cluster: PROBLEM: NATS at {nats} did not answer within 10 s");
            return false;
        }
    };
    let names: Vec<&str> = found.members.iter().map(|m| m.member.as_str()).collect();
    println!(
        "cluster: {} live member(s){}; leader: {}",
        names.len(),
        if names.is_empty() {
            String::new()
        } else {
            format!(" ({})", names.join(", "))
        },
        found.leader.as_deref().unwrap_or("none")
    );
    // Over the leader's roster, as the members themselves compute it.
    let roster: Vec<&str> = found.roster.iter().map(String::as_str).collect();
    let owners =
        dweetpipe::cluster::ownership::assign(things.iter().map(|t| t.name.as_str()), &roster);
    for member in &found.members {
        let owned = owners.get(member.member.as_str()).map_or(0, Vec::len);
        println!(
            "  {}: owns {owned} thing(s), streams or hands over {}",
            member.member,
            member.holding.len()
        );
        if things.len() <= CHECK_LIST_UP_TO
            && let Some(list) = owners.get(member.member.as_str())
        {
            println!("    {}", list.join(", "));
        }
    }
    true
}

/// Asks the source about every thing, a few at a time; `Err` when the source itself does not
/// answer (the first transport failure ends the probing).
async fn probe_things(
    client: &Client,
    things: &[dweetpipe::source::ThingConfig],
) -> anyhow::Result<Vec<(dweetpipe::source::ThingConfig, anyhow::Result<&'static str>)>> {
    use futures_util::StreamExt;
    if things.is_empty() {
        probe(client, "dweetpipe-check", None).await?;
        return Ok(Vec::new());
    }
    let mut answers = futures_util::stream::iter(things.iter().cloned())
        .map(|thing| async move {
            let answer = probe(client, &thing.name, thing.key.as_ref()).await;
            (thing, answer)
        })
        .buffered(CHECK_CONCURRENCY);
    let mut collected = Vec::with_capacity(things.len());
    while let Some((thing, answer)) = answers.next().await {
        if let Err(error) = &answer
            && error.is::<Unreachable>()
        {
            return Err(answer.unwrap_err());
        }
        collected.push((thing, answer));
    }
    Ok(collected)
}

/// The source did not answer at all.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unreachable(client::Error);

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
            Err(Unreachable(error).into())
        }
        Err(error) => Err(error.into()),
    }
}
