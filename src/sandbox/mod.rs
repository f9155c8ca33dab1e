//! A dweet.io-compatible server and an S5D9 fleet simulator.
//!
//! The public service is gone, so this server is both the reference our tests, benchmarks and
//! demo run against, and a self-hosted replacement for boards that still dweet. It speaks the
//! protocol of `../shared/dweet-protocol.md` byte for byte over plain HTTP (TLS belongs to a
//! proxy in front of it), and forgets as the public service did: the last `max_history`
//! dweets of a thing, for `retention` after its last dweet. With a data directory its state
//! survives restarts (`disk`: committed before each answer); without one it lives in memory.

mod content;
pub mod disk;
mod evaluator;
mod http;
mod keys;
mod names;
pub mod notify;
mod pages;
pub mod simulator;
mod store;
mod stored;

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::Key;
use crate::protocol;

pub use crate::alert::condition::EvaluationLimits;
pub use store::Limits;

/// Everything the server can be told. `Default` is the public service's behaviour on
/// 127.0.0.1:8080.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub listen: SocketAddr,
    /// A path prefix to serve under (`/dweet`), or empty.
    pub prefix: String,
    /// Locks that may be attached to things, with their master keys.
    pub locks: Vec<(String, Key)>,
    pub limits: Limits,
    /// Most characters of compact content JSON one dweet may carry.
    pub max_content_chars: usize,
    /// A listen stream that has had nothing to send for this long is closed.
    pub idle_close: Duration,
    /// Largest request body read; bigger ones are refused without being buffered.
    pub max_body_bytes: usize,
    /// What one alert condition may use per dweet.
    pub alert_limits: EvaluationLimits,
    /// Threads running alert conditions.
    pub alert_threads: usize,
    /// Told about every alert that opens or closes.
    pub notifiers: Vec<Arc<dyn notify::Notify>>,
    /// Where the state is kept (`sandbox.redb`); `None` keeps it in memory only.
    pub data: Option<PathBuf>,
    /// How long a locked thing's dweets and alert events stay retrievable by date.
    pub stored_retention: Duration,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            prefix: String::new(),
            locks: Vec::new(),
            limits: Limits::default(),
            max_content_chars: 2000,
            idle_close: Duration::from_secs(60),
            max_body_bytes: 256 * 1024,
            alert_limits: EvaluationLimits::default(),
            alert_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4),
            notifiers: vec![Arc::new(notify::LogNotifier)],
            data: None,
            stored_retention: Duration::from_secs(30 * 24 * 60 * 60),
        }
    }
}

/// A failure answer: the protocol's `{"this":"failed","with":code,"because":...}`, sent with
/// HTTP 200 as the public service did, except where `http_status` says otherwise (unknown
/// paths and methods, which the protocol does not cover).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub because: Cow<'static, str>,
    pub http_status: u16,
}

impl Refusal {
    pub fn new(code: u16, because: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            code,
            because: because.into(),
            http_status: 200,
        }
    }

    pub fn not_found() -> Self {
        Self::new(404, protocol::NOT_FOUND)
    }

    pub fn locked() -> Self {
        Self::new(403, protocol::LOCKED)
    }

    pub fn wrong_key() -> Self {
        Self::new(403, protocol::WRONG_KEY)
    }

    fn with_http_status(mut self, status: u16) -> Self {
        self.http_status = status;
        self
    }
}

/// A running sandbox. Dropping it does not stop the server; call [`SandboxHandle::shutdown`].
pub struct SandboxHandle {
    local_addr: SocketAddr,
    prefix: String,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    disk: Arc<disk::Disk>,
}

impl SandboxHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL clients should use, prefix included.
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.local_addr, self.prefix)
    }

    /// Stops accepting, ends every listen stream, and waits (a few seconds at most) for
    /// in-flight requests to finish.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if let Err(error) = self.task.await {
            tracing::warn!(%error, "sandbox server task ended abnormally");
        }
        // What was answered is committed already; this closes the file for the next start.
        let disk = self.disk;
        let _ = tokio::task::spawn_blocking(move || disk.close()).await;
    }

    /// Resolves when the server stops by itself (it does not, short of a panic) or is shut down.
    pub async fn stopped(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Binds `config.listen`, opens the data directory (refusing a damaged or foreign store
/// with a message naming the file), and serves in the background.
pub async fn start(config: SandboxConfig) -> io::Result<SandboxHandle> {
    let (disk, loaded) = disk::Disk::open(config.data.as_deref()).map_err(io::Error::other)?;
    let disk = Arc::new(disk);
    let listener = TcpListener::bind(config.listen).await?;
    let local_addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let prefix = config.prefix.trim_end_matches('/').to_owned();
    let store = Arc::new(store::Store::new(
        config.limits.clone(),
        config.locks.iter().cloned(),
    ));
    let restored_things = loaded.histories.len();
    let locks = store.restore(loaded);
    disk.commit(locks).await.map_err(io::Error::other)?;
    if config.data.is_some() {
        tracing::info!(store = %disk.path().display(), things = restored_things, "sandbox state restored");
    }
    tokio::spawn(sweep_forever(
        Arc::clone(&store),
        Arc::clone(&disk),
        config.stored_retention,
        shutdown.clone(),
    ));
    let evaluator = evaluator::Evaluator::start(config.alert_threads, config.alert_limits)?;
    let app = Arc::new(http::App::new(
        store,
        Arc::clone(&disk),
        evaluator,
        config,
        shutdown.clone(),
    ));
    let handler = Arc::new(move |request| {
        let app = Arc::clone(&app);
        async move { app.handle(request).await }
    });
    let task = tokio::spawn(crate::http_server::serve(
        listener,
        handler,
        shutdown.clone(),
    ));
    tracing::info!(%local_addr, "sandbox listening");
    Ok(SandboxHandle {
        local_addr,
        prefix,
        shutdown,
        task,
        disk,
    })
}

/// Forgets expired histories (in memory and on disk) and stored dweets past their retention.
async fn sweep_forever(
    store: Arc<store::Store>,
    disk: Arc<disk::Disk>,
    stored_retention: Duration,
    shutdown: CancellationToken,
) {
    let every =
        (store.limits().retention / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {
                let (removed, mut changes) = store.sweep();
                if removed > 0 {
                    tracing::debug!(removed, "forgot expired things");
                }
                let cutoff = chrono::Utc::now().timestamp_millis()
                    - i64::try_from(stored_retention.as_millis()).unwrap_or(i64::MAX);
                // Whole days: a stored day goes once all of it is past the retention.
                changes.push(disk::Change::PurgeStoredBefore { day: disk::day_of(cutoff) });
                if let Err(error) = disk.commit(changes).await {
                    tracing::warn!(%error, "could not forget expired state on disk; will retry");
                }
            }
        }
    }
}
