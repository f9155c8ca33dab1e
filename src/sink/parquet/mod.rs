//! The Parquet sink: three datasets under `[parquet] dir`, partitioned by date, zstd, readable
//! as they are by pyarrow and DuckDB.
//!
//! ```text
//! dir/readings/date=2026-11-23/part-<generation>-<n>.parquet       time, thing, sensor, value
//! dir/dweets/date=2026-11-23/part-<generation>-<n>.parquet         thing, created, received_at, content
//! dir/dead_letters/date=2026-11-23/part-<generation>-<n>.parquet   thing, created, received_at, payload, reason
//! ```
//!
//! Rows are written as they come into hidden `.tmp` files of the open *generation*. A
//! generation is sealed when it is `rotate_after` old or holds `max_rows` rows, and at
//! shutdown: every file gets its footer (with the generation, its file count and the per-thing
//! watermarks), is fsynced and renamed into place, and the folders are fsynced. Recovery
//! (`recovery`) removes what a crash left half-done, so after a restart with backfill every
//! dweet is in the output exactly once.
//!
//! The rooms: `config` (the section), `generation` (the open files and their footers),
//! `batch` (Arrow buffers), `recovery`, `held` (older history below a watermark), `compact`
//! (closed dates and retention), `run` (the loop); this file is the sink and its errors.

mod batch;
pub mod compact;
mod config;
mod generation;
mod held;
mod names;
mod recovery;
mod run;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{
    EnabledStatistics, WriterProperties, WriterPropertiesBuilder, WriterVersion,
};
use parquet::schema::types::ColumnPath;

pub use batch::Dataset;
use batch::Rows;
pub use config::ParquetConfig;
use generation::{
    Generation, META_FILES, META_GENERATION, META_WATERMARKS, OpenFile, open_generation,
};
pub use run::ParquetLoop;

use super::{DirLock, LockError, Watermarks};
use crate::record::{Record, ms_before, ms_to_datetime, now_ms};
use crate::telemetry::{Metrics, SinkName};

/// Rows buffered per file before they are encoded into the open file.
const BATCH_ROWS: usize = 16 * 1024;
/// Recovery opens the footers of generations younger than what the source can replay plus
/// this margin; older data is past the source's history, so its watermarks cannot matter for
/// backfill (and a large dataset need not be read whole at every start).
const RECOVERY_MARGIN: Duration = Duration::from_secs(48 * 60 * 60);

/// The Parquet dataset could not be written, read or locked.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("writing Parquet: {0}")]
    Format(#[from] parquet::errors::ParquetError),
    #[error("building an Arrow batch: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error(transparent)]
    Locked(#[from] LockError),
}

impl DatasetError {
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// The oldest generation (ms) whose footers recovery reads, `now_ms` being now: what the
/// source can still replay, and a margin.
fn recovery_horizon(now_ms: i64, replay: Duration) -> i64 {
    ms_before(now_ms, replay.saturating_add(RECOVERY_MARGIN))
}

pub struct ParquetSink {
    config: ParquetConfig,
    file_properties: FileProperties,
    /// What is durable: the maximum `created` per thing over sealed generations.
    durable: Watermarks,
    last_generation: i64,
    open: Option<Generation>,
    metrics: Arc<Metrics>,
    /// Other members' files whose watermarks are in `durable` (a shared directory).
    absorbed: HashSet<PathBuf>,
    /// How far back the source replays (`[source] history`), for the recovery horizon.
    replay: Duration,
    /// (thing, created) of the dweets stored on a few dates, read when a dweet older than its
    /// board's watermark arrives (older history imported after newer).
    held_on: HashMap<NaiveDate, HashSet<(String, i64)>>,
    /// Dweets not written because they are older than `[parquet] retention`.
    past_retention: u64,
    /// Things this member gave up before their records were durable here (a cluster).
    forsaken: Arc<crate::sink::Forsaken>,
    /// Records skipped as forsaken since the last look.
    forsaken_records: u64,
    /// The last UTC day a record's time fell on (days since the epoch) and its date.
    last_day: (i64, NaiveDate),
    /// Held while the sink exists: no other process (or member) recovers or writes this
    /// directory as this member.
    _lock: DirLock,
}

/// A day's milliseconds: a date partition's span.
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Dates whose dweets `held_on` keeps at once: an import goes date by date.
const HELD_DATES: usize = 3;

/// What recovery did at start-up, for the log and for `check`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opened {
    pub removed_temporary: usize,
    pub removed_incomplete: usize,
    pub things_with_watermark: usize,
}

impl ParquetSink {
    /// Locks `config.dir` for this process (creating it), then recovers from any earlier
    /// crash. `replay` is how far back the source keeps history (`[source] history`).
    pub fn open(
        config: ParquetConfig,
        replay: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Opened), DatasetError> {
        let lock = DirLock::acquire_as(&config.dir, config.member.as_deref())?;
        for dataset in Dataset::ALL {
            let dir = config.dir.join(dataset.dir_name());
            fs::create_dir_all(&dir).map_err(|e| DatasetError::io(&dir, e))?;
        }
        let horizon = recovery_horizon(now_ms(), replay);
        let recovered = recovery::recover(&config.dir, horizon, config.member.as_deref())?;
        let opened = Opened {
            removed_temporary: recovered.removed_temporary,
            removed_incomplete: recovered.removed_incomplete,
            things_with_watermark: recovered.watermarks.len(),
        };
        let sink = ParquetSink {
            config,
            file_properties: FileProperties::new(),
            durable: recovered.watermarks,
            last_generation: recovered.newest_generation,
            open: None,
            metrics,
            absorbed: recovered.absorbed,
            replay,
            held_on: HashMap::new(),
            past_retention: 0,
            forsaken: Arc::default(),
            forsaken_records: 0,
            // Day 0's date is the epoch's, which is `NaiveDate`'s default.
            last_day: (0, NaiveDate::default()),
            _lock: lock,
        };
        Ok((sink, opened))
    }

    /// The newest durable `created` (ms) per thing.
    pub fn watermarks(&self) -> &Watermarks {
        &self.durable
    }

    /// Reads the generations other members sealed into a shared directory since the last
    /// look, so what they hold is not written again (a thing that moved here); then the
    /// forsaken things that came back are lifted, their records now skipped as held where
    /// the others stored them. Returns how many files were read.
    pub fn absorb_others(&mut self) -> Result<usize, DatasetError> {
        let read = recovery::absorb(
            &self.config.dir,
            recovery_horizon(now_ms(), self.replay),
            self.config.member.as_deref(),
            &mut self.absorbed,
            &mut self.durable,
        )?;
        self.forsaken.lift_returned();
        Ok(read)
    }

    /// What this member gave up and must not store (shared with the worker's handle).
    pub fn forsaken(&self) -> Arc<crate::sink::Forsaken> {
        Arc::clone(&self.forsaken)
    }

    /// Records skipped as forsaken since the last call.
    pub fn take_forsaken_records(&mut self) -> u64 {
        std::mem::take(&mut self.forsaken_records)
    }

    /// Whether the open generation holds a record of a thing since forsaken: it must not be
    /// sealed, but abandoned and written again without them.
    pub fn open_holds_forsaken(&self) -> bool {
        self.open.as_ref().is_some_and(|generation| {
            generation
                .watermarks
                .iter()
                .any(|(thing, _)| self.forsaken.skips(thing))
        })
    }

    /// Rows written into the open generation and not yet sealed.
    pub fn pending_rows(&self) -> u64 {
        self.open.as_ref().map_or(0, Generation::rows)
    }

    /// Whether `thing`'s dweet `created_ms` is already sealed or in the open generation.
    fn holds(&self, thing: &str, created_ms: i64) -> bool {
        self.durable.holds(thing, created_ms)
            || self
                .open
                .as_ref()
                .is_some_and(|g| g.watermarks.holds(thing, created_ms))
    }

    /// Adds records to the open generation; dweets it already holds (sealed, or in the open
    /// generation) are skipped: they come back through backfill and spool replays. On an
    /// error the caller must [`abandon`](Self::abandon) the generation and retry its records.
    pub fn write(&mut self, records: &[Record]) -> Result<usize, DatasetError> {
        let mut skipped = 0;
        let kept_from = self.config.retention.map(|kept| ms_before(now_ms(), kept));
        for record in records {
            if let Some(thing) = record.thing()
                && self.forsaken.skips(thing)
            {
                self.forsaken_records += 1;
                continue;
            }
            match record {
                Record::Dweet(dweet) => {
                    if kept_from.is_some_and(|from| dweet.created_ms < from) {
                        self.past_retention += 1;
                        continue;
                    }
                    let date = self.date_of(dweet.created_ms);
                    // The live path: a dweet newer than its board's marks is not held, and
                    // the lookup that tells raises the open generation's mark.
                    let newer = !self.durable.holds(&dweet.thing, dweet.created_ms)
                        && self
                            .generation()
                            .watermarks
                            .raise_if_newer(&dweet.thing, dweet.created_ms);
                    if !newer {
                        if self.holds(&dweet.thing, dweet.created_ms)
                            && self.stored_on(date, &dweet.thing, dweet.created_ms)?
                        {
                            skipped += 1;
                            continue;
                        }
                        self.generation()
                            .watermarks
                            .raise(&dweet.thing, dweet.created_ms);
                    }
                    // Only while older history is being checked: no lookup on the live path.
                    if !self.held_on.is_empty()
                        && let Some(held) = self.held_on.get_mut(&date)
                    {
                        held.insert((dweet.thing.clone(), dweet.created_ms));
                    }
                    let generation = self.generation();
                    generation.count(Dataset::Dweets, 1);
                    generation.count(Dataset::Readings, dweet.readings.len() as u64);
                    self.push(Dataset::Dweets, date, |rows| rows.push_dweet(dweet))?;
                    if !dweet.readings.is_empty() {
                        self.push(Dataset::Readings, date, |rows| rows.push_dweet(dweet))?;
                    }
                }
                Record::DeadLetter(letter) => {
                    // A dead-lettered dweet counts as ingested, so backfill does not bring it
                    // back after a restart.
                    if let (Some(thing), Some(created_ms)) = (&letter.thing, letter.created_ms) {
                        if self.holds(thing, created_ms) {
                            skipped += 1;
                            continue;
                        }
                        self.generation().watermarks.raise(thing, created_ms);
                    }
                    let date = self.date_of(letter.received_ms);
                    self.generation().count(Dataset::DeadLetters, 1);
                    self.push(Dataset::DeadLetters, date, |rows| {
                        rows.push_dead_letter(letter)
                    })?;
                }
            }
        }
        Ok(skipped)
    }

    /// The UTC date of `ms`. Records come day by day: the last day's date is kept, where
    /// working it out cost about 100 instructions a dweet.
    fn date_of(&mut self, ms: i64) -> NaiveDate {
        let day = ms.div_euclid(DAY_MS);
        if day != self.last_day.0 {
            self.last_day = (day, ms_to_datetime(ms).date_naive());
        }
        self.last_day.1
    }

    /// Whether the dweet `(thing, created_ms)`, at or below the board's watermark, is stored
    /// on `date`. The first question about a date seals the open generation (so the files
    /// hold everything written) and reads the date's dweets.
    fn stored_on(
        &mut self,
        date: NaiveDate,
        thing: &str,
        created_ms: i64,
    ) -> Result<bool, DatasetError> {
        if !self.held_on.contains_key(&date) {
            self.seal()?;
            if self.held_on.len() >= HELD_DATES {
                self.held_on.clear();
            }
            let held = held::dweets_on(&self.config.dir, date)?;
            self.held_on.insert(date, held);
        }
        Ok(self
            .held_on
            .get(&date)
            .is_some_and(|held| held.contains(&(thing.to_owned(), created_ms))))
    }

    /// Dweets not written because they were older than `[parquet] retention`.
    pub fn past_retention(&self) -> u64 {
        self.past_retention
    }

    /// Compacts the dates closed `compact_after` before `now_ms` (see [`compact`]).
    pub fn compact(&mut self, now_ms: i64) -> Result<Vec<compact::Compacted>, DatasetError> {
        compact::compact_closed(
            &self.config.dir,
            now_ms,
            self.config.compact_after,
            &writer_properties(),
            None,
        )
    }

    /// Removes the dates wholly older than `[parquet] retention` (none without it).
    pub fn retire_old_dates(&mut self, now_ms: i64) -> Result<Vec<compact::Retired>, DatasetError> {
        match self.config.retention {
            Some(kept) => {
                self.held_on.clear();
                compact::retire_before(&self.config.dir, ms_before(now_ms, kept), None)
            }
            None => Ok(Vec::new()),
        }
    }

    /// The open generation is `rotate_after` old or holds `max_rows` rows: time to seal.
    pub fn due(&self) -> bool {
        self.open.as_ref().is_some_and(|g| {
            g.opened.elapsed() >= self.config.rotate_after || g.rows() >= self.config.max_rows
        })
    }

    /// Whether a generation is open (its records are not durable yet).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Seals whatever is open: on time, and at shutdown. On an error the generation is gone
    /// (its temporary files removed) and none of its records count as durable: the caller
    /// writes them again.
    pub fn close(&mut self) -> Result<(), DatasetError> {
        self.seal()
    }

    /// Drops the open generation after a failed write: its temporary files are removed and
    /// nothing of it counts as held, so its records can be written again.
    pub fn abandon(&mut self) {
        self.held_on.clear();
        if let Some(generation) = self.open.take() {
            for file in generation.files.into_values() {
                let _ = fs::remove_file(&file.tmp_path);
            }
        }
    }

    fn generation(&mut self) -> &mut Generation {
        open_generation(&mut self.open, &mut self.last_generation)
    }

    fn push(
        &mut self,
        dataset: Dataset,
        date: NaiveDate,
        add: impl FnOnce(&mut Rows),
    ) -> Result<(), DatasetError> {
        let generation = open_generation(&mut self.open, &mut self.last_generation);
        let sequence = generation.files.len();
        let id = generation.id;
        let file = match generation.files.entry((dataset, date)) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => entry.insert(OpenFile::create(
                &self.config.dir,
                dataset,
                date,
                (self.config.member.as_deref(), id, sequence),
                self.file_properties.of(dataset).clone(),
            )?),
        };
        add(&mut file.rows);
        if file.rows.len() >= BATCH_ROWS {
            file.write_buffered()?;
        }
        Ok(())
    }

    /// Footers, fsync, rename, fsync the folders: the generation becomes durable. On error the
    /// generation's temporary files are removed (their rows are not counted as durable), and
    /// so is what `held_on` learnt from it.
    fn seal(&mut self) -> Result<(), DatasetError> {
        let sealed = self.seal_open();
        if sealed.is_err() {
            self.held_on.clear();
        }
        sealed
    }

    fn seal_open(&mut self) -> Result<(), DatasetError> {
        let Some(generation) = self.open.take() else {
            return Ok(());
        };
        let started = Instant::now();
        let file_count = generation.files.len();
        let rows = generation.rows();
        let watermarks = serde_json::to_string(&generation.watermarks).unwrap_or_default();
        let mut finished = Vec::with_capacity(file_count);
        let mut failure = None;
        for (_, mut file) in generation.files {
            if failure.is_some() {
                let _ = fs::remove_file(&file.tmp_path);
                continue;
            }
            match file.finish(generation.id, file_count, &watermarks) {
                Ok(()) => finished.push(file),
                Err(error) => {
                    let _ = fs::remove_file(&file.tmp_path);
                    failure = Some(error);
                }
            }
        }
        if let Some(error) = failure {
            for file in &finished {
                let _ = fs::remove_file(&file.tmp_path);
            }
            return Err(error);
        }
        let mut dirs = Vec::new();
        for (renamed, file) in finished.iter().enumerate() {
            if let Err(error) = fs::rename(&file.tmp_path, &file.final_path) {
                // An incomplete generation is removed at the next start anyway; removing it
                // now keeps this run from counting or re-reading half of it.
                for done in &finished[..renamed] {
                    let _ = fs::remove_file(&done.final_path);
                }
                for rest in &finished[renamed..] {
                    let _ = fs::remove_file(&rest.tmp_path);
                }
                return Err(DatasetError::io(&file.final_path, error));
            }
            if let Some(parent) = file.final_path.parent()
                && !dirs.contains(&parent)
            {
                dirs.push(parent);
            }
        }
        for dir in dirs {
            if let Err(error) = File::open(dir).and_then(|d| d.sync_all()) {
                for file in &finished {
                    let _ = fs::remove_file(&file.final_path);
                }
                return Err(DatasetError::io(dir, error));
            }
        }
        // Counted once their folders are synced: only then are the files in place for good.
        for file in &finished {
            self.metrics.parquet_file_sealed(file.dataset.table());
        }
        self.durable.raise_all(generation.watermarks);
        for (dataset, rows) in Dataset::ALL.into_iter().zip(generation.dataset_rows) {
            if rows > 0 {
                self.metrics
                    .rows_written(SinkName::Parquet, dataset.table(), rows);
            }
        }
        tracing::debug!(
            generation = generation.id,
            files = file_count,
            rows,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sealed a Parquet generation"
        );
        Ok(())
    }
}

/// How the sink writes a new file, built once: the datasets differ only in their names.
struct FileProperties {
    names_plain: WriterProperties,
    names_in_dictionary: WriterProperties,
}

impl FileProperties {
    fn new() -> FileProperties {
        // Names are written plain where Dataset::writes_names_plain says so (see
        // NAME_COLUMNS); compaction turns their dictionary back on.
        let mut names_plain = writer_properties_builder();
        for column in batch::NAME_COLUMNS {
            names_plain =
                names_plain.set_column_dictionary_enabled(ColumnPath::from(column), false);
        }
        FileProperties {
            names_plain: names_plain.build(),
            names_in_dictionary: writer_properties(),
        }
    }

    fn of(&self, dataset: Dataset) -> &WriterProperties {
        if dataset.writes_names_plain() {
            &self.names_plain
        } else {
            &self.names_in_dictionary
        }
    }
}

/// How a file's columns are compressed unless a column says otherwise: zstd at its default
/// level. Compaction writes the measured values at it again.
pub(crate) fn file_compression() -> Compression {
    Compression::ZSTD(ZstdLevel::default())
}

/// The measured values as the sink writes them: uncompressed. zstd found some repeats in
/// their dictionary page and their pages of dictionary indices (in arrival order, every
/// sensor of a board interleaved), at a high price. Per dweet, against zstd at level -1 in
/// one build: `scripts/bench`'s import 1,530 instructions fewer (7%) for 20.6 bytes more (its
/// random readings), `run_pipeline` 690 fewer (4%) for 5.9 more (39.0 bytes from the
/// simulator's boards). LZ4 kept three quarters of those bytes but spent 820 of the 1,530
/// instructions on the import. The files as written live until their date is compacted,
/// which sorts a board's values into runs and writes them at zstd's default level
/// (`compact::compacted_properties`).
fn quantised_compression() -> Compression {
    Compression::UNCOMPRESSED
}

/// How a file is written where its names get a dictionary; the sink's readings files differ
/// only in that ([`FileProperties`]), and compaction starts from the same.
pub(crate) fn writer_properties() -> WriterProperties {
    writer_properties_builder().build()
}

fn writer_properties_builder() -> WriterPropertiesBuilder {
    let mut properties = WriterProperties::builder()
        .set_compression(file_compression())
        .set_max_row_group_row_count(Some(1024 * 1024))
        // Page limits and statistics are checked per mini-batch of this many values: 8,192
        // rather than 1,024 took 200 instructions a dweet off, for pages at most that many
        // values past their 1 MiB.
        .set_write_batch_size(8192)
        // Version 2 data pages compress the values straight from the encoder's buffer:
        // version 1 pages first copy them behind the levels, and then `parquet` grows the
        // compressed page's buffer by a copy of the whole page (1,900 instructions a dweet).
        // Version 2 also makes delta encodings the fallback for integers and text, which
        // `dweets.created` takes; the columns below that must stay plain say so.
        .set_writer_version(WriterVersion::PARQUET_2_0);
    // A dweet's content and a dead letter's payload are unique per row: a dictionary
    // never pays for itself there, and nobody filters on their minimum and maximum, so
    // both are skipped (together a sixth of the CPU the sink spent on them).
    for column in batch::UNIQUE_TEXT_COLUMNS {
        let column = ColumnPath::from(column);
        properties = properties
            .set_column_dictionary_enabled(column.clone(), false)
            .set_column_encoding(column.clone(), Encoding::PLAIN)
            .set_column_statistics_enabled(column, EnabledStatistics::None);
    }
    // A dictionary of times grows with the file and gets hashed on every row for almost no
    // saving; their statistics stay: readers prune by time.
    for column in batch::SELDOM_REPEATED_COLUMNS {
        properties = properties.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    // Past its 1 MiB limit a dictionary falls back to plain values for the rest of the
    // row group, which bounds what values that do not repeat can cost (see QUANTISED_COLUMNS).
    for column in batch::QUANTISED_COLUMNS {
        properties = properties
            .set_column_dictionary_enabled(ColumnPath::from(column), true)
            .set_column_compression(ColumnPath::from(column), quantised_compression());
    }
    // A time repeats for each reading of a dweet and then grows a little: deltas store
    // that in a few bits a row.
    for column in batch::TIME_COLUMNS {
        properties =
            properties.set_column_encoding(ColumnPath::from(column), Encoding::DELTA_BINARY_PACKED);
    }
    for column in batch::UNPRUNABLE_COLUMNS {
        properties = properties
            .set_column_statistics_enabled(ColumnPath::from(column), EnabledStatistics::None);
    }
    // A name without a dictionary, or past a full one, stays plain text as the unique text
    // columns do, not version 2's DELTA_BYTE_ARRAY fallback.
    for column in batch::NAME_COLUMNS {
        properties = properties.set_column_encoding(ColumnPath::from(column), Encoding::PLAIN);
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{DeadLetter, Normalized, Reading};

    fn dweet(thing: &str, created_ms: i64) -> Record {
        Record::Dweet(Normalized {
            thing: thing.to_owned(),
            created_ms,
            created_text: None,
            received_ms: created_ms + 5,
            content: r#"{"t":1}"#.to_owned(),
            readings: vec![Reading {
                sensor: "t".into(),
                value: 1.0,
            }],
        })
    }

    fn open(dir: &Path) -> (ParquetSink, Opened) {
        ParquetSink::open(
            ParquetConfig::new(dir),
            Duration::from_secs(24 * 60 * 60),
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap()
    }

    fn finalised(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for dataset in Dataset::ALL {
            for partition in fs::read_dir(dir.join(dataset.dir_name()))
                .unwrap()
                .flatten()
            {
                files.extend(
                    fs::read_dir(partition.path())
                        .unwrap()
                        .flatten()
                        .map(|f| f.path()),
                );
            }
        }
        files.sort();
        files
    }

    #[test]
    fn sealed_generations_carry_watermarks_and_skip_what_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let base = 1_795_000_000_000;
        let (mut sink, _) = open(dir.path());
        sink.write(&[
            dweet("a", base),
            dweet("a", base + DAY_MS),
            dweet("b", base + 7),
        ])
        .unwrap();
        sink.close().unwrap();
        assert_eq!(
            finalised(dir.path()).len(),
            4,
            "two dates × (readings + dweets)"
        );

        drop(sink); // the directory lock goes with it
        let (mut sink, opened) = open(dir.path());
        assert_eq!(opened.things_with_watermark, 2);
        assert_eq!(sink.watermarks().get("a"), Some(base + DAY_MS));
        let skipped = sink
            .write(&[dweet("a", base), dweet("b", base + 7), dweet("b", base + 8)])
            .unwrap();
        assert_eq!(skipped, 2, "durable dweets are not written twice");
        sink.close().unwrap();
    }

    #[test]
    fn each_record_lands_in_the_partition_of_its_utc_date() {
        let dir = tempfile::tempdir().unwrap();
        let midnight = 20_776 * DAY_MS; // 2026-11-19T00:00:00Z
        let (mut sink, _) = open(dir.path());
        // Across midnight and back, and before the epoch: the date kept from the last record
        // must not leak into the next one's.
        sink.write(&[
            dweet("a", midnight - 1),
            dweet("b", midnight),
            dweet("c", midnight - 1),
            dweet("d", -1),
            dweet("e", 0),
        ])
        .unwrap();
        sink.close().unwrap();
        let dates = |dataset: Dataset| {
            let mut dates: Vec<String> = fs::read_dir(dir.path().join(dataset.dir_name()))
                .unwrap()
                .flatten()
                .map(|partition| partition.file_name().to_string_lossy().into_owned())
                .collect();
            dates.sort();
            dates
        };
        let expected = [
            "date=1969-12-31",
            "date=1970-01-01",
            "date=2026-11-18",
            "date=2026-11-19",
        ];
        assert_eq!(dates(Dataset::Dweets), expected);
        assert_eq!(dates(Dataset::Readings), expected);
        let held =
            held::dweets_on(dir.path(), NaiveDate::from_ymd_opt(2026, 11, 18).unwrap()).unwrap();
        let mut held: Vec<(String, i64)> = held.into_iter().collect();
        held.sort();
        assert_eq!(
            held,
            [
                ("a".to_owned(), midnight - 1),
                ("c".to_owned(), midnight - 1)
            ]
        );
    }

    /// A board whose clock was never set dweets from 1970-01-01, the sink's first day kept.
    #[test]
    fn a_first_record_on_the_epoch_s_day_lands_on_its_date() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, _) = open(dir.path());
        sink.write(&[dweet("unset-clock", 5)]).unwrap();
        sink.close().unwrap();
        let held =
            held::dweets_on(dir.path(), NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).unwrap();
        assert_eq!(
            held.into_iter().collect::<Vec<_>>(),
            [("unset-clock".to_owned(), 5)]
        );
    }

    #[test]
    fn a_forsaken_thing_is_not_stored_until_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let base = 1_795_000_000_000;
        let (mut sink, _) = open(dir.path());
        sink.write(&[dweet("a", base), dweet("b", base)]).unwrap();
        assert!(!sink.open_holds_forsaken());
        let forsaken = sink.forsaken();
        forsaken.forsake("a");
        assert!(
            sink.open_holds_forsaken(),
            "the open generation holds a's first dweet"
        );
        // What the loop does then: drop the generation, write the records again.
        sink.abandon();
        sink.write(&[dweet("a", base), dweet("b", base), dweet("a", base + 1)])
            .unwrap();
        assert_eq!(sink.take_forsaken_records(), 2);
        assert!(!sink.open_holds_forsaken());
        sink.close().unwrap();
        assert_eq!(sink.watermarks().get("a"), None, "nothing of a is stored");
        assert_eq!(sink.watermarks().get("b"), Some(base));
        forsaken.returned(&["a".to_owned()]);
        forsaken.lift_returned();
        sink.write(&[dweet("a", base)]).unwrap();
        assert_eq!(
            sink.take_forsaken_records(),
            0,
            "back here, nothing is skipped as forsaken"
        );
    }

    #[test]
    fn dictionaries_and_statistics_only_where_they_pay() {
        use parquet::column::page::Page;
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, _) = open(dir.path());
        sink.write(&[dweet("a", 1_795_000_000_000), dweet("b", 1_795_000_000_001)])
            .unwrap();
        sink.close().unwrap();
        let files = finalised(dir.path());
        let file_of = |dataset: &str| {
            files
                .iter()
                .find(|path| path.to_string_lossy().contains(&format!("/{dataset}/")))
                .unwrap_or_else(|| panic!("a {dataset} file"))
                .clone()
        };
        let mut columns = Vec::new();
        for dataset in [Dataset::Dweets, Dataset::Readings] {
            let reader = SerializedFileReader::new(
                std::fs::File::open(file_of(dataset.dir_name())).unwrap(),
            )
            .unwrap();
            columns.extend(
                reader
                    .metadata()
                    .row_group(0)
                    .columns()
                    .iter()
                    .map(|column| (dataset, column.clone())),
            );
            let row_group = reader.get_row_group(0).unwrap();
            for column in 0..row_group.num_columns() {
                for page in row_group.get_column_page_reader(column).unwrap() {
                    let page = page.unwrap();
                    assert!(
                        matches!(page, Page::DataPageV2 { .. } | Page::DictionaryPage { .. }),
                        "{dataset:?} column {column}: version 2 data pages, not {:?}",
                        page.page_type()
                    );
                }
            }
        }
        assert_eq!(columns.len(), 8);
        for (dataset, column) in &columns {
            let name = column.column_path().string();
            let encodings: Vec<Encoding> = column.encodings().collect();
            let quantised = batch::QUANTISED_COLUMNS.contains(&name.as_str());
            let name_once_a_dweet =
                batch::NAME_COLUMNS.contains(&name.as_str()) && !dataset.writes_names_plain();
            assert_eq!(
                column.dictionary_page_offset().is_some(),
                quantised || name_once_a_dweet,
                "{dataset:?}.{name}: a dictionary only for measured values and names that come \
                 once a dweet (not unique, seldom repeated, or a name on every reading)"
            );
            assert!(
                [
                    &batch::UNIQUE_TEXT_COLUMNS[..],
                    &batch::SELDOM_REPEATED_COLUMNS,
                    &batch::NAME_COLUMNS,
                    &batch::QUANTISED_COLUMNS
                ]
                .iter()
                .any(|columns| columns.contains(&name.as_str())),
                "{name}: every column is in one of the lists that set its dictionary"
            );
            if quantised {
                assert!(
                    encodings.contains(&Encoding::RLE_DICTIONARY),
                    "{name}: values as dictionary indices: {encodings:?}"
                );
            }
            if batch::TIME_COLUMNS.contains(&name.as_str()) || name == "created" {
                assert!(
                    encodings.contains(&Encoding::DELTA_BINARY_PACKED),
                    "{name}: times as deltas: {encodings:?}"
                );
            }
            if [&batch::UNIQUE_TEXT_COLUMNS[..], &batch::NAME_COLUMNS]
                .iter()
                .any(|c| c.contains(&name.as_str()))
            {
                assert!(
                    !encodings.contains(&Encoding::DELTA_BYTE_ARRAY),
                    "{name}: text stays plain, not version 2's fallback: {encodings:?}"
                );
            }
            let unique = batch::UNIQUE_TEXT_COLUMNS.contains(&name.as_str());
            let unprunable = batch::UNPRUNABLE_COLUMNS.contains(&name.as_str());
            assert_eq!(
                column.statistics().is_none(),
                unique || unprunable,
                "{name}: statistics only where a reader can prune with them"
            );
        }
    }

    #[test]
    fn a_crash_mid_seal_is_undone_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let base = 1_795_000_000_000;
        let (mut sink, _) = open(dir.path());
        sink.write(&[dweet("a", base)]).unwrap();
        sink.close().unwrap();
        let first_generation = finalised(dir.path());
        sink.write(&[dweet("a", base + 1), dweet("a", base + DAY_MS)])
            .unwrap();
        sink.close().unwrap();
        let all = finalised(dir.path());
        assert_eq!(all.len(), 6);

        // The crash: one file of the second generation never got renamed, a temporary remains.
        let second: Vec<_> = all
            .iter()
            .filter(|f| !first_generation.contains(f))
            .collect();
        fs::remove_file(second[0]).unwrap();
        let stray = first_generation[0].with_file_name(".part-1-0.parquet.tmp");
        fs::write(&stray, b"half a file").unwrap();

        drop(sink); // the directory lock goes with it
        let (sink, opened) = open(dir.path());
        assert_eq!(opened.removed_temporary, 1);
        assert_eq!(
            opened.removed_incomplete, 3,
            "the rest of the incomplete generation"
        );
        assert_eq!(finalised(dir.path()), first_generation);
        assert_eq!(
            sink.watermarks().get("a"),
            Some(base),
            "only complete generations count"
        );
    }

    #[test]
    fn recovery_reads_as_far_back_as_the_source_can_replay() {
        let now = 1_795_000_000_000;
        let five_days_ago = now - 5 * DAY_MS;
        let week = Duration::from_secs(7 * 24 * 60 * 60);
        assert!(
            recovery_horizon(now, week) < five_days_ago,
            "a source keeping a week: a 5-day-old generation's watermarks are read"
        );
        assert!(
            recovery_horizon(now, Duration::from_secs(24 * 60 * 60)) > five_days_ago,
            "dweet.io's day: it is past replay and need not be read"
        );
        assert!(
            recovery_horizon(now, Duration::MAX) < 0,
            "an import reads every footer"
        );
    }

    #[test]
    fn dead_letters_are_written_and_deduplicated_like_dweets() {
        let dir = tempfile::tempdir().unwrap();
        let letter = Record::DeadLetter(DeadLetter {
            thing: Some("a".to_owned()),
            created: Some("2026-11-23T00:00:00.000Z".to_owned()),
            created_ms: Some(1_795_000_000_000),
            received_ms: 1_795_000_000_100,
            payload: "[1,2]".to_owned(),
            reason: "not an object".to_owned(),
        });
        let (mut sink, _) = open(dir.path());
        sink.write(std::slice::from_ref(&letter)).unwrap();
        sink.close().unwrap();
        drop(sink); // the directory lock goes with it
        let (mut sink, _) = open(dir.path());
        assert_eq!(
            sink.write(&[letter]).unwrap(),
            1,
            "a dead-lettered dweet is not dead-lettered again"
        );
        sink.close().unwrap();
        assert_eq!(finalised(dir.path()).len(), 1);
    }

    #[test]
    fn a_sealed_generation_reports_the_rows_of_each_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let (mut sink, _) = ParquetSink::open(
            ParquetConfig::new(dir.path()),
            Duration::from_secs(24 * 60 * 60),
            Arc::clone(&metrics),
        )
        .unwrap();
        let base = 1_795_000_000_000;
        let mut without_readings = dweet("b", base);
        if let Record::Dweet(dweet) = &mut without_readings {
            dweet.readings.clear();
        }
        let letter = Record::DeadLetter(DeadLetter {
            thing: None,
            created: None,
            created_ms: None,
            received_ms: base,
            payload: "[1,2]".to_owned(),
            reason: "not an object".to_owned(),
        });
        sink.write(&[
            dweet("a", base),
            dweet("a", base + 1),
            without_readings,
            letter,
        ])
        .unwrap();
        let rows = |table: &str| {
            metrics.value(
                "dweetpipe_sink_rows_written_total",
                &[("sink", "parquet"), ("table", table)],
            )
        };
        assert_eq!(rows("dweets"), 0.0, "nothing counts before the seal");
        sink.close().unwrap();
        assert_eq!(rows("readings"), 2.0);
        assert_eq!(rows("dweets"), 3.0);
        assert_eq!(rows("dead_letters"), 1.0);
    }
}
