//! `dweetpipe import`: JSON Lines files into the configured sinks, with progress and a summary.

use std::io::{BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use dweetpipe::config::Config;
use dweetpipe::import::Imported;
use dweetpipe::record::{Record, now_ms};
use dweetpipe::sink::parquet::DatasetError;
use dweetpipe::sink::parquet::{ParquetConfig, ParquetSink};
use dweetpipe::sink::postgres::PostgresSink;
use dweetpipe::telemetry::Metrics;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Only the sink sections ([parquet], [postgres]) of the things file are used.
    #[command(flatten)]
    config: super::ConfigArgs,
    /// JSON Lines files of dweets (`dweetpipe history` output); `-` reads stdin.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.path())?;
    if config.parquet.is_none() && config.postgres.is_none() {
        bail!(
            "{}: no sink is configured; add a [parquet] and/or a [postgres] section",
            args.config.path().display()
        );
    }
    let started = Instant::now();
    let received_ms = now_ms();
    let mut imported = Imported::default();
    for file in &args.files {
        let name = file.display().to_string();
        if name == "-" {
            imported.read("stdin", std::io::stdin().lock(), received_ms)?;
        } else {
            let input =
                std::fs::File::open(file).with_context(|| format!("could not open {name}"))?;
            imported.read(&name, BufReader::new(input), received_ms)?;
        }
    }
    let (lines, dweets) = (imported.lines, imported.dweets);
    let (records, repeats) = imported.into_records(received_ms);
    let dead_letters = records
        .iter()
        .filter(|r| matches!(r, Record::DeadLetter(_)))
        .count();

    let metrics = Arc::new(Metrics::new()?);
    let mut parquet = match &config.parquet {
        Some(parquet_config) => Some(open_parquet(parquet_config, &metrics)?),
        None => None,
    };
    let mut postgres = match &config.postgres {
        Some(postgres_config) => Some(
            PostgresSink::connect(
                postgres_config,
                Arc::clone(&metrics),
                std::time::Duration::from_secs(30),
            )
            .await?
            .for_bulk_load(),
        ),
        None => None,
    };
    let live = std::io::stderr().is_terminal();
    let total = records.len();
    let written =
        dweetpipe::import::write_to_sinks(&records, parquet.as_mut(), postgres.as_mut(), |done| {
            if live {
                eprint!(
                    "\rimported {done}/{total} records ({:.0}%)",
                    100.0 * done as f64 / total.max(1) as f64
                );
                let _ = std::io::stderr().flush();
            }
        })
        .await?;
    if live {
        eprintln!();
    }
    println!(
        "import: {lines} lines, {dweets} dweets ({repeats} repeated in the input), {dead_letters} unusable (dead letters), in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    summarise(&metrics, parquet.as_ref(), postgres.as_ref(), &written);
    // The process ends here: freeing every record one by one, their texts and readings,
    // cost 240 instructions a dweet and gave nothing back.
    std::mem::forget(records);
    Ok(())
}

/// The Parquet sink an import writes through; the worker must not hold the directory.
fn open_parquet(config: &ParquetConfig, metrics: &Arc<Metrics>) -> anyhow::Result<ParquetSink> {
    // An import may bring history of any age: every footer counts.
    let (sink, _) = ParquetSink::open(config.clone(), std::time::Duration::MAX, Arc::clone(metrics))
        .map_err(|error| match error {
            DatasetError::Locked(held) => anyhow!(
                "{held}\nimport writes the Parquet directory itself: stop the worker, run the import, then start the worker again (it backfills what the source still keeps)"
            ),
            other => other.into(),
        })?;
    Ok(sink)
}

/// Per sink, what it stored and what it skipped.
fn summarise(
    metrics: &Metrics,
    parquet: Option<&ParquetSink>,
    postgres: Option<&PostgresSink>,
    written: &dweetpipe::import::Written,
) {
    let rows = |sink: &str, table: &str| {
        metrics.value(
            "dweetpipe_sink_rows_written_total",
            &[("sink", sink), ("table", table)],
        )
    };
    // Per sink, what it stored and what it skipped: PostgreSQL may refuse a dweet Parquet
    // keeps (a \u0000 that jsonb cannot hold), and then holds it as one more dead letter.
    let stored = |sink: &str| {
        format!(
            "{} dweets, {} readings and {} dead letters written",
            rows(sink, "dweets"),
            rows(sink, "readings"),
            rows(sink, "dead_letters")
        )
    };
    if let Some(sink) = parquet {
        println!(
            "  Parquet: {}; {} already stored, skipped; {} older than [parquet] retention skipped",
            stored("parquet"),
            written.parquet_skipped,
            sink.past_retention()
        );
    }
    if let Some(sink) = postgres {
        println!(
            "  PostgreSQL: {}; those already stored skipped; {} older than [postgres] retention skipped; rollups brought up to date in {:.1} s; {} closed partition(s) re-keyed by board for reading in {:.1} s",
            stored("postgres"),
            sink.past_retention(),
            written.rollups_took.as_secs_f64(),
            written.partitions_arranged.len(),
            written.arranging_took.as_secs_f64()
        );
    }
}
