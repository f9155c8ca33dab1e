//! The PostgreSQL sink's loop: connect (for as long as it takes: the worker runs and the
//! other sinks ingest meanwhile, PostgreSQL's share waiting in its backlog), migrate, load the
//! watermarks, then write what the backlog holds oldest first, at most `max_rows` records per
//! transaction, and tell the backlog once each batch has committed.
//!
//! Batching is natural: everything queued (up to `max_rows`) goes as soon as the previous
//! write is done, so batches are small while traffic is light and large after an outage.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{History, PostgresConfig, PostgresError, PostgresSink, StreamStates, rollup};
use crate::backoff::Backoff;
use crate::record::{Record, now_ms};
use crate::sink::SinkError;
use crate::sink::backlog::Backlog;
use crate::sink::interface::{
    DESTINATION_PATIENCE, SinkConfig, SinkContext, SpawnedLoop, StartedSink,
};
use crate::telemetry::{Health, LoopBeat, Metrics, SinkName};

/// How often changed stream states are written to `things.stream_state`.
const STREAM_STATE_EVERY: Duration = Duration::from_secs(2);
/// How often the rollups are refreshed when no commit of this worker asks for it.
const ROLLUP_REFRESH_EVERY: Duration = Duration::from_secs(5);
/// The least time between two refreshes: the notes of the commits meanwhile are recomputed
/// together.
const ROLLUP_REFRESH_GAP: Duration = Duration::from_secs(2);
/// While a catch-up drains, the rollups wait (at most this long between refreshes): each
/// refresh recomputes whole minutes, which every batch of a catch-up adds boards to.
const ROLLUP_DEFER_MAX: Duration = Duration::from_secs(30);

/// How long after a minute ends its rollup is computed once more: dweets of the last
/// seconds are still on their way.
const ROLLUP_SETTLE_MS: i64 = 5_000;
/// How often the minutes still filling are recomputed.
const ROLLUP_OPEN_EVERY: Duration = Duration::from_secs(10);
/// How long the last refresh may hold up a shutdown.
const SHUTDOWN_REFRESH: Duration = Duration::from_secs(3);

/// What the writer tells the rollups' refresher after each commit.
#[derive(Default)]
struct Committed {
    notify: Notify,
    /// The last batch was full: more records wait behind it.
    catching_up: AtomicBool,
}
/// How often retention is applied and closed partitions re-keyed (and at start).
const RETENTION_EVERY: Duration = Duration::from_secs(60 * 60);
/// How often the partitions' upkeep looks whether it is due and this process has the duty.
const DUTY_CHECK_EVERY: Duration = Duration::from_secs(5);
/// The longest wait between connection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

impl SinkConfig for PostgresConfig {
    /// PostgreSQL need not answer: then the loop connects in the background.
    fn start<'a>(
        &'a self,
        cx: &'a SinkContext,
    ) -> futures_util::future::BoxFuture<'a, Result<StartedSink, SinkError>> {
        Box::pin(async move {
            let backlog = cx.open_backlog(&self.backlog(), SinkName::Postgres)?;
            // The endpoints answer meanwhile: a long migration is no reason to restart us.
            cx.health.set_sink_problem(
                SinkName::Postgres,
                Some("migrating: connecting and applying the schema migrations".to_owned()),
            );
            let connected =
                PostgresSink::connect(self, Arc::clone(&cx.metrics), DESTINATION_PATIENCE).await;
            cx.health.set_sink_problem(SinkName::Postgres, None);
            let (connected, marks) = match connected {
                Ok(sink) => {
                    tracing::info!(
                        things_with_watermark = sink.watermarks().len(),
                        "PostgreSQL sink open, schema migrated"
                    );
                    let marks = sink.watermarks().clone();
                    (Some(sink), marks)
                }
                Err(error) => {
                    tracing::warn!(%error, "starting without PostgreSQL: its records wait in its backlog until it answers, and every thing backfills what the source keeps");
                    (None, crate::sink::Watermarks::new())
                }
            };
            let running = spawn(
                self.clone(),
                connected,
                Arc::clone(&backlog),
                (Arc::clone(&cx.metrics), Arc::clone(&cx.health)),
                cx.leader,
            );
            Ok(StartedSink {
                backlog,
                marks,
                running: Box::new(running),
            })
        })
    }
}

/// Starts the loop with a sink already connected at start-up, or connects in the background.
fn spawn(
    config: PostgresConfig,
    connected: Option<PostgresSink>,
    backlog: Arc<Backlog>,
    (metrics, health): (Arc<Metrics>, Arc<Health>),
    retention_duty: bool,
) -> SpawnedLoop {
    let give_up = CancellationToken::new();
    let retention_duty = Arc::new(AtomicBool::new(retention_duty));
    let run = run(
        config,
        connected,
        backlog,
        (metrics, health),
        give_up.clone(),
        Arc::clone(&retention_duty),
    );
    // Retention and re-keying closed partitions are the leader's.
    SpawnedLoop::spawn("PostgreSQL sink", give_up, run).following_leadership(retention_duty)
}

async fn run(
    config: PostgresConfig,
    connected: Option<PostgresSink>,
    backlog: Arc<Backlog>,
    (metrics, health): (Arc<Metrics>, Arc<Health>),
    give_up: CancellationToken,
    retention_duty: Arc<AtomicBool>,
) {
    let beat = health.register_loop("PostgreSQL sink");
    let sink = match connected {
        Some(sink) => sink,
        None => match connect(&config, &metrics, &health, &backlog, &give_up, &beat).await {
            Some(sink) => sink,
            None => {
                backlog.spill_memory();
                tracing::warn!(
                    "PostgreSQL was not reachable before shutdown; its records are spooled for the next start"
                );
                return;
            }
        },
    };
    let mut sink = sink.with_health(Arc::clone(&health), beat.clone());
    let reporter_stop = CancellationToken::new();
    let reporter = tokio::spawn(report_stream_states(
        sink.states(),
        Arc::clone(&health),
        reporter_stop.clone(),
    ));
    let committed = Arc::new(Committed::default());
    let upkeep_stop = CancellationToken::new();
    let refresher = tokio::spawn(keep_rollups(
        sink.history(),
        Arc::clone(&committed),
        upkeep_stop.clone(),
    ));
    let tender = tokio::spawn(keep_partitions(
        Upkeep {
            history: sink.history(),
            config: config.clone(),
            metrics: Arc::clone(&metrics),
            retention_duty,
        },
        upkeep_stop.clone(),
    ));
    write_backlog(
        &mut sink,
        &backlog,
        config.max_rows,
        (&give_up, &committed),
        &beat,
    )
    .await;
    reporter_stop.cancel();
    upkeep_stop.cancel();
    let _ = reporter.await;
    let _ = refresher.await;
    let _ = tender.await;
}

/// What the partitions' upkeep needs.
struct Upkeep {
    history: History,
    config: PostgresConfig,
    metrics: Arc<Metrics>,
    retention_duty: Arc<AtomicBool>,
}

/// Keeps the rollups current: recomputes the buckets commits noted, after a commit but at
/// most once per [`ROLLUP_REFRESH_GAP`] (and every few seconds, for whatever another writer
/// of the database noted), and once more (a bounded pass) at shutdown. A failed refresh leaves its
/// notes for the next.
///
/// A minute still filling is recomputed at most every [`ROLLUP_OPEN_EVERY`], and once more
/// after it has closed ([`ROLLUP_SETTLE_MS`] after its end): recomputed on every refresh, the
/// live stream's current minute would be read whole every few seconds, on the cores the
/// writes need. So the rollups trail the raw rows by about ten seconds.
///
/// A catch-up defers them further (up to [`ROLLUP_DEFER_MAX`]): every batch adds boards to
/// the same minutes, and each refresh recomputes a touched minute whole, so refreshing after
/// every commit would re-read those minutes once per batch, on the cores the writes need.
/// Measured in the 1,000 × 500 catch-up: 31.6 s to PostgreSQL with a refresh after every
/// commit and 33.1 s with one every 2 s, against 26.6 s and 25.1 s for schema 3 in the same
/// runs.
async fn keep_rollups(history: History, committed: Arc<Committed>, stop: CancellationToken) {
    let mut refreshed_at = Instant::now();
    let mut open_refreshed_at: Option<Instant> = None;
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = committed.notify.notified() => false,
            _ = tokio::time::sleep(ROLLUP_REFRESH_EVERY) => false,
        };
        if !stopping
            && committed.catching_up.load(Ordering::Relaxed)
            && refreshed_at.elapsed() < ROLLUP_DEFER_MAX
        {
            continue;
        }
        let stopping = stopping
            || tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(ROLLUP_REFRESH_GAP) => false,
            };
        refreshed_at = Instant::now();
        // Minutes still filling are recomputed at most every ROLLUP_OPEN_EVERY; at shutdown
        // everything goes.
        let open_too =
            stopping || open_refreshed_at.is_none_or(|at| at.elapsed() >= ROLLUP_OPEN_EVERY);
        if open_too {
            open_refreshed_at = Some(Instant::now());
        }
        let closed_before =
            (!open_too).then(|| now_ms() - rollup::MINUTE_MS - ROLLUP_SETTLE_MS + 1);
        let refresh = history.refresh_rollups_once(closed_before);
        // At shutdown one bounded pass: what is left stays noted for the next refresher.
        let finished = if stopping {
            tokio::time::timeout(SHUTDOWN_REFRESH, refresh).await.ok()
        } else {
            Some(refresh.await)
        };
        match finished {
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                tracing::debug!(%error, "could not refresh the rollups; will retry")
            }
            None => tracing::debug!("the rollups' last refresh did not finish before shutdown"),
        }
        if stopping {
            return;
        }
    }
}

/// Applies retention, then re-keys the readings partitions that closed, at start and hourly
/// while this process has the duty (in a cluster, the leader). A task of its own: re-keying
/// a big partition takes minutes, and the rollups must not wait on it. Shutdown stops it
/// mid-step; every step is safe to repeat, so the next start finishes it.
async fn keep_partitions(upkeep: Upkeep, stop: CancellationToken) {
    let mut tended_at: Option<Instant> = None;
    loop {
        let due = tended_at.is_none_or(|at| at.elapsed() >= RETENTION_EVERY);
        if due && upkeep.retention_duty.load(Ordering::Relaxed) {
            let finished = tokio::select! {
                _ = stop.cancelled() => return,
                finished = tend_partitions(&upkeep) => finished,
            };
            if finished {
                tended_at = Some(Instant::now());
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(DUTY_CHECK_EVERY) => {}
        }
    }
}

/// One round of retention and re-keying; whether both went through.
async fn tend_partitions(upkeep: &Upkeep) -> bool {
    let pruned = match upkeep.history.prune(&upkeep.config, now_ms()).await {
        Ok(dropped) => {
            for partition in dropped {
                upkeep.metrics.retention_dropped(&partition.parent);
            }
            true
        }
        Err(error) => {
            tracing::warn!(%error, "could not apply retention; will retry");
            false
        }
    };
    let arranged = match upkeep.history.arrange(now_ms()).await {
        Ok(partitions) => {
            partitions
                .iter()
                .for_each(|_| upkeep.metrics.partition_arranged());
            true
        }
        Err(error) => {
            tracing::warn!(%error, "could not re-key the closed partitions by board; will retry");
            false
        }
    };
    pruned && arranged
}

/// Connects until it works or `give_up`; reports what is wrong to the log and `/readyz`.
async fn connect(
    config: &PostgresConfig,
    metrics: &Arc<Metrics>,
    health: &Health,
    backlog: &Backlog,
    give_up: &CancellationToken,
    beat: &LoopBeat,
) -> Option<PostgresSink> {
    config.url.as_ref()?;
    let mut backoff = Backoff::new(Duration::from_millis(200), RECONNECT_MAX);
    let mut last_problem = String::new();
    loop {
        beat.beat();
        // Shutting down before PostgreSQL ever answered: the spool keeps its share.
        let attempt = tokio::select! {
            _ = give_up.cancelled() => return None,
            _ = backlog.closed() => return None,
            attempt = PostgresSink::try_connect(config, Arc::clone(metrics)) => attempt,
        };
        let error = match attempt {
            Ok(sink) => {
                health.set_sink_problem(SinkName::Postgres, None);
                tracing::info!(
                    things_with_watermark = sink.watermarks().len(),
                    "PostgreSQL reached, schema migrated; its backlog drains"
                );
                return Some(sink);
            }
            Err(error) => error,
        };
        // Unreachable is a failed write for whoever alerts on sink errors, also when the
        // outage began before this worker did.
        metrics.sink_error(SinkName::Postgres);
        let text = error.to_string();
        if text != last_problem {
            if error.is_transient() {
                tracing::warn!(%error, "PostgreSQL is not reachable; ingestion goes on and its records wait in its backlog");
            } else {
                tracing::error!(%error, "PostgreSQL refuses this worker; retrying cannot fix that, so it is retried only every {RECONNECT_MAX:?} while its records wait in its backlog");
            }
            health.set_sink_problem(SinkName::Postgres, Some(format_problem(&error)));
            last_problem = text;
        }
        let delay = if error.is_transient() {
            backoff.next_delay(&mut rand::rng())
        } else {
            RECONNECT_MAX
        };
        tokio::select! {
            _ = give_up.cancelled() => return None,
            _ = backlog.closed() => return None,
            _ = beat.pause_beating(delay) => {}
        }
    }
}

fn format_problem(error: &PostgresError) -> String {
    if error.is_transient() {
        format!("unreachable ({error})")
    } else {
        error.to_string()
    }
}

async fn write_backlog(
    sink: &mut PostgresSink,
    backlog: &Backlog,
    max_rows: usize,
    (give_up, committed): (&CancellationToken, &Committed),
    beat: &LoopBeat,
) {
    loop {
        beat.beat();
        let first = tokio::select! {
            _ = give_up.cancelled() => None,
            first = backlog.next() => first,
            // Idle is not stuck: turn at least every second.
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
        };
        let Some(first) = first else {
            if give_up.is_cancelled() {
                backlog.spill_memory();
            }
            return;
        };
        let taken = backlog.take_more(first, max_rows);
        let rows: usize = taken.iter().map(|t| t.records.len()).sum();
        let write = async {
            // One spool segment can hold far more than max_rows: split it.
            let records: Vec<&Record> = taken.iter().flat_map(|t| t.records.iter()).collect();
            for chunk in records.chunks(max_rows) {
                sink.write(chunk.to_vec()).await;
            }
        };
        tokio::select! {
            () = write => {
                taken.into_iter().for_each(|t| backlog.done(t));
                // A full batch means more wait behind it: a catch-up, not the live stream.
                committed.catching_up.store(rows >= max_rows, Ordering::Relaxed);
                committed.notify.notify_one();
            }
            _ = give_up.cancelled() => {
                // What did commit is skipped as already stored when it replays.
                backlog.give_back(taken);
                backlog.spill_memory();
                tracing::warn!("PostgreSQL did not take everything before the shutdown deadline; the rest is spooled for the next start");
                return;
            }
        }
    }
}

/// Keeps `things.stream_state` in step with the streams run here: writes what changed every
/// few seconds, and `stopped` at shutdown for the things still run here (in a cluster, each
/// thing's state is its owner's to write).
async fn report_stream_states(states: StreamStates, health: Arc<Health>, stop: CancellationToken) {
    let mut written: HashMap<String, bool> = HashMap::new();
    let mut ticks = tokio::time::interval(STREAM_STATE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let states_now = health.stream_states();
        // A thing no longer run here (handed to another member, removed) is the new owner's
        // to report: forget it, so shutdown does not mark it stopped.
        written.retain(|thing, _| states_now.iter().any(|(running, _)| running == thing));
        let changed: Vec<(String, bool)> = states_now
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
