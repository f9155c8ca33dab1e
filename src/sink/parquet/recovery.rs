//! Start-up recovery: what the finalised files say was made durable.
//!
//! A generation's files are renamed into place one by one, so a crash can leave some of them.
//! Every file's footer records its generation and how many files the generation has, so an
//! incomplete generation is recognised and removed: its rows come back through backfill. The
//! per-thing watermarks are the maximum `created` over complete generations, read from the
//! footers, so no separate state file can disagree with the data.
//!
//! In a cluster, members may share the directory: file names carry the member
//! (`part-<member>-<generation>-<n>.parquet`), recovery removes only this member's leftovers,
//! and the watermarks count every member's complete generations, so a thing that moved here
//! is not written again. [`absorb`] reads the generations other members sealed since.

use std::collections::{HashMap, HashSet};

use std::fs;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};

use super::DatasetError;
use super::batch::Dataset;
use super::compact;
use super::{META_FILES, META_GENERATION, META_WATERMARKS};
use crate::sink::Watermarks;

/// What recovery found and did.
#[derive(Debug, Default)]
pub struct Recovered {
    pub watermarks: Watermarks,
    pub newest_generation: i64,
    pub removed_temporary: usize,
    pub removed_incomplete: usize,
    /// Other members' files already counted in `watermarks`.
    pub absorbed: HashSet<PathBuf>,
}

struct FileFooter {
    path: PathBuf,
    files: usize,
    watermarks: Watermarks,
}

/// A data file's name: `part-[<member>-]<generation>-<n>.parquet`.
#[derive(Debug, PartialEq, Eq)]
pub struct PartName<'a> {
    pub member: Option<&'a str>,
    pub generation: i64,
}

/// Reads a data file's name; temporary files (`.part-….parquet.tmp`) read as their final name.
pub fn part_name(name: &str) -> Option<PartName<'_>> {
    let name = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .unwrap_or(name);
    let stem = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let mut parts = stem.rsplitn(3, '-');
    let _sequence: usize = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    let member = parts.next();
    Some(PartName { member, generation })
}

/// How many files of each (member, generation) compaction or retention removed.
fn retired_by_generation(
    dir: &Path,
) -> Result<HashMap<(Option<String>, i64), usize>, DatasetError> {
    let mut gone = HashMap::new();
    for name in compact::retired_names(dir)? {
        if let Some(part) = part_name(&name) {
            *gone
                .entry((part.member.map(str::to_owned), part.generation))
                .or_default() += 1;
        }
    }
    Ok(gone)
}

/// Every data and temporary file under `dir`'s datasets (hidden folders, a retention's
/// leftovers, left out).
fn files(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut all = Vec::new();
    for dataset in Dataset::ALL {
        for partition in read_dir(&dir.join(dataset.dir_name()))? {
            let hidden = partition
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if partition.is_dir() && !hidden {
                all.extend(read_dir(&partition)?);
            }
        }
    }
    Ok(all)
}

/// Scans `dir` as `member` (`None` outside a cluster). Files of generations older than
/// `horizon_ms` are taken as complete without being opened: their things' dweets are past the
/// source's retention anyway.
pub fn recover(
    dir: &Path,
    horizon_ms: i64,
    member: Option<&str>,
) -> Result<Recovered, DatasetError> {
    let mut recovered = Recovered::default();
    recovered.removed_temporary += compact::finish_interrupted(dir)?;
    let retired = retired_by_generation(dir)?;
    let mut by_generation: HashMap<(Option<String>, i64), Vec<FileFooter>> = HashMap::new();
    for path in files(dir)? {
        let name = file_name(&path);
        if compact::compacted_generation(&name).is_some_and(|newest| newest >= horizon_ms) {
            recovered
                .watermarks
                .raise_all(compact::footer_watermarks(&path)?);
            if !name.starts_with('.') {
                recovered.absorbed.insert(path);
            }
            continue;
        }
        let Some(part) = part_name(&name) else {
            continue;
        };
        let own = part.member == member;
        if name.ends_with(".tmp") {
            // Another member's temporary file is its open generation, not a leftover.
            if own {
                fs::remove_file(&path).map_err(|e| DatasetError::io(&path, e))?;
                recovered.removed_temporary += 1;
            }
            continue;
        }
        if own {
            recovered.newest_generation = recovered.newest_generation.max(part.generation);
        }
        if part.generation < horizon_ms {
            continue;
        }
        match read_footer(&path, part.generation) {
            Ok(footer) => by_generation
                .entry((part.member.map(str::to_owned), part.generation))
                .or_default()
                .push(footer),
            Err(reason) if own => {
                // A file whose footer cannot be read was not finalised by us.
                tracing::warn!(path = %path.display(), %reason, "removing an unreadable Parquet file");
                fs::remove_file(&path).map_err(|e| DatasetError::io(&path, e))?;
                recovered.removed_incomplete += 1;
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "ignoring another member's unreadable Parquet file")
            }
        }
    }
    for ((owner, generation), files) in by_generation {
        let own = owner.as_deref() == member;
        let expected = files.iter().map(|f| f.files).max().unwrap_or(0);
        let gone = retired
            .get(&(owner.clone(), generation))
            .copied()
            .unwrap_or(0);
        if files.len() + gone < expected {
            if !own {
                // Still being sealed, or its member's next start removes it.
                continue;
            }
            tracing::warn!(
                generation,
                found = files.len(),
                expected,
                "removing an incomplete generation; backfill brings its rows back"
            );
            for file in &files {
                fs::remove_file(&file.path).map_err(|e| DatasetError::io(&file.path, e))?;
            }
            recovered.removed_incomplete += files.len();
            continue;
        }
        for file in files {
            recovered.watermarks.raise_all(file.watermarks);
            if !own {
                recovered.absorbed.insert(file.path);
            }
        }
    }
    Ok(recovered)
}

/// Adds the watermarks of complete generations other members sealed since the last look
/// (those not in `absorbed`), and remembers them. Removes nothing. Returns the files read.
pub fn absorb(
    dir: &Path,
    horizon_ms: i64,
    member: Option<&str>,
    absorbed: &mut HashSet<PathBuf>,
    watermarks: &mut Watermarks,
) -> Result<usize, DatasetError> {
    let retired = retired_by_generation(dir)?;
    let mut by_generation: HashMap<(String, i64), Vec<FileFooter>> = HashMap::new();
    let mut read = 0;
    for path in files(dir)? {
        let name = file_name(&path);
        if name.ends_with(".tmp") || absorbed.contains(&path) {
            continue;
        }
        if compact::compacted_generation(&name).is_some_and(|newest| newest >= horizon_ms) {
            watermarks.raise_all(compact::footer_watermarks(&path)?);
            absorbed.insert(path);
            read += 1;
            continue;
        }
        let Some(part) = part_name(&name) else {
            continue;
        };
        if part.member == member || part.generation < horizon_ms {
            continue;
        }
        if let Ok(footer) = read_footer(&path, part.generation) {
            let owner = part.member.unwrap_or_default().to_owned();
            by_generation
                .entry((owner, part.generation))
                .or_default()
                .push(footer);
        }
    }
    for ((owner, generation), files) in by_generation {
        let expected = files.iter().map(|f| f.files).max().unwrap_or(0);
        let gone = retired
            .get(&(Some(owner).filter(|o| !o.is_empty()), generation))
            .copied()
            .unwrap_or(0);
        if files.len() + gone < expected {
            continue;
        }
        for file in files {
            watermarks.raise_all(file.watermarks);
            absorbed.insert(file.path);
            read += 1;
        }
    }
    Ok(read)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut paths = Vec::new();
            for entry in entries {
                paths.push(entry.map_err(|e| DatasetError::io(dir, e))?.path());
            }
            Ok(paths)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(DatasetError::io(dir, e)),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
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
        None => Watermarks::new(),
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
    fn member_and_generation_are_read_from_the_file_name() {
        let solo = PartName {
            member: None,
            generation: 1_700_000_000_000,
        };
        assert_eq!(part_name("part-1700000000000-3.parquet"), Some(solo));
        assert_eq!(
            part_name(".part-worker-a-1-0.parquet.tmp"),
            Some(PartName {
                member: Some("worker-a"),
                generation: 1
            })
        );
        assert_eq!(part_name("notes.txt"), None);
        assert_eq!(part_name("part-x-y.parquet"), None);
    }
}
