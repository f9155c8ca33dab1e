//! What PostgreSQL has not yet taken: batches in memory up to a bound, then a durable spool on
//! disk, so an outage never stalls ingestion (Parquet goes on) and loses nothing accepted.
//!
//! Order is kept per thing, which the sink's watermarks rely on: once anything is on disk,
//! every newer batch goes to disk too, and the writer takes memory first (older), then the
//! spool segments oldest first. A segment is deleted only after its rows are committed, so a
//! crash replays it (the watermarks make the replay harmless). When the spool reaches its
//! bound, further batches are dropped, counted and logged: never silently.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::normalize::Record;
use crate::sink::SinkError;
use crate::telemetry::{Health, Metrics};

/// A segment is closed for appends past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// A fresh spool numbers its segments from here up, leaving room below for segments that must
/// replay before everything on disk (memory spilled at shutdown).
const FIRST_SEGMENT: u64 = 1 << 32;

#[derive(Debug)]
struct Segment {
    number: u64,
    path: PathBuf,
    bytes: u64,
}

#[derive(Default)]
struct State {
    memory: VecDeque<Vec<Record>>,
    memory_records: usize,
    /// Oldest first; the last one may still be open for appends.
    segments: VecDeque<Segment>,
    appending: Option<File>,
    spool_bytes: u64,
    next_segment: u64,
    closed: bool,
}

/// A batch taken by the writer; hand it back to [`Backlog::done`] once committed.
pub struct Taken {
    pub records: Vec<Record>,
    segment: Option<Segment>,
}

pub struct Backlog {
    state: Mutex<State>,
    ready: Notify,
    dir: PathBuf,
    memory_max_records: usize,
    spool_max_bytes: u64,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
}

fn segment_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("segment-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

impl Backlog {
    /// Opens the spool in `dir`; segments left by an earlier run come first.
    pub fn open(
        dir: &Path,
        memory_max_records: usize,
        spool_max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SinkError> {
        fs::create_dir_all(dir).map_err(|e| SinkError::io(dir, e))?;
        let mut found: Vec<(u64, Segment)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| SinkError::io(dir, e))? {
            let path = entry.map_err(|e| SinkError::io(dir, e))?.path();
            if let Some(number) = segment_number(&path) {
                let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                found.push((
                    number,
                    Segment {
                        number,
                        path,
                        bytes,
                    },
                ));
            }
        }
        found.sort_by_key(|(number, _)| *number);
        let state = State {
            next_segment: found.last().map_or(FIRST_SEGMENT, |(number, _)| number + 1),
            spool_bytes: found.iter().map(|(_, s)| s.bytes).sum(),
            segments: found.into_iter().map(|(_, segment)| segment).collect(),
            ..State::default()
        };
        if !state.segments.is_empty() {
            tracing::info!(
                segments = state.segments.len(),
                bytes = state.spool_bytes,
                "PostgreSQL spool from an earlier run will be replayed"
            );
        }
        metrics.spool_bytes.set(state.spool_bytes as i64);
        Ok(Backlog {
            state: Mutex::new(state),
            ready: Notify::new(),
            dir: dir.to_path_buf(),
            memory_max_records,
            spool_max_bytes,
            metrics,
            health: None,
        })
    }

    /// Reports to `health` whether PostgreSQL's share is being kept (for /readyz).
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a batch: in memory while there is room and nothing older is on disk, else on
    /// disk (written and fsynced before this returns).
    pub fn push(&self, batch: Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let mut state = self.lock();
        if state.segments.is_empty()
            && state.memory_records + batch.len() <= self.memory_max_records
        {
            state.memory_records += batch.len();
            state.memory.push_back(batch);
        } else if let Err(error) = self.spill(&mut state, &batch) {
            self.metrics.spool_dropped.inc_by(batch.len() as u64);
            tracing::error!(%error, records = batch.len(), "PostgreSQL is behind and the spool cannot take more: these records will not reach PostgreSQL (they are in Parquet if configured)");
        }
        self.metrics
            .sink_buffer_rows
            .with_label_values(&["postgres"])
            .set(state.memory_records as i64);
        drop(state);
        self.ready.notify_one();
    }

    fn spill(&self, state: &mut State, batch: &[Record]) -> Result<(), String> {
        let text = encode(batch)?;
        self.check_room(state, text.len() as u64)?;
        let reuse = state.appending.is_some()
            && state
                .segments
                .back()
                .is_some_and(|s| s.bytes < SEGMENT_BYTES);
        if !reuse {
            let number = state.next_segment;
            state.next_segment += 1;
            let (file, path) = self.create_segment(number)?;
            state.appending = Some(file);
            state.segments.push_back(Segment {
                number,
                path,
                bytes: 0,
            });
        }
        let file = state.appending.as_mut().ok_or("no open segment")?;
        file.write_all(&text)
            .and_then(|()| file.sync_data())
            .map_err(|e| e.to_string())?;
        if let Some(segment) = state.segments.back_mut() {
            segment.bytes += text.len() as u64;
        }
        self.add_spool_bytes(state, text.len() as u64);
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

    fn add_spool_bytes(&self, state: &mut State, size: u64) {
        state.spool_bytes += size;
        self.metrics.spool_bytes.set(state.spool_bytes as i64);
    }

    /// Creates segment `number`'s file, and makes its name durable.
    fn create_segment(&self, number: u64) -> Result<(File, PathBuf), String> {
        let path = self.dir.join(format!("segment-{number:020}.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok((file, path))
    }

    /// The oldest queued batch; waits for one. `None` once closed and empty.
    pub async fn next(&self) -> Option<Taken> {
        loop {
            let notified = self.ready.notified();
            if let Some(taken) = self.try_take() {
                return Some(taken);
            }
            if self.lock().closed && self.is_empty() {
                return None;
            }
            notified.await;
        }
    }

    fn is_empty(&self) -> bool {
        let state = self.lock();
        state.memory.is_empty() && state.segments.is_empty()
    }

    /// The oldest queued batch if there is one now.
    pub fn try_take(&self) -> Option<Taken> {
        loop {
            let mut state = self.lock();
            if let Some(records) = state.memory.pop_front() {
                state.memory_records -= records.len();
                self.metrics
                    .sink_buffer_rows
                    .with_label_values(&["postgres"])
                    .set(state.memory_records as i64);
                return Some(Taken {
                    records,
                    segment: None,
                });
            }
            let segment = state.segments.pop_front()?;
            if state.segments.is_empty() {
                // It was the one open for appends: newer batches start a new segment.
                state.appending = None;
            }
            drop(state);
            match read_segment(&segment.path) {
                Ok(records) => {
                    return Some(Taken {
                        records,
                        segment: Some(segment),
                    });
                }
                Err(error) => {
                    tracing::error!(path = %segment.path.display(), %error, "an unreadable spool segment is set aside");
                    let _ = fs::rename(&segment.path, segment.path.with_extension("unreadable"));
                }
            }
        }
    }

    /// Forgets a committed batch (deleting its segment).
    pub fn done(&self, taken: Taken) {
        if let Some(segment) = taken.segment {
            let _ = fs::remove_file(&segment.path);
            let mut state = self.lock();
            state.spool_bytes = state.spool_bytes.saturating_sub(segment.bytes);
            self.metrics.spool_bytes.set(state.spool_bytes as i64);
        }
    }

    /// Puts batches that could not be committed back at the front, in their order (oldest
    /// first), so that nothing is lost or reordered.
    pub fn give_back(&self, taken: Vec<Taken>) {
        let mut state = self.lock();
        for batch in taken.into_iter().rev() {
            match batch.segment {
                Some(segment) => state.segments.push_front(segment),
                None => {
                    state.memory_records += batch.records.len();
                    state.memory.push_front(batch.records);
                }
            }
        }
    }

    /// Moves whatever is still in memory to the spool (at shutdown, PostgreSQL unreachable).
    /// Memory holds the oldest records, so they go into a segment numbered before everything
    /// on disk: a restart replays them first.
    pub fn spill_memory(&self) {
        let mut state = self.lock();
        let records: Vec<Record> = state.memory.drain(..).flatten().collect();
        state.memory_records = 0;
        if records.is_empty() {
            return;
        }
        let number = state
            .segments
            .front()
            .map_or(state.next_segment, |s| s.number)
            - 1;
        let written = encode(&records).and_then(|text| {
            self.check_room(&state, text.len() as u64)?;
            let (mut file, path) = self.create_segment(number)?;
            file.write_all(&text)
                .and_then(|()| file.sync_data())
                .map_err(|e| e.to_string())?;
            Ok((path, text.len() as u64))
        });
        match written {
            Ok((path, bytes)) => {
                state.segments.push_front(Segment {
                    number,
                    path,
                    bytes,
                });
                self.add_spool_bytes(&mut state, bytes);
            }
            Err(error) => {
                self.metrics.spool_dropped.inc_by(records.len() as u64);
                tracing::error!(%error, records = records.len(), "could not spool records at shutdown");
            }
        }
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

/// Records as JSON Lines, the spool's format.
fn encode(records: &[Record]) -> Result<Vec<u8>, String> {
    let mut text = Vec::new();
    for record in records {
        serde_json::to_writer(&mut text, record).map_err(|e| e.to_string())?;
        text.push(b'\n');
    }
    Ok(text)
}

fn read_segment(path: &Path) -> Result<Vec<Record>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut records = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.is_empty() {
            continue;
        }
        // A torn last line (crash mid-append, before fsync returned) was never acknowledged.
        match serde_json::from_str(&line) {
            Ok(record) => records.push(record),
            Err(_) => break,
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::{Normalized, Reading};

    fn batch(thing: &str, from: i64, count: i64) -> Vec<Record> {
        (from..from + count)
            .map(|created_ms| {
                Record::Dweet(Normalized {
                    thing: thing.to_owned(),
                    created_ms,
                    received_ms: created_ms,
                    content: "{}".to_owned(),
                    readings: vec![Reading {
                        sensor: "v".to_owned(),
                        value: 1.0,
                    }],
                })
            })
            .collect()
    }

    /// Takes everything to the end (the backlog must be closed), as the writer would.
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

    #[tokio::test]
    async fn spills_past_the_memory_bound_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let backlog = Backlog::open(dir.path(), 3, 1 << 20, metrics.clone()).unwrap();
        backlog.push(batch("a", 0, 2));
        backlog.push(batch("a", 2, 2)); // over the bound: disk
        backlog.push(batch("a", 4, 1)); // something is on disk: disk too
        assert!(metrics.spool_bytes.get() > 0);
        let mut seen = Vec::new();
        for _ in 0..2 {
            let taken = backlog.next().await.unwrap();
            seen.extend(created(&taken));
            backlog.done(taken);
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(metrics.spool_bytes.get(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "committed segments are deleted"
        );
    }

    #[tokio::test]
    async fn a_restart_replays_the_spool_and_a_full_spool_counts_its_loss() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        {
            let backlog = Backlog::open(dir.path(), 0, 400, metrics.clone()).unwrap();
            backlog.push(batch("a", 0, 2));
            backlog.push(batch("a", 2, 50)); // too big for 400 bytes: dropped and counted
        }
        assert_eq!(metrics.spool_dropped.get(), 50);
        let backlog = Backlog::open(dir.path(), 0, 400, metrics).unwrap();
        backlog.close();
        let taken = backlog.next().await.unwrap();
        assert_eq!(created(&taken), vec![0, 1]);
        backlog.done(taken);
        assert!(backlog.next().await.is_none());
    }

    #[tokio::test]
    async fn memory_spilled_at_shutdown_replays_before_older_spool() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        {
            let backlog = Backlog::open(dir.path(), 2, 1 << 20, metrics.clone()).unwrap();
            backlog.push(batch("a", 0, 2)); // memory
            backlog.push(batch("a", 2, 2)); // disk
            backlog.spill_memory();
        }
        let backlog = Backlog::open(dir.path(), 2, 1 << 20, metrics).unwrap();
        backlog.close();
        assert_eq!(replay_all(&backlog).await, vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn batches_given_back_at_shutdown_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        {
            let backlog = Backlog::open(dir.path(), 2, 1 << 20, metrics.clone()).unwrap();
            backlog.push(batch("a", 0, 2)); // memory
            backlog.push(batch("a", 2, 2)); // disk
            backlog.push(batch("a", 4, 2)); // disk
            let first = backlog.try_take().unwrap();
            let second = backlog.try_take().unwrap();
            backlog.give_back(vec![first, second]);
            backlog.spill_memory();
        }
        let backlog = Backlog::open(dir.path(), 2, 1 << 20, metrics).unwrap();
        backlog.close();
        assert_eq!(replay_all(&backlog).await, vec![0, 1, 2, 3, 4, 5]);
    }
}
