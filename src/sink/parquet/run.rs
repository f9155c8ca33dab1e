//! The Parquet sink's loop, on its own OS thread (encoding and fsync are blocking work): take
//! batches from its backlog oldest first, write them into the open generation, seal on time,
//! and only then tell the backlog they are durable.
//!
//! A failed write or seal (ENOSPC, EIO, a read-only directory) abandons the open generation,
//! hands every batch it held back to the backlog (which moves them to its spool), marks the
//! sink unready, and retries with backoff: once the directory is writable again the backlog
//! drains by itself, oldest first, without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::{DatasetError, ParquetConfig, ParquetSink};
use crate::backoff::Backoff;
use crate::sink::SinkError;
use crate::sink::backlog::{Backlog, Taken};
use crate::sink::interface::{RunningSink, SinkConfig, SinkContext, StartedSink};
use crate::telemetry::{Health, LoopBeat, Metrics, SinkName, fault_point};

/// How often the loop wakes to seal on time when nothing arrives.
const TICK: Duration = Duration::from_millis(200);
/// How often closed dates are looked at for compaction and retention (and at start).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10 * 60);
/// Records taken into the open generation per turn.
const TAKE_RECORDS: usize = 8 * 1024;

/// The running loop.
pub struct ParquetLoop {
    /// Taken once the thread ended, to learn whether it panicked.
    thread: Option<std::thread::JoinHandle<()>>,
    /// Resolves when the thread ends, however it ends (its sender drops on a panic too).
    ended: Option<oneshot::Receiver<()>>,
    /// Stop retrying a failing directory: what is held goes to the spool (shutdown deadline).
    give_up: Arc<AtomicBool>,
    requests: Arc<Requests>,
    forsaken: Arc<crate::sink::Forsaken>,
}

/// What the worker asks of the loop in a cluster, taken at its next turn.
#[derive(Default)]
struct Requests {
    /// Read other members' new files before writing more (a thing moved here).
    absorb: AtomicBool,
    /// Seal the open generation now (a thing is being handed to another member).
    seal: AtomicBool,
    /// Compaction and retention are this process's to run (in a cluster, the leader's).
    housekeeping: AtomicBool,
    /// Things were forsaken: the open generation must not be sealed with their records.
    forsake: AtomicBool,
}

impl RunningSink for ParquetLoop {
    fn finished(&mut self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if let Some(ended) = self.ended.as_mut() {
                // An error only says the sender dropped without a word: the thread ended too.
                let _ = ended.await;
                self.ended = None;
            }
            match self.thread.take() {
                Some(thread) => thread
                    .join()
                    .map_err(|_| SinkError::Panicked("Parquet sink")),
                None => Ok(()),
            }
        })
    }

    /// A loop stuck on a failing directory spools what it holds and ends.
    fn give_up(&self) {
        self.give_up.store(true, Ordering::Relaxed);
    }

    /// Seals the open generation at the next turn rather than on time: a thing handed to
    /// another member must be durable here first.
    fn before_handover(&self) {
        self.requests.seal.store(true, Ordering::SeqCst);
    }

    /// Before its next write, the loop reads what other members sealed into a shared
    /// directory; then the things that came back are no longer forsaken.
    fn after_takeover(&self, things: &[String]) {
        self.forsaken.returned(things);
        self.requests.absorb.store(true, Ordering::SeqCst);
    }

    /// From now on their records are skipped; at its next turn the loop drops an open
    /// generation holding some of them (written again without them) rather than sealing it.
    fn forsake(&self, things: &[&str]) {
        things.iter().for_each(|thing| self.forsaken.forsake(thing));
        self.requests.forsake.store(true, Ordering::SeqCst);
    }

    /// Whether this process compacts closed dates and applies retention.
    fn set_leader(&self, leader: bool) {
        self.requests.housekeeping.store(leader, Ordering::SeqCst);
    }
}

impl SinkConfig for ParquetConfig {
    /// The spool first: opening the sink recovers its directory, which a second process must
    /// never do; both locks are taken before anything is touched.
    fn start<'a>(&'a self, cx: &'a SinkContext) -> BoxFuture<'a, Result<StartedSink, SinkError>> {
        Box::pin(async move {
            let backlog = cx.open_backlog(&self.backlog(), SinkName::Parquet)?;
            let (sink, opened) =
                ParquetSink::open(self.clone(), cx.source_history, Arc::clone(&cx.metrics))?;
            tracing::info!(
                dir = %self.dir.display(),
                removed_temporary = opened.removed_temporary,
                removed_incomplete = opened.removed_incomplete,
                things_with_watermark = opened.things_with_watermark,
                "Parquet sink open"
            );
            let marks = sink.watermarks().clone();
            let running = spawn(
                sink,
                Arc::clone(&backlog),
                (Arc::clone(&cx.metrics), Arc::clone(&cx.health)),
                cx.leader,
            )?;
            Ok(StartedSink {
                backlog,
                marks,
                running: Box::new(running),
            })
        })
    }
}

/// Starts the loop; it ends once `backlog` is closed and drained (or on `give_up`).
fn spawn(
    sink: ParquetSink,
    backlog: Arc<Backlog>,
    (metrics, health): (Arc<Metrics>, Arc<Health>),
    housekeeping: bool,
) -> Result<ParquetLoop, SinkError> {
    let runtime = tokio::runtime::Handle::current();
    let give_up = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(Requests::default());
    let forsaken = sink.forsaken();
    requests.housekeeping.store(housekeeping, Ordering::SeqCst);
    let state = Loop {
        requests: Arc::clone(&requests),
        beat: health.register_loop("Parquet sink"),
        sink,
        backlog,
        metrics,
        health,
        held: Vec::new(),
        give_up: Arc::clone(&give_up),
        failing_since: None,
        housekept_at: None,
    };
    let (ended_sender, ended) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("dweetpipe-parquet".to_owned())
        .spawn(move || {
            state.run(&runtime);
            let _ = ended_sender.send(());
        })
        .map_err(|e| SinkError::io(std::path::Path::new("the Parquet sink thread"), e))?;
    Ok(ParquetLoop {
        thread: Some(thread),
        ended: Some(ended),
        give_up,
        requests,
        forsaken,
    })
}

struct Loop {
    sink: ParquetSink,
    backlog: Arc<Backlog>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Batches in the open generation: done once it seals, given back if it fails.
    held: Vec<Taken>,
    give_up: Arc<AtomicBool>,
    failing_since: Option<Instant>,
    beat: LoopBeat,
    requests: Arc<Requests>,
    housekept_at: Option<Instant>,
}

impl Loop {
    fn run(mut self, runtime: &tokio::runtime::Handle) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            self.beat.beat();
            fault_point("parquet");
            let next =
                runtime.block_on(async { tokio::time::timeout(TICK, self.backlog.next()).await });
            let outcome = match next {
                Ok(Some(first)) => self.take_and_write(first),
                Ok(None) => break,
                Err(_idle) => Ok(()),
            };
            // While failing, seal at once: success is what ends the fault.
            let outcome = outcome.and_then(|()| {
                let asked = self.requests.seal.swap(false, Ordering::SeqCst);
                let failing = self.failing_since.is_some();
                if self.sink.due() || ((failing || asked) && self.sink.is_open()) {
                    self.seal()
                } else {
                    Ok(())
                }
            });
            match outcome {
                Ok(()) => {
                    if self.failing_since.is_some() && !self.sink.is_open() {
                        self.recovered();
                        backoff.reset();
                    }
                }
                Err(error) => {
                    self.failed(&error);
                    if self.give_up.load(Ordering::Relaxed) {
                        return;
                    }
                    let delay = backoff.next_delay(&mut rand::rng());
                    self.beat.sleep_beating(delay);
                }
            }
            if self.give_up.load(Ordering::Relaxed) {
                // Out of time: seal what is open below; what waits stays in the spool.
                break;
            }
            self.keep_house();
        }
        // Closed and drained (or out of time): seal what is open; if that fails, keep it in
        // the spool, with whatever still waits in memory.
        if let Err(error) = self.seal() {
            self.failed(&error);
        }
        self.backlog.spill_memory();
    }

    /// Compacts closed dates and applies retention, at start and every
    /// [`HOUSEKEEPING_EVERY`], while this process has the duty and the sink is healthy. A
    /// failure is logged and tried again next time: both are safe to interrupt.
    fn keep_house(&mut self) {
        let due = self
            .housekept_at
            .is_none_or(|at| at.elapsed() >= HOUSEKEEPING_EVERY);
        if !due
            || self.failing_since.is_some()
            || !self.requests.housekeeping.load(Ordering::SeqCst)
        {
            return;
        }
        self.housekept_at = Some(Instant::now());
        let now = crate::record::now_ms();
        match self.sink.retire_old_dates(now) {
            Ok(retired) => {
                for date in retired {
                    self.metrics.parquet_date_retired(date.dataset.table());
                }
            }
            Err(error) => tracing::warn!(%error, "could not apply Parquet retention; will retry"),
        }
        match self.sink.compact(now) {
            Ok(compacted) => {
                for date in compacted {
                    self.metrics.parquet_date_compacted(date.dataset.table());
                }
            }
            Err(error) => tracing::warn!(%error, "could not compact a closed date; will retry"),
        }
    }

    /// The open generation holds records of a thing forsaken since: drop it, and write what
    /// it held again, without them (the sink skips them now).
    fn drop_forsaken(&mut self) {
        if self.sink.open_holds_forsaken() {
            self.sink.abandon();
            self.backlog.give_back(std::mem::take(&mut self.held));
        }
    }

    fn take_and_write(&mut self, first: Taken) -> Result<(), DatasetError> {
        let taken = self.backlog.take_more(first, TAKE_RECORDS);
        let started = Instant::now();
        let mut outcome = Ok(());
        // Taken after the request: records of a thing that moved here come after it.
        if self.requests.absorb.swap(false, Ordering::SeqCst)
            && let Err(error) = self.sink.absorb_others()
        {
            self.requests.absorb.store(true, Ordering::SeqCst);
            outcome = Err(error);
        }
        for batch in &taken {
            if outcome.is_err() {
                break;
            }
            match self.sink.write(&batch.records) {
                Ok(skipped) => self.metrics.duplicates_dropped.inc_by(skipped as u64),
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            }
        }
        self.held.extend(taken);
        self.metrics
            .records_forsaken(SinkName::Parquet, self.sink.take_forsaken_records());
        self.metrics
            .sink_write_duration(SinkName::Parquet)
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    fn seal(&mut self) -> Result<(), DatasetError> {
        // Asked just before: nothing forsaken may become durable by this seal.
        if self.requests.forsake.swap(false, Ordering::SeqCst) {
            self.drop_forsaken();
        }
        self.sink.close()?;
        for taken in self.held.drain(..) {
            self.backlog.done(taken);
        }
        Ok(())
    }

    /// Nothing held is durable: it all goes back to the backlog, and to its spool.
    fn failed(&mut self, error: &DatasetError) {
        self.sink.abandon();
        self.backlog.give_back(std::mem::take(&mut self.held));
        self.backlog.spill_memory();
        self.metrics.sink_error(SinkName::Parquet);
        let (memory, spooled, lost) = self.backlog.pending();
        let problem = format!(
            "cannot write Parquet ({error}); {memory} records wait in memory and {spooled} bytes in the spool{}",
            if lost { ", and some were dropped" } else { "" }
        );
        if self.failing_since.is_none() {
            tracing::error!(%error, "the Parquet sink cannot write; its records wait in its backlog and it retries with backoff");
            self.failing_since = Some(Instant::now());
        } else {
            tracing::debug!(%error, "the Parquet sink still cannot write");
        }
        self.health
            .set_sink_problem(SinkName::Parquet, Some(problem));
    }

    fn recovered(&mut self) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                after_secs = since.elapsed().as_secs(),
                "the Parquet sink writes again; its backlog drains"
            );
        }
        self.health.set_sink_problem(SinkName::Parquet, None);
    }
}
