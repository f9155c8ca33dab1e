//! The ingest worker's wiring: start the sinks' loops, the fan-out and one subscription task
//! per configured thing (in a cluster, per thing this member owns); reload; follow the
//! cluster's ownership; shut down in order. The loops themselves live with their components
//! (`sink::parquet::run`, `sink::postgres::run`, `sink::nats::run`, `subscription`,
//! `cluster`).
//!
//! ```text
//! subscription tasks ──(bounded channel of Records)──▶ fan-out ──▶ each sink's backlog ──▶ its loop
//! ```

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::cluster::Membership;
use crate::config::{Config, ConfigError};
use crate::lifecycle;
use crate::nats::NatsError;
use crate::normalize::Normalizer;
use crate::record::Record;
use crate::sink::nats::{NatsLoop, NatsSink};
use crate::sink::parquet::{ParquetLoop, ParquetSink};
use crate::sink::postgres::{PostgresLoop, PostgresSink};
use crate::sink::{Backlog, SinkError};
use crate::source::subscription::{NO_WATERMARK, Subscription};
use crate::source::{SourceConfig, ThingConfig};
use crate::telemetry::{self, Health, Metrics, SinkName};

/// Records in flight between the subscriptions and the fan-out.
const PIPELINE_CAPACITY: usize = 16 * 1024;
/// Leases a new owner waits for the previous one to hand a thing over before it starts the
/// thing anyway (the previous one's sink is failing, say).
const HANDOVER_PATIENCE: f64 = 3.0;
/// How often a handover in progress is looked at again.
const HANDOVER_CHECK: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("could not listen for metrics on {addr}: {error}")]
    MetricsBind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("could not set up metrics: {0}")]
    Metrics(prometheus::Error),
    #[error("could not build the HTTP client: {0}")]
    Client(crate::client::Error),
    #[error(
        "shutdown did not finish within {0:?}; what was not durable is in the spools or comes back through backfill"
    )]
    ShutdownTimeout(Duration),
    #[error("the {0} thread could not start: {1}")]
    Thread(&'static str, std::io::Error),
    #[error(transparent)]
    Nats(#[from] NatsError),
}

impl From<prometheus::Error> for WorkerError {
    fn from(error: prometheus::Error) -> Self {
        WorkerError::Metrics(error)
    }
}

impl From<crate::client::Error> for WorkerError {
    fn from(error: crate::client::Error) -> Self {
        WorkerError::Client(error)
    }
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

/// A cluster member's side of the handover of things.
struct ClusterState {
    membership: Membership,
    /// Things stopped here (another member owns them now), held until every sink made what
    /// they emitted durable, so the new owner's backfill finds it; since when.
    releasing: HashMap<String, Instant>,
    /// Things owned here but still held by another member, since when.
    waiting: HashMap<String, Instant>,
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
    fan_out: std::thread::JoinHandle<()>,
    /// The sinks' backlogs, so shutdown can close them itself if the fan-out does not end.
    backlogs: Vec<Arc<Backlog>>,
    parquet: Option<ParquetLoop>,
    postgres: Option<PostgresLoop>,
    nats: Option<NatsLoop>,
    lifecycle: Option<lifecycle::Reconciler>,
    cluster: Option<ClusterState>,
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
    if config.parquet.is_none() && config.postgres.is_none() && config.nats.is_none() {
        return Err(config.error(
            "parquet",
            "no sink is configured",
            "add a [parquet] section with dir = \"data/parquet\", a [postgres] section, and/or a [nats] section",
        ));
    }
    Ok(source)
}

/// How long start-up waits for PostgreSQL before it goes on without it (PostgreSQL's share
/// then waits in its backlog, and every thing backfills all the source keeps).
const POSTGRES_PATIENCE: Duration = Duration::from_secs(3);

/// Lets a task loop drain until `give_up_at`, then tells it to give up (it spools what it
/// holds) and waits until `late`. True when it did not end by then.
async fn finish_task_loop(
    task_loop: Option<impl crate::sink::TaskLoop>,
    give_up_at: Instant,
    late: Instant,
) -> bool {
    let Some(mut task_loop) = task_loop else {
        return false;
    };
    if tokio::time::timeout_at(give_up_at.into(), &mut *task_loop.task())
        .await
        .is_ok()
    {
        return false;
    }
    task_loop.give_up();
    tokio::time::timeout_at(late.into(), task_loop.task())
        .await
        .is_err()
}

/// Each thing's starting watermark: the lowest over the sinks, so that a sink that is behind
/// gets what it misses (the others drop it as already stored). A thing unknown to any sink
/// (or a sink whose marks are not known yet) starts with none.
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

/// Starts the worker: the sinks' loops (PostgreSQL need not be reachable), metrics, the
/// fan-out, and every subscription.
pub async fn start(config: Config) -> Result<WorkerHandle, WorkerError> {
    let source = Arc::new(check_runnable(&config)?.clone());
    let metrics = Arc::new(Metrics::new()?);
    let stuck_after = config
        .metrics
        .as_ref()
        .map_or(Duration::from_secs(30), |m| m.stuck_after);
    let health = Arc::new(
        Health::new(source.start_spread + Duration::from_secs(60), stuck_after)
            .with_metrics(Arc::clone(&metrics)),
    );
    let background = CancellationToken::new();

    let mut backlogs = Vec::new();
    let mut sink_marks: Vec<HashMap<String, i64>> = Vec::new();
    let parquet = match &config.parquet {
        Some(parquet_config) => {
            metrics.declare_sink(SinkName::Parquet);
            // The spool first: opening the sink recovers its directory, which a second
            // process must never do; both locks are taken before anything is touched.
            let backlog = Arc::new(Backlog::open(
                &parquet_config.spool_dir(),
                SinkName::Parquet,
                parquet_config.memory_max_rows,
                parquet_config.spool_max,
                Arc::clone(&metrics),
                Arc::clone(&health),
            )?);
            let (sink, opened) =
                ParquetSink::open(parquet_config.clone(), source.history, Arc::clone(&metrics))?;
            tracing::info!(
                dir = %parquet_config.dir.display(),
                removed_temporary = opened.removed_temporary,
                removed_incomplete = opened.removed_incomplete,
                things_with_watermark = opened.things_with_watermark,
                "Parquet sink open"
            );
            sink_marks.push(sink.watermarks().clone());
            backlogs.push(Arc::clone(&backlog));
            Some((sink, backlog))
        }
        None => None,
    };
    let postgres = match &config.postgres {
        Some(postgres_config) => {
            metrics.declare_sink(SinkName::Postgres);
            let backlog = Arc::new(Backlog::open(
                &postgres_config.spool_dir,
                SinkName::Postgres,
                postgres_config.memory_max_rows,
                postgres_config.spool_max,
                Arc::clone(&metrics),
                Arc::clone(&health),
            )?);
            let connected =
                PostgresSink::connect(postgres_config, Arc::clone(&metrics), POSTGRES_PATIENCE)
                    .await;
            let connected = match connected {
                Ok(sink) => {
                    tracing::info!(
                        things_with_watermark = sink.watermarks().len(),
                        "PostgreSQL sink open, schema migrated"
                    );
                    sink_marks.push(sink.watermarks().clone());
                    Some(sink)
                }
                Err(error) => {
                    tracing::warn!(%error, "starting without PostgreSQL: its records wait in its backlog until it answers, and every thing backfills what the source keeps");
                    sink_marks.push(HashMap::new());
                    None
                }
            };
            backlogs.push(Arc::clone(&backlog));
            Some((postgres_config.clone(), connected, backlog))
        }
        None => None,
    };
    let nats = match &config.nats {
        Some(nats_config) => {
            metrics.declare_sink(SinkName::Nats);
            let backlog = Arc::new(Backlog::open(
                &nats_config.spool_dir,
                SinkName::Nats,
                nats_config.memory_max_rows,
                nats_config.spool_max,
                Arc::clone(&metrics),
                Arc::clone(&health),
            )?);
            let urls = nats_config.url.clone().unwrap_or_default();
            let client = crate::nats::connect(&urls, "dweetpipe output", false).await?;
            let names: Vec<String> = config.things.iter().map(|t| t.name.clone()).collect();
            let opened = tokio::time::timeout(POSTGRES_PATIENCE, async {
                let mut sink = NatsSink::open(client.clone(), nats_config).await?;
                let marks = sink.watermarks(&names).await?;
                Ok::<_, NatsError>((sink, marks))
            })
            .await;
            let opened = match opened {
                Ok(Ok((sink, marks))) => {
                    sink_marks.push(marks);
                    Some(sink)
                }
                failed => {
                    let why = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => "no answer within 3 s".to_owned(),
                    };
                    tracing::warn!(%why, "starting without the JetStream output: its records wait in its backlog until NATS answers, and every thing backfills what the source keeps");
                    sink_marks.push(HashMap::new());
                    None
                }
            };
            backlogs.push(Arc::clone(&backlog));
            Some((nats_config.clone(), client, opened, backlog))
        }
        None => None,
    };
    let watermarks = seed_watermarks(&sink_marks.iter().collect::<Vec<_>>());

    let metrics_addr = match &config.metrics {
        Some(metrics_config) => {
            let listener = tokio::net::TcpListener::bind(metrics_config.listen)
                .await
                .map_err(|error| WorkerError::MetricsBind {
                    addr: metrics_config.listen,
                    error,
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

    let parquet = match parquet {
        Some((sink, backlog)) => Some(crate::sink::parquet::spawn(
            sink,
            backlog,
            (Arc::clone(&metrics), Arc::clone(&health)),
            // In a cluster the leader compacts and prunes; `rebalance` hands it the duty.
            config.cluster.is_none(),
        )?),
        None => None,
    };
    let postgres = postgres.map(|(postgres_config, connected, backlog)| {
        crate::sink::postgres::spawn(
            postgres_config,
            connected,
            backlog,
            Arc::clone(&metrics),
            Arc::clone(&health),
            // In a cluster the leader applies retention; `rebalance` hands it the duty.
            config.cluster.is_none(),
        )
    });
    let nats = nats.map(|(nats_config, client, opened, backlog)| {
        crate::sink::nats::spawn(
            nats_config,
            client,
            opened,
            backlog,
            Arc::clone(&metrics),
            Arc::clone(&health),
        )
    });
    let cluster = match &config.cluster {
        Some(cluster_config) => {
            // A handover waits for what a thing emitted to be durable in every sink.
            backlogs.iter().for_each(|b| b.track_durable());
            let mut membership = Membership::join(
                cluster_config.clone(),
                Arc::clone(&metrics),
                Arc::clone(&health),
            )
            .await?;
            let view = membership.first_view(cluster_config.lease).await;
            tracing::info!(
                member = cluster_config.member(),
                members = ?view.members,
                connected = view.connected,
                "joined the cluster"
            );
            Some(ClusterState {
                membership,
                releasing: HashMap::new(),
                waiting: HashMap::new(),
            })
        }
        None => None,
    };
    let (records, receiver) = mpsc::channel(PIPELINE_CAPACITY);
    let fan_out = crate::sink::spawn_fan_out(receiver, backlogs.clone(), Arc::clone(&health))
        .map_err(|e| WorkerError::Thread("fan-out", e))?;
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
        fan_out,
        backlogs,
        parquet,
        postgres,
        nats,
        lifecycle: None,
        cluster,
        config: config.clone(),
    };
    worker
        .metrics
        .things_configured
        .set(config.things.len() as i64);
    if worker.cluster.is_some() {
        worker.rebalance().await?;
    } else {
        // A process of its own has every duty a cluster gives its leader.
        worker.metrics.cluster_leader.set(1);
        worker.reconcile_lifecycle(&config)?;
        for thing in &config.things {
            worker.start_thing(thing.clone(), true);
        }
        worker
            .metrics
            .cluster_things_owned
            .set(worker.things.len() as i64);
    }
    tracing::info!(things = worker.things.len(), url = %crate::settings::redact_url(&worker.source.url), mode = ?worker.source.mode, "worker started");
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

    /// What `/healthz` and `/readyz` answer from (the CLI's watchdog asks it too).
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The `shutdown_timeout` of the configuration in force (a reload changes it).
    pub fn shutdown_timeout(&self) -> Duration {
        self.config.shutdown_timeout
    }

    /// Resolves once every thing's subscription has made its first attempt (connected, or
    /// failed to): what systemd's READY means.
    pub async fn subscribed(&self) {
        while !self.health.all_attempted(self.things()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn start_thing(&mut self, thing: ThingConfig, spread: bool) {
        let cancel = CancellationToken::new();
        let watermark = Arc::clone(
            self.watermarks
                .entry(thing.name.clone())
                .or_insert_with(|| Arc::new(AtomicI64::new(NO_WATERMARK))),
        );
        // "Last dweet" from what the sinks hold, so a thing silent since before it started
        // here is seen as silent (and alerted on) rather than absent. Only where it runs: a
        // member exports no series of a thing another member streams (stop_thing drops them).
        let stored = watermark.load(std::sync::atomic::Ordering::SeqCst);
        if stored != NO_WATERMARK {
            self.metrics.set_last_dweet(&thing.name, stored);
        }
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
            normalizer: Normalizer::default(),
        };
        let health = Arc::clone(&self.health);
        let name = thing.name.clone();
        let task = tokio::spawn(async move {
            use futures_util::FutureExt;
            if std::panic::AssertUnwindSafe(subscription.run())
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(thing = %name, "the subscription task panicked; the worker is no longer alive");
                health.loop_failed(format!("the subscription of {name} panicked"));
            }
        });
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
            self.health.forget_thing(name);
        }
    }

    /// Applies a new configuration: things added start, removed stop, changed ones restart,
    /// unchanged ones keep their streams. A new `[source]` restarts every subscription.
    pub async fn reload(&mut self, config: Config) -> Result<ReloadReport, WorkerError> {
        let source = match check_runnable(&config) {
            Ok(checked) => checked,
            Err(error) => {
                self.metrics.config_reloaded(false);
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
        if config.nats != self.config.nats {
            report.ignored.push("nats".to_owned());
        }
        if config.cluster != self.config.cluster {
            report.ignored.push("cluster".to_owned());
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
        // In a cluster, `rebalance` below starts the new things this member owns.
        if self.cluster.is_none() {
            for thing in &config.things {
                if !self.things.contains_key(&thing.name) {
                    self.start_thing(thing.clone(), false);
                    report.added.push(thing.name.clone());
                }
            }
            self.metrics
                .cluster_things_owned
                .set(self.things.len() as i64);
        }
        self.metrics
            .things_configured
            .set(config.things.len() as i64);
        // A new source or new lifecycle settings need a new reconciler; new things do not.
        if (source_changed || config.lifecycle != self.config.lifecycle)
            && let Some(reconciler) = self.lifecycle.take()
        {
            reconciler.stop().await;
        }
        // In a cluster only the leader reconciles (`rebalance` starts it there).
        if self.cluster.is_none() || self.lifecycle.is_some() {
            self.reconcile_lifecycle(&config)?;
        }
        self.metrics.config_reloaded(true);
        // Sections that need a restart keep their running values.
        let parquet = self.config.parquet.clone();
        let postgres = self.config.postgres.clone();
        let metrics = self.config.metrics.clone();
        let nats = self.config.nats.clone();
        let cluster = self.config.cluster.clone();
        self.config = Config {
            parquet,
            postgres,
            metrics,
            nats,
            cluster,
            ..config
        };
        if self.cluster.is_some() {
            let before: BTreeSet<String> = self.things.keys().cloned().collect();
            self.rebalance().await?;
            report.added = self
                .things
                .keys()
                .filter(|t| !before.contains(*t))
                .cloned()
                .collect();
        }
        Ok(report)
    }

    /// Resolves when the cluster's view changed, or a handover in progress needs another
    /// look; then call [`rebalance`](Self::rebalance). Never resolves outside a cluster.
    pub async fn cluster_turn(&mut self) {
        let Some(cluster) = self.cluster.as_mut() else {
            return std::future::pending().await;
        };
        if cluster.releasing.is_empty() && cluster.waiting.is_empty() {
            cluster.membership.changed().await;
        } else {
            tokio::select! {
                () = cluster.membership.changed() => {}
                () = tokio::time::sleep(HANDOVER_CHECK) => {}
            }
        }
    }

    /// Follows the cluster's ownership: stops the things another member owns now (holding
    /// them until every sink made them durable), starts the owned things no other member
    /// holds any more (after a lease, even if one still does), and reconciles the lifecycle
    /// while this member leads.
    pub async fn rebalance(&mut self) -> Result<(), WorkerError> {
        // Taken out while the things change (they need `self`), put back before anything fails.
        let Some(mut cluster) = self.cluster.take() else {
            return Ok(());
        };
        let view = cluster.membership.view();
        let me = cluster.membership.member().to_owned();
        let lease = cluster.membership.lease();
        let mut moves = 0u64;

        let lost: Vec<String> = self
            .things
            .keys()
            .filter(|thing| !view.owns(&me, thing))
            .cloned()
            .collect();
        for thing in lost {
            self.stop_thing(&thing).await;
            moves += 1;
            cluster.releasing.insert(thing, Instant::now());
        }
        if !cluster.releasing.is_empty()
            && let Some(parquet) = &self.parquet
        {
            parquet.seal_soon();
        }
        cluster.releasing.retain(|thing, since| {
            let durable = self.durable_everywhere(thing);
            let overdue = since.elapsed() > 2 * lease;
            if overdue && !durable {
                tracing::warn!(%thing, "handing over a thing whose records are not all durable here yet; what is missing comes back through the new owner's backfill");
            }
            !(durable || overdue || view.owns(&me, thing))
        });

        // Nothing is claimed before the view settled: members started together first see
        // each other, rather than the first one taking the whole fleet and handing it on.
        let owned: Vec<ThingConfig> = self
            .config
            .things
            .iter()
            .filter(|t| {
                view.settled && view.owns(&me, &t.name) && !self.things.contains_key(&t.name)
            })
            .cloned()
            .collect();
        cluster
            .waiting
            .retain(|thing, _| owned.iter().any(|t| t.name == *thing));
        let mut starting = Vec::new();
        let mut claimed_now = false;
        for thing in owned {
            let since = *cluster
                .waiting
                .entry(thing.name.clone())
                .or_insert_with(Instant::now);
            // Claimed first: only a view read after the claim was published can clear it.
            if !view.published.contains(&thing.name) {
                claimed_now = true;
                continue;
            }
            match view.held_elsewhere.get(&thing.name) {
                Some(holder) if since.elapsed() < lease.mul_f64(HANDOVER_PATIENCE) => {
                    tracing::debug!(thing = %thing.name, %holder, "waiting for the previous owner to hand over");
                    continue;
                }
                Some(holder) => {
                    tracing::warn!(thing = %thing.name, %holder, "the previous owner did not hand over within three leases; starting anyway")
                }
                None => {}
            }
            cluster.waiting.remove(&thing.name);
            starting.push(thing);
        }
        if !starting.is_empty() {
            // The sinks look at what other members stored before these things' records.
            if let Some(parquet) = &self.parquet {
                parquet.absorb_others();
            }
            if let Some(nats) = &self.nats {
                nats.forget_published();
            }
            for thing in starting {
                moves += 1;
                self.start_thing(thing, false);
            }
        }
        let mut holding: BTreeSet<String> = self.things.keys().cloned().collect();
        holding.extend(cluster.releasing.keys().cloned());
        holding.extend(cluster.waiting.keys().cloned());
        cluster.membership.set_holding(holding, claimed_now);
        self.cluster = Some(cluster);
        self.metrics
            .cluster_things_owned
            .set(self.things.len() as i64);
        self.metrics.cluster_ownership_moves.inc_by(moves);
        if moves > 0 {
            tracing::info!(
                members = view.members.len(),
                owned = self.things.len(),
                moved = moves,
                "cluster ownership changed"
            );
        }

        if let Some(postgres) = &self.postgres {
            postgres.set_retention_duty(view.leader);
        }
        if let Some(parquet) = &self.parquet {
            parquet.set_housekeeping_duty(view.leader);
        }
        if view.leader && self.lifecycle.is_none() {
            let config = self.config.clone();
            self.reconcile_lifecycle(&config)?;
        } else if !view.leader
            && let Some(reconciler) = self.lifecycle.take()
        {
            reconciler.stop().await;
        }
        Ok(())
    }

    /// Whether every sink made durable all that `thing`'s subscription emitted here.
    fn durable_everywhere(&self, thing: &str) -> bool {
        let emitted = self.watermarks.get(thing).map_or(NO_WATERMARK, |w| {
            w.load(std::sync::atomic::Ordering::SeqCst)
        });
        emitted == NO_WATERMARK
            || self
                .backlogs
                .iter()
                .all(|b| b.durable(thing).is_some_and(|mark| mark >= emitted))
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

    /// Stops every subscription, lets each sink make what it holds durable (or spool it),
    /// and stops serving metrics, all within `timeout`.
    pub async fn shutdown(self, timeout: Duration) -> Result<(), WorkerError> {
        let deadline = Instant::now() + timeout;
        let WorkerHandle {
            things,
            records,
            background,
            fan_out,
            backlogs,
            parquet,
            postgres,
            nats,
            lifecycle,
            cluster,
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
        // The last sender goes: the fan-out hands over what is queued and closes the
        // backlogs; each sink's loop drains its backlog and ends.
        drop(records);
        // A subscription that overran the deadline still holds a sender: then the backlogs
        // are closed here, and what it still sends is not taken (backfill brings it back).
        let joined = tokio::task::spawn_blocking(move || fan_out.join());
        let mut timed_out = tokio::time::timeout_at(deadline.into(), joined)
            .await
            .is_err();
        if timed_out {
            tracing::warn!("the pipeline did not drain before the shutdown deadline");
            backlogs.iter().for_each(|backlog| backlog.close());
        }
        // A sink that cannot finish by a second before the deadline spools what it holds.
        let give_up_at = deadline
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(deadline);
        let late = deadline + Duration::from_secs(2);
        let parquet_done = async {
            let Some(parquet) = parquet else {
                return Ok(false);
            };
            while !parquet.is_finished() && Instant::now() < give_up_at {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            parquet.give_up();
            let joined = tokio::task::spawn_blocking(move || parquet.join());
            match tokio::time::timeout_at(late.into(), joined).await {
                Ok(joined) => joined
                    .unwrap_or(Err(SinkError::Panicked("Parquet sink")))
                    .map(|()| false),
                // Its thread ends with the process; the spool and backfill keep the records.
                Err(_) => Ok(true),
            }
        };
        let postgres_done = finish_task_loop(postgres, give_up_at, late);
        let nats_done = finish_task_loop(nats, give_up_at, late);
        let (parquet_late, postgres_late, nats_late) =
            tokio::join!(parquet_done, postgres_done, nats_done);
        timed_out |= postgres_late || nats_late;
        // Leaving only now: the others start this member's things once they are durable here.
        if let Some(cluster) = cluster {
            cluster.membership.leave().await;
        }
        background.cancel();
        timed_out |= parquet_late?;
        if timed_out {
            return Err(WorkerError::ShutdownTimeout(timeout));
        }
        Ok(())
    }
}
