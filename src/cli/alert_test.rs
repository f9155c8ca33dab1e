//! `dweetpipe alert test`: runs an alert condition over recorded dweets and prints when the
//! alert would have opened and closed, with the same engine and limits as the sandbox, so a
//! condition can be tried before it is set.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use dweetpipe::alert::condition::{ConditionEngine, EvaluationLimits, Verdict, transition};
use dweetpipe::import::Imported;
use dweetpipe::record::Record;
use dweetpipe::sandbox::notify::NotificationKind;

#[derive(Debug, Args)]
pub struct AlertTestArgs {
    /// The condition: a JavaScript function body over `dweet` (the content).
    #[arg(long, value_name = "CONDITION")]
    when: String,
    /// JSON Lines of dweets: `dweetpipe history` output, or from PostgreSQL with
    /// psql -Atc "select row_to_json(d) from (select thing, created, content from dweets) d".
    /// `-` reads stdin. Each thing's dweets are replayed oldest first.
    #[arg(value_name = "FILE.jsonl", required = true)]
    files: Vec<PathBuf>,
    /// Print the verdict on every dweet, not only when the alert opens or closes.
    #[arg(long)]
    every: bool,
    /// Longest the condition may run on one dweet (the sandbox's default).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    time_limit: Duration,
}

pub fn run(args: AlertTestArgs) -> anyhow::Result<()> {
    let mut engine = ConditionEngine::new(EvaluationLimits {
        time: args.time_limit,
        ..EvaluationLimits::default()
    })?;
    engine
        .check(&args.when)
        .context("--when is not a condition the engine accepts")?;
    let mut imported = Imported::default();
    for path in &args.files {
        let name = path.display().to_string();
        if name == "-" {
            imported.read("-", std::io::stdin().lock(), 0)?;
        } else {
            let file = File::open(path).with_context(|| format!("could not open {name}"))?;
            imported
                .read(&name, BufReader::new(file), 0)
                .with_context(|| format!("could not read {name}"))?;
        }
    }
    let (things, not_dweets) = imported.into_dweets();
    let mut out = std::io::stdout().lock();
    let (mut dweets, mut fired, mut opened, mut closed, mut errors) = (0, 0, 0, 0, 0);
    for (thing, recorded) in &things {
        let mut open = false;
        for dweet in recorded {
            dweets += 1;
            let content = dweet.content();
            let verdict = match engine.evaluate(&args.when, content) {
                Ok(verdict) => verdict,
                Err(error) => {
                    errors += 1;
                    writeln!(out, "{}  {thing}  ERROR  {error}", dweet.created())?;
                    continue;
                }
            };
            let message = match &verdict {
                Verdict::Fired { message } => {
                    fired += 1;
                    message.as_str()
                }
                Verdict::Quiet => "",
            };
            match transition(open, &verdict) {
                Some(NotificationKind::Opened) => {
                    open = true;
                    opened += 1;
                    writeln!(out, "{}  {thing}  OPEN   {message}", dweet.created())?;
                }
                Some(NotificationKind::Closed) => {
                    open = false;
                    closed += 1;
                    writeln!(out, "{}  {thing}  CLOSE", dweet.created())?;
                }
                None if args.every => {
                    let state = if open { "open " } else { "quiet" };
                    writeln!(out, "{}  {thing}  {state}  {message}", dweet.created())?;
                }
                None => {}
            }
        }
    }
    writeln!(
        out,
        "{dweets} dweets of {} thing(s): fired on {fired}, opened {opened} time(s), closed {closed}; {errors} evaluation error(s)",
        things.len()
    )?;
    for record in &not_dweets {
        if let Record::DeadLetter(letter) = record {
            eprintln!("skipped: {}", letter.reason);
        }
    }
    if dweets == 0 {
        bail!("no dweets in the input; `dweetpipe history THING > FILE.jsonl` records some");
    }
    Ok(())
}
