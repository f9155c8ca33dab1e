//! `dweetpipe sandbox` and `dweetpipe simulate`: the self-hosted server and the fleet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use dweetpipe::client::{Client, Key};
use dweetpipe::sandbox::notify::{LogNotifier, Notify, OutboxNotifier, SmtpNotifier};
use dweetpipe::sandbox::simulator::{DEFAULT_CONNECTIONS, FleetConfig, FleetStats, run_fleet};
use dweetpipe::sandbox::{EvaluationLimits, Limits, SandboxConfig};
use dweetpipe::settings::Secret;

use super::KeyArgs;
use super::api::seconds;

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Address to serve on: HOST:PORT, where HOST is an IP address or a name such as
    /// localhost (port 0 picks a free one; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = listen_address)]
    listen: SocketAddr,
    /// A lock and its master key, NAME:KEY; repeat for more. DWEETPIPE_SANDBOX_LOCKS takes a
    /// comma-separated list and keeps keys out of the process list.
    #[arg(
        long = "lock",
        value_name = "NAME:KEY",
        env = "DWEETPIPE_SANDBOX_LOCKS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    locks: Vec<Secret>,
    /// A file of locks, one NAME:KEY per line (`#` starts a comment).
    #[arg(long, value_name = "PATH")]
    locks_file: Option<PathBuf>,
    /// Serve under this path prefix, e.g. /dweet (a missing leading slash is added).
    #[arg(long, default_value = "", value_parser = path_prefix)]
    prefix: String,
    /// Dweets kept per thing (the Renesas sandbox kept 500).
    #[arg(long, default_value_t = 500, value_parser = super::numbers::whole(1, 1_000_000))]
    max_history: usize,
    /// How long a thing's history lives after its last dweet (e.g. 24h, 90m).
    #[arg(long, default_value = "24h", value_parser = super::numbers::positive_duration)]
    retention: Duration,
    /// Most characters of content per dweet.
    #[arg(long, default_value_t = 2000, value_parser = super::numbers::whole(1, 16 * 1024 * 1024))]
    max_content: usize,
    /// Requests per second allowed per thing (the public service allowed about 1). Off when
    /// not given.
    #[arg(long, value_name = "PER_SECOND", value_parser = super::numbers::per_second)]
    rate_limit: Option<f64>,
    /// Close a listen stream after this long without a dweet, as the public service did.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_close: Duration,
    /// Keep the state here (sandbox.redb: histories, locks and what they are attached to,
    /// alerts and their status, stored dweets), so a restart or a crash forgets nothing: a
    /// write is on disk before it is answered.
    #[arg(long, value_name = "DIR", default_value = "sandbox-data")]
    data: PathBuf,
    /// Keep nothing on disk: a restart starts empty (and --data is not used).
    #[arg(long)]
    in_memory: bool,
    /// How long a locked thing's dweets and alert events stay retrievable by date
    /// (/get/stored/dweets/for/THING?date=...; the public service kept 30 days).
    #[arg(long, default_value = "30d", value_parser = super::numbers::positive_duration)]
    stored_retention: Duration,
    #[command(flatten)]
    alerts: AlertArgs,
}

/// How the sandbox evaluates alert conditions and tells recipients.
#[derive(Debug, Args)]
struct AlertArgs {
    /// Append each alert that opens or closes, as one JSON line, to this file. Default:
    /// alerts.jsonl in the --data directory (dweetpipe-alerts.jsonl here with --in-memory).
    #[arg(long, value_name = "PATH")]
    alert_outbox: Option<PathBuf>,
    /// Do not write the alert outbox (alerts are still logged).
    #[arg(long, conflicts_with = "alert_outbox")]
    no_alert_outbox: bool,
    /// E-mail opened alerts through this SMTP relay: smtp://host:25,
    /// smtp://host:587?tls=required (STARTTLS) or smtps://user:password@host:465. Prefer the
    /// environment variable, which keeps the password out of the process list.
    #[arg(
        long,
        value_name = "URL",
        env = "DWEETPIPE_SMTP_URL",
        hide_env_values = true
    )]
    smtp_url: Option<Secret>,
    /// The sender of alert e-mails.
    #[arg(long, value_name = "ADDRESS", default_value = "dweetpipe@localhost")]
    smtp_from: String,
    /// Longest one condition may run on one dweet before it is stopped.
    #[arg(long, default_value = "50ms", value_parser = super::numbers::positive_duration)]
    alert_time_limit: Duration,
    /// Memory the condition engine may use, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = super::numbers::whole(1, 4096))]
    alert_memory_mib: usize,
    /// Alerts e-mailed per thing per UTC day (reported as `alerts_allowed_today`).
    #[arg(long, default_value_t = 100, value_parser = super::numbers::whole_u32(0, 1_000_000))]
    alerts_per_day: u32,
}

impl AlertArgs {
    /// `data`: the data directory, or `None` in memory (the outbox's default place).
    fn notifiers(&self, data: Option<&std::path::Path>) -> anyhow::Result<Vec<Arc<dyn Notify>>> {
        let mut notifiers: Vec<Arc<dyn Notify>> = vec![Arc::new(LogNotifier)];
        if !self.no_alert_outbox {
            let outbox = match (&self.alert_outbox, data) {
                (Some(path), _) => path.clone(),
                (None, Some(dir)) => dir.join("alerts.jsonl"),
                (None, None) => PathBuf::from("dweetpipe-alerts.jsonl"),
            };
            notifiers.push(Arc::new(OutboxNotifier::new(&outbox)));
        }
        if let Some(url) = &self.smtp_url {
            notifiers.push(Arc::new(
                SmtpNotifier::new(url.expose(), &self.smtp_from).context("--smtp-url")?,
            ));
        }
        Ok(notifiers)
    }

    fn limits(&self) -> EvaluationLimits {
        EvaluationLimits {
            time: self.alert_time_limit,
            memory_bytes: self.alert_memory_mib << 20,
        }
    }
}

pub async fn serve(args: SandboxArgs) -> anyhow::Result<()> {
    let mut locks = Vec::new();
    for spec in &args.locks {
        locks.push(parse_lock(spec.expose()).context("--lock")?);
    }
    if let Some(path) = &args.locks_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read the locks file {}", path.display()))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            locks.push(
                parse_lock(line)
                    .with_context(|| format!("{} line {}", path.display(), number + 1))?,
            );
        }
    }
    let data = (!args.in_memory).then(|| args.data.clone());
    let config = SandboxConfig {
        data: data.clone(),
        stored_retention: args.stored_retention,
        listen: args.listen,
        prefix: args.prefix,
        locks,
        limits: Limits {
            max_history: args.max_history,
            retention: args.retention,
            rate_limit: args.rate_limit,
            alerts_allowed_per_day: args.alerts.alerts_per_day,
        },
        max_content_chars: args.max_content,
        idle_close: args.idle_close,
        alert_limits: args.alerts.limits(),
        notifiers: args.alerts.notifiers(data.as_deref())?,
        ..SandboxConfig::default()
    };
    let lock_count = config.locks.len();
    let handle = dweetpipe::sandbox::start(config)
        .await
        .with_context(|| format!("could not start the sandbox on {}", args.listen))?;
    println!("listening on {}", handle.base_url());
    tracing::info!(
        locks = lock_count,
        "locks loaded from --lock, DWEETPIPE_SANDBOX_LOCKS and --locks-file"
    );
    super::shutdown_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

/// HOST:PORT with HOST an address or a name (the first address it resolves to).
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .map_err(|e| format!("{e} (write HOST:PORT, e.g. 127.0.0.1:8080 or localhost:8080)"))?
        .next()
        .ok_or_else(|| format!("{text} resolves to no address"))
}

/// A URL path prefix: "" (none) or "/segment[/...]", without a trailing slash.
fn path_prefix(text: &str) -> Result<String, String> {
    let trimmed = text.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed.contains(['?', '#', ' ']) {
        return Err("a path prefix has no '?', '#' or spaces, e.g. /dweet".to_owned());
    }
    Ok(if trimmed.starts_with('/') {
        trimmed.to_owned()
    } else {
        format!("/{trimmed}")
    })
}

/// `NAME:KEY`; the key itself never appears in the error.
fn parse_lock(spec: &str) -> anyhow::Result<(String, Key)> {
    match spec.split_once(':') {
        Some((name, key)) if !name.trim().is_empty() && !key.trim().is_empty() => {
            Ok((name.trim().to_owned(), Key::new(key.trim())))
        }
        _ => bail!("a lock is written NAME:KEY (both non-empty)"),
    }
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// How many boards.
    #[arg(long, default_value_t = 20, value_parser = super::numbers::whole(1, 100_000))]
    things: usize,
    /// Seconds between two dweets of one board (fractions allowed).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = super::numbers::interval_seconds)]
    interval: f64,
    /// Dweets per board, then exit. Without it, run until interrupted.
    #[arg(long, value_parser = super::numbers::whole_u64(1, u64::MAX))]
    count: Option<u64>,
    /// Thing names are PREFIX0001, PREFIX0002, ...
    #[arg(long, default_value = "S5D9-")]
    prefix: String,
    /// Every M-th dweet of a board is an odd payload (missing sensors, strings, nulls, nesting).
    #[arg(long, value_name = "M", value_parser = super::numbers::whole_u64(1, u64::MAX))]
    odd_every: Option<u64>,
    /// Seed for the boards' values; the same seed sends the same values.
    #[arg(long, default_value_t = 0x5D9)]
    seed: u64,
    /// At most N dweets in flight: N keep-alive connections carry the whole fleet, which is
    /// what lets one machine simulate 10,000 boards. Real boards hold a connection each; set
    /// N to --things to load a server that way.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONNECTIONS, value_parser = super::numbers::whole(1, 100_000))]
    connections: usize,
    #[command(flatten)]
    key: KeyArgs,
}

pub async fn simulate(client: Client, args: SimulateArgs) -> anyhow::Result<()> {
    let interval = seconds("--interval", args.interval)?;
    let config = FleetConfig {
        things: args.things,
        interval,
        count: args.count,
        prefix: args.prefix,
        key: args.key.optional()?,
        odd_every: args.odd_every,
        seed: args.seed,
        connections: args.connections,
    };
    let stats = Arc::new(FleetStats::default());
    let fleet = run_fleet(client, config, Arc::clone(&stats));
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    tokio::pin!(fleet);
    // One listener for the whole loop, so a signal between two turns is not missed.
    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut fleet => break,
            _ = &mut shutdown => break,
            _ = progress.tick() => {
                tracing::info!(sent = stats.sent(), failed = stats.failed(), "simulating");
            }
        }
    }
    eprintln!(
        "simulated {} boards: {} dweets sent, {} failed",
        args.things,
        stats.sent(),
        stats.failed()
    );
    if stats.failed() > 0 {
        bail!("{} dweets failed; see the warnings above", stats.failed());
    }
    Ok(())
}
