//! The client verbs: one dweet.io call each, results as JSON on stdout.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dweetpipe::client::{Client, Dweet, ListenOptions};
use dweetpipe::protocol::coerce_query_value;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Map, Value};

use super::KeyArgs;

#[derive(Debug, Args)]
pub struct DweetArgs {
    /// THING and/or k=v pairs. The first word without `=` is the thing; with none, the server
    /// names the thing.
    #[arg(value_name = "THING|KEY=VALUE")]
    words: Vec<String>,
    /// A whole JSON object as content; k=v pairs are added to it.
    #[arg(long, value_name = "OBJECT")]
    json: Option<String>,
    /// Ask for no answer body (HTTP 204); prints nothing on success.
    #[arg(long)]
    quietly: bool,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct ThingArgs {
    thing: String,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    thing: String,
    /// A day of a locked thing's stored dweets (UTC, YYYY-MM-DD), oldest first, instead of
    /// what the server keeps now; the key is required. The server keeps them for its stored
    /// retention (30 days by default).
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = day)]
    date: Option<chrono::NaiveDate>,
    /// One hour (00-23) of --date.
    #[arg(long, value_name = "HH", requires = "date", value_parser = clap::value_parser!(u8).range(0..24))]
    hour: Option<u8>,
    /// With --date: the server's CSV (thing, created, a column per content leaf) instead of
    /// JSON Lines.
    #[arg(long, requires = "date")]
    csv: bool,
    #[command(flatten)]
    key: KeyArgs,
}

fn day(text: &str) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| format!("{text:?} is not a day written YYYY-MM-DD (e.g. 2026-12-01)"))
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    thing: String,
    /// Stop after this many seconds, reconnecting until then. Without it, listen until
    /// interrupted.
    #[arg(long, value_name = "SECS", value_parser = super::numbers::timeout_seconds)]
    timeout: Option<f64>,
    /// Treat a connection silent for this many seconds as dead and reconnect.
    #[arg(long, value_name = "SECS", default_value_t = 90.0, value_parser = super::numbers::interval_seconds)]
    idle_timeout: f64,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct LockArgs {
    thing: String,
    /// The lock to attach.
    #[arg(long, value_name = "LOCK")]
    lock: String,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct KeyedThingArgs {
    thing: String,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct RemoveLockArgs {
    lock: String,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Debug, Subcommand)]
pub enum AlertCommand {
    /// Set (or replace) a locked thing's alert.
    ///
    /// Example: dweetpipe alert set S5D9-63de --to ops@example.com
    ///   --when "if(dweet.sensors.TemperatureC > 40) return 'too hot';" --key-file key.txt
    Set(AlertSetArgs),
    /// Show a thing's alert and its status.
    Get(KeyedThingArgs),
    /// Remove a thing's alert.
    Remove(KeyedThingArgs),
    /// Try a condition on recorded dweets and print when the alert would open and close.
    ///
    /// Example: dweetpipe history S5D9-63de > recorded.jsonl;
    ///   dweetpipe alert test --when "if(dweet.sensors.TemperatureC > 40) return 'too hot';"
    ///   recorded.jsonl
    Test(super::alert_test::AlertTestArgs),
}

#[derive(Debug, Args)]
pub struct AlertSetArgs {
    thing: String,
    /// Recipients, comma-separated: a@example.com,b@example.com.
    #[arg(long, value_name = "ADDRESSES", value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// A JavaScript function body over `dweet` (the content) returning a message to fire.
    /// Checked here before it is sent.
    #[arg(long, value_name = "CONDITION", value_parser = condition)]
    when: String,
    #[command(flatten)]
    key: KeyArgs,
}

/// An alert condition the engine parses (the sandbox would refuse anything else, and an
/// alert that never parses never fires).
fn condition(text: &str) -> Result<String, String> {
    use dweetpipe::alert::condition::ConditionEngine;
    let mut engine = ConditionEngine::new(Default::default()).map_err(|e| e.to_string())?;
    engine.check(text).map_err(|e| {
        format!("{e} (a JavaScript function body over `dweet`; try it with `dweetpipe alert test`)")
    })?;
    Ok(text.to_owned())
}

/// Splits `[THING] k=v ...` and builds the content.
fn dweet_parts(args: &DweetArgs) -> anyhow::Result<(Option<&str>, Value)> {
    let mut content = match &args.json {
        Some(text) => match serde_json::from_str::<Value>(text)
            .with_context(|| format!("--json {text:?} is not valid JSON"))?
        {
            Value::Object(map) => map,
            _ => bail!("--json must be a JSON object, like '{{\"TemperatureC\": 29}}'"),
        },
        None => Map::new(),
    };
    let mut thing = None;
    for (position, word) in args.words.iter().enumerate() {
        match word.split_once('=') {
            Some((name, value)) if !name.is_empty() => {
                content.insert(name.to_owned(), coerce_query_value(value));
            }
            _ if position == 0 => thing = Some(word.as_str()),
            _ => bail!("{word:?} is not KEY=VALUE; only the first word may be the thing name"),
        }
    }
    Ok((thing, Value::Object(content)))
}

pub async fn dweet(client: &Client, args: DweetArgs) -> anyhow::Result<()> {
    let (thing, content) = dweet_parts(&args)?;
    if content.as_object().is_some_and(|c| c.is_empty()) {
        bail!(
            "nothing to send: give the content as KEY=VALUE pairs or --json '{{...}}', e.g. `dweetpipe dweet S5D9-63de TemperatureC=29`"
        );
    }
    let key = args.key.optional()?;
    match (thing, args.quietly) {
        (Some(thing), true) => {
            client
                .dweet_quietly_for(thing, &content, key.as_ref())
                .await?
        }
        (Some(thing), false) => {
            print_json(&client.dweet_for(thing, &content, key.as_ref()).await?)?
        }
        (None, false) => {
            let dweet = client.dweet(&content).await?;
            eprintln!(
                "the server named the thing {:?}; dweet to it again with `dweetpipe dweet {} ...`",
                dweet.thing, dweet.thing
            );
            print_json(&dweet)?
        }
        (None, true) => {
            bail!("--quietly needs a THING: the server names things only in its answer")
        }
    }
    Ok(())
}

pub async fn latest(client: &Client, args: ThingArgs) -> anyhow::Result<()> {
    let key = args.key.optional()?;
    print_json(
        &client
            .get_latest_dweet_for(&args.thing, key.as_ref())
            .await?,
    )
}

pub async fn history(client: &Client, args: HistoryArgs) -> anyhow::Result<()> {
    let key = args.key.optional()?;
    if let Some(date) = args.date {
        let Some(key) = key else {
            anyhow::bail!(
                "stored dweets need the thing's key: add --key-file PATH (or --key, or DWEET_KEY)"
            );
        };
        let window = dweetpipe::client::StoredWindow {
            date,
            hour: args.hour,
        };
        let mut out = std::io::stdout().lock();
        if args.csv {
            let csv = client
                .get_stored_dweets_csv_for(&args.thing, &key, window)
                .await?;
            out.write_all(csv.as_bytes())?;
        } else {
            for dweet in client
                .get_stored_dweets_for(&args.thing, &key, window)
                .await?
            {
                write_line(&mut out, &dweet)?;
            }
        }
        return Ok(out.flush()?);
    }
    let dweets = client.get_dweets_for(&args.thing, key.as_ref()).await?;
    let mut out = std::io::stdout().lock();
    for dweet in &dweets {
        write_line(&mut out, dweet)?;
    }
    Ok(out.flush()?)
}

/// Longest listen the CLI schedules when no --timeout is given: "until interrupted".
const LISTEN_FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

pub async fn listen(client: &Client, args: ListenArgs) -> anyhow::Result<()> {
    let key = args.key.optional()?;
    let reconnect_for = match args.timeout {
        Some(secs) => seconds("--timeout", secs)?,
        None => LISTEN_FOREVER,
    };
    let options = ListenOptions {
        reconnect_for: Some(reconnect_for),
        idle_timeout: seconds("--idle-timeout", args.idle_timeout)?,
        ..ListenOptions::default()
    };
    let mut stream = client
        .listen_for_dweets_from(&args.thing, key.as_ref(), options)
        .await?;
    let mut out = std::io::stdout();
    // One listener for the whole loop, so a signal between two turns is not missed.
    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = &mut shutdown => {
                out.flush()?;
                return Err(super::Interrupted.into());
            }
        };
        let Some(item) = next else { break };
        let dweet: Dweet = item?;
        let mut lock = out.lock();
        write_line(&mut lock, &dweet)?;
        lock.flush()?;
    }
    out.flush()?;
    Ok(())
}

pub async fn lock(client: &Client, args: LockArgs) -> anyhow::Result<()> {
    let key = args.key.required()?;
    print_json(&client.lock(&args.thing, &args.lock, &key).await?)
}

pub async fn unlock(client: &Client, args: KeyedThingArgs) -> anyhow::Result<()> {
    let key = args.key.required()?;
    print_json(&client.unlock(&args.thing, &key).await?)
}

pub async fn remove_lock(client: &Client, args: RemoveLockArgs) -> anyhow::Result<()> {
    let key = args.key.required()?;
    print_json(&client.remove_lock(&args.lock, &key).await?)
}

pub async fn run_alert(client: &Client, command: AlertCommand) -> anyhow::Result<()> {
    match command {
        AlertCommand::Set(args) => {
            let key = args.key.required()?;
            let recipients: Vec<&str> = args.to.iter().map(|a| a.trim()).collect();
            print_json(
                &client
                    .set_alert(&args.thing, &recipients, &args.when, &key)
                    .await?,
            )
        }
        AlertCommand::Get(args) => {
            let key = args.key.required()?;
            print_json(&client.get_alert(&args.thing, &key).await?)
        }
        AlertCommand::Remove(args) => {
            let key = args.key.required()?;
            print_json(&client.remove_alert(&args.thing, &key).await?)
        }
        AlertCommand::Test(args) => super::alert_test::run(args),
    }
}

pub fn seconds(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .with_context(|| format!("{flag} must be a non-negative number of seconds, not {secs}"))
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    write_line(&mut out, value)?;
    Ok(out.flush()?)
}

fn write_line(out: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}
