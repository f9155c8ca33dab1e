//! One thing's subscription: subscribe, backfill the gap, stream, and reconnect, forever.
//!
//! Order is what makes restarts exact: the stream is opened first (so nothing sent from then
//! on is missed), then `get_dweets_for` fills the gap, then stream items are read. Each
//! thing's dweets therefore enter the pipeline oldest first, and "already seen" is simply
//! "not newer than the last one emitted": the watermark, shared across restarts of this task
//! and seeded from what the sinks made durable.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SourceConfig, SourceMode, ThingConfig};
use crate::backoff::Backoff;
use crate::client::{self, Client, ListenEvent, ListenOptions, TextDweet};
use crate::normalize::{self, Normalizer, ReadDweet};
use crate::record::{Record, now_ms};
use crate::telemetry::{ConnectOutcome, Disconnect, DweetSource, Health, Metrics};

/// No dweet emitted yet.
pub const NO_WATERMARK: i64 = i64::MIN;
/// The first wait after a rate-limited history read: the public service allowed one request
/// a second per thing, and the listen has just spent this second's.
const RATE_LIMITED_FIRST_WAIT: Duration = Duration::from_secs(1);
/// Past this wait the read gives up and the stream reconnects with its own backoff.
const RATE_LIMITED_MAX_WAIT: Duration = Duration::from_secs(32);

pub struct Subscription {
    pub thing: ThingConfig,
    pub client: Client,
    pub source: Arc<SourceConfig>,
    pub records: mpsc::Sender<Record>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The newest `created` (ms) emitted for this thing.
    pub watermark: Arc<AtomicI64>,
    pub cancel: CancellationToken,
    pub start_delay: Duration,
    /// This thing's normaliser: it shares sensor names from one dweet to the next.
    pub normalizer: Normalizer,
    /// Dweets of this thing without a usable `created`, already sent as dead letters.
    pub unplaced: Unplaced,
    /// A refill after a sink dropped records: the oldest `created` dropped. The first backfill
    /// says when the source no longer keeps that far back (those records are gone for good).
    pub refill_from: Option<i64>,
}

/// Dweets whose `created` is not a time, already sent as dead letters in this run. Having no
/// place below the watermark, they would otherwise come back as new dead letters with every
/// backfill and every poll. Bounded: past [`UNPLACED_KEPT`] the oldest are forgotten (and
/// would be sent once more), and a restart forgets them all (PostgreSQL's dead letters then
/// refuse the repeat by their natural key).
#[derive(Debug, Default)]
pub struct Unplaced {
    order: VecDeque<u64>,
    seen: HashSet<u64>,
}

/// Unplaceable dweets remembered per thing.
pub const UNPLACED_KEPT: usize = 1024;

impl Unplaced {
    /// Whether `dweet` (by its `created` text and content) is seen here for the first time.
    fn first_time(&mut self, dweet: &TextDweet) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        dweet.created().as_str().hash(&mut hasher);
        dweet.content().hash(&mut hasher);
        let key = hasher.finish();
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > UNPLACED_KEPT
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        true
    }
}

/// Why one connection (or poll loop) ended.
enum Ended {
    /// The server closed the stream (an idle close is normal).
    Closed,
    /// A transient failure: retry with backoff.
    Failed(client::Error),
    /// The server refused (locked, wrong key, unknown thing): retry slowly.
    Refused(client::Error),
    /// Cancelled, or the pipeline is gone.
    Stopped,
}

impl From<client::Error> for Ended {
    fn from(error: client::Error) -> Self {
        if error.is_transient() {
            Ended::Failed(error)
        } else {
            Ended::Refused(error)
        }
    }
}

impl Subscription {
    pub async fn run(mut self) {
        let thing = self.thing.name.clone();
        self.health.thing_down(&thing);
        if self.pause(self.start_delay).await.is_err() {
            return;
        }
        let mut backoff = Backoff::new(self.source.reconnect_min, self.source.reconnect_max);
        let mut last_problem = String::new();
        loop {
            let started = Instant::now();
            let ended = match self.source.mode {
                SourceMode::Stream => self.stream_once().await,
                SourceMode::Poll => self.poll_once().await,
            };
            self.health.thing_down(&thing);
            if started.elapsed() >= self.source.healthy_after {
                backoff.reset();
            }
            let delay = match ended {
                Ended::Stopped => {
                    self.metrics.stream_disconnected(Disconnect::Stopped);
                    return;
                }
                Ended::Closed => {
                    self.metrics.stream_disconnected(Disconnect::Closed);
                    tracing::debug!(%thing, "stream closed by the server; reconnecting");
                    backoff.next_delay(&mut rand::rng())
                }
                Ended::Failed(error) => {
                    self.metrics.stream_disconnected(Disconnect::Error);
                    report(&thing, &error, &mut last_problem, "will retry with backoff");
                    backoff.next_delay(&mut rand::rng())
                }
                Ended::Refused(error) => {
                    self.metrics.stream_disconnected(Disconnect::Error);
                    let retry = format!("will retry in {:?}", self.source.refused_retry);
                    report(&thing, &error, &mut last_problem, &retry);
                    self.source.refused_retry
                }
            };
            if self.pause(delay).await.is_err() {
                self.metrics.stream_disconnected(Disconnect::Stopped);
                return;
            }
        }
    }

    async fn pause(&self, delay: Duration) -> Result<(), ()> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(()),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }

    fn connected(&self, outcome: ConnectOutcome) {
        self.metrics.stream_connected(outcome);
        self.health.thing_attempted(&self.thing.name);
    }

    fn up(&self) {
        self.health.thing_up(&self.thing.name);
    }

    async fn stream_once(&mut self) -> Ended {
        let options = ListenOptions {
            idle_timeout: self.source.idle_timeout,
            ..ListenOptions::default()
        };
        // The stream reads a common dweet and its readings in one pass, by the shape of the
        // last frame where it fits, with names of its own (only equal names are shared);
        // serde_json reads any other line.
        let reader = normalize::StreamReader::default();
        let opened = tokio::select! {
            _ = self.cancel.cancelled() => return Ended::Stopped,
            opened = self.client.listen_for_dweets_read_by(&self.thing.name, self.thing.key.as_ref(), options, reader) => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream.events(),
            Err(error) => {
                let ended = Ended::from(error);
                self.connected(if matches!(ended, Ended::Refused(_)) {
                    ConnectOutcome::Refused
                } else {
                    ConnectOutcome::Failed
                });
                return ended;
            }
        };
        self.connected(ConnectOutcome::Ok);
        if let Err(ended) = self.fetch_history(DweetSource::Backfill).await {
            return ended;
        }
        self.up();
        loop {
            let item = tokio::select! {
                _ = self.cancel.cancelled() => return Ended::Stopped,
                item = stream.next() => item,
            };
            let sent = match item {
                None => return Ended::Closed,
                Some(Ok(ListenEvent::Dweet(dweet))) => self.emit(dweet, DweetSource::Stream).await,
                Some(Ok(ListenEvent::Skipped(line))) => {
                    self.metrics.decode_errors.inc();
                    self.metrics.dead_letters.inc();
                    let record = normalize::undecodable_line(
                        &self.thing.name,
                        line.excerpt,
                        line.reason.to_string(),
                        now_ms(),
                    );
                    self.records.send(record).await.is_ok()
                }
                Some(Err(error)) => return Ended::from(error),
            };
            if !sent {
                return Ended::Stopped;
            }
        }
    }

    async fn poll_once(&mut self) -> Ended {
        let mut first = true;
        loop {
            if let Err(ended) = self.fetch_history(DweetSource::Poll).await {
                if first {
                    self.connected(if matches!(ended, Ended::Refused(_)) {
                        ConnectOutcome::Refused
                    } else {
                        ConnectOutcome::Failed
                    });
                }
                return ended;
            }
            if first {
                self.connected(ConnectOutcome::Ok);
                self.up();
                first = false;
            }
            if self.pause(self.source.poll_interval).await.is_err() {
                return Ended::Stopped;
            }
        }
    }

    /// Emits, oldest first, whatever the server keeps that is newer than the watermark.
    async fn fetch_history(&mut self, source: DweetSource) -> Result<(), Ended> {
        // A rate-limited read is retried here, with the stream kept open: reconnecting would
        // spend the thing's next token on the listen, and the read would be refused again,
        // for ever (one request a second per thing, as dweet.io allowed).
        let mut wait = RATE_LIMITED_FIRST_WAIT;
        let fetched = loop {
            let fetched = tokio::select! {
                _ = self.cancel.cancelled() => return Err(Ended::Stopped),
                fetched = self.client.get_raw_dweets_for(&self.thing.name, self.thing.key.as_ref()) => fetched,
            };
            match fetched {
                Err(client::Error::RateLimited { .. }) if wait <= RATE_LIMITED_MAX_WAIT => {
                    let jitter = wait.mul_f64(rand::rng().random_range(0.0..0.5));
                    tracing::debug!(thing = %self.thing.name, ?wait, "history read rate-limited; retrying on the open stream");
                    if self.pause(wait + jitter).await.is_err() {
                        return Err(Ended::Stopped);
                    }
                    wait *= 2;
                }
                other => break other,
            }
        };
        let mut dweets = match fetched {
            Ok(dweets) => dweets,
            // A thing that has not dweeted yet (or whose history expired) has no gap to fill.
            Err(client::Error::NotFound { .. }) => Vec::new(),
            Err(error) => return Err(Ended::from(error)),
        };
        // Servers answer newest first; sort anyway rather than trust it.
        dweets.sort_by_key(|dweet| dweet.created.to_datetime());
        if let Some(dropped_from) = self.refill_from.take() {
            let kept_from = dweets.iter().find_map(|dweet| dweet.created.to_ms());
            if kept_from.is_none_or(|kept| kept > dropped_from) {
                self.metrics.refill_gaps.inc();
                tracing::error!(
                    thing = %self.thing.name,
                    dropped_from = %crate::record::ms_to_datetime(dropped_from),
                    source_keeps_from = ?kept_from.map(crate::record::ms_to_datetime),
                    "a sink dropped records the source no longer keeps: this thing's history has a gap there for good"
                );
            }
        }
        for dweet in dweets {
            if !self.emit(dweet, source).await {
                return Err(Ended::Stopped);
            }
        }
        Ok(())
    }

    /// Normalises and sends one dweet unless it is not newer than the watermark. Returns
    /// false when the pipeline is gone.
    async fn emit(&mut self, dweet: impl Into<ReadDweet>, source: DweetSource) -> bool {
        let read = dweet.into();
        let received_ms = now_ms();
        let created_ms = read.dweet.created().to_ms();
        if let Some(created_ms) = created_ms {
            if created_ms <= self.watermark.load(Ordering::Relaxed) {
                self.metrics.duplicates_dropped.inc();
                return true;
            }
            self.watermark.store(created_ms, Ordering::Relaxed);
            self.metrics.set_last_dweet(&self.thing.name, created_ms);
            if source != DweetSource::Backfill {
                let delay = (received_ms - created_ms).max(0) as f64 / 1000.0;
                self.metrics.ingest_delay.observe(delay);
            }
        } else if !self.unplaced.first_time(&read.dweet) {
            self.metrics.duplicates_dropped.inc();
            return true;
        }
        self.metrics.dweet_received(source);
        let record = read.normalize(&mut self.normalizer, created_ms, received_ms);
        if matches!(record, Record::DeadLetter(_)) {
            self.metrics.dead_letters.inc();
        }
        self.records.send(record).await.is_ok()
    }
}

/// Logs a problem at warn level when it changes, at debug level while it repeats, so a thing
/// that stays locked does not flood the log.
fn report(thing: &str, error: &client::Error, last: &mut String, retry: &str) {
    let text = error.to_string();
    let hint = match error {
        client::Error::Locked { .. } => " (the thing is locked: set key_env or key_file for it)",
        client::Error::WrongKey { .. } => " (the configured key does not open this thing)",
        client::Error::NotFound { .. } => " (check the thing name; names are case-sensitive)",
        client::Error::RateLimited { .. } => " (the server is rate limiting; backing off)",
        _ => "",
    };
    if *last == text {
        tracing::debug!(%thing, error = %text, "{retry}");
    } else {
        tracing::warn!(%thing, error = %text, "stream problem{hint}; {retry}");
        *last = text;
    }
}
