//! One process per data directory: an exclusive `flock` on a `.dweetpipe.lock` file, taken
//! before anything in the directory is read, recovered or deleted.
//!
//! Two processes on one Parquet or spool directory delete each other's temporary files in
//! their start-up recovery and write the same dweets twice. The kernel drops the lock when the
//! holder dies (even by SIGKILL), so a crash never leaves a directory locked; the holder's PID
//! is written into the file so the second process can say who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = ".dweetpipe.lock";

/// Held while the directory is in use; dropping it releases the lock.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{dir} is in use by another dweetpipe process{holder}; stop it first, or give this process a directory of its own"
    )]
    Held { dir: PathBuf, holder: String },
    /// The cause is part of the message, not a `source`, so a chain is printed once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl DirLock {
    /// Creates `dir` if needed and locks it, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        Self::acquire_as(dir, None)
    }

    /// Like [`DirLock::acquire`], for one cluster member of a directory that members share
    /// (each writes only its own files): the lock is `.dweetpipe-<member>.lock`.
    pub fn acquire_as(dir: &Path, member: Option<&str>) -> Result<DirLock, LockError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| LockError::Io { path, error }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = match member {
            Some(member) => dir.join(format!(".dweetpipe-{member}.lock")),
            None => dir.join(LOCK_FILE),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!(" (PID {pid})"),
                    Err(_) => String::new(),
                };
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(LockError::Io { path, error });
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()))
            .map_err(io(&path))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let refused = DirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains(&format!("PID {}", std::process::id())),
            "{refused}"
        );
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
