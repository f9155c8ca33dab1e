//! The ingest worker's wiring: start the sinks' loops, the fan-out and one subscription task
//! per configured thing (in a cluster, per thing this member owns); reload; follow the
//! cluster's ownership; shut down in order. The loops themselves live with their components
//! (`sink::parquet::run`, `sink::postgres::run`, `sink::nats::run`, `subscription`,
//! `cluster`).
//!
//! ```text
//! subscription tasks ──(bounded channel of Records)──▶ fan-out ──▶ each sink's backlog ──▶ its loop
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use crate::cluster::handover::{Decision, Handover, Situation, Turn};
use crate::config::{Config, ConfigError};
use crate::lifecycle;
use crate::nats::NatsError;
use crate::normalize::Normalizer;
use crate::record::Record;
use crate::sink::interface;
use crate::sink::{Backlog, RunningSink, SinkContext, SinkError, Watermarks};
use crate::source::subscription::{NO_WATERMARK, Subscription};
use crate::source::{SourceConfig, ThingConfig};
use crate::telemetry::{self, Health, Metrics};

/// Records in flight between the subscriptions and the fan-out.
const PIPELINE_CAPACITY: usize = 16 * 1024;
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
    handover: Handover,
    /// The last turn left a handover under way: look again soon.
    in_progress: bool,
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
    /// The sinks' loops, in the order of `Config::sinks`.
    sinks: Vec<Box<dyn RunningSink>>,
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
    if config.sinks().is_empty() {
        return Err(config.error(
            "parquet",
            "no sink is configured",
            "add a [parquet] section with dir = \"data/parquet\", a [postgres] section, and/or a [nats] section",
        ));
    }
    Ok(source)
}

/// Starts the worker: the sinks' loops (their destinations need not answer), metrics, the
/// fan-out, and every subscription (in a cluster, those of the things this member owns).
pub async fn start(config: Config) -> Result<WorkerHandle, WorkerError> {
    let source = Arc::new(check_runnable(&config)?.clone());
    let metrics = Arc::new(Metrics::new()?);
    let health = Arc::new(new_health(&config, &source).with_metrics(Arc::clone(&metrics)));
    let background = CancellationToken::new();
    let context = SinkContext {
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
        things: config.things.iter().map(|t| t.name.clone()).collect(),
        source_history: source.history,
        // In a cluster the leader has the housekeeping; `rebalance` hands it the duty.
        leader: config.cluster.is_none(),
    };
    // Served first: a load balancer and a liveness probe get answers while the sinks open.
    let metrics_addr = serve_metrics(&config, &metrics, &health, &background).await?;
    health.set_starting(Some("starting: opening the sinks".to_owned()));
    let mut started = Vec::new();
    for sink in config.sinks() {
        match sink.start(&context).await {
            Ok(sink) => started.push(sink),
            Err(error) => {
                // The sinks already started drain nothing and end; the endpoint goes.
                started.iter().for_each(|s| s.backlog.close());
                background.cancel();
                return Err(error.into());
            }
        }
    }
    let watermarks = Watermarks::lowest_of(started.iter().map(|s| &s.marks))
        .into_iter()
        .map(|(thing, mark)| (thing, Arc::new(AtomicI64::new(mark))))
        .collect();
    let next = match config.cluster {
        Some(_) => "starting: joining the cluster",
        None => "starting: the subscriptions",
    };
    health.set_starting(Some(next.to_owned()));
    let (backlogs, sinks): (Vec<_>, Vec<_>) =
        started.into_iter().map(|s| (s.backlog, s.running)).unzip();
    let cluster = join_cluster(&config, &backlogs, &metrics, &health).await?;
    let (records, receiver) = mpsc::channel(PIPELINE_CAPACITY);
    let fan_out = crate::sink::spawn_fan_out(receiver, backlogs.clone(), Arc::clone(&health))
        .map_err(|e| WorkerError::Thread("fan-out", e))?;
    let mut worker = WorkerHandle {
        things: HashMap::new(),
        watermarks,
        client: source.client()?,
        source,
        records,
        metrics,
        health,
        metrics_addr,
        background,
        fan_out,
        backlogs,
        sinks,
        lifecycle: None,
        cluster,
        config: config.clone(),
    };
    worker.take_up_things(&config).await?;
    worker.health.set_starting(None);
    tracing::info!(things = worker.things.len(), url = %crate::settings::redact_url(&worker.source.url), mode = ?worker.source.mode, "worker started");
    Ok(worker)
}

/// What `/healthz` and `/readyz` answer from: a thing may take the start spread and a minute
/// to connect; a loop is stuck after `[metrics] stuck_after`.
fn new_health(config: &Config, source: &SourceConfig) -> Health {
    let stuck_after = config
        .metrics
        .as_ref()
        .map_or(Duration::from_secs(30), |m| m.stuck_after);
    Health::new(source.start_spread + Duration::from_secs(60), stuck_after)
}

/// Serves `/metrics`, `/healthz` and `/readyz` when `[metrics]` asks for them; where.
async fn serve_metrics(
    config: &Config,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    background: &CancellationToken,
) -> Result<Option<SocketAddr>, WorkerError> {
    let Some(metrics_config) = &config.metrics else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(metrics_config.listen)
        .await
        .map_err(|error| WorkerError::MetricsBind {
            addr: metrics_config.listen,
            error,
        })?;
    let addr = listener.local_addr().ok();
    tokio::spawn(telemetry::serve(
        listener,
        Arc::clone(metrics),
        Arc::clone(health),
        background.clone(),
    ));
    Ok(addr)
}

/// Joins the cluster `[cluster]` names, if any, and waits for a first view of it.
async fn join_cluster(
    config: &Config,
    backlogs: &[Arc<Backlog>],
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) -> Result<Option<ClusterState>, WorkerError> {
    let Some(cluster_config) = &config.cluster else {
        return Ok(None);
    };
    // A handover waits for what a thing emitted to be durable in every sink.
    backlogs.iter().for_each(|b| b.track_durable());
    let mut membership = Membership::join(
        cluster_config.clone(),
        Arc::clone(metrics),
        Arc::clone(health),
    )
    .await?;
    let view = membership.first_view(cluster_config.lease).await;
    tracing::info!(
        member = cluster_config.member(),
        members = ?view.members,
        connected = view.connected,
        "joined the cluster"
    );
    Ok(Some(ClusterState {
        membership,
        handover: Handover::default(),
        in_progress: false,
    }))
}

impl WorkerHandle {
    /// Starts the things of `config`: in a cluster through the handover, otherwise all of
    /// them, with every duty a cluster gives its leader.
    async fn take_up_things(&mut self, config: &Config) -> Result<(), WorkerError> {
        self.metrics
            .things_configured
            .set(config.things.len() as i64);
        if self.cluster.is_some() {
            return self.rebalance().await;
        }
        self.metrics.cluster_leader.set(1);
        self.reconcile_lifecycle(config)?;
        for thing in &config.things {
            self.start_thing(thing.clone(), true, None);
        }
        self.metrics
            .cluster_things_owned
            .set(self.things.len() as i64);
        Ok(())
    }

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

    /// Starts `thing`'s subscription; `refill_from` is the oldest `created` a sink dropped,
    /// which its first backfill should reach back to.
    fn start_thing(&mut self, thing: ThingConfig, spread: bool, refill_from: Option<i64>) {
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
            unplaced: Default::default(),
            refill_from,
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
        let mut report = ReloadReport {
            ignored: self.config.changes_needing_restart(&config),
            ..ReloadReport::default()
        };
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
                    self.start_thing((*thing).clone(), false, None);
                    report.restarted.push(name);
                }
                Some(_) => report.unchanged += 1,
            }
        }
        // In a cluster, `rebalance` below starts the new things this member owns.
        if self.cluster.is_none() {
            for thing in &config.things {
                if !self.things.contains_key(&thing.name) {
                    self.start_thing(thing.clone(), false, None);
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
        self.config = self.config.keeping_restart_sections(config);
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
        if !cluster.in_progress {
            cluster.membership.changed().await;
        } else {
            tokio::select! {
                () = cluster.membership.changed() => {}
                () = tokio::time::sleep(HANDOVER_CHECK) => {}
            }
        }
    }

    /// Follows the cluster's ownership ([`Handover`] decides, this carries it out): stops
    /// the things another member owns now, starts those that moved here, tells the sinks,
    /// publishes what this member holds, and hands the leader's duties over.
    pub async fn rebalance(&mut self) -> Result<(), WorkerError> {
        // Taken out while the things change (they need `self`), put back before anything fails.
        let Some(mut cluster) = self.cluster.take() else {
            return Ok(());
        };
        let view = cluster.membership.view();
        let streaming: BTreeSet<&str> = self.things.keys().map(String::as_str).collect();
        let configured: Vec<&str> = self.config.things.iter().map(|t| t.name.as_str()).collect();
        let durable = |thing: &str| self.durable_everywhere(thing);
        let turn = cluster.handover.turn(&Situation {
            me: cluster.membership.member(),
            view: &view,
            lease: cluster.membership.lease(),
            now: Instant::now(),
            configured: &configured,
            streaming: &streaming,
            durable: &durable,
        });
        let moves = self.carry_out(&turn).await;
        cluster
            .membership
            .set_holding(turn.holding.clone(), turn.claimed_now);
        cluster.in_progress = turn.in_progress();
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
        for sink in &self.sinks {
            sink.set_leader(view.leader);
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

    /// Stops and starts what `turn` says, in the order the sinks need: a stopped thing's
    /// last records reach them before they seal; they read the others' before a start.
    /// How many things moved.
    async fn carry_out(&mut self, turn: &Turn) -> u64 {
        let mut moves = 0;
        // First, so that nothing of them is sealed or published from now on, not even what
        // their subscriptions emit while they stop.
        let forsaken = turn.to_forsake();
        if !forsaken.is_empty() {
            tracing::warn!(
                things = forsaken.len(),
                "this member gave up things before their records were durable here (its lease may have lapsed, or a handover could not finish): the sinks drop what they hold of them rather than store it twice; the new owner's backfill stores it"
            );
            self.sinks.iter().for_each(|s| s.forsake(&forsaken));
        }
        for thing in turn.to_stop() {
            if self.things.contains_key(thing) {
                self.stop_thing(thing).await;
                moves += 1;
            }
        }
        // Should a forsaken thing come back here, it backfills all the source keeps: its sinks
        // skip what they hold, and store what was forsaken unless the other owner did.
        for thing in forsaken {
            if let Some(mark) = self.watermarks.get(thing) {
                mark.store(NO_WATERMARK, std::sync::atomic::Ordering::SeqCst);
            }
        }
        if turn.sinks_should_seal() {
            self.sinks.iter().for_each(|s| s.before_handover());
        }
        for (thing, decision) in &turn.decisions {
            match decision {
                Decision::ReleaseOverdue => {
                    tracing::warn!(%thing, "handing over a thing whose records are not all durable here yet; what is missing comes back through the new owner's backfill")
                }
                Decision::Abandon => {
                    tracing::debug!(%thing, "abandoned: this member may have lost its lease")
                }
                Decision::Wait { holder } => {
                    tracing::debug!(%thing, %holder, "waiting for the previous owner to hand over")
                }
                Decision::TakeOver {
                    forced_from: Some(holder),
                } => {
                    tracing::warn!(%thing, %holder, "the previous owner did not hand over in time; starting anyway")
                }
                _ => {}
            }
        }
        let to_start: BTreeSet<&str> = turn.to_start().into_iter().collect();
        if turn.sinks_should_absorb() {
            let arriving: Vec<String> = to_start.iter().map(|t| (*t).to_owned()).collect();
            self.sinks.iter().for_each(|s| s.after_takeover(&arriving));
        }
        let starting: Vec<ThingConfig> = self
            .config
            .things
            .iter()
            .filter(|t| to_start.contains(t.name.as_str()))
            .cloned()
            .collect();
        for thing in starting {
            self.start_thing(thing, false, None);
            moves += 1;
        }
        moves
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

    /// Backfills again, from the source, the things a sink dropped records of once its
    /// backlog drained (what the source still keeps comes back; the other sinks skip it as
    /// stored). Call it every few seconds.
    pub async fn heal(&mut self) {
        // Per thing, the oldest `created` any sink dropped.
        let mut dropped: BTreeMap<String, Option<i64>> = BTreeMap::new();
        for (thing, oldest) in self.backlogs.iter().flat_map(|b| b.heal()) {
            let from = dropped.entry(thing).or_insert(oldest);
            *from = match (*from, oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        for (name, oldest_dropped) in dropped {
            let Some(config) = self.things.get(&name).map(|t| t.config.clone()) else {
                continue;
            };
            self.stop_thing(&name).await;
            if let Some(mark) = self.watermarks.get(&name) {
                mark.store(NO_WATERMARK, std::sync::atomic::Ordering::SeqCst);
            }
            self.start_thing(config, false, oldest_dropped);
        }
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
            mut sinks,
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
        let finished = futures_util::future::join_all(
            sinks
                .iter_mut()
                .map(|sink| interface::finish(sink.as_mut(), give_up_at, late)),
        )
        .await;
        // Leaving only now: the others start this member's things once they are durable here.
        if let Some(cluster) = cluster {
            cluster.membership.leave().await;
        }
        background.cancel();
        for late in finished {
            // A loop that did not end by then ends with the process; the spool and backfill
            // keep its records.
            timed_out |= late?;
        }
        if timed_out {
            return Err(WorkerError::ShutdownTimeout(timeout));
        }
        Ok(())
    }
}
