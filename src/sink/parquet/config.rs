//! The `[parquet]` section.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::Invalid;

/// The `[parquet]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    pub dir: PathBuf,
    /// Seal the open files after this long. Default 5 min.
    #[serde(
        default = "default_rotate_after",
        deserialize_with = "crate::settings::duration"
    )]
    pub rotate_after: Duration,
    /// Seal the open files once they hold this many rows (readings, dweets and dead letters
    /// together). Default 1,000,000.
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
    /// Records held in memory while the directory cannot be written (disk full, read-only),
    /// before the spool. Default 100,000.
    #[serde(default = "crate::sink::backlog::default_memory_max_rows")]
    pub memory_max_rows: usize,
    /// Where records wait on disk while the directory cannot be written. Put it on another
    /// filesystem than `dir` to ride out a full disk. Default: beside `dir`, named
    /// `<dir>-spool` (see [`ParquetConfig::spool_dir`]).
    #[serde(default, rename = "spool_dir")]
    pub spool_dir_setting: Option<PathBuf>,
    /// The spool's bound; past it records are dropped, counted and logged. Default 1GiB.
    #[serde(
        default = "crate::sink::backlog::default_spool_max",
        deserialize_with = "crate::settings::byte_size"
    )]
    pub spool_max: u64,
    /// A date is compacted (rewritten into one file per dataset, sorted by board and time)
    /// this long after it ends. Default "1h".
    #[serde(
        default = "default_compact_after",
        deserialize_with = "crate::settings::duration"
    )]
    pub compact_after: Duration,
    /// Dates older than this are removed, a whole date at a time. Default: kept for ever.
    #[serde(default, deserialize_with = "crate::settings::optional_duration")]
    pub retention: Option<Duration>,
    /// In a cluster, this member's name (from `[cluster]`, not written in `[parquet]`): file
    /// names carry it, and recovery touches only its files.
    #[serde(skip)]
    pub member: Option<String>,
}

fn default_compact_after() -> Duration {
    Duration::from_secs(60 * 60)
}

fn default_rotate_after() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_max_rows() -> u64 {
    1_000_000
}

impl ParquetConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ParquetConfig {
            dir: dir.into(),
            rotate_after: default_rotate_after(),
            max_rows: default_max_rows(),
            memory_max_rows: crate::sink::backlog::default_memory_max_rows(),
            spool_dir_setting: None,
            spool_max: crate::sink::backlog::default_spool_max(),
            compact_after: default_compact_after(),
            retention: None,
            member: None,
        }
    }

    /// The buffer settings of this section.
    pub fn backlog(&self) -> crate::sink::backlog::BacklogConfig {
        crate::sink::backlog::BacklogConfig {
            memory_max_rows: self.memory_max_rows,
            spool_dir: self.spool_dir(),
            spool_max: self.spool_max,
        }
    }

    /// Where the spool is: `spool_dir`, or `<dir>-spool` beside the dataset directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir_setting.clone().unwrap_or_else(|| {
            let mut name = self.dir.file_name().unwrap_or_default().to_os_string();
            name.push("-spool");
            self.dir.with_file_name(name)
        })
    }

    /// Checks values; keys in the error are relative to `[parquet]`.
    pub fn validate(&self) -> Result<(), Invalid> {
        const FIX: &str = "see the [parquet] section of config/things.example.toml";
        if self.dir.as_os_str().is_empty() {
            return Err(Invalid::new("dir", "the directory is empty", FIX));
        }
        if self.max_rows == 0 {
            return Err(Invalid::new("max_rows", "must be at least 1", FIX));
        }
        if self.spool_dir() == self.dir {
            return Err(Invalid::new(
                "spool_dir",
                "must not be the Parquet directory itself",
                "give the spool its own directory, ideally on another filesystem",
            ));
        }
        if self
            .retention
            .is_some_and(|kept| kept < Duration::from_secs(24 * 60 * 60))
        {
            return Err(Invalid::new(
                "retention",
                "must be at least 1d: dates go whole",
                "give how long to keep, like \"90d\"; leave it out to keep everything",
            ));
        }
        if self.rotate_after < Duration::from_millis(100)
            || self.rotate_after > Duration::from_secs(24 * 60 * 60)
        {
            return Err(Invalid::new(
                "rotate_after",
                "must be between 100ms and 24h",
                FIX,
            ));
        }
        Ok(())
    }
}
