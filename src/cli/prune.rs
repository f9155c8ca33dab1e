//! `dweetpipe prune`: apply the things file's retention once, and print what went.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use dweetpipe::config::Config;
use dweetpipe::record::now_ms;
use dweetpipe::sink::postgres::PostgresSink;
use dweetpipe::telemetry::Metrics;

pub async fn run(args: super::worker::ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(args.path())?;
    let Some(postgres) = config
        .postgres
        .as_ref()
        .filter(|p| p.retention.is_some() || p.rollup_retention.is_some())
    else {
        bail!(
            "{}: no retention is configured, so nothing would go; set [postgres] retention (raw rows) and/or rollup_retention (rollups), like retention = \"90d\"",
            args.path().display()
        );
    };
    let metrics = Arc::new(Metrics::new()?);
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
    Ok(())
}
