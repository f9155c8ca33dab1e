//! The open generation: the files being written (one per dataset and date), sealed together
//! with the generation's id, its file count and its per-thing watermarks in every footer.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::NaiveDate;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::DatasetError;
use super::batch::{Dataset, Rows};
use crate::record::now_ms;
use crate::sink::Watermarks;

pub(super) const META_GENERATION: &str = "dweetpipe.generation";
pub(super) const META_FILES: &str = "dweetpipe.generation_files";
pub(super) const META_WATERMARKS: &str = "dweetpipe.watermarks";

/// The open generation, begun now if there is none. A free function so that callers can
/// borrow the sink's other fields beside it.
pub(super) fn open_generation<'g>(
    open: &'g mut Option<Generation>,
    last: &mut i64,
) -> &'g mut Generation {
    open.get_or_insert_with(|| {
        // Strictly newer than anything on disk, so names never collide across restarts.
        let id = now_ms().max(*last + 1);
        *last = id;
        Generation {
            id,
            opened: Instant::now(),
            dataset_rows: [0; Dataset::ALL.len()],
            files: BTreeMap::new(),
            watermarks: Watermarks::new(),
        }
    })
}

/// One file of the open generation.
pub(super) struct OpenFile {
    pub(super) dataset: Dataset,
    pub(super) tmp_path: PathBuf,
    pub(super) final_path: PathBuf,
    pub(super) writer: ArrowWriter<File>,
    pub(super) rows: Rows,
}

/// The files being written, sealed together.
pub(super) struct Generation {
    pub(super) id: i64,
    pub(super) opened: Instant,
    /// Rows per dataset (in [`Dataset::ALL`]'s order), for the rows-written metric once
    /// sealed: counted twice a dweet, so by position rather than looked up.
    pub(super) dataset_rows: [u64; Dataset::ALL.len()],
    pub(super) files: BTreeMap<(Dataset, NaiveDate), OpenFile>,
    pub(super) watermarks: Watermarks,
}

impl Generation {
    pub(super) fn rows(&self) -> u64 {
        self.dataset_rows.iter().sum()
    }

    pub(super) fn count(&mut self, dataset: Dataset, rows: u64) {
        self.dataset_rows[dataset as usize] += rows;
    }
}

impl OpenFile {
    pub(super) fn create(
        dir: &Path,
        dataset: Dataset,
        date: NaiveDate,
        (member, generation, sequence): (Option<&str>, i64, usize),
        properties: WriterProperties,
    ) -> Result<Self, DatasetError> {
        let partition = dir.join(dataset.dir_name()).join(format!("date={date}"));
        fs::create_dir_all(&partition).map_err(|e| DatasetError::io(&partition, e))?;
        let name = match member {
            Some(member) => format!("part-{member}-{generation}-{sequence}.parquet"),
            None => format!("part-{generation}-{sequence}.parquet"),
        };
        let tmp_path = partition.join(format!(".{name}.tmp"));
        let final_path = partition.join(name);
        let file = File::create(&tmp_path).map_err(|e| DatasetError::io(&tmp_path, e))?;
        let writer = ArrowWriter::try_new(file, dataset.schema(), Some(properties))?;
        Ok(OpenFile {
            dataset,
            tmp_path,
            final_path,
            writer,
            rows: Rows::new(dataset),
        })
    }

    pub(super) fn write_buffered(&mut self) -> Result<(), DatasetError> {
        if self.rows.len() == 0 {
            return Ok(());
        }
        let batch = self.rows.take_batch(&self.dataset.batch_schema())?;
        self.writer.write(&batch)?;
        Ok(())
    }

    pub(super) fn finish(
        &mut self,
        generation: i64,
        file_count: usize,
        watermarks: &str,
    ) -> Result<(), DatasetError> {
        self.write_buffered()?;
        self.writer.append_key_value_metadata(KeyValue::new(
            META_GENERATION.to_owned(),
            generation.to_string(),
        ));
        self.writer.append_key_value_metadata(KeyValue::new(
            META_FILES.to_owned(),
            file_count.to_string(),
        ));
        self.writer.append_key_value_metadata(KeyValue::new(
            META_WATERMARKS.to_owned(),
            watermarks.to_owned(),
        ));
        self.writer.finish()?;
        self.writer
            .inner()
            .sync_all()
            .map_err(|e| DatasetError::io(&self.tmp_path, e))
    }
}
