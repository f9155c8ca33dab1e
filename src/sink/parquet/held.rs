//! Which dweets one date's sealed files hold, as (thing, created ms).
//!
//! A board's watermark says "everything up to here is stored" only while its dweets arrive
//! oldest first. An import of older history (a stored-dweets export, `history --date`) breaks
//! that on purpose: its dweets are below the watermark and yet missing. For those the sink
//! asks the date they belong in, reading only the `thing` and `created` columns of that
//! date's `dweets` files (every member's, in a shared directory).

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use arrow_array::{Array, StringArray, TimestampMillisecondArray};
use chrono::NaiveDate;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::Dataset;
use super::DatasetError;

/// The (thing, created) of every dweet in `dir`'s sealed `dweets` files of `date`.
pub fn dweets_on(dir: &Path, date: NaiveDate) -> Result<HashSet<(String, i64)>, DatasetError> {
    let folder = dir
        .join(Dataset::Dweets.dir_name())
        .join(format!("date={date}"));
    let mut held = HashSet::new();
    let entries = match fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(held),
        Err(error) => return Err(DatasetError::io(&folder, error)),
    };
    for entry in entries {
        let path = entry.map_err(|e| DatasetError::io(&folder, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || !name.ends_with(".parquet") {
            continue;
        }
        let file = fs::File::open(&path).map_err(|e| DatasetError::io(&path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [0, 1]);
        for batch in builder.with_projection(mask).build()? {
            let batch = batch.map_err(DatasetError::Arrow)?;
            let things = batch.column(0).as_any().downcast_ref::<StringArray>();
            let created = batch
                .column(1)
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>();
            let (Some(things), Some(created)) = (things, created) else {
                return Err(DatasetError::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a dweets file: thing and created are not its first columns",
                    ),
                ));
            };
            for row in 0..batch.num_rows() {
                if !things.is_null(row) && !created.is_null(row) {
                    held.insert((things.value(row).to_owned(), created.value(row)));
                }
            }
        }
    }
    Ok(held)
}
