//! Start-up recovery: what the finalised files say was made durable.
//!
//! A generation's files are renamed into place one by one, so a crash can leave some of them.
//! Every file's footer records its generation and how many files the generation has, so an
//! incomplete generation is recognised and removed: its rows come back through backfill. The
//! per-thing watermarks are the maximum `created` over complete generations, read from the
//! footers, so no separate state file can disagree with the data.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};

use super::batch::Dataset;
use super::{META_FILES, META_GENERATION, META_WATERMARKS};
use crate::sink::SinkError;

/// What recovery found and did.
#[derive(Debug, Default)]
pub struct Recovered {
    pub watermarks: HashMap<String, i64>,
    pub newest_generation: i64,
    pub removed_temporary: usize,
    pub removed_incomplete: usize,
}

struct FileFooter {
    path: PathBuf,
    files: usize,
    watermarks: HashMap<String, i64>,
}

/// Scans `dir`. Files of generations older than `horizon_ms` are taken as complete without
/// being opened: their things' dweets are past the source's retention anyway.
pub fn recover(dir: &Path, horizon_ms: i64) -> Result<Recovered, SinkError> {
    let mut recovered = Recovered::default();
    let mut by_generation: HashMap<i64, Vec<FileFooter>> = HashMap::new();
    for dataset in Dataset::ALL {
        let root = dir.join(dataset.dir_name());
        for partition in read_dir(&root)? {
            if !partition.is_dir() {
                continue;
            }
            for path in read_dir(&partition)? {
                let name = file_name(&path);
                if name.ends_with(".tmp") {
                    fs::remove_file(&path).map_err(|e| SinkError::io(&path, e))?;
                    recovered.removed_temporary += 1;
                    continue;
                }
                let Some(generation) = generation_of(&name) else {
                    continue;
                };
                recovered.newest_generation = recovered.newest_generation.max(generation);
                if generation < horizon_ms {
                    continue;
                }
                match read_footer(&path, generation) {
                    Ok(footer) => by_generation.entry(generation).or_default().push(footer),
                    Err(reason) => {
                        // A file whose footer cannot be read was not finalised by us.
                        tracing::warn!(path = %path.display(), %reason, "removing an unreadable Parquet file");
                        fs::remove_file(&path).map_err(|e| SinkError::io(&path, e))?;
                        recovered.removed_incomplete += 1;
                    }
                }
            }
        }
    }
    for (generation, files) in by_generation {
        let expected = files.iter().map(|f| f.files).max().unwrap_or(0);
        if files.len() < expected {
            tracing::warn!(
                generation,
                found = files.len(),
                expected,
                "removing an incomplete generation; backfill brings its rows back"
            );
            for file in &files {
                fs::remove_file(&file.path).map_err(|e| SinkError::io(&file.path, e))?;
            }
            recovered.removed_incomplete += files.len();
            continue;
        }
        for file in files {
            for (thing, created_ms) in file.watermarks {
                let mark = recovered.watermarks.entry(thing).or_insert(created_ms);
                *mark = (*mark).max(created_ms);
            }
        }
    }
    Ok(recovered)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, SinkError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut paths = Vec::new();
            for entry in entries {
                paths.push(entry.map_err(|e| SinkError::io(dir, e))?.path());
            }
            Ok(paths)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(SinkError::io(dir, e)),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `part-<generation>-<seq>.parquet` → generation.
pub fn generation_of(name: &str) -> Option<i64> {
    name.strip_prefix("part-")?
        .strip_suffix(".parquet")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

fn read_footer(path: &Path, generation: i64) -> Result<FileFooter, String> {
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(file).map_err(|e| e.to_string())?;
    let metadata = reader.metadata().file_metadata();
    let pairs: HashMap<&str, &str> = metadata
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .filter_map(|pair| Some((pair.key.as_str(), pair.value.as_deref()?)))
                .collect()
        })
        .unwrap_or_default();
    let recorded: i64 = pairs
        .get(META_GENERATION)
        .and_then(|v| v.parse().ok())
        .ok_or("no generation in the footer")?;
    if recorded != generation {
        return Err(format!(
            "footer generation {recorded} differs from the name"
        ));
    }
    let files = pairs
        .get(META_FILES)
        .and_then(|v| v.parse().ok())
        .ok_or("no file count in the footer")?;
    let watermarks = match pairs.get(META_WATERMARKS) {
        Some(json) => serde_json::from_str(json).map_err(|e| e.to_string())?,
        None => HashMap::new(),
    };
    Ok(FileFooter {
        path: path.to_path_buf(),
        files,
        watermarks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_read_from_the_file_name() {
        assert_eq!(
            generation_of("part-1700000000000-3.parquet"),
            Some(1_700_000_000_000)
        );
        assert_eq!(generation_of(".part-1-0.parquet.tmp"), None);
        assert_eq!(generation_of("notes.txt"), None);
    }
}
