//! The JetStream output's loop: connect (for as long as it takes; records wait in the
//! backlog), open the stream, then publish what the backlog holds oldest first and tell the
//! backlog once JetStream acknowledged every message of a batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{NatsConfig, NatsSink};
use crate::backoff::Backoff;
use crate::nats::NatsError;
use crate::record::Record;
use crate::sink::backlog::Backlog;
use crate::sink::interface::{
    DESTINATION_PATIENCE, SinkConfig, SinkContext, SpawnedLoop, StartedSink,
};
use crate::sink::{Forsaken, SinkError};
use crate::telemetry::{Health, LoopBeat, Metrics, SinkName, Table};

/// Records published per turn at most.
const TAKE_RECORDS: usize = 4096;

impl SinkConfig for NatsConfig {
    /// NATS need not answer: then the loop opens the stream in the background.
    fn start<'a>(
        &'a self,
        cx: &'a SinkContext,
    ) -> futures_util::future::BoxFuture<'a, Result<StartedSink, SinkError>> {
        Box::pin(async move {
            let backlog = cx.open_backlog(&self.backlog(), SinkName::Nats)?;
            let urls = self.url.clone().unwrap_or_default();
            let client = crate::nats::connect(&urls, "dweetpipe output", false).await?;
            let opened = tokio::time::timeout(DESTINATION_PATIENCE, async {
                let mut sink = NatsSink::open(client.clone(), self).await?;
                let marks = sink.watermarks(&cx.things).await?;
                Ok::<_, NatsError>((sink, marks))
            })
            .await;
            let (opened, marks) = match opened {
                Ok(Ok((sink, marks))) => (Some(sink), marks),
                failed => {
                    let why = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!("no answer within {DESTINATION_PATIENCE:?}"),
                    };
                    tracing::warn!(%why, "starting without the JetStream output: its records wait in its backlog until NATS answers, and every thing backfills what the source keeps");
                    (None, crate::sink::Watermarks::new())
                }
            };
            let running = spawn(
                self.clone(),
                client,
                opened,
                Arc::clone(&backlog),
                (Arc::clone(&cx.metrics), Arc::clone(&cx.health)),
            );
            Ok(StartedSink {
                backlog,
                marks,
                running: Box::new(running),
            })
        })
    }
}

/// Starts the loop with a sink opened at start-up, or opens it in the background.
fn spawn(
    config: NatsConfig,
    client: async_nats::Client,
    opened: Option<NatsSink>,
    backlog: Arc<Backlog>,
    (metrics, health): (Arc<Metrics>, Arc<Health>),
) -> SpawnedLoop {
    let give_up = CancellationToken::new();
    let forget = Arc::new(AtomicBool::new(false));
    let forsaken = Arc::new(Forsaken::default());
    let state = Loop {
        forsaken: Arc::clone(&forsaken),
        beat: health.register_loop("JetStream output"),
        config,
        client,
        backlog,
        metrics,
        health,
        give_up: give_up.clone(),
        forget: Arc::clone(&forget),
    };
    // After a takeover the loop asks the stream again what it holds per thing.
    SpawnedLoop::spawn("JetStream output", give_up, state.run(opened))
        .raising_on_takeover(forget)
        .fencing(forsaken)
}

struct Loop {
    config: NatsConfig,
    client: async_nats::Client,
    backlog: Arc<Backlog>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    give_up: CancellationToken,
    forget: Arc<AtomicBool>,
    forsaken: Arc<Forsaken>,
    beat: LoopBeat,
}

impl Loop {
    async fn run(self, opened: Option<NatsSink>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut sink = opened;
        loop {
            self.beat.beat();
            if sink.is_none() {
                match NatsSink::open(self.client.clone(), &self.config).await {
                    Ok(opened) => {
                        self.health.set_sink_problem(SinkName::Nats, None);
                        sink = Some(opened);
                    }
                    Err(error) => {
                        if self.failed(&error, &mut backoff).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let Some(open) = sink.as_mut() else { continue };
            let first = tokio::select! {
                _ = self.give_up.cancelled() => None,
                first = self.backlog.next() => first,
                // Idle is not stuck: turn at least every second.
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let Some(first) = first else {
                self.backlog.spill_memory();
                return;
            };
            let taken = self.backlog.take_more(first, TAKE_RECORDS);
            if self.forget.swap(false, Ordering::SeqCst) {
                open.forget();
                self.forsaken.lift_returned();
            }
            let mut records: Vec<&Record> = taken.iter().flat_map(|t| t.records.iter()).collect();
            if !self.forsaken.is_empty() {
                let before = records.len();
                records.retain(|r| r.thing().is_none_or(|thing| !self.forsaken.skips(thing)));
                self.metrics
                    .records_forsaken(SinkName::Nats, (before - records.len()) as u64);
            }
            let dweets = records
                .iter()
                .filter(|r| matches!(r, Record::Dweet(_)))
                .count();
            let started = std::time::Instant::now();
            let published = tokio::select! {
                _ = self.give_up.cancelled() => None,
                published = open.publish(&records) => Some(published),
            };
            if published.is_some() {
                self.metrics
                    .sink_write_duration(SinkName::Nats)
                    .observe(started.elapsed().as_secs_f64());
            }
            match published {
                Some(Ok(skipped)) => {
                    self.metrics.duplicates_dropped.inc_by(skipped as u64);
                    self.metrics.rows_written(
                        SinkName::Nats,
                        Table::Dweets,
                        (dweets - skipped) as u64,
                    );
                    taken.into_iter().for_each(|t| self.backlog.done(t));
                    self.health.set_sink_problem(SinkName::Nats, None);
                    backoff.reset();
                }
                Some(Err(error)) => {
                    // What was acknowledged stays known: asking the stream again would skip
                    // a refused message below a later one it took.
                    self.backlog.give_back(taken);
                    if self.failed(&error, &mut backoff).await {
                        return;
                    }
                }
                None => {
                    // Acknowledged ones are skipped when the rest replays.
                    self.backlog.give_back(taken);
                    self.backlog.spill_memory();
                    return;
                }
            }
        }
    }

    /// Reports `error`, spools what waits, and backs off. Returns true when giving up.
    async fn failed(&self, error: &NatsError, backoff: &mut Backoff) -> bool {
        self.metrics.sink_error(SinkName::Nats);
        self.backlog.spill_memory();
        let (memory, spooled, _) = self.backlog.pending();
        tracing::warn!(%error, memory, spooled, "the JetStream output cannot publish; its records wait in its backlog");
        self.health.set_sink_problem(
            SinkName::Nats,
            Some(format!(
                "cannot publish ({error}); {memory} records wait in memory and {spooled} bytes in the spool"
            )),
        );
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::select! {
            _ = self.give_up.cancelled() => true,
            _ = self.backlog.closed() => {
                // Shutting down while NATS is away: the spool keeps its share.
                self.backlog.spill_memory();
                true
            }
            _ = self.beat.pause_beating(delay) => false,
        }
    }
}
