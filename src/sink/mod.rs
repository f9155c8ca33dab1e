//! Where normalised records end up. One folder per sink, its config struct beside its code.

pub mod parquet;
pub mod postgres;

use std::path::{Path, PathBuf};

/// A sink could not make rows durable.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing Parquet: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("building an Arrow batch: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl SinkError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        SinkError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
