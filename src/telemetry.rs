//! Every metric the worker exports, named in one place, and the `/metrics`, `/healthz` and
//! `/readyz` endpoints.
//!
//! Naming follows Prometheus conventions: the `dweetpipe_` prefix, base units, `_total` on
//! counters, and `thing` as the only high-cardinality label. Dashboards and alert rules are
//! written against these names, so renaming one is a breaking change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http_server::{self, Body};

/// The `[metrics]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// A loop (fan-out, a sink's loop) that has not turned for this long makes `/healthz`
    /// answer 503 and stops the systemd watchdog pings. Default 30s.
    #[serde(
        default = "default_stuck_after",
        deserialize_with = "crate::settings::duration"
    )]
    pub stuck_after: Duration,
}

fn default_stuck_after() -> Duration {
    Duration::from_secs(30)
}

impl MetricsConfig {
    pub fn new(listen: SocketAddr) -> Self {
        MetricsConfig {
            listen,
            stuck_after: default_stuck_after(),
        }
    }
}

/// Blocks this thread for good when `DWEETPIPE_FAULT_STALL` names `point`: an operator's fire
/// drill for the watchdog and liveness probe (README, "systemd"), and what the health tests
/// use to show that a stuck loop is reported. Costs one variable read per call.
pub fn fault_point(point: &str) {
    if std::env::var("DWEETPIPE_FAULT_STALL").is_ok_and(|stalled| stalled == point) {
        tracing::warn!(
            point,
            "fault point: this loop stalls for good (DWEETPIPE_FAULT_STALL)"
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// A long-running loop's heartbeat: the loop calls [`LoopBeat::beat`] every turn (and while
/// it waits); `/healthz` and the watchdog fail once it has not for `stuck_after`.
#[derive(Clone)]
pub struct LoopBeat {
    last_ms: Arc<AtomicI64>,
    started: Instant,
}

impl LoopBeat {
    pub fn beat(&self) {
        let ms = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Sleeps `total`, beating every second: a loop that waits on purpose is not stuck.
    pub fn sleep_beating(&self, total: Duration) {
        let until = Instant::now() + total;
        loop {
            self.beat();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_secs(1)));
        }
    }

    /// [`LoopBeat::sleep_beating`] for async loops.
    pub async fn pause_beating(&self, total: Duration) {
        let until = Instant::now() + total;
        loop {
            self.beat();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        }
    }
}

/// A sink, as its metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SinkName {
    Parquet,
    Postgres,
    /// The JetStream output (`[nats]`).
    Nats,
}

impl SinkName {
    pub const ALL: [SinkName; 3] = [SinkName::Parquet, SinkName::Postgres, SinkName::Nats];

    pub fn as_str(self) -> &'static str {
        match self {
            SinkName::Parquet => "parquet",
            SinkName::Postgres => "postgres",
            SinkName::Nats => "nats",
        }
    }
}

/// A table (PostgreSQL) or dataset (Parquet), as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Readings,
    Dweets,
    DeadLetters,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Readings, Table::Dweets, Table::DeadLetters];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Readings => "readings",
            Table::Dweets => "dweets",
            Table::DeadLetters => "dead_letters",
        }
    }
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The server closed it (an idle close is normal).
    Closed,
    Error,
    /// Cancelled: a reload or shutdown.
    Stopped,
}

impl Disconnect {
    pub fn as_str(self) -> &'static str {
        match self {
            Disconnect::Closed => "closed",
            Disconnect::Error => "error",
            Disconnect::Stopped => "stopped",
        }
    }
}

/// How a stream connection attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    Ok,
    /// Locked, wrong key, unknown thing.
    Refused,
    Failed,
}

impl ConnectOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectOutcome::Ok => "ok",
            ConnectOutcome::Refused => "refused",
            ConnectOutcome::Failed => "failed",
        }
    }
}

/// Where a dweet entering the pipeline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DweetSource {
    Stream,
    Backfill,
    Poll,
}

impl DweetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DweetSource::Stream => "stream",
            DweetSource::Backfill => "backfill",
            DweetSource::Poll => "poll",
        }
    }
}

/// The worker's metrics, registered in their own registry (several workers in one process,
/// as in tests, do not share counters).
pub struct Metrics {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub things_configured: IntGauge,
    stream_up: IntGaugeVec,
    stream_connects: IntCounterVec,
    stream_disconnects: IntCounterVec,
    dweets_received: IntCounterVec,
    pub duplicates_dropped: IntCounter,
    pub decode_errors: IntCounter,
    pub dead_letters: IntCounter,
    last_dweet_timestamp: GaugeVec,
    pub ingest_delay: Histogram,
    sink_rows_written: IntCounterVec,
    sink_errors: IntCounterVec,
    sink_write_duration: HistogramVec,
    sink_buffer_rows: IntGaugeVec,
    parquet_files_finalized: IntCounterVec,
    retention_partitions_dropped: IntCounterVec,
    partitions_arranged: IntCounter,
    parquet_dates_compacted: IntCounterVec,
    parquet_dates_retired: IntCounterVec,
    config_reloads: IntCounterVec,
    spool_bytes: IntGaugeVec,
    spool_dropped: IntCounterVec,
    spool_corrupt_records: IntCounterVec,
    lifecycle_actions: IntCounterVec,
    pub lifecycle_drift: IntGauge,
    pub lifecycle_problems: IntGauge,
    pub uptime: Gauge,
    /// Live members of the cluster as this member sees them (0 outside a cluster).
    pub cluster_members: IntGauge,
    /// Things this member owns and streams.
    pub cluster_things_owned: IntGauge,
    /// Things this member started or stopped because ownership changed.
    pub cluster_ownership_moves: IntCounter,
    cluster_lease_renewals: IntCounterVec,
    /// 1 while this member leads (reconciles locks and alerts).
    pub cluster_leader: IntGauge,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("dweetpipe_{name}"), help)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            opts("build_info", "Always 1; the version is a label."),
            &["version"],
        )?;
        let things_configured =
            IntGauge::with_opts(opts("things_configured", "Things in the configuration."))?;
        let stream_up = IntGaugeVec::new(
            opts(
                "stream_up",
                "1 while the thing's listen stream (or poll loop) is healthy.",
            ),
            &["thing"],
        )?;
        let stream_connects = IntCounterVec::new(
            opts(
                "stream_connects_total",
                "Stream connection attempts by outcome (ok, refused, failed).",
            ),
            &["outcome"],
        )?;
        let stream_disconnects = IntCounterVec::new(
            opts(
                "stream_disconnects_total",
                "Streams ended, by reason (closed, error, stopped).",
            ),
            &["reason"],
        )?;
        let dweets_received = IntCounterVec::new(
            opts(
                "dweets_received_total",
                "Dweets accepted into the pipeline, by source (stream, backfill, poll).",
            ),
            &["source"],
        )?;
        let duplicates_dropped = IntCounter::with_opts(opts(
            "duplicates_dropped_total",
            "Dweets dropped because they were already ingested.",
        ))?;
        let decode_errors = IntCounter::with_opts(opts(
            "decode_errors_total",
            "Stream lines that were not dweets.",
        ))?;
        let dead_letters = IntCounter::with_opts(opts(
            "dead_letters_total",
            "Dweets and stream lines the worker could not turn into rows: dead letters in every sink. A dweet only PostgreSQL refuses counts in sink_rows_written_total{sink=\"postgres\",table=\"dead_letters\"} instead.",
        ))?;
        let last_dweet_timestamp = GaugeVec::new(
            opts(
                "last_dweet_timestamp_seconds",
                "Unix time of the newest dweet ingested per thing.",
            ),
            &["thing"],
        )?;
        let ingest_delay = Histogram::with_opts(
            HistogramOpts::new("dweetpipe_ingest_delay_seconds", "Seconds from a dweet's created time to its arrival at the worker (stream and poll).")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        )?;
        let sink_rows_written = IntCounterVec::new(
            opts(
                "sink_rows_written_total",
                "Rows made durable, by sink and table.",
            ),
            &["sink", "table"],
        )?;
        let sink_errors =
            IntCounterVec::new(opts("sink_errors_total", "Sink write failures."), &["sink"])?;
        let sink_write_duration = HistogramVec::new(
            HistogramOpts::new(
                "dweetpipe_sink_write_duration_seconds",
                "Seconds per sink write call.",
            )
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["sink"],
        )?;
        let sink_buffer_rows = IntGaugeVec::new(
            opts(
                "sink_buffer_rows",
                "Records a sink holds in memory and has not yet made durable (its in-memory backlog and the batches it is writing); what waits on disk is dweetpipe_spool_bytes.",
            ),
            &["sink"],
        )?;
        let parquet_files_finalized = IntCounterVec::new(
            opts(
                "parquet_files_finalized_total",
                "Parquet files closed, synced and renamed into place, by dataset.",
            ),
            &["dataset"],
        )?;
        let retention_partitions_dropped = IntCounterVec::new(
            opts(
                "retention_partitions_dropped_total",
                "PostgreSQL partitions dropped by retention, by table they belonged to.",
            ),
            &["table"],
        )?;
        let partitions_arranged = IntCounter::with_opts(opts(
            "partitions_arranged_total",
            "Closed readings partitions re-keyed by board for reading.",
        ))?;
        let parquet_dates_compacted = IntCounterVec::new(
            opts(
                "parquet_dates_compacted_total",
                "Closed dates rewritten into one sorted file, by dataset.",
            ),
            &["dataset"],
        )?;
        let parquet_dates_retired = IntCounterVec::new(
            opts(
                "parquet_dates_retired_total",
                "Dates removed by [parquet] retention, by dataset.",
            ),
            &["dataset"],
        )?;
        let config_reloads = IntCounterVec::new(
            opts(
                "config_reloads_total",
                "Configuration reloads by outcome (ok, invalid).",
            ),
            &["outcome"],
        )?;
        let spool_bytes = IntGaugeVec::new(
            opts("spool_bytes", "Bytes waiting for a sink in its disk spool."),
            &["sink"],
        )?;
        let spool_dropped = IntCounterVec::new(
            opts(
                "spool_dropped_records_total",
                "Records a sink will not get in this run because its spool could not take them (full, or its disk failing).",
            ),
            &["sink"],
        )?;
        let spool_corrupt_records = IntCounterVec::new(
            opts(
                "spool_corrupt_records_total",
                "Damaged records skipped while replaying a sink's spool (each one is logged with its segment and offset).",
            ),
            &["sink"],
        )?;
        let lifecycle_actions = IntCounterVec::new(
            opts(
                "lifecycle_actions_total",
                "Lock and alert changes made to match things.toml, by thing, kind (lock, unlock, set_alert, replace_alert, remove_alert) and outcome (ok, failed).",
            ),
            &["thing", "kind", "outcome"],
        )?;
        let lifecycle_drift = IntGauge::with_opts(opts(
            "lifecycle_drift",
            "Things whose lock or alert differed from things.toml at the last lifecycle check.",
        ))?;
        let lifecycle_problems = IntGauge::with_opts(opts(
            "lifecycle_problems",
            "Things whose lock or alert could not be checked or corrected at the last lifecycle check (wrong key, server unreachable).",
        ))?;
        let uptime = Gauge::with_opts(opts("uptime_seconds", "Seconds since the worker started."))?;
        let cluster_members = IntGauge::with_opts(opts(
            "cluster_members",
            "Live members of the cluster as this member sees them (0 outside a cluster, or while this member cannot renew its membership).",
        ))?;
        let cluster_things_owned = IntGauge::with_opts(opts(
            "cluster_things_owned",
            "Things this member owns and streams (every configured thing outside a cluster).",
        ))?;
        let cluster_ownership_moves = IntCounter::with_opts(opts(
            "cluster_ownership_moves_total",
            "Things this member started or stopped because the cluster's ownership changed.",
        ))?;
        let cluster_lease_renewals = IntCounterVec::new(
            opts(
                "cluster_lease_renewals_total",
                "Membership renewals in the NATS bucket, by outcome (ok, failed).",
            ),
            &["outcome"],
        )?;
        let cluster_leader = IntGauge::with_opts(opts(
            "cluster_leader",
            "1 while this member leads the cluster (reconciles locks and alerts, applies retention, compacts Parquet); always 1 outside a cluster.",
        ))?;

        registry.register(Box::new(build_info.clone()))?;
        registry.register(Box::new(things_configured.clone()))?;
        registry.register(Box::new(stream_up.clone()))?;
        registry.register(Box::new(stream_connects.clone()))?;
        registry.register(Box::new(stream_disconnects.clone()))?;
        registry.register(Box::new(dweets_received.clone()))?;
        registry.register(Box::new(duplicates_dropped.clone()))?;
        registry.register(Box::new(decode_errors.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(last_dweet_timestamp.clone()))?;
        registry.register(Box::new(ingest_delay.clone()))?;
        registry.register(Box::new(sink_rows_written.clone()))?;
        registry.register(Box::new(sink_errors.clone()))?;
        registry.register(Box::new(sink_write_duration.clone()))?;
        registry.register(Box::new(sink_buffer_rows.clone()))?;
        registry.register(Box::new(parquet_files_finalized.clone()))?;
        registry.register(Box::new(retention_partitions_dropped.clone()))?;
        registry.register(Box::new(partitions_arranged.clone()))?;
        registry.register(Box::new(parquet_dates_compacted.clone()))?;
        registry.register(Box::new(parquet_dates_retired.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(spool_bytes.clone()))?;
        registry.register(Box::new(spool_dropped.clone()))?;
        registry.register(Box::new(spool_corrupt_records.clone()))?;
        registry.register(Box::new(lifecycle_actions.clone()))?;
        registry.register(Box::new(lifecycle_drift.clone()))?;
        registry.register(Box::new(lifecycle_problems.clone()))?;
        registry.register(Box::new(uptime.clone()))?;
        registry.register(Box::new(cluster_members.clone()))?;
        registry.register(Box::new(cluster_things_owned.clone()))?;
        registry.register(Box::new(cluster_ownership_moves.clone()))?;
        registry.register(Box::new(cluster_lease_renewals.clone()))?;
        registry.register(Box::new(cluster_leader.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Series exist from the first scrape, so rate() and alert rules see them at once.
        for outcome in ["ok", "refused", "failed"] {
            stream_connects.with_label_values(&[outcome]);
        }
        for reason in ["closed", "error", "stopped"] {
            stream_disconnects.with_label_values(&[reason]);
        }
        for source in ["stream", "backfill", "poll"] {
            dweets_received.with_label_values(&[source]);
        }
        for outcome in ["ok", "invalid"] {
            config_reloads.with_label_values(&[outcome]);
        }
        for outcome in ["ok", "failed"] {
            cluster_lease_renewals.with_label_values(&[outcome]);
        }
        Ok(Metrics {
            registry,
            build_info,
            things_configured,
            stream_up,
            stream_connects,
            stream_disconnects,
            dweets_received,
            duplicates_dropped,
            decode_errors,
            dead_letters,
            last_dweet_timestamp,
            ingest_delay,
            sink_rows_written,
            sink_errors,
            sink_write_duration,
            sink_buffer_rows,
            parquet_files_finalized,
            retention_partitions_dropped,
            partitions_arranged,
            parquet_dates_compacted,
            parquet_dates_retired,
            config_reloads,
            spool_bytes,
            spool_dropped,
            spool_corrupt_records,
            lifecycle_actions,
            lifecycle_drift,
            lifecycle_problems,
            uptime,
            cluster_members,
            cluster_things_owned,
            cluster_ownership_moves,
            cluster_lease_renewals,
            cluster_leader,
        })
    }

    /// One membership renewal in the cluster's bucket, made (`ok`) or failed.
    pub fn cluster_renewal(&self, ok: bool) {
        self.cluster_lease_renewals
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Creates a sink's series (at zero) when the sink is configured.
    pub fn declare_sink(&self, sink: SinkName) {
        let label = sink.as_str();
        self.sink_errors.with_label_values(&[label]);
        self.sink_write_duration.with_label_values(&[label]);
        self.sink_buffer_rows.with_label_values(&[label]);
        self.spool_bytes.with_label_values(&[label]);
        self.spool_dropped.with_label_values(&[label]);
        self.spool_corrupt_records.with_label_values(&[label]);
        for table in Table::ALL {
            self.sink_rows_written
                .with_label_values(&[label, table.as_str()]);
            if sink == SinkName::Parquet {
                self.parquet_files_finalized
                    .with_label_values(&[table.as_str()]);
            }
        }
    }

    pub fn set_stream_up(&self, thing: &str, up: bool) {
        self.stream_up
            .with_label_values(&[thing])
            .set(i64::from(up));
    }

    pub fn stream_connected(&self, outcome: ConnectOutcome) {
        self.stream_connects
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    pub fn stream_disconnected(&self, reason: Disconnect) {
        self.stream_disconnects
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    pub fn dweet_received(&self, source: DweetSource) {
        self.dweets_received
            .with_label_values(&[source.as_str()])
            .inc();
    }

    pub fn set_last_dweet(&self, thing: &str, created_ms: i64) {
        self.last_dweet_timestamp
            .with_label_values(&[thing])
            .set(created_ms as f64 / 1000.0);
    }

    pub fn rows_written(&self, sink: SinkName, table: Table, rows: u64) {
        self.sink_rows_written
            .with_label_values(&[sink.as_str(), table.as_str()])
            .inc_by(rows);
    }

    pub fn sink_error(&self, sink: SinkName) {
        self.sink_errors.with_label_values(&[sink.as_str()]).inc();
    }

    /// Seconds per write call of `sink`.
    pub fn sink_write_duration(&self, sink: SinkName) -> Histogram {
        self.sink_write_duration.with_label_values(&[sink.as_str()])
    }

    pub fn set_sink_buffer(&self, sink: SinkName, records: usize) {
        self.sink_buffer_rows
            .with_label_values(&[sink.as_str()])
            .set(records as i64);
    }

    pub fn parquet_file_sealed(&self, dataset: Table) {
        self.parquet_files_finalized
            .with_label_values(&[dataset.as_str()])
            .inc();
    }

    /// A partition of `table` (`readings`, `readings_1m`, …) went by retention.
    pub fn retention_dropped(&self, table: &str) {
        self.retention_partitions_dropped
            .with_label_values(&[table])
            .inc();
    }

    pub fn partition_arranged(&self) {
        self.partitions_arranged.inc();
    }

    pub fn parquet_date_compacted(&self, dataset: Table) {
        self.parquet_dates_compacted
            .with_label_values(&[dataset.as_str()])
            .inc();
    }

    pub fn parquet_date_retired(&self, dataset: Table) {
        self.parquet_dates_retired
            .with_label_values(&[dataset.as_str()])
            .inc();
    }

    pub fn config_reloaded(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "invalid" }])
            .inc();
    }

    pub fn set_spool_bytes(&self, sink: SinkName, bytes: u64) {
        self.spool_bytes
            .with_label_values(&[sink.as_str()])
            .set(bytes as i64);
    }

    pub fn spool_dropped(&self, sink: SinkName, records: u64) {
        self.spool_dropped
            .with_label_values(&[sink.as_str()])
            .inc_by(records);
    }

    pub fn spool_corrupt(&self, sink: SinkName, records: u64) {
        self.spool_corrupt_records
            .with_label_values(&[sink.as_str()])
            .inc_by(records);
    }

    /// One lifecycle change made (`ok`) or failed; `kind` is the lifecycle's action name.
    pub fn lifecycle_action(&self, thing: &str, kind: &'static str, ok: bool) {
        self.lifecycle_actions
            .with_label_values(&[thing, kind, if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Drops a removed thing's series so dashboards stop showing it.
    pub fn forget_thing(&self, thing: &str) {
        let _ = self.stream_up.remove_label_values(&[thing]);
        let _ = self.last_dweet_timestamp.remove_label_values(&[thing]);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = Vec::new();
        // Encoding our own registry's families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut text);
        String::from_utf8(text).unwrap_or_default()
    }

    /// A counter's or gauge's current value, summed over labels matching `labels`: for tests,
    /// progress lines and summaries.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| {
                let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
                family
                    .get_metric()
                    .iter()
                    .map(move |metric| (counter, metric))
            })
            .filter(|(_, metric)| {
                labels.iter().all(|(key, value)| {
                    metric
                        .get_label()
                        .iter()
                        .any(|pair| pair.name() == *key && pair.value() == *value)
                })
            })
            .map(|(counter, metric)| {
                if counter {
                    metric.get_counter().get_value()
                } else {
                    metric.get_gauge().get_value()
                }
            })
            // An empty f64 sum is -0.0; adding 0.0 makes it print as 0.
            .sum::<f64>()
            + 0.0
    }
}

/// What `/healthz` and `/readyz` answer from, and the one place that knows each thing's
/// stream state and each sink's trouble (the metrics and `things.stream_state` are fed from
/// here, never read back from the registry).
pub struct Health {
    started: Instant,
    /// Each long-running loop's last turn, in ms since `started`.
    loops: Mutex<Vec<(&'static str, Arc<AtomicI64>)>>,
    /// Loops that ended by a panic, with what they said.
    failed_loops: Mutex<Vec<String>>,
    stuck_after: Duration,
    /// Things whose subscription has made its first attempt (for systemd's READY).
    attempted: Mutex<HashSet<String>>,
    /// Sinks that lost records in this run (their spool could not take them).
    sink_losses: Mutex<BTreeMap<SinkName, String>>,
    /// Sinks that cannot make records durable now, with what is wrong.
    sink_problems: Mutex<BTreeMap<SinkName, String>>,
    /// In a cluster: why this member cannot renew its membership (it then owns nothing).
    cluster_problem: Mutex<Option<String>>,
    /// Every running thing: `None` while its stream is up, else since when it is down.
    streams: Mutex<HashMap<String, Option<Instant>>>,
    /// How long a thing may be down before the worker is not ready.
    grace: Duration,
    /// Fed from the stream states above (`stream_up`, a removed thing's series), so the gauge
    /// and the database's `stream_state` say the same.
    metrics: Option<Arc<Metrics>>,
}

impl Health {
    pub fn new(grace: Duration, stuck_after: Duration) -> Self {
        Health {
            started: Instant::now(),
            loops: Mutex::new(Vec::new()),
            failed_loops: Mutex::new(Vec::new()),
            stuck_after,
            attempted: Mutex::new(HashSet::new()),
            sink_losses: Mutex::new(BTreeMap::new()),
            metrics: None,
            sink_problems: Mutex::new(BTreeMap::new()),
            cluster_problem: Mutex::new(None),
            streams: Mutex::new(HashMap::new()),
            grace,
        }
    }

    /// Keeps `metrics`' per-thing series in step with the stream states held here.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Registers a long-running loop by name; it must beat from now on.
    pub fn register_loop(&self, name: &'static str) -> LoopBeat {
        let beat = LoopBeat {
            last_ms: Arc::new(AtomicI64::new(0)),
            started: self.started,
        };
        beat.beat();
        lock(&self.loops).push((name, Arc::clone(&beat.last_ms)));
        beat
    }

    /// A loop ended by a panic: alive no more.
    pub fn loop_failed(&self, what: String) {
        lock(&self.failed_loops).push(what);
    }

    /// A sink dropped records its spool could not take (`None`: it has not).
    pub fn set_sink_loss(&self, sink: SinkName, loss: Option<String>) {
        set_or_clear(&self.sink_losses, sink, loss);
    }

    /// `thing`'s subscription has made its first attempt (connected, or failed to).
    pub fn thing_attempted(&self, thing: &str) {
        lock(&self.attempted).insert(thing.to_owned());
    }

    /// Whether every one of `things` has made its first attempt.
    pub fn all_attempted<'a>(&self, mut things: impl Iterator<Item = &'a str>) -> bool {
        let attempted = lock(&self.attempted);
        things.all(|thing| attempted.contains(thing))
    }

    /// A sink reports trouble (`Some(what)`: records wait in its backlog or are dropped) or
    /// that it is writing again (`None`).
    pub fn set_sink_problem(&self, sink: SinkName, problem: Option<String>) {
        set_or_clear(&self.sink_problems, sink, problem);
    }

    /// In a cluster: NATS cannot be reached to renew the membership (`Some(what)`), or can.
    pub fn set_cluster_problem(&self, problem: Option<String>) {
        *lock(&self.cluster_problem) = problem;
    }

    pub fn thing_down(&self, thing: &str) {
        let mut streams = lock(&self.streams);
        let state = streams.entry(thing.to_owned()).or_insert(None);
        if state.is_none() {
            *state = Some(Instant::now());
        }
        if let Some(metrics) = &self.metrics {
            metrics.set_stream_up(thing, false);
        }
    }

    pub fn thing_up(&self, thing: &str) {
        lock(&self.streams).insert(thing.to_owned(), None);
        if let Some(metrics) = &self.metrics {
            metrics.set_stream_up(thing, true);
        }
    }

    /// A thing removed from the configuration: its state and its series go.
    pub fn forget_thing(&self, thing: &str) {
        lock(&self.streams).remove(thing);
        lock(&self.attempted).remove(thing);
        if let Some(metrics) = &self.metrics {
            metrics.forget_thing(thing);
        }
    }

    /// Each running thing and whether its stream is up.
    pub fn stream_states(&self) -> Vec<(String, bool)> {
        lock(&self.streams)
            .iter()
            .map(|(thing, down)| (thing.clone(), down.is_none()))
            .collect()
    }

    /// Alive: every registered loop turned within `stuck_after` and none died. The error
    /// names the loops that did not.
    pub fn liveness(&self) -> Result<(), String> {
        let failed = lock(&self.failed_loops);
        if let Some(first) = failed.first() {
            return Err(first.clone());
        }
        drop(failed);
        let now = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let limit = i64::try_from(self.stuck_after.as_millis()).unwrap_or(i64::MAX);
        let stuck: Vec<String> = lock(&self.loops)
            .iter()
            .filter_map(|(name, last)| {
                let silent = now - last.load(Ordering::Relaxed);
                (silent > limit).then(|| {
                    format!(
                        "the {name} loop has not turned for {:.1} s",
                        silent as f64 / 1000.0
                    )
                })
            })
            .collect();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(stuck.join("; "))
        }
    }

    /// Ready: every sink making records durable and every thing up or within its reconnect
    /// grace. The answer names what is not ready.
    pub fn readiness(&self) -> Result<(), String> {
        let mut named: Vec<String> = lock(&self.sink_problems)
            .iter()
            .chain(lock(&self.sink_losses).iter())
            .map(|(sink, problem)| format!("{}: {problem}", sink.as_str()))
            .collect();
        if let Some(problem) = lock(&self.cluster_problem).as_ref() {
            named.push(format!("cluster: {problem}"));
        }
        if !named.is_empty() {
            return Err(named.join("; "));
        }
        let streams = lock(&self.streams);
        let mut stale: Vec<&str> = streams
            .iter()
            .filter(|(_, down)| down.is_some_and(|since| since.elapsed() > self.grace))
            .map(|(thing, _)| thing.as_str())
            .collect();
        stale.sort_unstable();
        stale.truncate(10);
        if stale.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "streams down beyond the {:?} grace: {}",
                self.grace,
                stale.join(", ")
            ))
        }
    }
}

/// Records what is wrong with `sink` (`Some`), or that nothing is (`None`).
fn set_or_clear(map: &Mutex<BTreeMap<SinkName, String>>, sink: SinkName, what: Option<String>) {
    let mut map = lock(map);
    match what {
        Some(what) => map.insert(sink, what),
        None => map.remove(&sink),
    };
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let handler = Arc::new(move |request: Request<hyper::body::Incoming>| {
        let answer = answer(request.uri().path(), &metrics, &health);
        async move { answer }
    });
    http_server::serve(listener, handler, shutdown).await;
}

fn answer(path: &str, metrics: &Metrics, health: &Health) -> Response<Body> {
    let (status, content_type, text) = match path {
        "/metrics" => {
            metrics.uptime.set(health.started.elapsed().as_secs_f64());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.encode(),
            )
        }
        "/healthz" => match health.liveness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not alive: {why}\n"),
            ),
        },
        "/readyz" => match health.readiness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric names as this file registers them (`opts("name"` and `HistogramOpts::new`).
    fn registered_names() -> std::collections::BTreeSet<String> {
        let code = include_str!("telemetry.rs");
        let code = &code[..code.find("#[cfg(test)]").unwrap_or(code.len())];
        let mut names = std::collections::BTreeSet::new();
        for (marker, prefix) in [("opts(", "dweetpipe_"), ("HistogramOpts::new(", "")] {
            for piece in code.split(marker).skip(1) {
                let piece = piece.trim_start();
                if let Some(rest) = piece.strip_prefix('"')
                    && let Some(end) = rest.find('"')
                {
                    names.insert(format!("{prefix}{}", &rest[..end]));
                }
            }
        }
        names
    }

    #[test]
    fn the_readme_metrics_table_lists_every_metric_and_only_those() {
        let readme = include_str!("../README.md");
        let listed: std::collections::BTreeSet<String> = readme
            .lines()
            .filter_map(|line| line.strip_prefix("| `dweetpipe_"))
            .map(|rest| {
                let end = rest.find(['{', '`']).unwrap_or(rest.len());
                format!("dweetpipe_{}", &rest[..end])
            })
            .collect();
        let registered = registered_names();
        assert!(registered.len() > 25, "{registered:?}");
        let undocumented: Vec<_> = registered.difference(&listed).collect();
        let unknown: Vec<_> = listed.difference(&registered).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "README lacks {undocumented:?} and lists unknown {unknown:?}"
        );
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new().unwrap();
        metrics.stream_up.with_label_values(&["t"]).set(1);
        metrics
            .dweets_received
            .with_label_values(&["stream"])
            .inc_by(3);
        let text = metrics.encode();
        for line in text.lines().filter(|l| l.starts_with("# TYPE dweetpipe_")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        }
        assert!(text.contains("dweetpipe_build_info{version="));
        assert_eq!(
            metrics.value("dweetpipe_dweets_received_total", &[("source", "stream")]),
            3.0
        );
        assert_eq!(metrics.value("dweetpipe_stream_up", &[]), 1.0);
        metrics.forget_thing("t");
        assert!(!metrics.encode().contains("thing=\"t\""));
    }

    #[test]
    fn liveness_names_a_stuck_loop_and_a_dead_one() {
        let health = Health::new(Duration::ZERO, Duration::ZERO);
        assert!(health.liveness().is_ok(), "no loops yet");
        let _beat = health.register_loop("fan-out");
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            health
                .liveness()
                .unwrap_err()
                .contains("the fan-out loop has not turned"),
        );
        let alive = Health::new(Duration::ZERO, Duration::from_secs(30));
        let beat = alive.register_loop("Parquet sink");
        beat.beat();
        assert!(alive.liveness().is_ok());
        alive.loop_failed("the subscription of t panicked".to_owned());
        assert_eq!(
            alive.liveness().unwrap_err(),
            "the subscription of t panicked"
        );
    }

    #[test]
    fn readiness_names_what_is_wrong() {
        let health = Health::new(Duration::ZERO, Duration::from_secs(30));
        assert!(health.readiness().is_ok());
        health.thing_down("S5D9-0001");
        std::thread::sleep(Duration::from_millis(5));
        assert!(health.readiness().unwrap_err().contains("S5D9-0001"));
        health.thing_up("S5D9-0001");
        assert!(health.readiness().is_ok());
        let metrics = Arc::new(Metrics::new().unwrap());
        let fed =
            Health::new(Duration::ZERO, Duration::from_secs(30)).with_metrics(Arc::clone(&metrics));
        fed.thing_down("t");
        assert_eq!(metrics.value("dweetpipe_stream_up", &[("thing", "t")]), 0.0);
        fed.thing_up("t");
        assert_eq!(metrics.value("dweetpipe_stream_up", &[("thing", "t")]), 1.0);
        fed.forget_thing("t");
        assert!(
            !metrics.encode().contains("thing=\"t\""),
            "the series is gone"
        );
        health.set_sink_problem(SinkName::Postgres, Some("unreachable".to_owned()));
        assert_eq!(health.readiness().unwrap_err(), "postgres: unreachable");
        health.set_sink_problem(SinkName::Postgres, None);
        assert!(health.readiness().is_ok());
        assert_eq!(health.stream_states(), vec![("S5D9-0001".to_owned(), true)]);
    }
}
