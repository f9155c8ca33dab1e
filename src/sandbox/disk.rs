//! The sandbox's state on disk, so a restart (an upgrade, a reboot, a crash) forgets nothing:
//! histories, locks and what they are attached to, alerts with their status, and the stored
//! dweets and alert events of locked things.
//!
//! The store is redb: one file (`sandbox.redb` in `--data`), ACID transactions with
//! checksummed commits, pure Rust (no C library to build), and an in-memory backend for
//! `--in-memory` so both modes run the same code. The in-memory [`super::store::Store`] stays
//! the working set that answers reads; every change is committed here *before* the request is
//! answered. Changes go through one writer thread that commits whatever has queued meanwhile
//! in one transaction (group commit): concurrent writers share an fsync.
//!
//! A commit that fails (a full disk) fails its requests and nothing of them is shown. redb
//! then refuses every later write until the file is reopened, so the writer reopens it before
//! the next commit, until that works: once the disk has room again the sandbox writes again
//! without a restart. Until then [`Disk::problem`] says why (`/healthz`).
//!
//! ```text
//! meta          "format" → "dweetpipe-sandbox/1"
//! dweets        (thing, created ms) → dweet JSON       the last max_history per thing, within retention
//! locks         lock id → {"salt","hash","thing"}       keys as salted HMAC-SHA256, never in clear
//! alerts        thing → alert JSON (condition, recipients, status, counting day)
//! stored        (day, thing, created ms) → dweet JSON  locked things' dweets, --stored-retention
//! alert_events  (day, thing, at ms) → event JSON       alert openings and closings, likewise
//! ```

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// What the file says it is; a file without it (or with another) is refused at start.
const FORMAT: &str = "dweetpipe-sandbox/1";
/// The file's name inside `--data`.
pub const FILE_NAME: &str = "sandbox.redb";
/// Changes committed in one transaction at most.
const GROUP_MAX: usize = 4096;

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const DWEETS: TableDefinition<(&str, i64), &str> = TableDefinition::new("dweets");
const LOCKS: TableDefinition<&str, &str> = TableDefinition::new("locks");
const ALERTS: TableDefinition<&str, &str> = TableDefinition::new("alerts");
const STORED: TableDefinition<(i64, &str, i64), &str> = TableDefinition::new("stored");
const ALERT_EVENTS: TableDefinition<(i64, &str, i64), &str> = TableDefinition::new("alert_events");

/// The store could not be opened or written. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "{path}: {problem}; it is not a dweetpipe sandbox store this version can read: move it away (the sandbox then starts empty) or point --data elsewhere"
    )]
    Foreign { path: PathBuf, problem: String },
    #[error("{path}: {problem}")]
    Io { path: PathBuf, problem: String },
    #[error(
        "{path} is in use by another sandbox process; stop it first, or give this one --data of its own"
    )]
    InUse { path: PathBuf },
    #[error("the sandbox's store stopped; see the log above")]
    Stopped,
    #[error("{path} is being reopened after a failed write ({problem}); try again shortly")]
    Reopening { path: PathBuf, problem: String },
}

/// A lock as kept: its key as a salted hash, and the thing it is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRow {
    pub salt: String,
    pub hash: String,
    pub thing: Option<String>,
}

/// One change to commit.
#[derive(Debug, Clone)]
pub enum Change {
    /// A dweet kept in the thing's history; the history now starts after `evicted_through`.
    Dweet {
        thing: String,
        created_ms: i64,
        json: std::sync::Arc<str>,
        evicted_through: Option<i64>,
        /// The thing is locked: the dweet is also stored (`--stored-retention`).
        stored: bool,
    },
    /// The thing's history expired.
    ForgetHistory {
        thing: String,
    },
    Lock {
        lock: String,
        row: LockRow,
    },
    Alert {
        thing: String,
        json: Option<String>,
    },
    AlertEvent {
        thing: String,
        at_ms: i64,
        json: String,
    },
    /// Stored dweets and alert events of days before `day` (days since the epoch) go.
    PurgeStoredBefore {
        day: i64,
    },
}

/// Days since the Unix epoch of `ms`.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(24 * 60 * 60 * 1000)
}

/// What the file held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Per thing, oldest first.
    pub histories: Vec<(String, Vec<(i64, String)>)>,
    pub locks: Vec<(String, LockRow)>,
    pub alerts: Vec<(String, String)>,
}

struct Job {
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The open database, shared by readers and the writer thread; `None` while the writer reopens
/// it and once closed.
type Shared = std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<Database>>>>;

/// Why the last commit failed, when it did; cleared by the next commit that works.
type Problem = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// The open store and its writer thread.
pub struct Disk {
    /// `None` once closed.
    jobs: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    database: Shared,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    problem: Problem,
    path: PathBuf,
}

impl Disk {
    /// Opens (creating) `dir/sandbox.redb`, or an in-memory store when `dir` is `None`, and
    /// reads what it holds.
    pub fn open(dir: Option<&Path>) -> Result<(Disk, Loaded), DiskError> {
        let (database, path) = match dir {
            Some(dir) => {
                let path = dir.join(FILE_NAME);
                std::fs::create_dir_all(dir).map_err(|e| DiskError::Io {
                    path: dir.to_path_buf(),
                    problem: e.to_string(),
                })?;
                let database = Database::create(&path).map_err(|e| match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => {
                        DiskError::InUse { path: path.clone() }
                    }
                    other => DiskError::Foreign {
                        path: path.clone(),
                        problem: other.to_string(),
                    },
                })?;
                (database, path)
            }
            None => {
                let database = Database::builder()
                    .create_with_backend(redb::backends::InMemoryBackend::new())
                    .map_err(|e| DiskError::Io {
                        path: PathBuf::from("(memory)"),
                        problem: e.to_string(),
                    })?;
                (database, PathBuf::from("(memory)"))
            }
        };
        let io = |problem: String| DiskError::Io {
            path: path.clone(),
            problem,
        };
        check_format(&database, &path)?;
        let loaded = load(&database).map_err(io)?;
        let database = std::sync::Arc::new(database);
        let shared: Shared = std::sync::Arc::new(std::sync::Mutex::new(Some(database.clone())));
        let problem = Problem::default();
        let (jobs, queue) = mpsc::channel::<Job>();
        let mut writer = Writer {
            database: Some(database),
            shared: shared.clone(),
            problem: problem.clone(),
            reopen_from: dir.map(|_| path.clone()),
            broken: false,
        };
        let writer = std::thread::Builder::new()
            .name("dweetpipe-sandbox-store".to_owned())
            .spawn(move || writer.write_forever(&queue))
            .map_err(|e| io(e.to_string()))?;
        Ok((
            Disk {
                jobs: std::sync::Mutex::new(Some(jobs)),
                database: shared,
                writer: std::sync::Mutex::new(Some(writer)),
                problem,
                path,
            },
            loaded,
        ))
    }

    /// Lets what is queued commit, then closes the file (another process, or a restarted
    /// sandbox, may open it). Later commits fail.
    pub fn close(&self) {
        drop(lock(&self.jobs).take());
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
        drop(lock(&self.database).take());
    }

    fn database(&self) -> Result<std::sync::Arc<Database>, DiskError> {
        if let Some(database) = lock(&self.database).clone() {
            return Ok(database);
        }
        match self.problem() {
            Some(problem) if lock(&self.jobs).is_some() => Err(DiskError::Reopening {
                path: self.path.clone(),
                problem,
            }),
            _ => Err(DiskError::Stopped),
        }
    }

    /// Why the last commit failed, while no commit has worked since.
    pub fn problem(&self) -> Option<String> {
        lock(&self.problem).clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits `changes` (with whatever else is queued) and resolves once they are durable.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), DiskError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (done, committed) = oneshot::channel();
        lock(&self.jobs)
            .as_ref()
            .ok_or(DiskError::Stopped)?
            .send(Job { changes, done })
            .map_err(|_| DiskError::Stopped)?;
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(problem)) => Err(DiskError::Io {
                path: self.path.clone(),
                problem,
            }),
            Err(_) => Err(DiskError::Stopped),
        }
    }

    /// The stored dweets of `thing` on `day` with `created` in `[from_ms, to_ms)`, oldest first.
    pub fn stored_dweets(
        &self,
        thing: &str,
        day: i64,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<String>, DiskError> {
        self.stored_range(STORED, thing, day, from_ms, to_ms)
    }

    /// The alert events of `thing` on `day`, oldest first.
    pub fn alert_events(&self, thing: &str, day: i64) -> Result<Vec<String>, DiskError> {
        self.stored_range(ALERT_EVENTS, thing, day, i64::MIN, i64::MAX)
    }

    fn stored_range(
        &self,
        table: TableDefinition<(i64, &str, i64), &str>,
        thing: &str,
        day: i64,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<String>, DiskError> {
        let io = |e: &dyn std::fmt::Display| DiskError::Io {
            path: self.path.clone(),
            problem: e.to_string(),
        };
        let read = self.database()?.begin_read().map_err(|e| io(&e))?;
        let table = match read.open_table(table) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(io(&e)),
        };
        let mut found = Vec::new();
        for item in table
            .range((day, thing, from_ms)..(day, thing, to_ms))
            .map_err(|e| io(&e))?
        {
            let (_, value) = item.map_err(|e| io(&e))?;
            found.push(value.value().to_owned());
        }
        Ok(found)
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new file gets the format marker; an existing one must carry it.
fn check_format(database: &Database, path: &Path) -> Result<(), DiskError> {
    let foreign = |problem: String| DiskError::Foreign {
        path: path.to_path_buf(),
        problem,
    };
    let write = database.begin_write().map_err(|e| foreign(e.to_string()))?;
    {
        let mut meta = write.open_table(META).map_err(|e| foreign(e.to_string()))?;
        let found = meta
            .get("format")
            .map_err(|e| foreign(e.to_string()))?
            .map(|v| v.value().to_owned());
        match found {
            Some(format) if format == FORMAT => {}
            Some(other) => return Err(foreign(format!("its format is {other:?}, not {FORMAT:?}"))),
            None => {
                let empty = write
                    .list_tables()
                    .map_err(|e| foreign(e.to_string()))?
                    .any(|t| t.name() != "meta");
                if empty {
                    return Err(foreign(
                        "it holds tables but no dweetpipe format marker".to_owned(),
                    ));
                }
                meta.insert("format", FORMAT)
                    .map_err(|e| foreign(e.to_string()))?;
            }
        }
    }
    write.commit().map_err(|e| foreign(e.to_string()))
}

fn load(database: &Database) -> Result<Loaded, String> {
    let read = database.begin_read().map_err(|e| e.to_string())?;
    let mut loaded = Loaded::default();
    if let Ok(dweets) = read.open_table(DWEETS) {
        for item in dweets.iter().map_err(|e| e.to_string())? {
            let (key, value) = item.map_err(|e| e.to_string())?;
            let (thing, created_ms) = key.value();
            let json = value.value().to_owned();
            match loaded.histories.last_mut() {
                Some((last, history)) if last == thing => history.push((created_ms, json)),
                _ => loaded
                    .histories
                    .push((thing.to_owned(), vec![(created_ms, json)])),
            }
        }
    }
    if let Ok(locks) = read.open_table(LOCKS) {
        for item in locks.iter().map_err(|e| e.to_string())? {
            let (key, value) = item.map_err(|e| e.to_string())?;
            let row: LockRow = serde_json::from_str(value.value())
                .map_err(|e| format!("lock {:?}: {e}", key.value()))?;
            loaded.locks.push((key.value().to_owned(), row));
        }
    }
    if let Ok(alerts) = read.open_table(ALERTS) {
        for item in alerts.iter().map_err(|e| e.to_string())? {
            let (key, value) = item.map_err(|e| e.to_string())?;
            loaded
                .alerts
                .push((key.value().to_owned(), value.value().to_owned()));
        }
    }
    Ok(loaded)
}

/// The writer thread's state: the database it commits to, and what it must do after a failure.
struct Writer {
    database: Option<std::sync::Arc<Database>>,
    shared: Shared,
    problem: Problem,
    /// The file to reopen after a failed commit; `None` in memory, where nothing can fail.
    reopen_from: Option<PathBuf>,
    /// A commit failed: redb refuses every later write until the file is reopened.
    broken: bool,
}

impl Writer {
    /// Takes a job, then whatever else has queued, commits them together, and answers each.
    /// Ends when every sender is gone.
    fn write_forever(&mut self, queue: &mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut jobs = vec![first];
            let mut changes = jobs[0].changes.len();
            while changes < GROUP_MAX {
                match queue.try_recv() {
                    Ok(job) => {
                        changes += job.changes.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            let outcome = self.commit(jobs.iter().flat_map(|j| j.changes.iter()));
            for job in jobs {
                let _ = job.done.send(outcome.clone());
            }
        }
    }

    fn commit<'a>(&mut self, changes: impl Iterator<Item = &'a Change>) -> Result<(), String> {
        let outcome = self.usable().and_then(|database| apply(&database, changes));
        match &outcome {
            Ok(()) => {
                if lock(&self.problem).take().is_some() {
                    tracing::info!("the sandbox commits again");
                }
            }
            Err(problem) => {
                tracing::error!(%problem, "the sandbox could not commit; the requests are answered with a failure and nothing of them is shown");
                self.broken = self.reopen_from.is_some();
                *lock(&self.problem) = Some(problem.clone());
            }
        }
        outcome
    }

    /// The database to commit to, reopened first after a failure.
    fn usable(&mut self) -> Result<std::sync::Arc<Database>, String> {
        if let (true, Some(path)) = (self.broken, &self.reopen_from) {
            drop(lock(&self.shared).take());
            if let Some(database) = self.database.take() {
                // Readers hold the database only for one read; the file can be opened again
                // once every handle is closed.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while std::sync::Arc::strong_count(&database) > 1
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                if std::sync::Arc::strong_count(&database) > 1 {
                    self.database = Some(database);
                    return Err("the store is still being read; not reopened yet".to_owned());
                }
            }
            let reopened = Database::create(path).map_err(|e| {
                format!(
                    "{}: could not reopen after a failed write: {e}",
                    path.display()
                )
            })?;
            let reopened = std::sync::Arc::new(reopened);
            *lock(&self.shared) = Some(reopened.clone());
            self.database = Some(reopened);
            self.broken = false;
            tracing::info!(path = %path.display(), "the sandbox's store is reopened after a failed write");
        }
        self.database
            .clone()
            .ok_or_else(|| "the store is closed".to_owned())
    }
}

fn apply<'a>(database: &Database, changes: impl Iterator<Item = &'a Change>) -> Result<(), String> {
    let write = database.begin_write().map_err(|e| e.to_string())?;
    {
        let e = |e: redb::Error| e.to_string();
        let mut dweets = write.open_table(DWEETS).map_err(|x| e(x.into()))?;
        let mut locks = write.open_table(LOCKS).map_err(|x| e(x.into()))?;
        let mut alerts = write.open_table(ALERTS).map_err(|x| e(x.into()))?;
        let mut stored = write.open_table(STORED).map_err(|x| e(x.into()))?;
        let mut events = write.open_table(ALERT_EVENTS).map_err(|x| e(x.into()))?;
        for change in changes {
            match change {
                Change::Dweet {
                    thing,
                    created_ms,
                    json,
                    evicted_through,
                    stored: locked,
                } => {
                    dweets
                        .insert((thing.as_str(), *created_ms), &**json)
                        .map_err(|x| e(x.into()))?;
                    if let Some(through) = evicted_through {
                        dweets
                            .retain_in(
                                (thing.as_str(), i64::MIN)..=(thing.as_str(), *through),
                                |_, _| false,
                            )
                            .map_err(|x| e(x.into()))?;
                    }
                    if *locked {
                        stored
                            .insert((day_of(*created_ms), thing.as_str(), *created_ms), &**json)
                            .map_err(|x| e(x.into()))?;
                    }
                }
                Change::ForgetHistory { thing } => {
                    dweets
                        .retain_in(
                            (thing.as_str(), i64::MIN)..=(thing.as_str(), i64::MAX),
                            |_, _| false,
                        )
                        .map_err(|x| e(x.into()))?;
                }
                Change::Lock { lock, row } => {
                    let json = serde_json::to_string(row).map_err(|x| x.to_string())?;
                    locks
                        .insert(lock.as_str(), json.as_str())
                        .map_err(|x| e(x.into()))?;
                }
                Change::Alert { thing, json } => match json {
                    Some(json) => {
                        alerts
                            .insert(thing.as_str(), json.as_str())
                            .map_err(|x| e(x.into()))?;
                    }
                    None => {
                        alerts.remove(thing.as_str()).map_err(|x| e(x.into()))?;
                    }
                },
                Change::AlertEvent { thing, at_ms, json } => {
                    events
                        .insert((day_of(*at_ms), thing.as_str(), *at_ms), json.as_str())
                        .map_err(|x| e(x.into()))?;
                }
                Change::PurgeStoredBefore { day } => {
                    stored
                        .retain_in((i64::MIN, "", i64::MIN)..(*day, "", i64::MIN), |_, _| false)
                        .map_err(|x| e(x.into()))?;
                    events
                        .retain_in((i64::MIN, "", i64::MIN)..(*day, "", i64::MIN), |_, _| false)
                        .map_err(|x| e(x.into()))?;
                }
            }
        }
    }
    write.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dweet(thing: &str, created_ms: i64, stored: bool) -> Change {
        Change::Dweet {
            thing: thing.to_owned(),
            created_ms,
            json: format!("{{\"thing\":\"{thing}\",\"created_ms\":{created_ms}}}").into(),
            evicted_through: None,
            stored,
        }
    }

    #[tokio::test]
    async fn stored_days_are_purged_whole_and_histories_are_cut_where_told() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open(Some(dir.path())).unwrap();
        let day_ms = 24 * 60 * 60 * 1000;
        let day = 20_000;
        disk.commit(vec![
            dweet("a", day * day_ms + 5, true),
            dweet("a", (day + 1) * day_ms + 5, true),
            dweet("b", (day + 1) * day_ms + 6, false),
        ])
        .await
        .unwrap();
        assert_eq!(
            disk.stored_dweets("a", day, i64::MIN, i64::MAX)
                .unwrap()
                .len(),
            1
        );
        assert!(
            disk.stored_dweets("b", day + 1, i64::MIN, i64::MAX)
                .unwrap()
                .is_empty(),
            "b is not locked"
        );
        disk.commit(vec![Change::PurgeStoredBefore { day: day + 1 }])
            .await
            .unwrap();
        assert!(
            disk.stored_dweets("a", day, i64::MIN, i64::MAX)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            disk.stored_dweets("a", day + 1, i64::MIN, i64::MAX)
                .unwrap()
                .len(),
            1
        );
        let Change::Dweet {
            thing,
            created_ms,
            json,
            stored,
            ..
        } = dweet("a", (day + 1) * day_ms + 9, false)
        else {
            unreachable!("dweet() makes a dweet")
        };
        disk.commit(vec![Change::Dweet {
            thing,
            created_ms,
            json,
            evicted_through: Some((day + 1) * day_ms + 5),
            stored,
        }])
        .await
        .unwrap();
        disk.close();
        let (again, loaded) = Disk::open(Some(dir.path())).unwrap();
        let a = loaded.histories.iter().find(|(t, _)| t == "a").unwrap();
        assert_eq!(
            a.1.iter().map(|(ms, _)| *ms).collect::<Vec<_>>(),
            [(day + 1) * day_ms + 9]
        );
        let (second, _) = (Disk::open(Some(dir.path())), ());
        assert!(
            matches!(second, Err(DiskError::InUse { .. })),
            "one process per file"
        );
        again.close();
    }
}
