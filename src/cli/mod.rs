//! The command line: argument definitions and the small helpers every command shares. Each
//! command's work is a call into the library; this layer parses, prints and sets exit codes.

mod alert_test;
mod api;
mod demo;
mod import;
mod lifecycle;
mod numbers;
mod prune;
mod query;
mod sandbox;
mod systemd;
mod worker;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use dweetpipe::client::{Client, Key};

pub use api::{AlertCommand, run_alert};

const ABOUT: &str = "Keep, query and watch the data of a dweet.io fleet.";

const LONG_ABOUT: &str = "\
Keep, query and watch the data of a dweet.io fleet.

Talk to any dweet.io-compatible server (renesas.dweet.io, a self-hosted `dweetpipe sandbox`),
run a sandbox of your own, or simulate a fleet of Renesas S5D9 boards.

Try it with no set-up: `dweetpipe demo`. Or, in three terminals:
  dweetpipe sandbox --listen 127.0.0.1:8080
  dweetpipe --server http://127.0.0.1:8080 simulate --things 5 --interval 1
  dweetpipe --server http://127.0.0.1:8080 listen S5D9-0001";

#[derive(Debug, Parser)]
#[command(name = "dweetpipe", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// The dweet.io-compatible server the client verbs and `simulate` talk to:
    /// scheme://host[:port][/prefix]. Other commands take theirs from the things file and
    /// refuse an explicit --server (DWEET_SERVER, meant for the client verbs, is left alone).
    #[arg(long, global = true, env = "DWEET_SERVER", default_value = dweetpipe::client::DEFAULT_BASE_URL)]
    pub server: String,

    /// Log lines on stderr: `human` (the default) or `json` (one object a line, for
    /// Kubernetes and log shippers). RUST_LOG filters them (`RUST_LOG=dweetpipe=debug`).
    #[arg(long, global = true, env = "DWEETPIPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a dweet: `dweetpipe dweet S5D9-63de TemperatureC=29 LED=0`.
    ///
    /// Values that read as numbers are sent as numbers. Without a THING the server names one
    /// (the answer says which). --json gives a whole object; k=v pairs are added to it.
    Dweet(api::DweetArgs),
    /// Print the newest dweet of a thing as one JSON line.
    Latest(api::ThingArgs),
    /// Print the dweets the server keeps for a thing, one JSON line each, newest first.
    ///
    /// The output is JSON Lines, ready for `dweetpipe import`. With --date, a locked thing's
    /// stored dweets of that day instead (oldest first): dweetpipe history S5D9-63de --date
    /// 2026-12-01 --hour 13 --csv --key-file key.txt
    History(api::HistoryArgs),
    /// Follow a thing's new dweets, one compact JSON line each, as they arrive.
    ///
    /// Reconnects by itself when the server closes the stream; with --timeout it stops after
    /// that many seconds (dweepy's timeout), otherwise it runs until interrupted.
    Listen(api::ListenArgs),
    /// Attach a lock to a thing; from then on every call on it needs the key.
    Lock(api::LockArgs),
    /// Detach the lock from a thing.
    Unlock(api::KeyedThingArgs),
    /// Detach a lock from whatever thing holds it.
    RemoveLock(api::RemoveLockArgs),
    /// Set, show or remove the alert of a locked thing, or try a condition on recorded dweets.
    #[command(subcommand)]
    Alert(AlertCommand),
    /// Serve the dweet.io API (a self-hosted replacement for the public service).
    Sandbox(sandbox::SandboxArgs),
    /// Dweet from a simulated fleet of Renesas S5D9 boards.
    Simulate(sandbox::SimulateArgs),
    /// Run everything on loopback: a sandbox, a simulated S5D9 fleet and the ingest worker
    /// writing Parquet, with live progress and a summary. Needs no network and no set-up.
    Demo(demo::DemoArgs),
    /// The ingest worker: keep every configured thing's dweets in Parquet and PostgreSQL.
    ///
    /// Subscribes to every [[thing]] of the file, backfills gaps on every (re)connect, and
    /// writes readings, raw dweets and dead letters; serves /metrics, /healthz and /readyz.
    /// Starts even while PostgreSQL is down (its share waits in its spool). When the file
    /// manages locks or alerts, keeps them as declared (like `apply`) at start, on SIGHUP and
    /// every [lifecycle] interval. SIGTERM/SIGINT: stop, make what the sinks hold durable or
    /// spool it (within shutdown_timeout), and print a summary. SIGHUP: reload the file
    /// (validated first).
    Run(ConfigArgs),
    /// Validate a things file and say what `run` would do, and whether the source answers.
    Check(ConfigArgs),
    /// Show what `apply` would change so the server's locks and alerts match the things file.
    ///
    /// Reads each managed thing's state (is it locked, does our key open it, which alert it
    /// carries) and prints lock, unlock, set/replace/remove alert per thing. Changes nothing.
    /// A thing is managed only when its entry declares `lock`, [thing.alert] or `manage = true`
    /// (a key alone is for reading); in it, no `lock` means unlocked and no [thing.alert] means
    /// no alert. Other things are never touched. Exits non-zero when a thing cannot be
    /// reconciled (wrong key).
    Plan(ConfigArgs),
    /// Make the server's locks and alerts match the things file, and print what was done.
    ///
    /// Idempotent: a second apply finds nothing to do. Exits non-zero if a change failed,
    /// with the server's reason. `run` does the same at start, on SIGHUP and every
    /// [lifecycle] interval.
    Apply(ConfigArgs),
    /// Load dweets from JSON Lines files (`history` output; `-` for stdin) into the sinks.
    ///
    /// Needs only the sink sections of the things file. Each thing's dweets are sorted and
    /// deduplicated first; dweets already stored are skipped, bad lines go to dead letters.
    Import(import::ImportArgs),
    /// Create or upgrade the PostgreSQL schema (`run` does it at start too).
    Migrate(worker::MigrateArgs),
    /// Apply the things file's retention once: drop whole partitions and dates older than it.
    ///
    /// `[postgres] retention` bounds the raw tables (dweets, readings), `rollup_retention` the
    /// rollups (readings_1m, readings_1h); a partition goes once its newest possible row is
    /// older than that. Nothing is DELETEd. `[parquet] retention` removes whole date folders.
    /// `run` does the same by itself (in a cluster, the leader alone). Prints what went.
    Prune(ConfigArgs),
    /// Rewrite closed Parquet dates into one file per dataset, sorted by board and time.
    ///
    /// A date is compacted once it ended `[parquet] compact_after` ago (default 1h); readers
    /// then skip the row groups of other boards. Crash-safe at every step: the next start
    /// finishes or undoes it. `run` does it by itself (in a cluster, the leader alone); this
    /// needs the directory, so stop the worker first.
    Compact(ConfigArgs),
    /// Read the Parquet dataset back: a board's readings, per-minute averages, the newest
    /// values. Needs nothing else installed.
    ///
    /// Reads only sealed files, so it runs beside a worker that is writing and compacting,
    /// and skips the date folders and row groups (by their statistics) that cannot hold what
    /// is asked: one board's day of a compacted dataset reads a few row groups. --explain
    /// says how many it read and skipped. A board or sensor that matches nothing is an error
    /// listing those that exist.
    Query(query::QueryArgs),
}

/// The things file, for the verbs that read one.
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

/// Where a lock's master key comes from. The environment or a file keeps it out of shell
/// history and process listings; --key is there for quick tries.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The lock's master key. Prefer DWEET_KEY or --key-file outside quick tries.
    #[arg(long, env = "DWEET_KEY", hide_env_values = true)]
    key: Option<Key>,
    /// Read the key from this file (surrounding whitespace ignored); it takes precedence over
    /// --key and DWEET_KEY.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

impl KeyArgs {
    pub fn optional(&self) -> anyhow::Result<Option<Key>> {
        let Some(path) = &self.key_file else {
            return Ok(self.key.clone());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read the key file {}", path.display()))?;
        let key = text.trim();
        if key.is_empty() {
            bail!("the key file {} is empty", path.display());
        }
        Ok(Some(Key::new(key)))
    }

    pub fn required(&self) -> anyhow::Result<Key> {
        match self.optional()? {
            Some(key) => Ok(key),
            None => bail!(
                "this needs the lock's master key: pass --key, --key-file PATH or set DWEET_KEY"
            ),
        }
    }
}

/// Which kind of call a command makes, so a hint can fit the call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Reads or writes a thing's dweets.
    Thing,
    Lock,
    RemoveLock,
    Alert,
    Other,
}

impl Call {
    pub fn of(command: &Command) -> Call {
        match command {
            Command::Dweet(_)
            | Command::Latest(_)
            | Command::History(_)
            | Command::Listen(_)
            | Command::Unlock(_) => Call::Thing,
            Command::Lock(_) => Call::Lock,
            Command::RemoveLock(_) => Call::RemoveLock,
            Command::Alert(_) => Call::Alert,
            _ => Call::Other,
        }
    }

    /// Whether the command talks to `--server` (the others take their server from a file
    /// or are one).
    fn uses_server(command: &Command) -> bool {
        matches!(
            command,
            Command::Dweet(_)
                | Command::Latest(_)
                | Command::History(_)
                | Command::Listen(_)
                | Command::Lock(_)
                | Command::Unlock(_)
                | Command::RemoveLock(_)
                | Command::Alert(_)
                | Command::Simulate(_)
        )
    }
}

/// The user interrupted a command that ends that way (Ctrl-C in `listen`): exit 130, as
/// shells expect.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // DWEET_SERVER may be exported for the client verbs; an explicit --server is a mistake.
    let explicit_server = std::env::args().any(|a| a == "--server" || a.starts_with("--server="));
    if explicit_server && !Call::uses_server(&cli.command) {
        bail!(
            "--server is for the client verbs and `simulate`; this command does not use it: \
             `run`, `check`, `plan`, `apply` and `import` take the server from [source] url in the things file, \
             `demo` and `sandbox` are servers of their own, `migrate` talks to PostgreSQL. Drop --server."
        );
    }
    let client = || Client::new(&cli.server).with_context(|| format!("--server {:?}", cli.server));
    match cli.command {
        Command::Dweet(args) => api::dweet(&client()?, args).await,
        Command::Latest(args) => api::latest(&client()?, args).await,
        Command::History(args) => api::history(&client()?, args).await,
        Command::Listen(args) => api::listen(&client()?, args).await,
        Command::Lock(args) => api::lock(&client()?, args).await,
        Command::Unlock(args) => api::unlock(&client()?, args).await,
        Command::RemoveLock(args) => api::remove_lock(&client()?, args).await,
        Command::Alert(command) => run_alert(&client()?, command).await,
        Command::Sandbox(args) => sandbox::serve(args).await,
        Command::Simulate(args) => sandbox::simulate(client()?, args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Run(args) => worker::run(args).await,
        Command::Check(args) => worker::check(args).await,
        Command::Plan(args) => lifecycle::plan(args).await,
        Command::Apply(args) => lifecycle::apply(args).await,
        Command::Migrate(args) => worker::migrate(args).await,
        Command::Prune(args) => prune::prune(args).await,
        Command::Compact(args) => prune::compact(args).await,
        Command::Query(args) => query::query(args),
        Command::Import(args) => import::run(args).await,
    }
}

/// The default log filter: servers say what they do, one-shot verbs only what went wrong.
pub fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Sandbox(_) | Command::Simulate(_) | Command::Run(_) => "info",
        _ => "warn",
    }
}

/// Resolves on SIGINT or SIGTERM, the signals a terminal, systemd and Kubernetes send.
pub async fn shutdown_signal() {
    ShutdownSignal::listen().recv().await
}

/// SIGTERM and SIGINT, listened for from the moment it is made: one that arrives before
/// [`ShutdownSignal::recv`] is awaited (during a long start, a migration) is kept for it
/// instead of killing the process.
pub struct ShutdownSignal {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            ShutdownSignal {
                terminate: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        ShutdownSignal {}
    }

    /// Waits for the next one.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.terminate.is_none() && self.interrupt.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                () = next(&mut self.terminate) => {}
                () = next(&mut self.interrupt) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_arguments_never_print_their_secrets() {
        for args in [
            vec!["dweetpipe", "latest", "t", "--key", "sekrit-1"],
            vec!["dweetpipe", "sandbox", "--lock", "a:sekrit-1"],
            vec![
                "dweetpipe",
                "sandbox",
                "--smtp-url",
                "smtps://u:sekrit-1@mail:465",
            ],
        ] {
            let cli = Cli::try_parse_from(&args).unwrap();
            let printed = format!("{cli:?}");
            assert!(!printed.contains("sekrit-1"), "{args:?}: {printed}");
        }
    }
}
