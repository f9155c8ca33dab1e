//! The ingest worker: one subscription task per configured thing, feeding one ordered pipeline
//! into the sinks, with metrics and health served beside it.
//!
//! ```text
//! subscription tasks ──(bounded channel of Records)──▶ sink thread ──▶ Parquet generations
//! ```
//!
//! The channel is bounded, so a slow sink slows the subscriptions (backpressure) instead of
//! growing memory. The Parquet sink runs on its own OS thread: encoding and fsync are blocking
//! work that must not stall the async runtime.

pub(crate) mod backoff;
pub mod lifecycle;
mod subscription;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use subscription::NO_WATERMARK;

use crate::client::Client;
use crate::config::{Config, ConfigError, ThingConfig};
use crate::normalize::Record;
use crate::sink::SinkError;
use crate::sink::parquet::ParquetSink;
use crate::sink::postgres::{Backlog, PostgresError, PostgresSink, StreamStates};
use crate::telemetry::{self, Health, Metrics};
use subscription::Subscription;

/// Records in flight between the subscriptions and the sinks.
const PIPELINE_CAPACITY: usize = 16 * 1024;
/// Records the sink takes per write call.
const SINK_BATCH: usize = 8 * 1024;

/// How the worker reads a thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceMode {
    /// Hold a listen stream open (the default).
    #[default]
    Stream,
    /// Poll `get_dweets_for` every `poll_interval`, for servers without streaming.
    Poll,
}

impl<'de> Deserialize<'de> for SourceMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "stream" => Ok(SourceMode::Stream),
            "poll" => Ok(SourceMode::Poll),
            other => Err(serde::de::Error::custom(format!(
                "mode {other:?} is not \"stream\" or \"poll\""
            ))),
        }
    }
}

/// The `[source]` section. Only `url` is needed; the rest are tuning knobs with defaults for
/// the public service's behaviour.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub url: String,
    #[serde(default)]
    pub mode: SourceMode,
    #[serde(
        default = "defaults::poll_interval",
        deserialize_with = "crate::config::duration"
    )]
    pub poll_interval: Duration,
    /// A stream silent for this long is reopened; above the server's own 60 s idle close.
    #[serde(
        default = "defaults::idle_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub idle_timeout: Duration,
    #[serde(
        default = "defaults::reconnect_min",
        deserialize_with = "crate::config::duration"
    )]
    pub reconnect_min: Duration,
    #[serde(
        default = "defaults::reconnect_max",
        deserialize_with = "crate::config::duration"
    )]
    pub reconnect_max: Duration,
    /// A connection up this long resets the backoff.
    #[serde(
        default = "defaults::healthy_after",
        deserialize_with = "crate::config::duration"
    )]
    pub healthy_after: Duration,
    /// Wait after a refusal (locked, wrong key, unknown thing) before trying again.
    #[serde(
        default = "defaults::refused_retry",
        deserialize_with = "crate::config::duration"
    )]
    pub refused_retry: Duration,
    /// Subscriptions start at random offsets within this window, so a restart is no herd.
    #[serde(
        default = "defaults::start_spread",
        deserialize_with = "crate::config::duration"
    )]
    pub start_spread: Duration,
    #[serde(
        default = "defaults::request_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub request_timeout: Duration,
}

mod defaults {
    use std::time::Duration;
    pub fn poll_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(90)
    }
    pub fn reconnect_min() -> Duration {
        Duration::from_secs(1)
    }
    pub fn reconnect_max() -> Duration {
        Duration::from_secs(60)
    }
    pub fn healthy_after() -> Duration {
        Duration::from_secs(30)
    }
    pub fn refused_retry() -> Duration {
        Duration::from_secs(5 * 60)
    }
    pub fn start_spread() -> Duration {
        Duration::from_secs(5)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
}

impl SourceConfig {
    pub fn new(url: impl Into<String>) -> Self {
        SourceConfig {
            url: url.into(),
            mode: SourceMode::Stream,
            poll_interval: defaults::poll_interval(),
            idle_timeout: defaults::idle_timeout(),
            reconnect_min: defaults::reconnect_min(),
            reconnect_max: defaults::reconnect_max(),
            healthy_after: defaults::healthy_after(),
            refused_retry: defaults::refused_retry(),
            start_spread: defaults::start_spread(),
            request_timeout: defaults::request_timeout(),
        }
    }

    /// Checks values; the error is (key, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Err(error) = Client::new(&self.url) {
            return Err(("url".to_owned(), format!("{:?}: {error}", self.url)));
        }
        for (key, value) in [
            ("poll_interval", self.poll_interval),
            ("idle_timeout", self.idle_timeout),
            ("reconnect_min", self.reconnect_min),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return Err((key.to_owned(), "must be above zero".to_owned()));
            }
        }
        if self.reconnect_max < self.reconnect_min {
            return Err((
                "reconnect_max".to_owned(),
                "must not be below reconnect_min".to_owned(),
            ));
        }
        Ok(())
    }

    /// A client for this source, with its request timeout.
    pub fn client(&self) -> Result<Client, WorkerError> {
        Client::builder(&self.url)
            .request_timeout(self.request_timeout)
            .build()
            .map_err(WorkerError::Client)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the Parquet sink failed: {0}")]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    #[error("could not listen for metrics on {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("could not build the HTTP client: {0}")]
    Client(crate::client::Error),
    #[error(
        "shutdown did not finish within {0:?}; the open Parquet files were not sealed and backfill will bring their rows back"
    )]
    ShutdownTimeout(Duration),
}

struct RunningThing {
    config: ThingConfig,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: usize,
    /// Settings that need a restart to take effect.
    pub ignored: Vec<String>,
}

/// A running worker.
pub struct WorkerHandle {
    config: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    metrics_addr: Option<SocketAddr>,
    client: Client,
    source: Arc<SourceConfig>,
    records: mpsc::Sender<Record>,
    things: HashMap<String, RunningThing>,
    /// Per-thing watermarks, kept across removals and restarts of subscription tasks.
    watermarks: HashMap<String, Arc<AtomicI64>>,
    background: CancellationToken,
    sink_thread: std::thread::JoinHandle<Result<(), SinkError>>,
    postgres_task: Option<PostgresTasks>,
    lifecycle: Option<lifecycle::Reconciler>,
}

/// The PostgreSQL side's background tasks.
struct PostgresTasks {
    writer: JoinHandle<()>,
    /// Makes the writer spool what is left and stop (the shutdown deadline is near).
    spool_now: CancellationToken,
    reporter: JoinHandle<()>,
    reporter_stop: CancellationToken,
}

/// Checks that `config` can run as a worker: a source and at least one sink.
pub fn check_runnable(config: &Config) -> Result<&SourceConfig, ConfigError> {
    let source = config.source.as_ref().ok_or_else(|| {
        config.error(
            "source",
            "there is no [source] section",
            "add [source] with url = \"https://dweet.io\" (or your sandbox)",
        )
    })?;
    if config.parquet.is_none() && config.postgres.is_none() {
        return Err(config.error(
            "parquet",
            "no sink is configured",
            "add a [parquet] section with dir = \"data/parquet\" and/or a [postgres] section",
        ));
    }
    Ok(source)
}

/// How long start-up waits for PostgreSQL before giving up.
const POSTGRES_PATIENCE: Duration = Duration::from_secs(30);

/// Each thing's starting watermark: the lowest over the sinks, so that a sink that is behind
/// gets what it misses (the others drop it as already stored). A thing unknown to any sink
/// starts with none.
fn seed_watermarks(sinks: &[&HashMap<String, i64>]) -> HashMap<String, Arc<AtomicI64>> {
    let Some((first, rest)) = sinks.split_first() else {
        return HashMap::new();
    };
    first
        .iter()
        .filter_map(|(thing, mark)| {
            let lowest = rest
                .iter()
                .map(|other| other.get(thing).copied())
                .try_fold(*mark, |low, other| other.map(|o| low.min(o)))?;
            Some((thing.clone(), Arc::new(AtomicI64::new(lowest))))
        })
        .collect()
}

/// Starts the worker: recovers the sinks, binds metrics, and starts every subscription.
pub async fn start(config: Config) -> Result<WorkerHandle, WorkerError> {
    let source = Arc::new(check_runnable(&config)?.clone());
    let metrics = Arc::new(Metrics::new()?);
    let health = Arc::new(Health::new(source.start_spread + Duration::from_secs(60)));
    let background = CancellationToken::new();

    let tables = ["readings", "dweets", "dead_letters"];
    if config.parquet.is_some() {
        metrics.declare_sink("parquet", &tables);
    }
    if config.postgres.is_some() {
        metrics.declare_sink("postgres", &tables);
    }
    let parquet = match &config.parquet {
        Some(parquet_config) => {
            let (sink, opened) = ParquetSink::open(parquet_config.clone(), Arc::clone(&metrics))?;
            tracing::info!(
                dir = %parquet_config.dir.display(),
                removed_temporary = opened.removed_temporary,
                removed_incomplete = opened.removed_incomplete,
                things_with_watermark = opened.things_with_watermark,
                "Parquet sink open"
            );
            Some(sink)
        }
        None => None,
    };
    let postgres = match &config.postgres {
        Some(postgres_config) => {
            let sink =
                PostgresSink::connect(postgres_config, Arc::clone(&metrics), POSTGRES_PATIENCE)
                    .await?;
            tracing::info!(
                things_with_watermark = sink.watermarks().len(),
                "PostgreSQL sink open, schema migrated"
            );
            Some(sink)
        }
        None => None,
    };
    let sink_marks: Vec<&HashMap<String, i64>> = parquet
        .as_ref()
        .map(ParquetSink::watermarks)
        .into_iter()
        .chain(postgres.as_ref().map(PostgresSink::watermarks))
        .collect();
    let watermarks = seed_watermarks(&sink_marks);

    let metrics_addr = match &config.metrics {
        Some(metrics_config) => {
            let listener = tokio::net::TcpListener::bind(metrics_config.listen)
                .await
                .map_err(|source| WorkerError::MetricsBind {
                    addr: metrics_config.listen,
                    source,
                })?;
            let addr = listener.local_addr().ok();
            tokio::spawn(telemetry::serve(
                listener,
                Arc::clone(&metrics),
                Arc::clone(&health),
                background.clone(),
            ));
            addr
        }
        None => None,
    };
    tokio::spawn(heartbeat(Arc::clone(&health), background.clone()));

    let (records, receiver) = mpsc::channel(PIPELINE_CAPACITY);
    let (to_postgres, postgres_task) = match (postgres, &config.postgres) {
        (Some(sink), Some(postgres_config)) => {
            let backlog = Arc::new(
                Backlog::open(
                    &postgres_config.spool_dir,
                    postgres_config.memory_max_rows,
                    postgres_config.spool_max,
                    Arc::clone(&metrics),
                )?
                .with_health(Arc::clone(&health)),
            );
            let stop = CancellationToken::new();
            let reporter_stop = CancellationToken::new();
            let reporter = tokio::spawn(report_stream_states(
                sink.states(),
                Arc::clone(&metrics),
                reporter_stop.clone(),
            ));
            let task = tokio::spawn(postgres_writer(
                sink,
                Arc::clone(&backlog),
                postgres_config.max_rows,
                stop.clone(),
            ));
            (
                Some(backlog),
                Some(PostgresTasks {
                    writer: task,
                    spool_now: stop,
                    reporter,
                    reporter_stop,
                }),
            )
        }
        _ => (None, None),
    };
    let sink_thread = spawn_sink_thread(
        parquet,
        to_postgres,
        receiver,
        Arc::clone(&metrics),
        Arc::clone(&health),
    )?;
    let client = source.client()?;
    let mut worker = WorkerHandle {
        things: HashMap::new(),
        watermarks,
        client,
        source,
        records,
        metrics,
        health,
        metrics_addr,
        background,
        sink_thread,
        postgres_task,
        lifecycle: None,
        config: config.clone(),
    };
    worker.reconcile_lifecycle(&config)?;
    for thing in &config.things {
        worker.start_thing(thing.clone(), true);
    }
    worker
        .metrics
        .things_configured
        .set(worker.things.len() as i64);
    tracing::info!(things = worker.things.len(), url = %worker.source.url, mode = ?worker.source.mode, "worker started");
    Ok(worker)
}

impl WorkerHandle {
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where `/metrics` is served (with the port chosen when the config said `:0`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn things(&self) -> impl Iterator<Item = &str> {
        self.things.keys().map(String::as_str)
    }

    fn start_thing(&mut self, thing: ThingConfig, spread: bool) {
        let cancel = CancellationToken::new();
        let watermark = Arc::clone(
            self.watermarks
                .entry(thing.name.clone())
                .or_insert_with(|| Arc::new(AtomicI64::new(NO_WATERMARK))),
        );
        let start_delay = if spread && !self.source.start_spread.is_zero() {
            self.source
                .start_spread
                .mul_f64(rand::rng().random_range(0.0..1.0))
        } else {
            Duration::ZERO
        };
        let subscription = Subscription {
            thing: thing.clone(),
            client: self.client.clone(),
            source: Arc::clone(&self.source),
            records: self.records.clone(),
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
            watermark,
            cancel: cancel.clone(),
            start_delay,
        };
        let task = tokio::spawn(subscription.run());
        self.things.insert(
            thing.name.clone(),
            RunningThing {
                config: thing,
                cancel,
                task,
            },
        );
    }

    async fn stop_thing(&mut self, name: &str) {
        if let Some(running) = self.things.remove(name) {
            running.cancel.cancel();
            let _ = running.task.await;
            self.metrics.forget_thing(name);
            self.health.forget_thing(name);
        }
    }

    /// Applies a new configuration: things added start, removed stop, changed ones restart,
    /// unchanged ones keep their streams. A new `[source]` restarts every subscription.
    pub async fn reload(&mut self, config: Config) -> Result<ReloadReport, WorkerError> {
        let source = match check_runnable(&config) {
            Ok(checked) => checked,
            Err(error) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["invalid"])
                    .inc();
                return Err(error.into());
            }
        };
        let mut report = ReloadReport::default();
        if config.parquet != self.config.parquet {
            report.ignored.push("parquet".to_owned());
        }
        if config.postgres != self.config.postgres {
            report.ignored.push("postgres".to_owned());
        }
        if config.metrics.as_ref().map(|m| m.listen)
            != self.config.metrics.as_ref().map(|m| m.listen)
        {
            report.ignored.push("metrics".to_owned());
        }
        let source_changed = *source != *self.source;
        if source_changed {
            self.source = Arc::new(source.clone());
            self.client = self.source.client()?;
        }
        let wanted: HashMap<&str, &ThingConfig> =
            config.things.iter().map(|t| (t.name.as_str(), t)).collect();
        let current: Vec<String> = self.things.keys().cloned().collect();
        for name in current {
            match wanted.get(name.as_str()) {
                None => {
                    self.stop_thing(&name).await;
                    report.removed.push(name);
                }
                Some(thing)
                    if source_changed
                        || self
                            .things
                            .get(&name)
                            .is_some_and(|r| !r.config.reads_like(thing)) =>
                {
                    self.stop_thing(&name).await;
                    self.start_thing((*thing).clone(), false);
                    report.restarted.push(name);
                }
                Some(_) => report.unchanged += 1,
            }
        }
        for thing in &config.things {
            if !self.things.contains_key(&thing.name) {
                self.start_thing(thing.clone(), false);
                report.added.push(thing.name.clone());
            }
        }
        self.metrics.things_configured.set(self.things.len() as i64);
        // A new source or new lifecycle settings need a new reconciler; new things do not.
        if (source_changed || config.lifecycle != self.config.lifecycle)
            && let Some(reconciler) = self.lifecycle.take()
        {
            reconciler.stop().await;
        }
        self.reconcile_lifecycle(&config)?;
        self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        // Sections that need a restart keep their running values.
        let parquet = self.config.parquet.clone();
        let postgres = self.config.postgres.clone();
        let metrics = self.config.metrics.clone();
        self.config = Config {
            parquet,
            postgres,
            metrics,
            ..config
        };
        Ok(report)
    }

    /// Keeps the server's locks and alerts in step with `config` when it declares any: starts
    /// the reconciler, or hands it the new things (which reconciles them at once).
    fn reconcile_lifecycle(&mut self, config: &Config) -> Result<(), WorkerError> {
        match (&config.lifecycle, &self.lifecycle) {
            (Some(_), Some(running)) => running.update(config.things.clone()),
            (Some(settings), None) => {
                self.lifecycle = Some(lifecycle::Reconciler::start(
                    self.source.client()?,
                    config.things.clone(),
                    settings.clone(),
                    Arc::clone(&self.metrics),
                ));
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// Stops every subscription, seals the sinks, and stops serving metrics, all within
    /// `timeout`.
    pub async fn shutdown(self, timeout: Duration) -> Result<(), WorkerError> {
        let deadline = Instant::now() + timeout;
        let WorkerHandle {
            things,
            records,
            background,
            sink_thread,
            postgres_task,
            lifecycle,
            ..
        } = self;
        if let Some(reconciler) = lifecycle {
            reconciler.stop().await;
        }
        for running in things.values() {
            running.cancel.cancel();
        }
        for (_, running) in things {
            let _ = tokio::time::timeout_at(deadline.into(), running.task).await;
        }
        // The last sender goes: the sink thread drains, seals and ends.
        drop(records);
        let joined = tokio::task::spawn_blocking(move || sink_thread.join());
        let outcome = tokio::time::timeout_at(deadline.into(), joined).await;
        // The sink thread closed PostgreSQL's backlog: the writer drains it and ends, or
        // spools the rest a second before the deadline.
        if let Some(mut tasks) = postgres_task {
            let spool_at = deadline
                .checked_sub(Duration::from_secs(1))
                .unwrap_or(deadline);
            if tokio::time::timeout_at(spool_at.into(), &mut tasks.writer)
                .await
                .is_err()
            {
                tasks.spool_now.cancel();
                let _ = tokio::time::timeout_at(
                    (deadline + Duration::from_secs(2)).into(),
                    tasks.writer,
                )
                .await;
            }
            tasks.reporter_stop.cancel();
            let _ =
                tokio::time::timeout_at((deadline + Duration::from_secs(2)).into(), tasks.reporter)
                    .await;
        }
        background.cancel();
        match outcome {
            Ok(Ok(Ok(result))) => result.map_err(WorkerError::Sink),
            Ok(Ok(Err(_))) | Ok(Err(_)) => Err(WorkerError::Sink(SinkError::io(
                std::path::Path::new("sink thread"),
                std::io::Error::other("the sink thread panicked"),
            ))),
            Err(_elapsed) => Err(WorkerError::ShutdownTimeout(timeout)),
        }
    }
}

/// How often changed stream states are written to `things.stream_state`.
const STREAM_STATE_EVERY: Duration = Duration::from_secs(2);

/// Keeps `things.stream_state` in step with the streams: writes what changed every few
/// seconds, and `stopped` for every thing at shutdown.
async fn report_stream_states(
    states: StreamStates,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut written: HashMap<String, bool> = HashMap::new();
    let mut ticks = tokio::time::interval(STREAM_STATE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let changed: Vec<(String, bool)> = metrics
            .stream_states()
            .into_iter()
            .filter(|(thing, up)| written.get(thing) != Some(up))
            .collect();
        let rows: Vec<(String, &str)> = changed
            .iter()
            .map(|(thing, up)| (thing.clone(), if *up { "up" } else { "down" }))
            .collect();
        match states.write(&rows).await {
            Ok(()) => written.extend(changed),
            Err(error) => tracing::debug!(%error, "could not record stream states; will retry"),
        }
    }
    let stopped: Vec<(String, &str)> = written
        .into_keys()
        .map(|thing| (thing, "stopped"))
        .collect();
    if let Err(error) = states.write(&stopped).await {
        tracing::debug!(%error, "could not record the stopped stream states");
    }
}

async fn heartbeat(health: Arc<Health>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => health.beat(),
        }
    }
}

/// Runs the file sink on its own thread: take what is queued (up to a batch), write it to
/// Parquet, pass it on to PostgreSQL, seal on time, and seal at the end when every sender is
/// gone.
fn spawn_sink_thread(
    mut parquet: Option<ParquetSink>,
    to_postgres: Option<Arc<Backlog>>,
    mut receiver: mpsc::Receiver<Record>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<std::thread::JoinHandle<Result<(), SinkError>>, WorkerError> {
    let runtime = tokio::runtime::Handle::current();
    let thread = std::thread::Builder::new()
        .name("dweetpipe-sink".to_owned())
        .spawn(move || {
            let mut batch = Vec::with_capacity(SINK_BATCH);
            let tick = Duration::from_millis(200);
            loop {
                let next =
                    runtime.block_on(async { tokio::time::timeout(tick, receiver.recv()).await });
                match next {
                    Ok(Some(record)) => {
                        batch.push(record);
                        while batch.len() < SINK_BATCH {
                            match receiver.try_recv() {
                                Ok(record) => batch.push(record),
                                Err(_) => break,
                            }
                        }
                        if let Some(sink) = parquet.as_mut() {
                            write_parquet(sink, &batch, &metrics, &health);
                        }
                        match &to_postgres {
                            // Never blocks on PostgreSQL: memory, then the disk spool.
                            Some(backlog) => backlog.push(std::mem::replace(
                                &mut batch,
                                Vec::with_capacity(SINK_BATCH),
                            )),
                            None => batch.clear(),
                        }
                    }
                    Ok(None) => break,
                    Err(_idle) => {}
                }
                if let Some(sink) = parquet.as_mut() {
                    if let Err(error) = sink.tick() {
                        tracing::error!(%error, "the Parquet sink failed to seal a generation");
                        health.set_sinks_ok(false);
                    }
                    metrics
                        .sink_buffer_rows
                        .with_label_values(&["parquet"])
                        .set(sink.pending_rows() as i64);
                }
            }
            if let Some(backlog) = &to_postgres {
                backlog.close();
            }
            let closed = parquet.as_mut().map_or(Ok(()), ParquetSink::close);
            metrics
                .sink_buffer_rows
                .with_label_values(&["parquet"])
                .set(0);
            closed
        })
        .map_err(|e| WorkerError::Sink(SinkError::io(std::path::Path::new("sink thread"), e)))?;
    Ok(thread)
}

fn write_parquet(sink: &mut ParquetSink, batch: &[Record], metrics: &Metrics, health: &Health) {
    let started = Instant::now();
    match sink.write(batch) {
        Ok(skipped) => {
            metrics.duplicates_dropped.inc_by(skipped as u64);
            health.set_sinks_ok(true);
        }
        Err(error) => {
            tracing::error!(%error, records = batch.len(), "the Parquet sink failed to write");
            metrics.sink_errors.with_label_values(&["parquet"]).inc();
            health.set_sinks_ok(false);
        }
    }
    metrics
        .sink_write_duration
        .with_label_values(&["parquet"])
        .observe(started.elapsed().as_secs_f64());
}

/// Writes what has queued for PostgreSQL, oldest first: everything available (up to
/// `max_rows`) as soon as the previous write is done, so batches are small while traffic is
/// light and large when it is heavy or after an outage. On `stop` (the shutdown deadline with
/// PostgreSQL still unreachable) what is left goes to the spool.
async fn postgres_writer(
    mut sink: PostgresSink,
    backlog: Arc<Backlog>,
    max_rows: usize,
    stop: CancellationToken,
) {
    while let Some(first) = backlog.next().await {
        let mut rows = first.records.len();
        let mut taken = vec![first];
        while rows < max_rows {
            match backlog.try_take() {
                Some(more) => {
                    rows += more.records.len();
                    taken.push(more);
                }
                None => break,
            }
        }
        tokio::select! {
            () = sink.write(taken.iter().flat_map(|t| t.records.iter())) => {
                taken.into_iter().for_each(|t| backlog.done(t));
            }
            _ = stop.cancelled() => {
                backlog.give_back(taken);
                backlog.spill_memory();
                tracing::warn!("PostgreSQL did not take everything before the shutdown deadline; the rest is spooled for the next start");
                return;
            }
        }
    }
}
