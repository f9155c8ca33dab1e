//! Closed dates laid out for reading, and old dates removed: compaction and retention of the
//! Parquet dataset.
//!
//! A live worker seals a generation every few minutes, so a date ends as hundreds of small
//! files with every board's rows interleaved: a reader opens them all and can skip nothing.
//! Compaction rewrites a closed date's files of one dataset into one file sorted by
//! `(thing, time)`, in row groups small enough that one board's rows fall in a few of them,
//! with `thing` statistics on, so readers skip the other boards' row groups (and `value`'s,
//! which the live files go without).
//!
//! Both are rewrites, made crash-safe by their order (each step has a test):
//! 1. the new file is written under a hidden temporary name and fsynced;
//! 2. the names of the files it replaces are appended to the retired ledger and fsynced;
//! 3. it is renamed into place (its footer lists what it replaces) and the folder fsynced;
//! 4. the replaced files are removed.
//!
//! A crash before 3 leaves the old files (the temporary one is removed at start); after 3,
//! the next start removes whatever the new file replaces that still exists. The ledger lets
//! recovery tell a generation whose files were compacted or retired from one a crash cut
//! short. Retention appends a date's names to the ledger, renames the folder to a hidden name
//! (readers stop seeing it at once) and removes it.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array};
use arrow_schema::ArrowError;
use arrow_select::concat::concat_batches;
use arrow_select::take::take_record_batch;
use chrono::NaiveDate;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::ColumnPath;

use super::DatasetError;
use super::META_WATERMARKS;
use super::batch::Dataset;
use super::file_compression;
use super::recovery::part_name;
use crate::sink::Watermarks;

/// The footer key listing the files a compacted file replaces (JSON array of names).
pub const META_REPLACES: &str = "dweetpipe.replaces";
/// Names of data files removed by compaction or retention, one a line.
pub const LEDGER: &str = ".dweetpipe-retired";
const COMPACTED: &str = "compacted-";
/// Row groups per compacted file, about: one board's rows then span a few of them.
const ROW_GROUPS: usize = 64;
const MIN_GROUP_ROWS: usize = 2048;

/// A compaction step, for the crash tests: stop right after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Written,
    Retired,
    Renamed,
    RemovedOne,
}

/// One dataset of one date compacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    pub dataset: Dataset,
    pub date: NaiveDate,
    pub files_before: usize,
    pub rows: usize,
}

/// One dataset's date removed by retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    pub dataset: Dataset,
    pub date: NaiveDate,
    pub files: usize,
}

/// The newest generation a compacted file holds rows of, from its name.
pub fn compacted_generation(name: &str) -> Option<i64> {
    name.strip_prefix(COMPACTED)?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

/// The ms at which `date` ends (UTC).
fn date_end_ms(date: NaiveDate) -> i64 {
    date.succ_opt()
        .and_then(|next| next.and_hms_opt(0, 0, 0))
        .map_or(i64::MAX, |end| end.and_utc().timestamp_millis())
}

/// The `date=` folders of a dataset, with their dates (hidden ones left out).
pub fn dates(dir: &Path, dataset: Dataset) -> Result<Vec<(NaiveDate, PathBuf)>, DatasetError> {
    let root = dir.join(dataset.dir_name());
    let entries = match fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DatasetError::io(&root, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| DatasetError::io(&root, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(date) = name
            .strip_prefix("date=")
            .and_then(|d| d.parse::<NaiveDate>().ok())
        {
            out.push((date, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The files of a date folder a reader should read, sorted: the sealed data files, less those
/// a compacted file beside them replaces (between compaction's rename and its removals both
/// are there, and reading both would count their rows twice). Temporary and hidden files are
/// never sealed. A folder gone (retention) holds nothing.
pub fn readable_files(folder: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let names = match names_in(folder) {
        Ok(names) => names,
        Err(DatasetError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Vec::new());
        }
        Err(other) => return Err(other),
    };
    let sealed: Vec<&String> = names
        .iter()
        .filter(|n| !n.starts_with('.') && n.ends_with(".parquet"))
        .collect();
    let mut replaced = HashSet::new();
    for name in sealed.iter().filter(|n| compacted_generation(n).is_some()) {
        let listed: Vec<String> = footer(&folder.join(name))?
            .get(META_REPLACES)
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default();
        replaced.extend(listed.into_iter().filter(|old| old != *name));
    }
    Ok(sealed
        .into_iter()
        .filter(|n| !replaced.contains(*n))
        .map(|n| folder.join(n))
        .collect())
}

fn names_in(folder: &Path) -> Result<Vec<String>, DatasetError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(folder).map_err(|e| DatasetError::io(folder, e))? {
        let entry = entry.map_err(|e| DatasetError::io(folder, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn sync_dir(dir: &Path) -> Result<(), DatasetError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DatasetError::io(dir, e))
}

/// The names the ledger lists.
pub fn retired_names(dir: &Path) -> Result<HashSet<String>, DatasetError> {
    let path = dir.join(LEDGER);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(DatasetError::io(&path, e)),
    }
}

fn retire(dir: &Path, names: &[String]) -> Result<(), DatasetError> {
    if names.is_empty() {
        return Ok(());
    }
    let path = dir.join(LEDGER);
    let mut ledger = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| DatasetError::io(&path, e))?;
    let mut text = names.join("\n");
    text.push('\n');
    ledger
        .write_all(text.as_bytes())
        .and_then(|()| ledger.sync_all())
        .map_err(|e| DatasetError::io(&path, e))?;
    sync_dir(dir)
}

/// The key-value pairs of a file's footer.
fn footer(path: &Path) -> Result<HashMap<String, String>, DatasetError> {
    let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let reader = SerializedFileReader::new(file)?;
    Ok(reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
                .collect()
        })
        .unwrap_or_default())
}

/// The per-thing watermarks a data file's footer carries.
pub fn footer_watermarks(path: &Path) -> Result<Watermarks, DatasetError> {
    Ok(footer(path)?
        .get(META_WATERMARKS)
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default())
}

/// Finishes or undoes what a crash interrupted: removes temporary compacted files and hidden
/// retired folders, and the files a compacted file replaces that are still there. Returns
/// how many files it removed.
pub fn finish_interrupted(dir: &Path) -> Result<usize, DatasetError> {
    let mut removed = 0;
    for dataset in Dataset::ALL {
        let root = dir.join(dataset.dir_name());
        if let Ok(entries) = fs::read_dir(&root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".retired-") {
                    let path = entry.path();
                    fs::remove_dir_all(&path).map_err(|e| DatasetError::io(&path, e))?;
                    removed += 1;
                }
            }
        }
        for (_, folder) in dates(dir, dataset)? {
            let names = names_in(&folder)?;
            let parts = names.iter().any(|n| part_name(n).is_some());
            for name in &names {
                if name.starts_with(&format!(".{COMPACTED}")) {
                    let path = folder.join(name);
                    fs::remove_file(&path).map_err(|e| DatasetError::io(&path, e))?;
                    removed += 1;
                } else if parts && compacted_generation(name).is_some() {
                    let replaced: Vec<String> = footer(&folder.join(name))?
                        .get(META_REPLACES)
                        .and_then(|json| serde_json::from_str(json).ok())
                        .unwrap_or_default();
                    for old in replaced.iter().filter(|old| *old != name) {
                        match fs::remove_file(folder.join(old)) {
                            Ok(()) => removed += 1,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(DatasetError::io(&folder.join(old), e)),
                        }
                    }
                }
            }
        }
    }
    Ok(removed)
}

/// Compacts every dataset's dates that closed `grace` before `now_ms`, taking only files of
/// generations at least `grace` old (so nothing being sealed). `stop_after` is for the
/// crash tests.
pub fn compact_closed(
    dir: &Path,
    now_ms: i64,
    grace: Duration,
    properties: &WriterProperties,
    stop_after: Option<Step>,
) -> Result<Vec<Compacted>, DatasetError> {
    let settled = crate::record::ms_before(now_ms, grace);
    let mut done = Vec::new();
    for dataset in Dataset::ALL {
        for (date, folder) in dates(dir, dataset)? {
            if date_end_ms(date) > settled {
                continue;
            }
            let names = names_in(&folder)?;
            let parts: Vec<&String> = names
                .iter()
                .filter(|n| !n.starts_with('.'))
                .filter(|n| part_name(n).is_some_and(|p| p.generation <= settled))
                .collect();
            if parts.is_empty() {
                continue;
            }
            let inputs: Vec<&String> = names
                .iter()
                .filter(|n| compacted_generation(n).is_some())
                .chain(parts.iter().copied())
                .collect();
            let newest = inputs
                .iter()
                .filter_map(|n| {
                    part_name(n)
                        .map(|p| p.generation)
                        .or(compacted_generation(n))
                })
                .max()
                .unwrap_or(0);
            let rows = compact_one(
                (dir, &folder, dataset),
                &inputs,
                newest,
                properties,
                stop_after,
            )?;
            tracing::info!(dataset = dataset.dir_name(), %date, files = inputs.len(), rows, "compacted a closed date");
            done.push(Compacted {
                dataset,
                date,
                files_before: inputs.len(),
                rows,
            });
            if stop_after.is_some() {
                return Ok(done);
            }
        }
    }
    Ok(done)
}

/// The rows of `inputs` (names in `folder`) in one batch sorted by board and time, and the
/// highest watermark per thing their footers carry.
fn read_sorted(
    folder: &Path,
    inputs: &[&String],
    dataset: Dataset,
) -> Result<(RecordBatch, Watermarks), DatasetError> {
    let schema = dataset.schema();
    let mut batches = Vec::new();
    let mut watermarks = Watermarks::new();
    for name in inputs {
        let path = folder.join(name);
        watermarks.raise_all(footer_watermarks(&path)?);
        let file = File::open(&path).map_err(|e| DatasetError::io(&path, e))?;
        for batch in ParquetRecordBatchReaderBuilder::try_new(file)?.build()? {
            let batch = batch.map_err(DatasetError::Arrow)?;
            // The file's own schema may carry metadata ours lacks: keep the columns.
            batches.push(
                RecordBatch::try_new(Arc::clone(&schema), batch.columns().to_vec())
                    .map_err(DatasetError::Arrow)?,
            );
        }
    }
    let all = concat_batches(&schema, &batches).map_err(DatasetError::Arrow)?;
    drop(batches);
    let sorted = if all.num_rows() > 1 {
        let order = order_by_thing_and_time(&all, dataset.time_column())?;
        take_record_batch(&all, &order).map_err(DatasetError::Arrow)?
    } else {
        all
    };
    Ok((sorted, watermarks))
}

/// The rows' order by board, then time; a missing board or time first. Sorted here rather
/// than with arrow's generic sort kernels, whose crate alone took a fifth of a first build.
fn order_by_thing_and_time(all: &RecordBatch, time: &str) -> Result<UInt32Array, DatasetError> {
    let column = |name: &str| {
        all.column_by_name(name).ok_or_else(|| {
            DatasetError::Arrow(ArrowError::SchemaError(format!("no column {name:?}")))
        })
    };
    let things = column("thing")?;
    let times = column(time)?;
    let (Some(things), Some(times)) = (
        things.as_any().downcast_ref::<StringArray>(),
        times.as_any().downcast_ref::<TimestampMillisecondArray>(),
    ) else {
        return Err(DatasetError::Arrow(ArrowError::SchemaError(format!(
            "thing is not text or {time} is not a millisecond time"
        ))));
    };
    let key = |row: usize| {
        (
            things.is_valid(row).then(|| things.value(row)),
            times.is_valid(row).then(|| times.value(row)),
        )
    };
    let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
    order.sort_by(|a, b| key(*a as usize).cmp(&key(*b as usize)));
    Ok(UInt32Array::from(order))
}

/// How a compacted file is written: the sink's `properties` with row groups of `group` rows,
/// and what pays for itself in a file that is sorted, written once and kept long.
fn compacted_properties(properties: &WriterProperties, group: usize) -> WriterProperties {
    let mut properties = properties
        .clone()
        .into_builder()
        .set_max_row_group_row_count(Some(group))
        .set_column_statistics_enabled(ColumnPath::from("thing"), EnabledStatistics::Page)
        // A board's values in a row, where one that sends a single sensor gives pages of
        // a narrow range: a filter on values can skip the rest there.
        .set_column_statistics_enabled(ColumnPath::from("value"), EnabledStatistics::Page);
    // The names' dictionary and zstd's default level for the values.
    for column in super::batch::NAME_COLUMNS {
        properties = properties.set_column_dictionary_enabled(ColumnPath::from(column), true);
    }
    for column in super::batch::QUANTISED_COLUMNS {
        properties =
            properties.set_column_compression(ColumnPath::from(column), file_compression());
    }
    properties.build()
}

/// Rewrites `inputs` (names in `folder`) as one sorted file; returns its rows.
fn compact_one(
    (dir, folder, dataset): (&Path, &Path, Dataset),
    inputs: &[&String],
    newest: i64,
    properties: &WriterProperties,
    stop_after: Option<Step>,
) -> Result<usize, DatasetError> {
    let schema = dataset.schema();
    let (sorted, watermarks) = read_sorted(folder, inputs, dataset)?;
    let rows = sorted.num_rows();
    let group = (rows / ROW_GROUPS).max(MIN_GROUP_ROWS);
    let properties = compacted_properties(properties, group);
    let name = format!("{COMPACTED}{newest}.parquet");
    let tmp = folder.join(format!(".{name}.tmp"));
    let replaced: Vec<&String> = inputs.to_vec();
    {
        let file = File::create(&tmp).map_err(|e| DatasetError::io(&tmp, e))?;
        let mut writer = ArrowWriter::try_new(file, schema, Some(properties))?;
        writer.write(&sorted)?;
        writer.append_key_value_metadata(KeyValue::new(
            META_REPLACES.to_owned(),
            serde_json::to_string(&replaced).unwrap_or_default(),
        ));
        writer.append_key_value_metadata(KeyValue::new(
            META_WATERMARKS.to_owned(),
            serde_json::to_string(&watermarks).unwrap_or_default(),
        ));
        writer.finish()?;
        writer
            .inner()
            .sync_all()
            .map_err(|e| DatasetError::io(&tmp, e))?;
    }
    if stop_after == Some(Step::Written) {
        return Ok(rows);
    }
    let retiring: Vec<String> = inputs
        .iter()
        .filter(|n| part_name(n).is_some())
        .map(|n| (*n).clone())
        .collect();
    retire(dir, &retiring)?;
    if stop_after == Some(Step::Retired) {
        return Ok(rows);
    }
    let target = folder.join(&name);
    fs::rename(&tmp, &target).map_err(|e| DatasetError::io(&target, e))?;
    sync_dir(folder)?;
    if stop_after == Some(Step::Renamed) {
        return Ok(rows);
    }
    for old in inputs.iter().filter(|old| ***old != name) {
        let path = folder.join(old);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DatasetError::io(&path, e)),
        }
        if stop_after == Some(Step::RemovedOne) {
            return Ok(rows);
        }
    }
    sync_dir(folder)?;
    Ok(rows)
}

/// Removes every dataset's dates that ended at or before `cutoff_ms`. `stop_after` (the
/// number of steps: 1 ledger, 2 hidden) is for the crash tests.
pub fn retire_before(
    dir: &Path,
    cutoff_ms: i64,
    stop_after: Option<u8>,
) -> Result<Vec<Retired>, DatasetError> {
    let mut retired = Vec::new();
    for dataset in Dataset::ALL {
        let root = dir.join(dataset.dir_name());
        for (date, folder) in dates(dir, dataset)? {
            if date_end_ms(date) > cutoff_ms {
                continue;
            }
            let names = names_in(&folder)?;
            let parts: Vec<String> = names
                .iter()
                .filter(|n| part_name(n).is_some() && !n.ends_with(".tmp"))
                .cloned()
                .collect();
            retire(dir, &parts)?;
            if stop_after == Some(1) {
                return Ok(retired);
            }
            let hidden = root.join(format!(".retired-date={date}"));
            fs::rename(&folder, &hidden).map_err(|e| DatasetError::io(&folder, e))?;
            sync_dir(&root)?;
            if stop_after == Some(2) {
                return Ok(retired);
            }
            fs::remove_dir_all(&hidden).map_err(|e| DatasetError::io(&hidden, e))?;
            tracing::info!(dataset = dataset.dir_name(), %date, files = names.len(), "retention removed a date");
            retired.push(Retired {
                dataset,
                date,
                files: names.len(),
            });
        }
    }
    Ok(retired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;
    use crate::sink::parquet::{ParquetConfig, ParquetSink};
    use crate::telemetry::Metrics;
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float64Type;
    use parquet::basic::{Compression, ZstdLevel};

    const DAY: i64 = 24 * 60 * 60 * 1000;
    /// 2026-12-03T00:00:00Z
    const DEC3: i64 = 1_796_256_000_000;
    const NOW: i64 = DEC3 + 12 * 60 * 60 * 1000;

    fn dweet(thing: &str, created_ms: i64) -> Record {
        crate::record::test_dweet(thing, created_ms, &[("t", created_ms as f64)])
    }

    #[test]
    fn compacted_values_are_compressed_at_zstds_default_level_again() {
        let (value, thing) = (ColumnPath::from("value"), ColumnPath::from("thing"));
        let as_written = crate::sink::parquet::writer_properties();
        assert_eq!(
            as_written.compression(&value),
            Compression::UNCOMPRESSED,
            "the sink's values"
        );
        let compacted = compacted_properties(&as_written, 1_000);
        let default = Compression::ZSTD(ZstdLevel::default());
        assert_eq!(compacted.compression(&value), default, "compacted values");
        assert_eq!(
            compacted.compression(&thing),
            default,
            "the other columns as they were"
        );
        assert_eq!(compacted.max_row_group_row_count(), Some(1_000));
    }

    fn open(dir: &Path) -> ParquetSink {
        reopen(dir).0
    }

    /// Three generations over 2026-11-30, 12-01 and today: the last spans an old date and
    /// today, so removing its old files must not make it look cut short.
    fn fill(dir: &Path) -> Vec<(String, i64)> {
        let mut sink = open(dir);
        let mut expected = Vec::new();
        let batches = [
            vec![("a", DEC3 - 3 * DAY + 10), ("b", DEC3 - 3 * DAY + 20)],
            vec![("a", DEC3 - 3 * DAY + 30), ("a", DEC3 - 2 * DAY + 5)],
            vec![
                ("c", DEC3 - 3 * DAY + 1),
                ("b", DEC3 - 2 * DAY + 7),
                ("b", DEC3 + 9),
            ],
        ];
        for batch in batches {
            let records: Vec<Record> = batch.iter().map(|(t, ms)| dweet(t, *ms)).collect();
            sink.write(&records).unwrap();
            sink.close().unwrap();
            expected.extend(batch.iter().map(|(t, ms)| ((*t).to_owned(), *ms)));
            // Generations are named by the ms they open at: keep them apart.
            std::thread::sleep(Duration::from_millis(2));
        }
        expected.sort();
        expected
    }

    /// Every dweet row in the dataset's visible files, sorted.
    fn union(dir: &Path) -> Vec<(String, i64)> {
        let mut rows = Vec::new();
        for (date, _) in dates(dir, Dataset::Dweets).unwrap() {
            rows.extend(crate::sink::parquet::held::dweets_on(dir, date).unwrap());
        }
        // A set cannot show a repeat: count files' rows too.
        let mut counted = 0;
        for (_, folder) in dates(dir, Dataset::Dweets).unwrap() {
            for name in names_in(&folder).unwrap() {
                if name.ends_with(".parquet") && !name.starts_with('.') {
                    let file = File::open(folder.join(&name)).unwrap();
                    let reader = SerializedFileReader::new(file).unwrap();
                    counted += reader.metadata().file_metadata().num_rows() as usize;
                }
            }
        }
        assert_eq!(counted, rows.len(), "no dweet is in two files");
        rows.sort();
        rows
    }

    fn files_per_closed_date(dir: &Path) -> Vec<usize> {
        let mut counts = Vec::new();
        for dataset in Dataset::ALL {
            for (date, folder) in dates(dir, dataset).unwrap() {
                if date_end_ms(date) <= NOW - DAY {
                    counts.push(
                        names_in(&folder)
                            .unwrap()
                            .iter()
                            .filter(|n| !n.starts_with('.'))
                            .count(),
                    );
                }
            }
        }
        counts
    }

    fn properties() -> WriterProperties {
        crate::sink::parquet::writer_properties()
    }

    /// Compacts as a run two hours from now would (the fresh generations settled).
    fn compact_later(dir: &Path, stop: Option<Step>) -> Vec<Compacted> {
        let later = crate::record::now_ms() + 2 * 60 * 60 * 1000;
        compact_closed(dir, later, Duration::from_secs(3600), &properties(), stop).unwrap()
    }

    /// Opens the sink (its recovery runs) and says what recovery removed.
    fn reopen(dir: &Path) -> (ParquetSink, crate::sink::parquet::Opened) {
        ParquetSink::open(
            ParquetConfig::new(dir),
            Duration::MAX,
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap()
    }

    /// A stop after each step, and none.
    const EVERY_STOP: [Option<Step>; 5] = [
        Some(Step::Written),
        Some(Step::Retired),
        Some(Step::Renamed),
        Some(Step::RemovedOne),
        None,
    ];

    #[test]
    fn a_kill_at_any_compaction_step_leaves_every_dweet_once() {
        for stop in EVERY_STOP {
            let dir = tempfile::tempdir().unwrap();
            let expected = fill(dir.path());
            let marks = open(dir.path()).watermarks().clone();
            let done = compact_later(dir.path(), stop);
            assert!(!done.is_empty(), "{stop:?}: something to compact");
            // The process dies here; the next start recovers.
            let sink = open(dir.path());
            assert_eq!(union(dir.path()), expected, "{stop:?}: after the restart");
            assert_eq!(sink.watermarks(), &marks, "{stop:?}: the watermarks hold");
            drop(sink);
            compact_later(dir.path(), None);
            let (sink, opened) = reopen(dir.path());
            assert_eq!(
                opened.removed_incomplete, 0,
                "{stop:?}: nothing looks cut short"
            );
            assert_eq!(union(dir.path()), expected, "{stop:?}: finished");
            assert_eq!(sink.watermarks(), &marks, "{stop:?}");
            let counts = files_per_closed_date(dir.path());
            assert!(
                counts.iter().all(|n| *n == 1),
                "{stop:?}: one file per dataset and closed date: {counts:?}"
            );
        }
    }

    #[test]
    fn a_reader_sees_every_row_once_at_every_compaction_step() {
        for stop in EVERY_STOP {
            let dir = tempfile::tempdir().unwrap();
            let expected = fill(dir.path()).len();
            compact_later(dir.path(), stop);
            // No restart: what a query running beside the compaction sees.
            let mut rows = 0;
            for (_, folder) in dates(dir.path(), Dataset::Readings).unwrap() {
                for path in readable_files(&folder).unwrap() {
                    let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
                    rows += reader.metadata().file_metadata().num_rows() as usize;
                }
            }
            assert_eq!(rows, expected, "{stop:?}: every reading once");
        }
    }

    #[test]
    fn a_kill_at_any_retention_step_removes_whole_dates_only() {
        for stop in [Some(1), Some(2), None] {
            let dir = tempfile::tempdir().unwrap();
            let expected = fill(dir.path());
            let marks = open(dir.path()).watermarks().clone();
            let cutoff = DEC3 - 2 * DAY; // the end of 2026-11-30
            retire_before(dir.path(), cutoff, stop).unwrap();
            let sink = open(dir.path());
            let kept: Vec<(String, i64)> = expected
                .iter()
                .filter(|(_, ms)| *ms >= cutoff)
                .cloned()
                .collect();
            let seen = union(dir.path());
            // Each dataset's date goes whole; a kill may come between two of them.
            assert!(
                seen == kept || (stop.is_some() && seen == expected),
                "{stop:?}: {seen:?}"
            );
            assert_eq!(
                sink.watermarks(),
                &marks,
                "{stop:?}: the newer dates' generations stay whole"
            );
            drop(sink);
            retire_before(dir.path(), cutoff, None).unwrap();
            let (_, opened) = reopen(dir.path());
            assert_eq!(opened.removed_incomplete, 0, "{stop:?}");
            assert_eq!(union(dir.path()), kept, "{stop:?}: finished");
        }
    }

    #[test]
    fn rows_are_ordered_by_board_then_time_with_missing_values_first() {
        let things: StringArray = vec![Some("b"), None, Some("a"), Some("a"), Some("a")].into();
        let times: TimestampMillisecondArray =
            vec![Some(1), Some(5), Some(2), Some(1), None].into();
        let batch = RecordBatch::try_from_iter([
            ("thing", Arc::new(things) as arrow_array::ArrayRef),
            ("time", Arc::new(times) as arrow_array::ArrayRef),
        ])
        .unwrap();
        let order = order_by_thing_and_time(&batch, "time").unwrap();
        assert_eq!(order.values().to_vec(), vec![1, 4, 3, 2, 0]);
        assert!(order_by_thing_and_time(&batch, "received_at").is_err());
    }

    /// The codec of `value` in each of a date's readings files, by file name.
    fn value_codecs(folder: &Path) -> Vec<Compression> {
        let mut names = names_in(folder).unwrap();
        names.sort();
        names
            .iter()
            .map(|name| {
                let reader =
                    SerializedFileReader::new(File::open(folder.join(name)).unwrap()).unwrap();
                let group = reader.metadata().row_group(0);
                group
                    .columns()
                    .iter()
                    .find(|column| column.column_path().string() == "value")
                    .unwrap()
                    .compression()
            })
            .collect()
    }

    #[test]
    fn a_date_with_values_compressed_and_uncompressed_compacts_whole() {
        // A worker upgraded mid-day: its earlier files hold values at zstd's level -1 (as
        // before 7d2d401), its later ones uncompressed.
        let dir = tempfile::tempdir().unwrap();
        let start = DEC3 - 2 * DAY;
        let mut sink = open(dir.path());
        sink.file_properties.names_plain = sink
            .file_properties
            .names_plain
            .clone()
            .into_builder()
            .set_column_compression(
                ColumnPath::from("value"),
                Compression::ZSTD(ZstdLevel::try_new(-1).unwrap()),
            )
            .build();
        sink.write(&[dweet("a", start + 10), dweet("b", start + 20)])
            .unwrap();
        sink.close().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        sink.file_properties = crate::sink::parquet::FileProperties::new();
        sink.write(&[dweet("a", start + 30), dweet("c", start + 40)])
            .unwrap();
        sink.close().unwrap();
        drop(sink);
        let folder = dir.path().join("readings").join("date=2026-12-01");
        let mut before = value_codecs(&folder);
        before.sort_by_key(|codec| format!("{codec:?}"));
        assert!(
            matches!(
                before.as_slice(),
                [Compression::UNCOMPRESSED, Compression::ZSTD(_)]
            ),
            "one file of each: {before:?}"
        );

        compact_later(dir.path(), None);
        assert_eq!(
            value_codecs(&folder),
            [Compression::ZSTD(ZstdLevel::default())]
        );
        let names = names_in(&folder).unwrap();
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(File::open(folder.join(&names[0])).unwrap())
                .unwrap()
                .build()
                .unwrap();
        let mut rows = Vec::new();
        for batch in reader {
            let batch = batch.unwrap();
            let things = batch.column_by_name("thing").unwrap().as_string::<i32>();
            let values = batch
                .column_by_name("value")
                .unwrap()
                .as_primitive::<Float64Type>();
            for row in 0..batch.num_rows() {
                rows.push((things.value(row).to_owned(), values.value(row)));
            }
        }
        // Each test dweet's one reading is its own time.
        let expected: Vec<(String, f64)> = [("a", 10), ("a", 30), ("b", 20), ("c", 40)]
            .iter()
            .map(|(thing, ms)| ((*thing).to_owned(), (start + ms) as f64))
            .collect();
        assert_eq!(rows, expected);
    }

    #[test]
    fn a_compacted_date_lets_a_reader_skip_other_boards() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(dir.path());
        let start = DEC3 - 2 * DAY;
        for minute in (0..1440).step_by(2) {
            let records: Vec<Record> = (0..200)
                .map(|board| dweet(&format!("S5D9-{board:04}"), start + minute * 60_000 + board))
                .collect();
            sink.write(&records).unwrap();
            if minute % 240 == 0 {
                sink.close().unwrap();
            }
        }
        sink.close().unwrap();
        drop(sink);
        compact_later(dir.path(), None);
        for dataset in [Dataset::Readings, Dataset::Dweets] {
            let folder = dir.path().join(dataset.dir_name()).join("date=2026-12-01");
            let names = names_in(&folder).unwrap();
            assert_eq!(names.len(), 1, "{names:?}");
            let reader =
                SerializedFileReader::new(File::open(folder.join(&names[0])).unwrap()).unwrap();
            let groups = reader.metadata().row_groups();
            let column = |name: &str| {
                groups[0]
                    .columns()
                    .iter()
                    .position(|c| c.column_path().string() == name)
                    .unwrap()
            };
            let thing = column("thing");
            assert!(
                groups[0].column(thing).dictionary_page_offset().is_some(),
                "{dataset:?}: compacted names get their dictionary back"
            );
            if dataset == Dataset::Readings {
                let value = column("value");
                assert!(
                    groups
                        .iter()
                        .all(|g| g.column(value).statistics().is_some()),
                    "compacted values get their statistics back"
                );
            }
            let admitting = groups
                .iter()
                .filter(|group| match group.column(thing).statistics() {
                    Some(parquet::file::statistics::Statistics::ByteArray(stats)) => {
                        let board = b"S5D9-0077".as_slice();
                        stats.min_opt().is_none_or(|min| min.data() <= board)
                            && stats.max_opt().is_none_or(|max| max.data() >= board)
                    }
                    _ => true,
                })
                .count();
            assert!(
                admitting * 10 <= groups.len(),
                "{dataset:?}: {admitting} of {} row groups admit one board",
                groups.len()
            );
        }
    }
}
