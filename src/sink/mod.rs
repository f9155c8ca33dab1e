//! Where normalised records end up, and how they get there.
//!
//! ```text
//! records ──▶ fan_out ──▶ Parquet's Backlog ──▶ parquet::run (its own thread)
//!                    ├──▶ PostgreSQL's Backlog ─▶ postgres::run (its own task)
//!                    └──▶ JetStream's Backlog ──▶ nats::run (its own task)
//! ```
//!
//! Each sink is an independent consumer: the fan-out hands every batch to each sink's backlog
//! (memory, then a disk spool), which never blocks, so no sink waits for another. A sink's loop
//! takes batches oldest first and tells its backlog once they are durable; what it could not
//! make durable goes back into the backlog and is retried. One folder per sink holds its
//! config, its loop and its state.

pub mod backlog;
pub mod dir_lock;
pub mod forsaken;
pub mod interface;
pub mod nats;
pub mod parquet;
pub mod postgres;
pub mod spool;
pub mod watermarks;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::record::Record;
use crate::telemetry::Health;
pub use backlog::Backlog;
pub use dir_lock::{DirLock, LockError};
pub use forsaken::Forsaken;
pub use interface::{RunningSink, SinkConfig, SinkContext, StartedSink};
pub use watermarks::Watermarks;

/// Records the fan-out takes from the pipeline per batch.
const FAN_OUT_BATCH: usize = 8 * 1024;

/// A sink could not make rows durable. Causes are part of the messages, not `source`s, so
/// a chain printed with `{:#}` says each once.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Dataset(#[from] parquet::DatasetError),
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error("the {0} thread panicked; see the log above")]
    Panicked(&'static str),
    #[error(transparent)]
    Nats(#[from] crate::nats::NatsError),
}

impl SinkError {
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        SinkError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Hands every batch of `records` to each backlog until the pipeline closes, then closes the
/// backlogs (their loops drain and end). Runs on its own thread: a push that spills fsyncs.
pub fn spawn_fan_out(
    mut records: mpsc::Receiver<Record>,
    backlogs: Vec<Arc<Backlog>>,
    health: Arc<Health>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::current();
    let beat = health.register_loop("fan-out");
    std::thread::Builder::new()
        .name("dweetpipe-fan-out".to_owned())
        .spawn(move || {
            loop {
                beat.beat();
                let first = runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(1), records.recv()).await
                });
                let first = match first {
                    Ok(Some(record)) => record,
                    Ok(None) => break,
                    Err(_idle) => continue,
                };
                let mut batch = Vec::with_capacity(FAN_OUT_BATCH.min(records.len() + 1));
                batch.push(first);
                while batch.len() < FAN_OUT_BATCH {
                    match records.try_recv() {
                        Ok(record) => batch.push(record),
                        Err(_) => break,
                    }
                }
                let batch = Arc::new(batch);
                for backlog in &backlogs {
                    backlog.push(Arc::clone(&batch));
                }
            }
            for backlog in &backlogs {
                backlog.close();
            }
        })
}
