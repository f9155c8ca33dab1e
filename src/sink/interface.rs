//! The one way a sink is started and driven, so the worker holds a list of sinks rather than
//! knowing each one: a sink's config section starts it with a [`SinkContext`] and hands back a
//! [`StartedSink`] (its backlog, its durable marks, and a [`RunningSink`] handle). The worker
//! then treats every sink alike: the fan-out feeds the backlogs, a cluster handover calls the
//! same hooks on each, and shutdown finishes each by the same deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::backlog::BacklogConfig;
use super::{Backlog, Forsaken, SinkError, Watermarks};
use crate::telemetry::{Health, Metrics, SinkName};

/// What every sink is started with, from outside its own section.
pub struct SinkContext {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The configured things' names (a sink that must ask its destination per thing).
    pub things: Vec<String>,
    /// How far back the source keeps a thing's history (what a backfill can still bring).
    pub source_history: Duration,
    /// Whether this process starts with the housekeeping duties (retention, compaction, ...);
    /// in a cluster they wait for [`RunningSink::set_leader`].
    pub leader: bool,
}

impl SinkContext {
    /// Declares `sink`'s metrics and opens its backlog (the spool's lock is the first thing
    /// a sink takes, before it touches its destination).
    pub fn open_backlog(
        &self,
        config: &BacklogConfig,
        sink: SinkName,
    ) -> Result<Arc<Backlog>, SinkError> {
        self.metrics.declare_sink(sink);
        Backlog::open_configured(
            config,
            sink,
            Arc::clone(&self.metrics),
            Arc::clone(&self.health),
        )
        .map(Arc::new)
    }
}

/// How long start-up waits for a sink's destination before it goes on without it: the
/// sink's share then waits in its backlog, and every thing backfills what the source keeps.
pub const DESTINATION_PATIENCE: Duration = Duration::from_secs(3);

/// A sink that is running.
pub struct StartedSink {
    /// What the fan-out feeds; the loop takes from it.
    pub backlog: Arc<Backlog>,
    /// The newest `created` per thing the destination held at start; empty when it did not
    /// answer in time (then every thing starts from what the source keeps).
    pub marks: Watermarks,
    pub running: Box<dyn RunningSink>,
}

/// How a config section starts its sink: opens the backlog (its lock first), reads the
/// durable marks, starts the loop.
pub trait SinkConfig {
    fn start<'a>(&'a self, cx: &'a SinkContext) -> BoxFuture<'a, Result<StartedSink, SinkError>>;
}

/// The worker's handle on a sink's loop. The hooks a sink does not need do nothing.
pub trait RunningSink: Send {
    /// Resolves once the loop ended: its backlog closed and drained, or after [`give_up`].
    /// Safe to poll again after a timeout.
    ///
    /// [`give_up`]: RunningSink::give_up
    fn finished(&mut self) -> BoxFuture<'_, Result<(), SinkError>>;
    /// Stop retrying a failing destination: what the loop holds goes to the spool, and it ends.
    fn give_up(&self);
    /// A thing is about to leave this process: make what is held durable soon, not on time.
    fn before_handover(&self) {}
    /// `things` moved here: look at what other members stored before writing theirs.
    fn after_takeover(&self, _things: &[String]) {}
    /// These things left without all their records durable here (the lease may be lost, or
    /// the handover was given up): what this sink holds or is given of them must not be
    /// stored now, in a destination the new owner shares, until they move back here. A
    /// destination that drops repeats itself (PostgreSQL) needs nothing.
    fn forsake(&self, _things: &[&str]) {}
    /// Whether this process has the housekeeping duties (in a cluster, the leader has them).
    fn set_leader(&self, _leader: bool) {}
}

/// Lets a sink drain until `give_up_at`, then tells it to give up and waits until `late`.
/// `Ok(true)` when it had not ended by then (its records wait in the spool or come back
/// through backfill).
pub async fn finish(
    running: &mut dyn RunningSink,
    give_up_at: Instant,
    late: Instant,
) -> Result<bool, SinkError> {
    if let Ok(ended) = tokio::time::timeout_at(give_up_at.into(), running.finished()).await {
        return ended.map(|()| false);
    }
    running.give_up();
    match tokio::time::timeout_at(late.into(), running.finished()).await {
        Ok(ended) => ended.map(|()| false),
        Err(_) => Ok(true),
    }
}

/// A sink loop that runs as a tokio task (PostgreSQL, the JetStream output): it ends when its
/// task does, and gives up when told.
pub struct SpawnedLoop {
    task: tokio::task::JoinHandle<()>,
    give_up: tokio_util::sync::CancellationToken,
    name: &'static str,
    /// Raised by `after_takeover`, for a loop that must look at its destination again.
    takeover: Option<Arc<AtomicBool>>,
    /// Follows `set_leader`, for a loop with housekeeping duties.
    leader: Option<Arc<AtomicBool>>,
    /// Follows `forsake` and `after_takeover`, for a loop storing into a shared destination.
    forsaken: Option<Arc<Forsaken>>,
}

impl SpawnedLoop {
    /// Spawns `run`, which ends once `give_up` is cancelled or its backlog drained.
    pub fn spawn(
        name: &'static str,
        give_up: tokio_util::sync::CancellationToken,
        run: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        SpawnedLoop {
            task: tokio::spawn(run),
            give_up,
            name,
            takeover: None,
            leader: None,
            forsaken: None,
        }
    }

    /// `after_takeover` raises `flag` (the loop lowers it once it acted on it).
    pub fn raising_on_takeover(mut self, flag: Arc<AtomicBool>) -> Self {
        self.takeover = Some(flag);
        self
    }

    /// `forsake` and `after_takeover` keep `forsaken` (the loop skips what it names and lifts
    /// the things that returned once it looked at its destination again).
    pub fn fencing(mut self, forsaken: Arc<Forsaken>) -> Self {
        self.forsaken = Some(forsaken);
        self
    }

    /// `set_leader` sets `flag`.
    pub fn following_leadership(mut self, flag: Arc<AtomicBool>) -> Self {
        self.leader = Some(flag);
        self
    }
}

impl RunningSink for SpawnedLoop {
    /// A panic of the task is reported as such.
    fn finished(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            (&mut self.task)
                .await
                .map_err(|_| SinkError::Panicked(self.name))
        })
    }

    fn give_up(&self) {
        self.give_up.cancel();
    }

    fn after_takeover(&self, things: &[String]) {
        if let Some(forsaken) = &self.forsaken {
            forsaken.returned(things);
        }
        if let Some(flag) = &self.takeover {
            flag.store(true, Ordering::SeqCst);
        }
    }

    fn forsake(&self, things: &[&str]) {
        if let Some(forsaken) = &self.forsaken {
            things.iter().for_each(|thing| forsaken.forsake(thing));
        }
    }

    fn set_leader(&self, leader: bool) {
        if let Some(flag) = &self.leader {
            flag.store(leader, Ordering::SeqCst);
        }
    }
}
