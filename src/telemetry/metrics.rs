//! The worker's metrics: the names, help texts and label values, in one registry per worker.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

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

/// Declares [`Metrics`] from its table: each row is a field, its type, its name (after
/// `dweetpipe_`), its help, its labels and, for histograms, its buckets.
macro_rules! metric_table {
    ($(
        $(#[doc = $doc:literal])*
        $vis:vis $field:ident: $kind:ident(
            $name:literal, $help:literal $(, [$($label:literal),+])? $(, buckets = [$($bucket:expr),+])? $(,)?
        );
    )+) => {
        /// The worker's metrics, registered in their own registry (several workers in one
        /// process, as in tests, do not share counters).
        pub struct Metrics {
            pub registry: Registry,
            $( $(#[doc = $doc])* $vis $field: $kind, )+
        }

        impl Metrics {
            /// Every metric of the table, registered.
            fn registered() -> Result<Self, prometheus::Error> {
                let registry = Registry::new();
                $(
                    let $field = <$kind as Build>::build(
                        concat!("dweetpipe_", $name),
                        $help,
                        &[$($($label),+)?],
                        &[$($($bucket),+)?],
                    )?;
                    registry.register(Box::new($field.clone()))?;
                )+
                Ok(Metrics { registry, $($field),+ })
            }
        }
    };
}

/// How a metric of each type is made from a row of the table.
trait Build: Sized {
    fn build(
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<Self, prometheus::Error>;
}

macro_rules! build_plain {
    ($($kind:ty),+) => {$(
        impl Build for $kind {
            fn build(name: &str, help: &str, _: &[&str], _: &[f64]) -> Result<Self, prometheus::Error> {
                <$kind>::with_opts(Opts::new(name, help))
            }
        }
    )+};
}

macro_rules! build_labelled {
    ($($kind:ty),+) => {$(
        impl Build for $kind {
            fn build(name: &str, help: &str, labels: &[&str], _: &[f64]) -> Result<Self, prometheus::Error> {
                <$kind>::new(Opts::new(name, help), labels)
            }
        }
    )+};
}

build_plain!(IntCounter, IntGauge, Gauge);
build_labelled!(IntCounterVec, IntGaugeVec, GaugeVec);

impl Build for Histogram {
    fn build(
        name: &str,
        help: &str,
        _: &[&str],
        buckets: &[f64],
    ) -> Result<Self, prometheus::Error> {
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
    }
}

impl Build for HistogramVec {
    fn build(
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<Self, prometheus::Error> {
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
    }
}

metric_table! {
    pub build_info: IntGaugeVec(
        "build_info",
        "Always 1; the version is a label.",
        ["version"]
    );
    pub things_configured: IntGauge(
        "things_configured",
        "Things in the configuration."
    );
    stream_up: IntGaugeVec(
        "stream_up",
        "1 while the thing's listen stream (or poll loop) is healthy.",
        ["thing"]
    );
    stream_connects: IntCounterVec(
        "stream_connects_total",
        "Stream connection attempts by outcome (ok, refused, failed).",
        ["outcome"]
    );
    stream_disconnects: IntCounterVec(
        "stream_disconnects_total",
        "Streams ended, by reason (closed, error, stopped).",
        ["reason"]
    );
    dweets_received: IntCounterVec(
        "dweets_received_total",
        "Dweets accepted into the pipeline, by source (stream, backfill, poll).",
        ["source"]
    );
    pub refill_gaps: IntCounter(
        "refill_gaps_total",
        "Refills after a sink dropped records (its spool full) that could not reach back to the oldest dropped: the source no longer kept them, so the thing's history has a gap."
    );
    pub duplicates_dropped: IntCounter(
        "duplicates_dropped_total",
        "Dweets dropped because they were already ingested."
    );
    pub decode_errors: IntCounter(
        "decode_errors_total",
        "Stream lines that were not dweets."
    );
    pub dead_letters: IntCounter(
        "dead_letters_total",
        "Dweets and stream lines the worker could not turn into rows: dead letters in every sink. A dweet only PostgreSQL refuses counts in sink_rows_written_total{sink=\"postgres\",table=\"dead_letters\"} instead."
    );
    last_dweet_timestamp: GaugeVec(
        "last_dweet_timestamp_seconds",
        "Unix time of the newest dweet ingested per thing.",
        ["thing"]
    );
    pub ingest_delay: Histogram(
        "ingest_delay_seconds",
        "Seconds from a dweet's created time to its arrival at the worker (stream and poll).",
        buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    );
    sink_rows_written: IntCounterVec(
        "sink_rows_written_total",
        "Rows made durable, by sink and table.",
        ["sink", "table"]
    );
    sink_errors: IntCounterVec(
        "sink_errors_total",
        "Sink write failures.",
        ["sink"]
    );
    sink_records_forsaken: IntCounterVec(
        "sink_records_forsaken_total",
        "Records not stored because their thing left this cluster member before they were durable here (its lease may have lapsed, or a handover was given up); the new owner's backfill stores them.",
        ["sink"]
    );
    sink_write_duration: HistogramVec(
        "sink_write_duration_seconds",
        "Seconds per sink write call.",
        ["sink"],
        buckets = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]
    );
    sink_buffer_rows: IntGaugeVec(
        "sink_buffer_rows",
        "Records a sink holds in memory and has not yet made durable (its in-memory backlog and the batches it is writing); what waits on disk is dweetpipe_spool_bytes.",
        ["sink"]
    );
    parquet_files_finalized: IntCounterVec(
        "parquet_files_finalized_total",
        "Parquet files closed, synced and renamed into place, by dataset.",
        ["dataset"]
    );
    retention_partitions_dropped: IntCounterVec(
        "retention_partitions_dropped_total",
        "PostgreSQL partitions dropped by retention, by table they belonged to.",
        ["table"]
    );
    partitions_arranged: IntCounter(
        "partitions_arranged_total",
        "Closed readings partitions re-keyed by board for reading."
    );
    parquet_dates_compacted: IntCounterVec(
        "parquet_dates_compacted_total",
        "Closed dates rewritten into one sorted file, by dataset.",
        ["dataset"]
    );
    parquet_dates_retired: IntCounterVec(
        "parquet_dates_retired_total",
        "Dates removed by [parquet] retention, by dataset.",
        ["dataset"]
    );
    config_reloads: IntCounterVec(
        "config_reloads_total",
        "Configuration reloads by outcome (ok, invalid).",
        ["outcome"]
    );
    spool_bytes: IntGaugeVec(
        "spool_bytes",
        "Bytes waiting for a sink in its disk spool.",
        ["sink"]
    );
    spool_dropped: IntCounterVec(
        "spool_dropped_records_total",
        "Records a sink will not get in this run because its spool could not take them (full, or its disk failing).",
        ["sink"]
    );
    spool_unreadable_segments: IntCounterVec(
        "spool_unreadable_segments_total",
        "Spool segments a sink could not read at all (a foreign file, a newer format): set aside as .unreadable and tried again at the next start.",
        ["sink"]
    );
    spool_corrupt_records: IntCounterVec(
        "spool_corrupt_records_total",
        "Damaged records skipped while replaying a sink's spool (each one is logged with its segment and offset).",
        ["sink"]
    );
    lifecycle_actions: IntCounterVec(
        "lifecycle_actions_total",
        "Lock and alert changes made to match things.toml, by thing, kind (lock, unlock, set_alert, replace_alert, remove_alert) and outcome (ok, failed).",
        ["thing", "kind", "outcome"]
    );
    pub lifecycle_drift: IntGauge(
        "lifecycle_drift",
        "Things whose lock or alert differed from things.toml at the last lifecycle check."
    );
    pub lifecycle_problems: IntGauge(
        "lifecycle_problems",
        "Things whose lock or alert could not be checked or corrected at the last lifecycle check (wrong key, server unreachable)."
    );
    pub uptime: Gauge(
        "uptime_seconds",
        "Seconds since the worker started."
    );
    /// Live members of the cluster as this member sees them (0 outside a cluster).
    pub cluster_members: IntGauge(
        "cluster_members",
        "Live members of the cluster as this member sees them (0 outside a cluster, or while this member cannot renew its membership)."
    );
    /// Things this member owns and streams.
    pub cluster_things_owned: IntGauge(
        "cluster_things_owned",
        "Things this member owns and streams (every configured thing outside a cluster)."
    );
    /// Things this member started or stopped because ownership changed.
    pub cluster_ownership_moves: IntCounter(
        "cluster_ownership_moves_total",
        "Things this member started or stopped because the cluster's ownership changed."
    );
    cluster_lease_renewals: IntCounterVec(
        "cluster_lease_renewals_total",
        "Membership renewals in the NATS bucket, by outcome (ok, failed).",
        ["outcome"]
    );
    /// 1 while this member leads (reconciles locks and alerts).
    pub cluster_leader: IntGauge(
        "cluster_leader",
        "1 while this member leads the cluster (reconciles locks and alerts, applies retention, compacts Parquet); always 1 outside a cluster."
    );
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let metrics = Self::registered()?;
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Series exist from the first scrape, so rate() and alert rules see them at once.
        for outcome in ["ok", "refused", "failed"] {
            metrics.stream_connects.with_label_values(&[outcome]);
        }
        for reason in ["closed", "error", "stopped"] {
            metrics.stream_disconnects.with_label_values(&[reason]);
        }
        for source in ["stream", "backfill", "poll"] {
            metrics.dweets_received.with_label_values(&[source]);
        }
        for outcome in ["ok", "invalid"] {
            metrics.config_reloads.with_label_values(&[outcome]);
        }
        for outcome in ["ok", "failed"] {
            metrics.cluster_lease_renewals.with_label_values(&[outcome]);
        }
        Ok(metrics)
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
        self.sink_records_forsaken.with_label_values(&[label]);
        self.sink_write_duration.with_label_values(&[label]);
        self.sink_buffer_rows.with_label_values(&[label]);
        self.spool_bytes.with_label_values(&[label]);
        self.spool_dropped.with_label_values(&[label]);
        self.spool_corrupt_records.with_label_values(&[label]);
        self.spool_unreadable_segments.with_label_values(&[label]);
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

    pub fn records_forsaken(&self, sink: SinkName, records: u64) {
        self.sink_records_forsaken
            .with_label_values(&[sink.as_str()])
            .inc_by(records);
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

    pub fn spool_unreadable(&self, sink: SinkName) {
        self.spool_unreadable_segments
            .with_label_values(&[sink.as_str()])
            .inc();
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

    /// A histogram's buckets as `(upper bound, cumulative count)`, summed over its series
    /// (empty when `name` is no histogram): two readings give the distribution between them.
    pub fn buckets(&self, name: &str) -> Vec<(f64, u64)> {
        let mut buckets: Vec<(f64, u64)> = Vec::new();
        let families = self.registry.gather();
        let histograms = families
            .iter()
            .filter(|family| family.name() == name)
            .filter(|family| family.get_field_type() == prometheus::proto::MetricType::HISTOGRAM)
            .flat_map(|family| family.get_metric());
        for metric in histograms {
            for (at, bucket) in metric.get_histogram().get_bucket().iter().enumerate() {
                match buckets.get_mut(at) {
                    Some((_, count)) => *count += bucket.cumulative_count(),
                    None => buckets.push((bucket.upper_bound(), bucket.cumulative_count())),
                }
            }
        }
        buckets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric names as the table declares them (the line after a row's `Kind(`).
    fn registered_names() -> std::collections::BTreeSet<String> {
        let code = include_str!("metrics.rs");
        let table = &code[code.find("metric_table! {").unwrap_or(0)..];
        let table = &table[..table.find("\n}\n").unwrap_or(table.len())];
        let lines: Vec<&str> = table.lines().map(str::trim).collect();
        lines
            .windows(2)
            .filter(|pair| pair[0].ends_with('(') && pair[0].contains(": "))
            .filter_map(|pair| pair[1].strip_prefix('"')?.split('"').next())
            .map(|name| format!("dweetpipe_{name}"))
            .collect()
    }

    #[test]
    fn a_histograms_buckets_are_read_back_cumulative_and_nothing_else_has_any() {
        let metrics = Metrics::new().unwrap();
        for delay in [0.001, 0.02, 0.02, 7.0] {
            metrics.ingest_delay.observe(delay);
        }
        let buckets = metrics.buckets("dweetpipe_ingest_delay_seconds");
        let count_at = |bound: f64| {
            buckets
                .iter()
                .find(|(upper, _)| *upper == bound)
                .map(|b| b.1)
        };
        assert_eq!(count_at(0.005), Some(1));
        assert_eq!(count_at(0.025), Some(3));
        assert_eq!(count_at(5.0), Some(3));
        assert_eq!(count_at(10.0), Some(4));
        assert!(
            metrics
                .buckets("dweetpipe_dweets_received_total")
                .is_empty()
        );
    }

    #[test]
    fn the_readme_metrics_table_lists_every_metric_and_only_those() {
        let readme = include_str!("../../README.md");
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
}
