//! `dweetpipe prune` and `dweetpipe compact`: the things file's retention and the Parquet
//! compaction, run once by hand, printing what they did. `run` does both by itself.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use dweetpipe::config::Config;
use dweetpipe::record::now_ms;
use dweetpipe::sink::parquet::DatasetError;
use dweetpipe::sink::parquet::ParquetSink;
use dweetpipe::sink::postgres::PostgresSink;
use dweetpipe::telemetry::Metrics;

/// Opens the Parquet dataset for this process, or says why another one has it.
fn open_parquet(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Option<ParquetSink>> {
    let Some(parquet) = &config.parquet else {
        return Ok(None);
    };
    let replay = config
        .source
        .as_ref()
        .map_or(Duration::from_secs(24 * 60 * 60), |source| source.history);
    match ParquetSink::open(parquet.clone(), replay, Arc::clone(metrics)) {
        Ok((sink, _)) => Ok(Some(sink)),
        Err(DatasetError::Locked(held)) => Err(anyhow!(
            "{held}\na running worker compacts and applies retention to its Parquet directory by itself (every 10 minutes; in a cluster, the leader)"
        )),
        Err(other) => Err(other.into()),
    }
}

pub async fn prune(args: super::ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(args.path())?;
    let postgres = config
        .postgres
        .as_ref()
        .filter(|p| p.retention.is_some() || p.rollup_retention.is_some());
    let parquet_retention = config.parquet.as_ref().and_then(|p| p.retention);
    if postgres.is_none() && parquet_retention.is_none() {
        bail!(
            "{}: no retention is configured, so nothing would go; set [postgres] retention (raw rows) and/or rollup_retention (rollups), or [parquet] retention, like retention = \"90d\"",
            args.path().display()
        );
    }
    let metrics = Arc::new(Metrics::new()?);
    if parquet_retention.is_some()
        && let Some(mut sink) = open_parquet(&config, &metrics)?
    {
        let retired = sink.retire_old_dates(now_ms())?;
        for date in &retired {
            println!(
                "removed {}/date={} ({} files)",
                date.dataset.dir_name(),
                date.date,
                date.files
            );
        }
        println!("prune: {} Parquet date folder(s) removed", retired.len());
    }
    if let Some(postgres) = postgres {
        let sink =
            PostgresSink::connect(postgres, Arc::clone(&metrics), Duration::from_secs(30)).await?;
        let dropped = sink.history().prune(postgres, now_ms()).await?;
        for partition in &dropped {
            println!(
                "dropped {} ({} before {})",
                partition.name, partition.parent, partition.until
            );
        }
        println!(
            "prune: {} partition(s) dropped; everything newer is kept",
            dropped.len()
        );
    }
    Ok(())
}

pub async fn compact(args: super::ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(args.path())?;
    let metrics = Arc::new(Metrics::new()?);
    let Some(mut sink) = open_parquet(&config, &metrics)? else {
        bail!(
            "{}: there is no [parquet] section, so nothing to compact",
            args.path().display()
        );
    };
    let compacted = sink.compact(now_ms())?;
    for date in &compacted {
        println!(
            "compacted {}/date={}: {} files -> 1, {} rows",
            date.dataset.dir_name(),
            date.date,
            date.files_before,
            date.rows
        );
    }
    println!(
        "compact: {} date folder(s) compacted; dates that closed less than compact_after ago wait",
        compacted.len()
    );
    Ok(())
}
