//! A sink's queue: what the fan-out handed it and it has not yet made durable. Batches wait in
//! memory up to a bound, then in a spool on disk (fsynced before `push` returns), so a slow or
//! failing destination never stalls ingestion or another sink, and loses nothing accepted.
//!
//! Order is kept per sink, which the sinks' watermarks rely on: [`Backlog::next`] hands out
//! batches oldest first whether they wait in memory or on disk. A spool segment is deleted only
//! after the sink said its records are durable ([`Backlog::done`]), so a crash replays it.
//!
//! The one hazard of a memory-then-disk queue is a crash while an older batch is held in
//! memory by the sink (being written, or waiting for its Parquet generation to seal) and newer
//! ones are already on disk: the restart would replay the newer ones and the sink's watermark
//! would pass the lost older ones for good. So whenever anything goes to disk, every batch the
//! sink still holds from memory is copied there first ("shadowed"); the copy is skipped while
//! this process runs and replayed only after a crash.
//!
//! When the spool cannot take a batch (full, or its disk failing), the batch is dropped,
//! counted and logged, and so is every later record of the same things in this run: the
//! sink's watermark then stays below the gap, and the next start's backfill refills it from the
//! source when the source still has it.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::dir_lock::DirLock;
use super::spool;
use super::{SinkError, Watermarks};
use crate::record::Record;
use crate::telemetry::{Health, Metrics, SinkName};

/// The most dweets of a thing the source keeps (dweet.io: 500): what one backfill can bring.
pub const SOURCE_KEEPS: usize = 500;
/// A segment is closed for appends past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".spool";
/// A segment an earlier run could not read, set aside under this suffix; each start tries it
/// again (a newer build reads a newer format).
const SET_ASIDE_SUFFIX: &str = ".unreadable";

/// A batch of records in a sink's queue.
pub type Batch = Arc<Vec<Record>>;

#[derive(Debug)]
struct Segment {
    /// Order in this process (on disk, the file name's number gives the order).
    seq: u64,
    path: PathBuf,
    bytes: u64,
    /// Record ranges that copy batches held in memory: skipped unless the process restarted.
    skip: Vec<Range<usize>>,
    /// The things it holds, each with its oldest `created`, when this run wrote it: what is
    /// lost if it cannot be read back. Empty for an earlier run's segment (the start's
    /// backfill, from below anything spooled, covers those).
    things: HashMap<String, i64>,
}

struct Queued {
    /// Order in this process, and the batch's identity while the sink holds it.
    seq: u64,
    records: Batch,
    /// A copy is in a spool segment already.
    shadowed: bool,
}

/// The memory batches a sink holds, oldest first, each with whether a spool segment also
/// holds it (shadowed), and the records of those that only memory holds. A live sink takes
/// thousands of one-dweet batches at a time and finishes them in order: both the finish and
/// the count stay O(1) there.
#[derive(Default)]
struct InFlight {
    batches: VecDeque<(u64, Batch, bool)>,
    unshadowed_records: usize,
}

impl InFlight {
    fn push(&mut self, seq: u64, batch: Batch, shadowed: bool) {
        if !shadowed {
            self.unshadowed_records += batch.len();
        }
        self.batches.push_back((seq, batch, shadowed));
    }

    /// Takes batch `seq` out; returns whether it was shadowed.
    fn remove(&mut self, seq: u64) -> Option<bool> {
        let at = match self.batches.front() {
            Some((first, _, _)) if *first == seq => 0,
            _ => self.batches.iter().position(|(held, _, _)| *held == seq)?,
        };
        let (_, batch, shadowed) = self.batches.remove(at)?;
        if !shadowed {
            self.unshadowed_records -= batch.len();
        }
        Some(shadowed)
    }

    /// Marks every batch held as also on disk.
    fn shadow_all(&mut self) {
        for entry in self.batches.iter_mut() {
            entry.2 = true;
        }
        self.unshadowed_records = 0;
    }

    /// The batches only memory holds.
    fn unshadowed(&self) -> impl Iterator<Item = &Batch> {
        self.batches
            .iter()
            .filter(|(_, _, shadowed)| !shadowed)
            .map(|(_, batch, _)| batch)
    }
}

#[derive(Default)]
struct State {
    memory: VecDeque<Queued>,
    memory_records: usize,
    /// Oldest first; the last one may still be open for appends.
    segments: VecDeque<Segment>,
    appending: Option<File>,
    /// Memory batches the sink holds (taken, not yet done or given back).
    in_flight: InFlight,
    spool_bytes: u64,
    next_segment: u64,
    next_seq: u64,
    /// Things whose records were dropped in this run, so later ones are dropped too, each
    /// with the oldest `created` dropped (what a refill must reach back to; `i64::MAX` while
    /// only records without a `created` were).
    lost: HashMap<String, i64>,
    closed: bool,
    /// In a cluster: the newest `created` per thing made durable in this run, so a member
    /// hands a thing over only once its sinks hold everything it emitted.
    durable: Option<Watermarks>,
}

/// A batch taken by the sink; hand it back to [`Backlog::done`] once durable, or to
/// [`Backlog::give_back`] if it could not be made durable.
pub struct Taken {
    pub records: Batch,
    origin: Origin,
}

enum Origin {
    Memory { seq: u64 },
    Segment(Segment),
}

pub struct Backlog {
    state: Mutex<State>,
    ready: Notify,
    dir: PathBuf,
    sink: SinkName,
    memory_max_records: usize,
    spool_max_bytes: u64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    _lock: DirLock,
}

/// A sink's buffer settings, the same three keys in every sink's section: how many records
/// wait in memory, then where and how much on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BacklogConfig {
    pub memory_max_rows: usize,
    pub spool_dir: PathBuf,
    pub spool_max: u64,
}

/// `memory_max_rows` when a section does not set it.
pub fn default_memory_max_rows() -> usize {
    100_000
}

/// `spool_max` when a section does not set it: 1 GiB.
pub fn default_spool_max() -> u64 {
    1 << 30
}

fn segment_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?.strip_prefix(SEGMENT_PREFIX)?;
    name.strip_suffix(SEGMENT_SUFFIX)
        .or_else(|| name.strip_suffix(SET_ASIDE_SUFFIX))?
        .parse()
        .ok()
}

impl Backlog {
    /// Opens the backlog a sink's section describes (see [`Backlog::open`]).
    pub fn open_configured(
        config: &BacklogConfig,
        sink: SinkName,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, SinkError> {
        Self::open(
            &config.spool_dir,
            sink,
            config.memory_max_rows,
            config.spool_max,
            metrics,
            health,
        )
    }

    /// Locks `dir` for this process and opens its spool; segments left by an earlier run come
    /// first.
    pub fn open(
        dir: &Path,
        sink: SinkName,
        memory_max_records: usize,
        spool_max_bytes: u64,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, SinkError> {
        let lock = DirLock::acquire(dir)?;
        let mut found: Vec<(u64, PathBuf, u64)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| SinkError::io(dir, e))? {
            let path = entry.map_err(|e| SinkError::io(dir, e))?.path();
            if let Some(number) = segment_number(&path) {
                let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                found.push((number, path, bytes));
            }
        }
        found.sort_by_key(|(number, _, _)| *number);
        let mut state = State {
            next_segment: found.last().map_or(1, |(number, _, _)| number + 1),
            spool_bytes: found.iter().map(|(_, _, bytes)| bytes).sum(),
            ..State::default()
        };
        for (_, path, bytes) in found {
            let seq = state.take_seq();
            state.segments.push_back(Segment {
                seq,
                path,
                bytes,
                skip: Vec::new(),
                things: HashMap::new(),
            });
        }
        if !state.segments.is_empty() {
            tracing::info!(
                sink = sink.as_str(),
                segments = state.segments.len(),
                bytes = state.spool_bytes,
                "spool from an earlier run will be replayed"
            );
        }
        let backlog = Backlog {
            state: Mutex::new(state),
            ready: Notify::new(),
            dir: dir.to_path_buf(),
            sink,
            memory_max_records,
            spool_max_bytes,
            metrics,
            health,
            _lock: lock,
        };
        backlog.publish(&backlog.lock());
        Ok(backlog)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What waits, for the metrics: records in memory (queued or held by the sink, not yet
    /// durable) and bytes on disk.
    fn publish(&self, state: &State) {
        self.metrics.set_spool_bytes(self.sink, state.spool_bytes);
        self.metrics.set_sink_buffer(
            self.sink,
            state.memory_records + state.in_flight.unshadowed_records,
        );
    }

    /// Bytes on disk in the spool now.
    pub fn spool_bytes(&self) -> u64 {
        self.lock().spool_bytes
    }

    /// Records and spool bytes waiting, and whether anything was dropped in this run.
    pub fn pending(&self) -> (usize, u64, bool) {
        let state = self.lock();
        (
            state.memory_records,
            state.spool_bytes,
            !state.lost.is_empty(),
        )
    }

    /// Queues a batch: in memory while there is room and nothing is on disk, else on disk
    /// (written and fsynced before this returns).
    pub fn push(&self, batch: Batch) {
        let mut state = self.lock();
        let batch = self.past_a_hole_dropped(&state, batch);
        if batch.is_empty() {
            return;
        }
        if state.segments.is_empty()
            && state.memory_records + batch.len() <= self.memory_max_records
        {
            state.memory_records += batch.len();
            let seq = state.take_seq();
            state.memory.push_back(Queued {
                seq,
                records: batch,
                shadowed: false,
            });
        } else {
            let written = self
                .persist_memory(&mut state)
                .and_then(|()| self.append(&mut state, &batch));
            if let Err(error) = written {
                self.drop_batch(&mut state, &batch, &error);
            }
        }
        self.publish(&state);
        drop(state);
        self.ready.notify_one();
    }

    fn drop_batch(&self, state: &mut State, batch: &[Record], error: &str) {
        self.metrics.spool_dropped(self.sink, batch.len() as u64);
        note_oldest(&mut state.lost, batch);
        self.health.set_sink_loss(
            self.sink,
            Some(format!(
                "its spool cannot take records ({error}); {} thing(s) lose records until the sink catches up and they are backfilled again",
                state.lost.len()
            )),
        );
        tracing::error!(
            sink = self.sink.as_str(),
            %error,
            records = batch.len(),
            "the sink is behind and its spool cannot take more: these records, and later ones of the same things, are dropped for this sink until it catches up; then these things are backfilled again from the source, which refills what it still keeps"
        );
    }

    /// Moves to disk what only memory holds: the batches the sink holds (as copies, skipped in
    /// this run) and the queued ones, oldest first, in one new segment at the end.
    fn persist_memory(&self, state: &mut State) -> Result<(), String> {
        let held: Vec<Batch> = state.in_flight.unshadowed().map(Arc::clone).collect();
        let queued_unshadowed = state.memory.iter().any(|q| !q.shadowed);
        if held.is_empty() && !queued_unshadowed {
            return Ok(());
        }
        let mut text = spool::header().to_vec();
        let mut skip = Vec::new();
        let mut at = 0;
        for batch in &held {
            spool::encode(batch, &mut text);
            skip.push(at..at + batch.len());
            at += batch.len();
        }
        let mut things = HashMap::new();
        for batch in &held {
            note_oldest(&mut things, batch);
        }
        for queued in state.memory.iter().filter(|q| !q.shadowed) {
            spool::encode(&queued.records, &mut text);
            note_oldest(&mut things, &queued.records);
        }
        self.check_room(state, text.len() as u64)?;
        let number = state.next_segment;
        state.next_segment += 1;
        let (mut file, path) = self.create_segment(number)?;
        file.write_all(&text)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        state.in_flight.shadow_all();
        let kept: VecDeque<Queued> = state.memory.drain(..).filter(|q| q.shadowed).collect();
        state.memory_records = kept.iter().map(|q| q.records.len()).sum();
        state.memory = kept;
        let seq = state.take_seq();
        state.segments.push_back(Segment {
            seq,
            path,
            bytes: text.len() as u64,
            skip,
            things,
        });
        state.appending = Some(file);
        state.spool_bytes += text.len() as u64;
        Ok(())
    }

    /// Appends `batch` to the open segment, or a new one.
    fn append(&self, state: &mut State, batch: &[Record]) -> Result<(), String> {
        let reuse = state.appending.is_some()
            && state
                .segments
                .back()
                .is_some_and(|s| s.bytes < SEGMENT_BYTES);
        let mut text = Vec::new();
        if !reuse {
            text.extend_from_slice(&spool::header());
        }
        spool::encode(batch, &mut text);
        self.check_room(state, text.len() as u64)?;
        if !reuse {
            let number = state.next_segment;
            state.next_segment += 1;
            let (file, path) = self.create_segment(number)?;
            let seq = state.take_seq();
            state.appending = Some(file);
            state.segments.push_back(Segment {
                seq,
                path,
                bytes: 0,
                skip: Vec::new(),
                things: HashMap::new(),
            });
        }
        let file = state.appending.as_mut().ok_or("no open segment")?;
        if let Err(error) = file.write_all(&text).and_then(|()| file.sync_data()) {
            // What was appended may be torn; a new segment starts clean.
            state.appending = None;
            return Err(error.to_string());
        }
        if let Some(segment) = state.segments.back_mut() {
            segment.bytes += text.len() as u64;
            note_oldest(&mut segment.things, batch);
        }
        state.spool_bytes += text.len() as u64;
        Ok(())
    }

    fn check_room(&self, state: &State, size: u64) -> Result<(), String> {
        if state.spool_bytes + size > self.spool_max_bytes {
            return Err(format!(
                "the spool is full ({} of {} bytes)",
                state.spool_bytes, self.spool_max_bytes
            ));
        }
        Ok(())
    }

    /// Creates segment `number`'s file, and makes its name durable.
    fn create_segment(&self, number: u64) -> Result<(File, PathBuf), String> {
        let path = self
            .dir
            .join(format!("{SEGMENT_PREFIX}{number:020}{SEGMENT_SUFFIX}"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        Ok((file, path))
    }

    /// The oldest queued batch; waits for one. `None` once closed and empty.
    pub async fn next(&self) -> Option<Taken> {
        loop {
            let notified = self.ready.notified();
            if let Some(taken) = self.try_take() {
                return Some(taken);
            }
            {
                let state = self.lock();
                if state.closed && state.memory.is_empty() && state.segments.is_empty() {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// After records were dropped, once everything queued drained and the sink reports no
    /// trouble: forgets that some of the things lost records (theirs are taken again) and
    /// returns them, for the worker to backfill them from the source. As many as a backfill of
    /// each (at most [`SOURCE_KEEPS`] dweets) fits in memory, so the refill does not overflow
    /// again; the rest at later calls. Empty otherwise. Each with the oldest `created` it
    /// dropped, when a dropped record had one.
    pub fn heal(&self) -> Vec<(String, Option<i64>)> {
        let mut state = self.lock();
        if state.lost.is_empty()
            || !state.segments.is_empty()
            || !state.memory.is_empty()
            || self.health.sink_has_problem(self.sink)
        {
            return Vec::new();
        }
        let at_once = (self.memory_max_records / SOURCE_KEEPS).max(1);
        let healed: Vec<(String, Option<i64>)> = state
            .lost
            .iter()
            .take(at_once)
            .map(|(thing, oldest)| (thing.clone(), (*oldest != i64::MAX).then_some(*oldest)))
            .collect();
        for (thing, _) in &healed {
            state.lost.remove(thing);
        }
        let still_lost = state.lost.len();
        drop(state);
        if still_lost == 0 {
            self.health.set_sink_loss(self.sink, None);
        }
        tracing::info!(
            sink = self.sink.as_str(),
            things = healed.len(),
            "the sink caught up after dropping records; the things it dropped are backfilled again from the source"
        );
        healed
    }

    /// `first` and the batches queued after it now, until they hold `max_records` records.
    pub fn take_more(&self, first: Taken, max_records: usize) -> Vec<Taken> {
        let mut records = first.records.len();
        let mut taken = vec![first];
        while records < max_records {
            match self.try_take() {
                Some(more) => {
                    records += more.records.len();
                    taken.push(more);
                }
                None => break,
            }
        }
        taken
    }

    /// The oldest queued batch if there is one now.
    pub fn try_take(&self) -> Option<Taken> {
        loop {
            let mut state = self.lock();
            let memory_first = match (state.memory.front(), state.segments.front()) {
                (Some(queued), Some(segment)) => queued.seq < segment.seq,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if memory_first {
                let queued = state.memory.pop_front()?;
                state.memory_records -= queued.records.len();
                let records = self.past_a_hole_dropped(&state, queued.records);
                state
                    .in_flight
                    .push(queued.seq, Arc::clone(&records), queued.shadowed);
                self.publish(&state);
                return Some(Taken {
                    records,
                    origin: Origin::Memory { seq: queued.seq },
                });
            }
            let segment = state.segments.pop_front()?;
            if state.segments.is_empty() {
                // It was the one open for appends: newer batches start a new segment.
                state.appending = None;
            }
            drop(state);
            match self.read_segment(&segment) {
                Ok((records, damaged)) => {
                    let mut state = self.lock();
                    if damaged {
                        self.lose_segment(&mut state, &segment, "a damaged spool record");
                    }
                    let records = self.past_a_hole_dropped(&state, Arc::new(records));
                    return Some(Taken {
                        records,
                        origin: Origin::Segment(segment),
                    });
                }
                Err(error) => {
                    let aside = segment.path.with_extension(&SET_ASIDE_SUFFIX[1..]);
                    self.metrics.spool_unreadable(self.sink);
                    tracing::error!(sink = self.sink.as_str(), path = %segment.path.display(), %error, set_aside = %aside.display(), "an unreadable spool segment is set aside and tried again at the next start (a newer build may read it); the things it held are backfilled again from the source once the sink catches up");
                    let _ = fs::rename(&segment.path, &aside);
                    let mut state = self.lock();
                    state.spool_bytes = state.spool_bytes.saturating_sub(segment.bytes);
                    self.lose_segment(&mut state, &segment, "an unreadable spool segment");
                    self.publish(&state);
                }
            }
        }
    }

    /// The things of a segment this run wrote and could not read back whole are lost, as if
    /// the spool had dropped them: their records from the segment's oldest on are dropped
    /// until the sink catches up, then the things are backfilled again ([`Backlog::heal`]).
    fn lose_segment(&self, state: &mut State, segment: &Segment, what: &str) {
        if segment.things.is_empty() {
            return;
        }
        for (thing, oldest) in &segment.things {
            let lost = state.lost.entry(thing.clone()).or_insert(*oldest);
            *lost = (*lost).min(*oldest);
        }
        self.health.set_sink_loss(
            self.sink,
            Some(format!(
                "{what} cost records; {} thing(s) are backfilled again once the sink catches up",
                state.lost.len()
            )),
        );
    }

    /// `batch` less the records of lost things from their oldest lost `created` on: those
    /// would carry the thing's mark past the hole. Applied when a batch is pushed and when it
    /// is taken (records queued behind a segment found damaged).
    fn past_a_hole_dropped(&self, state: &State, batch: Batch) -> Batch {
        let past_a_hole = |r: &Record| match (r.thing(), r.created_ms()) {
            (Some(thing), Some(created)) => {
                state.lost.get(thing).is_some_and(|from| created >= *from)
            }
            _ => false,
        };
        if state.lost.is_empty() || !batch.iter().any(past_a_hole) {
            return batch;
        }
        let kept: Vec<Record> = batch.iter().filter(|r| !past_a_hole(r)).cloned().collect();
        self.metrics
            .spool_dropped(self.sink, (batch.len() - kept.len()) as u64);
        Arc::new(kept)
    }

    /// The segment's records, less the copies this run skips, and whether some were damaged;
    /// damage is counted and logged.
    fn read_segment(&self, segment: &Segment) -> Result<(Vec<Record>, bool), String> {
        let bytes = fs::read(&segment.path).map_err(|e| e.to_string())?;
        let decoded = spool::decode(&bytes).map_err(|e| e.to_string())?;
        for damage in &decoded.damaged {
            tracing::error!(
                sink = self.sink.as_str(),
                segment = %segment.path.display(),
                offset = damage.offset,
                reason = %damage.reason,
                "a damaged spool record is skipped; the records after it are replayed"
            );
        }
        if !decoded.damaged.is_empty() {
            self.metrics
                .spool_corrupt(self.sink, decoded.damaged.len() as u64);
        }
        let damaged = !decoded.damaged.is_empty();
        if segment.skip.is_empty() {
            return Ok((decoded.records, damaged));
        }
        let records = decoded
            .records
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !segment.skip.iter().any(|range| range.contains(i)))
            .map(|(_, record)| record)
            .collect();
        Ok((records, damaged))
    }

    /// Keeps, from now on, the newest durable `created` per thing (see [`Backlog::durable`]).
    pub fn track_durable(&self) {
        self.lock().durable.get_or_insert_with(Watermarks::new);
    }

    /// The newest `created` of `thing` made durable in this run, when tracked.
    pub fn durable(&self, thing: &str) -> Option<i64> {
        self.lock().durable.as_ref()?.get(thing)
    }

    /// Forgets a batch the sink made durable (deleting its segment).
    pub fn done(&self, taken: Taken) {
        let mut state = self.lock();
        if let Some(durable) = state.durable.as_mut() {
            for record in taken.records.iter() {
                if let (Some(thing), Some(created)) = (record.thing(), record.created_ms()) {
                    durable.raise(thing, created);
                }
            }
        }
        match taken.origin {
            Origin::Memory { seq } => {
                state.in_flight.remove(seq);
            }
            Origin::Segment(segment) => {
                let _ = fs::remove_file(&segment.path);
                state.spool_bytes = state.spool_bytes.saturating_sub(segment.bytes);
            }
        }
        self.publish(&state);
    }

    /// Puts batches the sink could not make durable back in front, in their order.
    pub fn give_back(&self, taken: Vec<Taken>) {
        let mut state = self.lock();
        for batch in taken.into_iter().rev() {
            match batch.origin {
                Origin::Memory { seq } => {
                    let shadowed = state.in_flight.remove(seq).unwrap_or(false);
                    state.memory_records += batch.records.len();
                    state.memory.push_front(Queued {
                        seq,
                        records: batch.records,
                        shadowed,
                    });
                }
                Origin::Segment(segment) => state.segments.push_front(segment),
            }
        }
        self.publish(&state);
        drop(state);
        self.ready.notify_one();
    }

    /// Moves whatever only memory holds to the spool: when the sink's destination fails, and
    /// at shutdown.
    pub fn spill_memory(&self) {
        let mut state = self.lock();
        if let Err(error) = self.persist_memory(&mut state) {
            tracing::warn!(sink = self.sink.as_str(), %error, records = state.memory_records, "could not move the in-memory backlog to the spool; it stays in memory");
        }
        self.publish(&state);
    }

    /// Resolves once the backlog is closed (nothing more will be pushed).
    pub async fn closed(&self) {
        loop {
            let notified = self.ready.notified();
            if self.lock().closed {
                return;
            }
            notified.await;
        }
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_waiters();
        self.ready.notify_one();
    }
}

/// Adds each thing of `records` to `things` with its oldest `created` (`i64::MAX` while it has
/// only records without one).
fn note_oldest(things: &mut HashMap<String, i64>, records: &[Record]) {
    for record in records {
        if let Some(thing) = record.thing() {
            let oldest = match things.get_mut(thing) {
                Some(oldest) => oldest,
                None => things.entry(thing.to_owned()).or_insert(i64::MAX),
            };
            *oldest = (*oldest).min(record.created_ms().unwrap_or(i64::MAX));
        }
    }
}

impl State {
    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn batch(thing: &str, from: i64, count: i64) -> Batch {
        Arc::new(
            (from..from + count)
                .map(|created_ms| crate::record::test_dweet(thing, created_ms, &[("v", 1.0)]))
                .collect(),
        )
    }

    #[test]
    fn held_batches_finish_in_any_order_and_only_unshadowed_ones_count() {
        let mut held = InFlight::default();
        held.push(1, batch("a", 0, 3), false);
        held.push(2, batch("b", 0, 5), true);
        held.push(3, batch("c", 0, 7), false);
        assert_eq!(held.unshadowed_records, 10);
        assert_eq!(held.remove(3), Some(false), "out of order");
        assert_eq!(held.unshadowed_records, 3);
        assert_eq!(held.remove(3), None, "once only");
        assert_eq!(held.remove(2), Some(true));
        assert_eq!(held.unshadowed_records, 3, "a shadowed batch never counted");
        held.push(4, batch("d", 0, 2), false);
        held.shadow_all();
        assert_eq!(held.unshadowed_records, 0);
        assert_eq!(held.unshadowed().count(), 0);
        assert_eq!(held.remove(1), Some(true));
        assert_eq!(held.remove(4), Some(true));
        assert!(held.batches.is_empty());
    }

    fn open(dir: &Path, memory: usize, spool: u64, metrics: &Arc<Metrics>) -> Backlog {
        let health = Arc::new(Health::new(Duration::ZERO, Duration::from_secs(30)));
        Backlog::open(
            dir,
            SinkName::Postgres,
            memory,
            spool,
            Arc::clone(metrics),
            health,
        )
        .unwrap()
    }

    /// Takes everything to the end (the backlog must be closed), as a sink would.
    async fn replay_all(backlog: &Backlog) -> Vec<i64> {
        let mut seen = Vec::new();
        while let Some(taken) = backlog.next().await {
            seen.extend(created(&taken));
            backlog.done(taken);
        }
        seen
    }

    fn created(taken: &Taken) -> Vec<i64> {
        taken
            .records
            .iter()
            .filter_map(Record::created_ms)
            .collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| segment_number(p).is_some())
            .collect();
        found.sort();
        found
    }

    fn spooled(metrics: &Metrics) -> f64 {
        metrics.value("dweetpipe_spool_bytes", &[("sink", "postgres")])
    }

    #[tokio::test]
    async fn spills_past_the_memory_bound_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let backlog = open(dir.path(), 3, 1 << 20, &metrics);
        backlog.push(batch("a", 0, 2));
        backlog.push(batch("a", 2, 2)); // over the bound: memory and this go to disk
        backlog.push(batch("a", 4, 1)); // something is on disk: disk too
        assert!(spooled(&metrics) > 0.0);
        backlog.close();
        assert_eq!(replay_all(&backlog).await, vec![0, 1, 2, 3, 4]);
        assert_eq!(spooled(&metrics), 0.0);
        assert!(
            segments(dir.path()).is_empty(),
            "durable segments are deleted"
        );
    }

    #[tokio::test]
    async fn a_batch_held_by_the_sink_is_on_disk_before_anything_newer() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        {
            let backlog = open(dir.path(), 2, 1 << 20, &metrics);
            backlog.push(batch("a", 0, 2));
            let held = backlog.try_take().unwrap(); // the sink is writing 0, 1
            backlog.push(batch("a", 2, 2)); // memory is free again: memory
            backlog.push(batch("a", 4, 2)); // over: 0..4 go to disk before 4, 5
            // In this run the copies are skipped: the sink still holds 0, 1 and takes 2.. next.
            let next = backlog.try_take().unwrap();
            assert_eq!(created(&next), vec![2, 3, 4, 5]);
            drop((held, next)); // a crash: nothing done
        }
        let backlog = open(dir.path(), 2, 1 << 20, &metrics);
        backlog.close();
        assert_eq!(
            replay_all(&backlog).await,
            vec![0, 1, 2, 3, 4, 5],
            "after a crash everything replays, oldest first"
        );
    }

    #[tokio::test]
    async fn given_back_batches_come_out_again_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let backlog = open(dir.path(), 2, 1 << 20, &metrics);
        backlog.push(batch("a", 0, 2)); // memory
        backlog.push(batch("a", 2, 2)); // disk (with 0, 1)
        backlog.push(batch("a", 4, 2)); // disk
        let first = backlog.try_take().unwrap();
        let second = backlog.try_take();
        backlog.give_back(std::iter::once(first).chain(second).collect());
        backlog.spill_memory();
        backlog.close();
        assert_eq!(replay_all(&backlog).await, vec![0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn memory_spilled_at_shutdown_replays_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        {
            let backlog = open(dir.path(), 10, 1 << 20, &metrics);
            backlog.push(batch("a", 0, 2));
            let held = backlog.try_take().unwrap();
            backlog.push(batch("a", 2, 2));
            backlog.give_back(vec![held]);
            backlog.spill_memory();
        }
        let backlog = open(dir.path(), 10, 1 << 20, &metrics);
        backlog.close();
        assert_eq!(replay_all(&backlog).await, vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn a_full_spool_counts_its_loss_and_drops_the_things_later_records_too() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let backlog = open(dir.path(), 0, 400, &metrics);
        backlog.push(batch("a", 0, 2));
        backlog.push(batch("a", 2, 50)); // too big for 400 bytes: dropped and counted
        backlog.push(batch("a", 52, 1)); // after a gap: dropped, so no watermark passes it
        backlog.push(batch("b", 0, 1)); // another thing is unaffected
        // A dead letter without a `created`, too big: dropped, but it has no place to refill.
        backlog.push(Arc::new(vec![Record::DeadLetter(
            crate::record::DeadLetter {
                thing: Some("c".to_owned()),
                created: None,
                created_ms: None,
                received_ms: 1,
                payload: "x".repeat(1000),
                reason: "not a dweet".to_owned(),
            },
        )]));
        let dropped = metrics.value(
            "dweetpipe_spool_dropped_records_total",
            &[("sink", "postgres")],
        );
        assert_eq!(dropped, 52.0);
        let said = backlog.health.readiness().unwrap_err();
        assert!(
            said.starts_with("postgres: its spool cannot take records"),
            "{said}"
        );
        backlog.close();
        assert_eq!(replay_all(&backlog).await, vec![0, 1, 0]);
        // Drained: each thing that lost records comes back with the oldest `created` lost,
        // one a call here (no memory for a refill beside it).
        let mut healed = backlog.heal();
        healed.extend(backlog.heal());
        healed.sort();
        assert_eq!(
            healed,
            vec![("a".to_owned(), Some(2)), ("c".to_owned(), None)]
        );
        assert!(backlog.heal().is_empty());
    }

    #[tokio::test]
    async fn a_segment_damaged_while_running_loses_its_things_until_they_are_backfilled() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        // No memory: every batch goes to the one segment this run writes.
        let backlog = open(dir.path(), 0, 1 << 20, &metrics);
        backlog.push(batch("a", 10, 3));
        backlog.push(batch("b", 20, 1));
        backlog.push(batch("c", 30, 1));
        let segment = &segments(dir.path())[0];
        let mut bytes = fs::read(segment).unwrap();
        // Inside a's second record: damage on disk after the write.
        let second = spool::HEADER_LEN + (bytes.len() - spool::HEADER_LEN) / 5 + 20;
        bytes[second] ^= 0xff;
        fs::write(segment, bytes).unwrap();

        // Every record the segment held of its things, from their oldest on, is dropped: what
        // survived of a would carry its mark past the hole.
        let taken = backlog.try_take().expect("the segment");
        assert_eq!(created(&taken), Vec::<i64>::new());
        backlog.done(taken);
        let said = backlog.health.readiness().unwrap_err();
        assert!(
            said.contains("a damaged spool record cost records"),
            "{said}"
        );
        backlog.push(batch("a", 13, 1)); // later: dropped too, the hole stays before the mark
        backlog.push(batch("d", 0, 1)); // a thing the segment did not hold is unaffected
        backlog.close();
        assert_eq!(replay_all(&backlog).await, vec![0]);

        // Drained: the three things come back to be backfilled from their oldest record.
        let mut healed = Vec::new();
        for _ in 0..3 {
            healed.extend(backlog.heal());
        }
        healed.sort();
        let expected = [("a", 10), ("b", 20), ("c", 30)].map(|(t, c)| (t.to_owned(), Some(c)));
        assert_eq!(healed, expected);
        assert!(backlog.health.readiness().is_ok());
    }

    #[tokio::test]
    async fn a_damaged_record_is_skipped_and_counted_and_the_rest_replays() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        {
            let backlog = open(dir.path(), 0, 1 << 20, &metrics);
            backlog.push(batch("a", 0, 10));
        }
        let segment = &segments(dir.path())[0];
        let mut bytes = fs::read(segment).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        fs::write(segment, bytes).unwrap();

        let backlog = open(dir.path(), 0, 1 << 20, &metrics);
        backlog.close();
        let replayed = replay_all(&backlog).await;
        assert_eq!(replayed.len(), 9, "{replayed:?}");
        assert_eq!(
            metrics.value(
                "dweetpipe_spool_corrupt_records_total",
                &[("sink", "postgres")]
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn an_unreadable_segment_is_set_aside_and_frees_its_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        fs::write(
            dir.path()
                .join(format!("{SEGMENT_PREFIX}{:020}{SEGMENT_SUFFIX}", 7)),
            vec![b'x'; 300],
        )
        .unwrap();
        let backlog = open(dir.path(), 0, 400, &metrics);
        assert_eq!(backlog.spool_bytes(), 300);
        assert!(backlog.try_take().is_none());
        assert_eq!(backlog.spool_bytes(), 0, "capacity is not lost for good");
        backlog.push(batch("a", 0, 2));
        assert!(
            backlog.spool_bytes() > 0,
            "and the spool takes records again"
        );
        assert!(
            dir.path()
                .join(format!("{SEGMENT_PREFIX}{:020}.unreadable", 7))
                .exists()
        );
        assert_eq!(
            metrics.value(
                "dweetpipe_spool_unreadable_segments_total",
                &[("sink", "postgres")]
            ),
            1.0,
            "an unreadable segment is counted"
        );
    }

    #[tokio::test]
    async fn a_segment_set_aside_is_drained_by_a_build_that_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        // What an older build set aside (a newer format, say) and this build reads.
        let mut bytes = spool::header().to_vec();
        spool::encode(&batch("a", 0, 2), &mut bytes);
        let aside = dir
            .path()
            .join(format!("{SEGMENT_PREFIX}{:020}.unreadable", 3));
        fs::write(&aside, &bytes).unwrap();
        let backlog = open(dir.path(), 0, 1 << 20, &metrics);
        let taken = backlog
            .try_take()
            .expect("the set-aside segment is replayed");
        assert_eq!(taken.records.len(), 2);
        backlog.done(taken);
        assert!(!aside.exists(), "and removed once durable");
    }
}
