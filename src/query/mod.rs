//! Reading the Parquet dataset back without any other tool: `dweetpipe query`.
//!
//! The dataset's layout answers "what did these boards measure then" by itself: date folders
//! rule out whole days, and each row group's `thing` and `time` statistics rule out the rest
//! (after compaction a date is sorted by board, so one board's day is a few row groups). Only
//! sealed files are read, and never a file a compacted one beside it replaces, so a query sees
//! every reading once while a worker writes and compacts; it takes no lock.

pub mod aggregate;
pub mod pattern;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::{Array, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use chrono::NaiveDate;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::RowGroupMetaData;
use parquet::file::statistics::Statistics;

pub use aggregate::{Accumulator, Aggregate};
pub use pattern::Pattern;

use crate::record::ms_to_datetime;
use crate::sink::parquet::Dataset;
use crate::sink::parquet::DatasetError;
use crate::sink::parquet::compact::{dates, readable_files};

/// How often a date folder is listed again when a file in it vanishes under the query
/// (compaction finished, retention removed it) before the query gives up.
const RELISTS: usize = 5;

/// What to read.
#[derive(Debug, Clone)]
pub struct Query {
    /// Boards: names or globs; empty means every board.
    pub things: Vec<Pattern>,
    /// Sensors: names or globs; empty means every sensor.
    pub sensors: Vec<Pattern>,
    /// The range, `from_ms` inclusive, `to_ms` exclusive.
    pub from_ms: i64,
    pub to_ms: i64,
    pub shape: Shape,
}

/// What comes out.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Every reading.
    Raw,
    /// Aggregates per board, sensor and `every_ms` bucket.
    Every {
        every_ms: i64,
        aggregates: Vec<Aggregate>,
    },
    /// Each board's newest reading of each sensor.
    Latest,
}

/// One reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub time_ms: i64,
    pub thing: String,
    pub sensor: String,
    pub value: f64,
}

/// One bucket of one board's sensor: the aggregates in the order asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub start_ms: i64,
    pub thing: String,
    pub sensor: String,
    pub values: Vec<f64>,
}

/// The answer's rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    /// By board, time and sensor (raw) or by board and sensor (latest).
    Readings(Vec<Reading>),
    /// By board, sensor and bucket.
    Buckets(Vec<Bucket>),
}

impl Rows {
    pub fn len(&self) -> usize {
        match self {
            Rows::Readings(rows) => rows.len(),
            Rows::Buckets(rows) => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the query read and what the layout let it skip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Explain {
    pub dates_read: usize,
    pub dates_skipped: usize,
    pub files_read: usize,
    pub row_groups_read: usize,
    pub row_groups_skipped_by_thing: usize,
    pub row_groups_skipped_by_time: usize,
    pub rows_read: u64,
    pub rows_matched: u64,
}

impl Explain {
    pub fn row_groups(&self) -> usize {
        self.row_groups_read + self.row_groups_skipped_by_thing + self.row_groups_skipped_by_time
    }
}

#[derive(Debug)]
pub struct Answer {
    pub rows: Rows,
    pub explain: Explain,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "{dir}: not a dweetpipe Parquet dataset ({reason}); name the folder that holds readings/, dweets/ and dead_letters/, as [parquet] dir in the things file"
    )]
    NotADataset { dir: PathBuf, reason: String },
    #[error("{path}: not a readings file dweetpipe wrote ({reason})")]
    Foreign { path: PathBuf, reason: String },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "{path}: it kept changing while being read (compaction or retention); run the query again"
    )]
    Unsettled { path: PathBuf },
    #[error("THING {pattern:?} names no board with readings from {from} to {to}; {known}")]
    NoBoard {
        pattern: String,
        from: String,
        to: String,
        known: String,
    },
    #[error("--sensor {pattern:?} matches no sensor of the boards asked for; {known}")]
    NoSensor { pattern: String, known: String },
}

/// Runs `query` over the dataset in `dir`.
pub fn run(dir: &Path, query: &Query) -> Result<Answer, QueryError> {
    let root = dir.join(Dataset::Readings.dir_name());
    if !root.is_dir() {
        let reason = if dir.is_dir() {
            format!("it has no {}/ folder", Dataset::Readings.dir_name())
        } else {
            "no such folder".to_owned()
        };
        return Err(QueryError::NotADataset {
            dir: dir.to_path_buf(),
            reason,
        });
    }
    let mut scan = Scan::new(query);
    for (date, folder) in dates(dir, Dataset::Readings)? {
        if !date_overlaps(date, query.from_ms, query.to_ms) {
            scan.explain.dates_skipped += 1;
            continue;
        }
        scan.explain.dates_read += 1;
        scan.folder(&folder)?;
    }
    scan.check_every_pattern_matched(dir)?;
    let explain = scan.explain.clone();
    Ok(Answer {
        rows: scan.finish(),
        explain,
    })
}

fn date_overlaps(date: NaiveDate, from_ms: i64, to_ms: i64) -> bool {
    let Some(start) = date
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
    else {
        return false;
    };
    start < to_ms && start.saturating_add(24 * 60 * 60 * 1000) > from_ms
}

/// The state of one query's pass over the dataset.
struct Scan<'a> {
    query: &'a Query,
    explain: Explain,
    readings: Vec<Reading>,
    buckets: BTreeMap<(String, String, i64), Accumulator>,
    /// Per thing pattern: whether a row in range matched it.
    thing_seen: Vec<bool>,
    /// Per sensor pattern: whether a row of a wanted board matched it.
    sensor_seen: Vec<bool>,
    /// The sensors of the wanted boards, for the error that lists them.
    sensors_of_boards: BTreeSet<String>,
}

impl<'a> Scan<'a> {
    fn new(query: &'a Query) -> Self {
        Scan {
            query,
            explain: Explain::default(),
            readings: Vec::new(),
            buckets: BTreeMap::new(),
            thing_seen: vec![false; query.things.len()],
            sensor_seen: vec![false; query.sensors.len()],
            sensors_of_boards: BTreeSet::new(),
        }
    }

    /// Reads one date folder. Its rows are kept aside until the whole folder is read: if a
    /// file vanishes mid-way (a compaction finished), the folder is listed and read again.
    fn folder(&mut self, folder: &Path) -> Result<(), QueryError> {
        for _ in 0..RELISTS {
            let mut found = Vec::new();
            let mut explain = Explain::default();
            let mut vanished = false;
            for path in readable_files(folder)? {
                match File::open(&path) {
                    Ok(file) => self.file(&path, file, &mut found, &mut explain)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        vanished = true;
                        break;
                    }
                    Err(e) => return Err(DatasetError::io(&path, e).into()),
                }
            }
            if !vanished {
                self.explain.files_read += explain.files_read;
                self.explain.row_groups_read += explain.row_groups_read;
                self.explain.row_groups_skipped_by_thing += explain.row_groups_skipped_by_thing;
                self.explain.row_groups_skipped_by_time += explain.row_groups_skipped_by_time;
                self.explain.rows_read += explain.rows_read;
                found.into_iter().for_each(|reading| self.keep(reading));
                return Ok(());
            }
        }
        Err(QueryError::Unsettled {
            path: folder.to_path_buf(),
        })
    }

    /// Reads the row groups of one file that may hold a match; the rows of wanted boards in
    /// range go to `found` (sensor filtering happens in `keep`, which also notes what exists).
    fn file(
        &self,
        path: &Path,
        file: File,
        found: &mut Vec<Reading>,
        explain: &mut Explain,
    ) -> Result<(), QueryError> {
        let read_error = |e: &dyn std::fmt::Display| QueryError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| read_error(&e))?;
        let mut wanted = Vec::new();
        for (index, group) in builder.metadata().row_groups().iter().enumerate() {
            if !self.time_may_match(group) {
                explain.row_groups_skipped_by_time += 1;
            } else if !self.thing_may_match(group) {
                explain.row_groups_skipped_by_thing += 1;
            } else {
                wanted.push(index);
            }
        }
        explain.files_read += 1;
        explain.row_groups_read += wanted.len();
        if wanted.is_empty() {
            return Ok(());
        }
        let reader = builder
            .with_row_groups(wanted)
            .build()
            .map_err(|e| read_error(&e))?;
        for batch in reader {
            let batch = batch.map_err(|e| read_error(&e))?;
            let columns = Columns::of(&batch).map_err(|reason| QueryError::Foreign {
                path: path.to_path_buf(),
                reason,
            })?;
            explain.rows_read += batch.num_rows() as u64;
            for row in 0..batch.num_rows() {
                let time_ms = columns.time.value(row);
                if time_ms < self.query.from_ms || time_ms >= self.query.to_ms {
                    continue;
                }
                let thing = columns.thing.value(row);
                if !self.query.things.is_empty()
                    && !self.query.things.iter().any(|p| p.matches(thing))
                {
                    continue;
                }
                found.push(Reading {
                    time_ms,
                    thing: thing.to_owned(),
                    sensor: columns.sensor.value(row).to_owned(),
                    value: columns.value.value(row),
                });
            }
        }
        Ok(())
    }

    fn time_may_match(&self, group: &RowGroupMetaData) -> bool {
        match statistics(group, "time") {
            Some(Statistics::Int64(stats)) => {
                stats.min_opt().is_none_or(|min| *min < self.query.to_ms)
                    && stats.max_opt().is_none_or(|max| *max >= self.query.from_ms)
            }
            _ => true,
        }
    }

    fn thing_may_match(&self, group: &RowGroupMetaData) -> bool {
        if self.query.things.is_empty() {
            return true;
        }
        match statistics(group, "thing") {
            Some(Statistics::ByteArray(stats)) => {
                let min = stats.min_opt().map(|v| v.data());
                let max = stats.max_opt().map(|v| v.data());
                self.query
                    .things
                    .iter()
                    .any(|pattern| pattern.may_match_range(min, max))
            }
            _ => true,
        }
    }

    /// Notes what `reading` (of a wanted board, in range) matched and keeps it if its sensor
    /// is wanted.
    fn keep(&mut self, reading: Reading) {
        for (seen, pattern) in self.thing_seen.iter_mut().zip(&self.query.things) {
            *seen |= pattern.matches(&reading.thing);
        }
        let mut wanted = self.query.sensors.is_empty();
        for (seen, pattern) in self.sensor_seen.iter_mut().zip(&self.query.sensors) {
            if pattern.matches(&reading.sensor) {
                *seen = true;
                wanted = true;
            }
        }
        if !self.sensors_of_boards.contains(&reading.sensor) {
            self.sensors_of_boards.insert(reading.sensor.clone());
        }
        if !wanted {
            return;
        }
        self.explain.rows_matched += 1;
        match &self.query.shape {
            Shape::Raw => self.readings.push(reading),
            Shape::Every { every_ms, .. } => {
                let start = aggregate::bucket_start(reading.time_ms, *every_ms);
                self.accumulate(
                    (reading.thing, reading.sensor, start),
                    reading.time_ms,
                    reading.value,
                );
            }
            Shape::Latest => self.accumulate(
                (reading.thing, reading.sensor, 0),
                reading.time_ms,
                reading.value,
            ),
        }
    }

    fn accumulate(&mut self, key: (String, String, i64), ms: i64, value: f64) {
        self.buckets
            .entry(key)
            .and_modify(|bucket| bucket.add(ms, value))
            .or_insert_with(|| Accumulator::new(ms, value));
    }

    /// A board or sensor the user named that matched nothing is an error naming it (and what
    /// there is instead), not an empty answer.
    fn check_every_pattern_matched(&self, dir: &Path) -> Result<(), QueryError> {
        let (from, to) = (rfc3339(self.query.from_ms), rfc3339(self.query.to_ms));
        if let Some((pattern, _)) = self
            .query
            .things
            .iter()
            .zip(&self.thing_seen)
            .find(|(_, seen)| !**seen)
        {
            let boards = boards_in_range(dir, self.query.from_ms, self.query.to_ms)?;
            let known = if boards.is_empty() {
                "the dataset holds no readings in that range: widen it with --since, --from or --to"
                    .to_owned()
            } else {
                format!("boards with readings then: {}", listing(&boards))
            };
            return Err(QueryError::NoBoard {
                pattern: pattern.as_str().to_owned(),
                from,
                to,
                known,
            });
        }
        if let Some((pattern, _)) = self
            .query
            .sensors
            .iter()
            .zip(&self.sensor_seen)
            .find(|(_, seen)| !**seen)
        {
            let known = if self.sensors_of_boards.is_empty() {
                format!("those boards have no readings from {from} to {to}")
            } else {
                format!("their sensors: {}", listing(&self.sensors_of_boards))
            };
            return Err(QueryError::NoSensor {
                pattern: pattern.as_str().to_owned(),
                known,
            });
        }
        Ok(())
    }

    fn finish(mut self) -> Rows {
        match &self.query.shape {
            Shape::Raw => {
                self.readings.sort_by(|a, b| {
                    (&a.thing, a.time_ms, &a.sensor).cmp(&(&b.thing, b.time_ms, &b.sensor))
                });
                Rows::Readings(self.readings)
            }
            Shape::Every { aggregates, .. } => Rows::Buckets(
                self.buckets
                    .into_iter()
                    .map(|((thing, sensor, start_ms), bucket)| Bucket {
                        start_ms,
                        thing,
                        sensor,
                        values: aggregates.iter().map(|a| bucket.value(*a)).collect(),
                    })
                    .collect(),
            ),
            Shape::Latest => Rows::Readings(
                self.buckets
                    .into_iter()
                    .map(|((thing, sensor, _), bucket)| Reading {
                        time_ms: bucket.last_ms(),
                        thing,
                        sensor,
                        value: bucket.value(Aggregate::Last),
                    })
                    .collect(),
            ),
        }
    }
}

/// The columns of a readings batch, typed.
struct Columns<'b> {
    time: &'b TimestampMillisecondArray,
    thing: &'b StringArray,
    sensor: &'b StringArray,
    value: &'b Float64Array,
}

impl<'b> Columns<'b> {
    fn of(batch: &'b RecordBatch) -> Result<Self, String> {
        fn column<'c, T: 'static>(batch: &'c RecordBatch, name: &str) -> Result<&'c T, String> {
            let array = batch
                .column_by_name(name)
                .ok_or_else(|| format!("no column {name:?}"))?;
            array
                .as_any()
                .downcast_ref::<T>()
                .ok_or_else(|| format!("column {name:?} is {}", array.data_type()))
        }
        let columns = Columns {
            time: column(batch, "time")?,
            thing: column(batch, "thing")?,
            sensor: column(batch, "sensor")?,
            value: column(batch, "value")?,
        };
        if columns.time.null_count() + columns.thing.null_count() + columns.sensor.null_count() > 0
            || columns.value.null_count() > 0
        {
            return Err("a column holds nulls".to_owned());
        }
        Ok(columns)
    }
}

fn statistics<'g>(group: &'g RowGroupMetaData, column: &str) -> Option<&'g Statistics> {
    group
        .columns()
        .iter()
        .find(|c| c.column_path().string() == column)
        .and_then(|c| c.statistics())
}

/// The boards with readings in a range, for an error message: reads only the `thing` column.
fn boards_in_range(dir: &Path, from_ms: i64, to_ms: i64) -> Result<BTreeSet<String>, QueryError> {
    let everything = Query {
        things: Vec::new(),
        sensors: Vec::new(),
        from_ms,
        to_ms,
        shape: Shape::Latest,
    };
    let mut scan = Scan::new(&everything);
    for (date, folder) in dates(dir, Dataset::Readings)? {
        if date_overlaps(date, from_ms, to_ms) {
            scan.folder(&folder)?;
        }
    }
    Ok(scan
        .buckets
        .into_keys()
        .map(|(thing, _, _)| thing)
        .collect())
}

/// At most ten names, and how many there are in all.
fn listing(names: &BTreeSet<String>) -> String {
    const SHOWN: usize = 10;
    let shown: Vec<&str> = names.iter().take(SHOWN).map(String::as_str).collect();
    if names.len() > SHOWN {
        format!("{}, … ({} in all)", shown.join(", "), names.len())
    } else {
        shown.join(", ")
    }
}

/// A time as the output writes it: RFC 3339, UTC, milliseconds.
pub fn rfc3339(ms: i64) -> String {
    ms_to_datetime(ms)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}
