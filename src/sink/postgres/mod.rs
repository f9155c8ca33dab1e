//! The PostgreSQL sink: batches into `dweets`, `readings` and `dead_letters` (COPY for bulk
//! batches, one INSERT per table for the live stream's small ones, see `insert.rs`), with each
//! thing's watermark kept in `things` in the same transaction.
//!
//! Exactly once without `ON CONFLICT` on the hot path: each thing's dweets arrive oldest first
//! and a batch commits atomically with the thing's `last_created`, so every stored dweet of a
//! thing is at or below its watermark and anything newer cannot conflict. Older dweets
//! (backfill after a restart, imports) take `ON CONFLICT DO NOTHING`, and so does a batch
//! retried after a conflict all the same (another writer). Connection-class errors are retried
//! forever; data errors are narrowed down by bisection and only the offending dweets go to
//! `dead_letters`.

pub mod arrange;
mod copy;
mod insert;
pub mod partitions;
pub mod retention;
pub mod rollup;
mod run;

pub use partitions::Partitions;
pub use run::PostgresLoop;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use crate::backoff::Backoff;
use crate::record::{DeadLetter, Record};
use crate::settings::Invalid;
use crate::telemetry::{Health, LoopBeat, Metrics, SinkName, Table};
use copy::BinaryRows;

/// The schema, embedded so the binary migrates without the source tree.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../../migrations/0001_schema.sql"),
    ),
    (
        2,
        "dead letter key",
        include_str!("../../../migrations/0002_dead_letter_key.sql"),
    ),
    (
        3,
        "readings key led by time",
        include_str!("../../../migrations/0003_readings_time_key.sql"),
    ),
    (
        4,
        "partitions and rollups",
        include_str!("../../../migrations/0004_partitions_and_rollups.sql"),
    ),
    (
        5,
        "readings arranged when closed",
        include_str!("../../../migrations/0005_readings_arranged_when_closed.sql"),
    ),
];

/// A database URL. It carries the password, so it never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn options(&self) -> Result<PgConnectOptions, PostgresError> {
        self.0
            .parse::<PgConnectOptions>()
            .map_err(|e| PostgresError::Url(strip_url(&e.to_string(), &self.0)))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(DatabaseUrl)
    }
}

/// An error text with the URL (and so the password) cut out.
fn strip_url(text: &str, url: &str) -> String {
    text.replace(url, "<database url>")
}

/// The `[postgres]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host/db`; or `url_env` names a variable holding it.
    pub url: Option<DatabaseUrl>,
    pub url_env: Option<String>,
    /// Records per statement (and per transaction) at most. Default 5000.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// Removed: batches are written as soon as the previous one commits, so no record waits
    /// on a timer. Kept only to refuse files that still set it with a clear message.
    #[serde(default, rename = "max_age")]
    pub removed_max_age: Option<serde::de::IgnoredAny>,
    /// Records held in memory while PostgreSQL is slow or down, before the spool. Default 100,000.
    #[serde(default = "crate::sink::backlog::default_memory_max_rows")]
    pub memory_max_rows: usize,
    /// Where records wait on disk while PostgreSQL is down. Default `data/spool`.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: std::path::PathBuf,
    /// The spool's bound; past it records are dropped, counted and logged. Default 1GiB.
    #[serde(
        default = "crate::sink::backlog::default_spool_max",
        deserialize_with = "crate::settings::byte_size"
    )]
    pub spool_max: u64,
    /// How much time one partition of the history tables spans (UTC-aligned). Default "1d".
    #[serde(
        default = "default_partition",
        deserialize_with = "crate::settings::duration"
    )]
    pub partition: Duration,
    /// Raw rows (`dweets`, `readings`) older than this go, a whole partition at a time.
    /// Default: kept for ever.
    #[serde(default, deserialize_with = "crate::settings::optional_duration")]
    pub retention: Option<Duration>,
    /// The same for the rollups (`readings_1m`, `readings_1h`), which may outlive the raw
    /// rows. Default: kept for ever.
    #[serde(default, deserialize_with = "crate::settings::optional_duration")]
    pub rollup_retention: Option<Duration>,
}

fn default_partition() -> Duration {
    Duration::from_secs(24 * 60 * 60)
}

fn default_spool_dir() -> std::path::PathBuf {
    std::path::PathBuf::from("data/spool")
}

fn default_max_rows() -> usize {
    5000
}

impl PostgresConfig {
    /// The buffer settings of this section.
    pub fn backlog(&self) -> crate::sink::backlog::BacklogConfig {
        crate::sink::backlog::BacklogConfig {
            memory_max_rows: self.memory_max_rows,
            spool_dir: self.spool_dir.clone(),
            spool_max: self.spool_max,
        }
    }

    pub fn new(url: DatabaseUrl) -> Self {
        PostgresConfig {
            url: Some(url),
            url_env: None,
            max_rows: default_max_rows(),
            removed_max_age: None,
            memory_max_rows: crate::sink::backlog::default_memory_max_rows(),
            spool_dir: default_spool_dir(),
            spool_max: crate::sink::backlog::default_spool_max(),
            partition: default_partition(),
            retention: None,
            rollup_retention: None,
        }
    }

    /// Resolves `url_env` into `url` and checks values; keys in the error are relative to `[postgres]`.
    pub fn resolve(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        let url = crate::settings::address(
            ("url", self.url.as_ref().map(|u| u.0.as_str())),
            ("url_env", self.url_env.as_deref()),
            &env,
            None,
            "name a database: url = \"postgres://...\" or url_env = \"DATABASE_URL\"",
        )?;
        self.url = Some(DatabaseUrl(url));
        if let Some(url) = &self.url
            && let Err(error) = url.options()
        {
            return Err(Invalid::new(
                "url",
                error.to_string(),
                "write it as postgres://user:password@host:5432/database".to_owned(),
            ));
        }
        if self.max_rows == 0 {
            return Err(Invalid::new(
                "max_rows",
                "must be at least 1".to_owned(),
                "the default is 5000".to_owned(),
            ));
        }
        if self.removed_max_age.is_some() {
            return Err(Invalid::new(
                    "max_age",
                    "was removed: records are written as soon as the previous batch commits, so none waits on a timer".to_owned(),
                "delete the line; max_rows still bounds each statement".to_owned(),
            ));
        }
        validate_partition(self.partition)?;
        for (key, retention) in [
            ("retention", self.retention),
            ("rollup_retention", self.rollup_retention),
        ] {
            if retention.is_some_and(|kept| kept < Duration::from_secs(60 * 60)) {
                return Err(Invalid::new(
                    key,
                    "must be at least 1h",
                    "give how long to keep, like \"90d\"; leave it out to keep everything",
                ));
            }
        }
        Ok(())
    }
}

/// `partition` is whole hours, from 1h to 31d: a partition is a table, and retention drops
/// whole ones.
fn validate_partition(partition: Duration) -> Result<(), Invalid> {
    const HOUR: u64 = 60 * 60;
    let seconds = partition.as_secs();
    if partition.subsec_nanos() != 0
        || !seconds.is_multiple_of(HOUR)
        || !(HOUR..=31 * 24 * HOUR).contains(&seconds)
    {
        return Err(Invalid::new(
            "partition",
            format!(
                "{} is not a whole number of hours from 1h to 31d",
                humantime::format_duration(partition)
            ),
            "size it so the newest partition and its indexes fit in memory: \"1d\" (the default) for most fleets, \"1h\" for thousands of boards a second",
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("the database URL is not valid: {0}")]
    Url(String),
    #[error("PostgreSQL: {0}")]
    Database(String),
    /// The server answered and refused us: waiting will not fix it, a person must.
    #[error("PostgreSQL refused the connection: {reason} ({fix})")]
    Refused { reason: String, fix: &'static str },
    #[error("applying the migrations: {0}")]
    Migrate(String),
}

impl PostgresError {
    fn database(error: &sqlx::Error, url: &DatabaseUrl) -> Self {
        let reason = strip_url(&database_message(error), url.expose());
        let code = error.as_database_error().and_then(|e| e.code());
        let fix = match code.as_deref() {
            Some("3D000") => "create the database, or name an existing one in the URL",
            Some("28P01") | Some("28000") => "check the user and password in the URL",
            Some("42501") => "grant the user CONNECT and CREATE on the database",
            _ => return PostgresError::Database(reason),
        };
        PostgresError::Refused { reason, fix }
    }

    /// Whether waiting and retrying can help (the server is down or busy), as opposed to a
    /// setting a person must fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, PostgresError::Database(_) | PostgresError::Migrate(_))
    }
}

/// sqlx's message without the source chain it repeats ("error: error: ...").
fn database_message(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// Applies the embedded migrations (idempotent); returns how many were newly applied.
pub async fn migrate(url: &DatabaseUrl) -> Result<usize, PostgresError> {
    migrate_to(url, schema_version()).await
}

/// Applies the embedded migrations up to `version` and no further: what an older release
/// left behind, for testing the migrations that follow.
pub async fn migrate_to(url: &DatabaseUrl, version: i64) -> Result<usize, PostgresError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(url.options()?)
        .await
        .map_err(|e| PostgresError::database(&e, url))?;
    let applied = migrate_pool(&pool, url, version).await;
    pool.close().await;
    applied
}

/// Connects once and asks for the schema version, changing nothing: for `check`. Within
/// `patience`, or a "no answer" error.
pub async fn probe(url: &DatabaseUrl, patience: Duration) -> Result<Option<i64>, PostgresError> {
    let attempt = async {
        let mut connection = PgConnection::connect_with(&url.options()?)
            .await
            .map_err(|e| PostgresError::database(&e, url))?;
        let version: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut connection)
                .await
                .ok()
                .flatten();
        Ok(version)
    };
    tokio::time::timeout(patience, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(PostgresError::Database(format!(
                "no answer within {patience:?}"
            )))
        })
}

/// The newest schema version this build applies.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map_or(0, |(version, _, _)| *version)
}

/// [`migrate`] over a pool (a pool, not a connection: the future stays `Send`, so a spawned
/// task can run it).
async fn migrate_pool(
    pool: &PgPool,
    url: &DatabaseUrl,
    up_to: i64,
) -> Result<usize, PostgresError> {
    let migrator = Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .filter(|(version, _, _)| *version <= up_to)
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sqlx::SqlSafeStr::into_sql_str(*sql),
                    false,
                )
            })
            .collect(),
    );
    let before: i64 = applied_count(pool).await;
    migrator
        .run(pool)
        .await
        .map_err(|e| PostgresError::Migrate(strip_url(&e.to_string(), url.expose())))?;
    let after = applied_count(pool).await;
    Ok(usize::try_from(after - before).unwrap_or(0))
}

async fn applied_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// How an error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The server or the connection: wait and try the same batch again.
    Retry,
    /// Some row is unacceptable: narrow it down and dead-letter it.
    Data,
    /// A row already exists: take the conflict-tolerant path.
    Conflict,
}

/// Classifies by SQLSTATE class: 08 connection, 53 resources (too many connections), 57
/// operator intervention (shutdown), 40 serialisation/deadlock: retry. 22 data, 23 integrity,
/// 54 program limits: the data. Anything else (a missing table, a permission) is retried too:
/// nothing is dropped while an operator fixes it.
fn classify(error: &sqlx::Error) -> Failure {
    let Some(code) = error.as_database_error().and_then(|e| e.code()) else {
        return Failure::Retry;
    };
    match code.as_ref() {
        "23505" => Failure::Conflict,
        // No partition for a row: one this process counted on was dropped; it is made again.
        "23514" if error.to_string().contains("no partition") => Failure::Retry,
        code if code.starts_with("22") || code.starts_with("23") || code.starts_with("54") => {
            Failure::Data
        }
        _ => Failure::Retry,
    }
}

/// Writes `things.stream_state`: what the worker knows of each thing's stream.
#[derive(Clone)]
pub struct StreamStates {
    pool: PgPool,
    url: DatabaseUrl,
}

impl StreamStates {
    /// Upserts `(thing, state)` pairs (`up`, `down`, `stopped`).
    pub async fn write(&self, states: &[(String, &str)]) -> Result<(), PostgresError> {
        if states.is_empty() {
            return Ok(());
        }
        let things: Vec<&str> = states.iter().map(|(thing, _)| thing.as_str()).collect();
        let values: Vec<&str> = states.iter().map(|(_, state)| *state).collect();
        sqlx::query(
            "INSERT INTO things (thing, stream_state, updated_at)
             SELECT *, now() FROM unnest($1::text[], $2::text[])
             ON CONFLICT (thing) DO UPDATE SET stream_state = EXCLUDED.stream_state, updated_at = now()",
        )
        .bind(&things)
        .bind(&values)
        .execute(&self.pool)
        .await
        .map_err(|e| PostgresError::database(&e, &self.url))?;
        Ok(())
    }
}

/// Watermarks moved by committed batches, applied to the sink once a write is done.
type Marks = HashMap<String, i64>;

pub struct PostgresSink {
    url: DatabaseUrl,
    pool: PgPool,
    /// Newest committed `created` (ms) per thing, from `things`.
    watermarks: HashMap<String, i64>,
    metrics: Arc<Metrics>,
    /// Told while writes fail and retry (the worker's readiness and liveness); none for
    /// one-shot imports.
    health: Option<(Arc<Health>, LoopBeat)>,
    partitions: Arc<Partitions>,
    /// `[postgres] retention`: older dweets are not stored.
    retention: Option<Duration>,
    past_retention: u64,
}

/// The history upkeep of one database: rollup refreshes and retention.
#[derive(Clone)]
pub struct History {
    pool: PgPool,
    url: DatabaseUrl,
    partitions: Arc<Partitions>,
}

impl History {
    /// Recomputes every rollup bucket that commits noted; see [`rollup`].
    pub async fn refresh_rollups(&self) -> Result<usize, PostgresError> {
        rollup::refresh_all(&self.pool, &self.partitions, None)
            .await
            .map_err(|e| PostgresError::database(&e, &self.url))
    }

    /// One pass (up to a few thousand buckets) over the noted minutes that start before
    /// `before_ms` (all when `None`): what the live worker does after commits. One pass, not
    /// until nothing is pending: other writers of the database may note minutes as fast as it
    /// recomputes them.
    pub async fn refresh_rollups_once(
        &self,
        before_ms: Option<i64>,
    ) -> Result<usize, PostgresError> {
        rollup::refresh(&self.pool, &self.partitions, before_ms)
            .await
            .map_err(|e| PostgresError::database(&e, &self.url))
    }

    /// Re-keys the readings partitions that closed for reading by board; see [`arrange`].
    pub async fn arrange(&self, now_ms: i64) -> Result<Vec<String>, PostgresError> {
        arrange::arrange_closed(&self.pool, now_ms)
            .await
            .map_err(|e| PostgresError::database(&e, &self.url))
    }

    /// Drops the partitions wholly older than the retention settings; see [`retention`].
    pub async fn prune(
        &self,
        config: &PostgresConfig,
        now_ms: i64,
    ) -> Result<Vec<retention::Dropped>, PostgresError> {
        let dropped = retention::prune(&self.pool, config, now_ms)
            .await
            .map_err(|e| PostgresError::database(&e, &self.url))?;
        if !dropped.is_empty() {
            self.partitions.forget();
        }
        Ok(dropped)
    }
}

impl PostgresSink {
    /// Connects (retrying for up to `patience`), migrates, and loads the watermarks.
    pub async fn connect(
        config: &PostgresConfig,
        metrics: Arc<Metrics>,
        patience: Duration,
    ) -> Result<Self, PostgresError> {
        let deadline = Instant::now() + patience;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match Self::try_connect(config, Arc::clone(&metrics)).await {
                Ok(sink) => return Ok(sink),
                Err(error) if Instant::now() < deadline => {
                    tracing::warn!(%error, "PostgreSQL is not ready; retrying");
                    let delay = backoff.next_delay(&mut rand::rng());
                    tokio::time::sleep(delay).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One attempt: connect, migrate, load the watermarks.
    pub async fn try_connect(
        config: &PostgresConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PostgresError> {
        let url = config
            .url
            .as_ref()
            .ok_or_else(|| PostgresError::Url("no database URL".to_owned()))?;
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(url.options()?)
            .await
            .map_err(|e| PostgresError::database(&e, url))?;
        migrate_pool(&pool, url, schema_version()).await?;
        let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT thing, last_created FROM things WHERE last_created IS NOT NULL")
                .fetch_all(&pool)
                .await
                .map_err(|e| PostgresError::database(&e, url))?;
        let watermarks = rows
            .into_iter()
            .map(|(thing, at)| (thing, at.timestamp_millis()))
            .collect();
        Ok(PostgresSink {
            url: url.clone(),
            pool,
            watermarks,
            metrics,
            health: None,
            partitions: Arc::new(Partitions::new(config.partition)),
            retention: config.retention,
            past_retention: 0,
        })
    }

    /// The rollups' refresher and retention, sharing this sink's pool and partitions.
    pub fn history(&self) -> History {
        History {
            pool: self.pool.clone(),
            url: self.url.clone(),
            partitions: Arc::clone(&self.partitions),
        }
    }

    /// Dweets skipped because they were older than `[postgres] retention`.
    pub fn past_retention(&self) -> u64 {
        self.past_retention
    }

    /// Reports write trouble to `health` while it lasts, and beats `beat` while it retries.
    pub fn with_health(mut self, health: Arc<Health>, beat: LoopBeat) -> Self {
        self.health = Some((health, beat));
        self
    }

    fn report(&self, problem: Option<String>) {
        if let Some((health, _)) = &self.health {
            health.set_sink_problem(SinkName::Postgres, problem);
        }
    }

    fn beat(&self) {
        if let Some((_, beat)) = &self.health {
            beat.beat();
        }
    }

    pub fn watermarks(&self) -> &HashMap<String, i64> {
        &self.watermarks
    }

    /// A handle for side writers (the stream-state reporter); shares the pool.
    pub fn states(&self) -> StreamStates {
        StreamStates {
            pool: self.pool.clone(),
            url: self.url.clone(),
        }
    }

    /// Makes `records` durable, however long PostgreSQL takes to be reachable. Records newer
    /// than their thing's watermark cannot conflict and are COPYed as they are; older ones (an
    /// import of old history, a sink that fell behind the others) go through the
    /// conflict-tolerant path, so nothing already stored is duplicated and nothing missing is
    /// skipped.
    pub async fn write<'a>(&mut self, records: impl IntoIterator<Item = &'a Record>) {
        let kept_from = self
            .retention
            .map(|kept| crate::record::ms_before(crate::record::now_ms(), kept));
        let mut past_retention = 0;
        let (fresh, old): (Vec<&Record>, Vec<&Record>) = records
            .into_iter()
            .filter(|r| {
                let past = r
                    .as_dweet()
                    .zip(kept_from)
                    .is_some_and(|(dweet, from)| dweet.created_ms < from);
                past_retention += u64::from(past);
                !past
            })
            .partition(|r| self.is_new(r));
        self.past_retention += past_retention;
        let mut marks = Marks::new();
        if !old.is_empty() {
            self.write_all(&old, true, &mut marks).await;
        }
        // PostgreSQL is the bottleneck and two COPY sessions beat one; each thing's rows and
        // watermark stay in one transaction, so a crash still leaves whole things' batches.
        let (even, odd) = split_by_thing(&fresh);
        let mut odd_marks = Marks::new();
        tokio::join!(
            self.write_all(&even, false, &mut marks),
            self.write_all(&odd, false, &mut odd_marks)
        );
        for (thing, created) in marks.into_iter().chain(odd_marks) {
            let mark = self.watermarks.entry(thing).or_insert(created);
            *mark = (*mark).max(created);
        }
    }

    async fn write_all(&self, records: &[&Record], start_tolerant: bool, marks: &mut Marks) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        // Slices still to write, in order; a failing slice is split in two (bisection).
        let mut pending: Vec<&[&Record]> = vec![records];
        let mut tolerant = start_tolerant;
        let mut last_problem = String::new();
        while let Some(slice) = pending.pop() {
            self.beat();
            if slice.is_empty() {
                continue;
            }
            let started = Instant::now();
            let result = self.write_batch(slice, tolerant, marks).await;
            self.metrics
                .sink_write_duration(SinkName::Postgres)
                .observe(started.elapsed().as_secs_f64());
            let Err(error) = result else {
                if !last_problem.is_empty() {
                    self.report(None);
                    last_problem.clear();
                }
                backoff.reset();
                tolerant = start_tolerant;
                continue;
            };
            let text = strip_url(&database_message(&error), self.url.expose());
            match classify(&error) {
                Failure::Conflict => {
                    tolerant = true;
                    pending.push(slice);
                }
                Failure::Data if slice.len() == 1 => {
                    tracing::warn!(thing = slice[0].thing().unwrap_or(""), error = %text, "PostgreSQL refused a dweet; it goes to dead_letters");
                    self.quarantine(slice[0], &text, marks).await;
                }
                Failure::Data => {
                    let (first, second) = slice.split_at(slice.len() / 2);
                    pending.push(second);
                    pending.push(first);
                }
                Failure::Retry => {
                    self.partitions.forget();
                    // Only failed attempts count as sink errors: a conflict or a bisection
                    // step is the write path working as designed.
                    self.metrics.sink_error(SinkName::Postgres);
                    if text != last_problem {
                        tracing::warn!(error = %text, rows = slice.len(), "PostgreSQL write failed; retrying until it succeeds");
                        self.report(Some(format!("writes fail and are retried: {text}")));
                        last_problem = text;
                    }
                    pending.push(slice);
                    let delay = backoff.next_delay(&mut rand::rng());
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn is_new(&self, record: &Record) -> bool {
        match (record.thing(), record.created_ms()) {
            (Some(thing), Some(created)) => self
                .watermarks
                .get(thing)
                .is_none_or(|mark| created > *mark),
            _ => true,
        }
    }

    /// Replaces a refused record by a dead letter saying why, written in its place so the
    /// thing's watermark still moves past it.
    async fn quarantine(&self, record: &Record, reason: &str, marks: &mut Marks) {
        let letter = match record {
            Record::Dweet(dweet) => Record::DeadLetter(DeadLetter {
                thing: Some(dweet.thing.clone()),
                created: Some(crate::protocol::format_created(
                    crate::record::ms_to_datetime(dweet.created_ms),
                )),
                created_ms: Some(dweet.created_ms),
                received_ms: dweet.received_ms,
                payload: dweet.content.clone(),
                reason: format!("PostgreSQL refused the dweet: {reason}"),
            }),
            Record::DeadLetter(letter) => Record::DeadLetter(DeadLetter {
                reason: format!(
                    "{} (and PostgreSQL refused it as is: {reason})",
                    letter.reason
                ),
                ..letter.clone()
            }),
        };
        // Counted in rows written (table dead_letters) once stored; dead_letters_total counts
        // what normalisation refused, which Parquet stores as dead letters too.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            match self.write_batch(&[&letter], false, marks).await {
                Ok(()) => return,
                Err(error) if classify(&error) == Failure::Retry => {
                    let delay = backoff.next_delay(&mut rand::rng());
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    // Dead letters are NUL-free text; a refusal here is a schema problem.
                    tracing::error!(error = %strip_url(&error.to_string(), self.url.expose()), "could not store a dead letter; it is logged instead: {letter:?}");
                    return;
                }
            }
        }
    }

    /// One transaction: COPY the rows, move the things' watermarks, commit.
    async fn write_batch(
        &self,
        records: &[&Record],
        tolerant: bool,
        marks_out: &mut Marks,
    ) -> Result<(), sqlx::Error> {
        let mut marks: HashMap<&str, (i64, i64)> = HashMap::new();
        for record in records {
            if let (Some(thing), Some(created)) = (record.thing(), record.created_ms()) {
                let mark = marks
                    .entry(thing)
                    .or_insert((created, record.received_ms()));
                mark.0 = mark.0.max(created);
                mark.1 = mark.1.max(record.received_ms());
            }
        }
        for parent in ["dweets", "readings"] {
            let times = records
                .iter()
                .filter_map(|r| r.as_dweet())
                .map(|d| d.created_ms);
            self.partitions.ensure(&self.pool, parent, times).await?;
        }
        let mut tx = self.pool.begin().await?;
        let (dweets, readings, dead_letters) =
            if tolerant || insert::readings_in(records) < insert::COPY_FROM_READINGS {
                insert::insert(&mut tx, records, tolerant).await?
            } else {
                let rows = BinaryRows::of(records.iter().filter_map(|r| r.as_dweet()));
                (
                    copy_into(
                        &mut tx,
                        "dweets",
                        "thing, created, received_at, content",
                        &rows.dweets,
                        rows.dweet_count,
                    )
                    .await?,
                    copy_into(
                        &mut tx,
                        "readings",
                        "time, thing, sensor, value",
                        &rows.readings,
                        rows.reading_count,
                    )
                    .await?,
                    // Letters may repeat whatever the watermark says (they have no order of
                    // their own): always the conflict-tolerant INSERT.
                    insert::insert_letters(&mut tx, records).await?,
                )
            };
        let written = [
            (Table::Dweets, dweets),
            (Table::Readings, readings),
            (Table::DeadLetters, dead_letters),
        ];
        if !marks.is_empty() {
            let things: Vec<&str> = marks.keys().copied().collect();
            let created: Vec<chrono::DateTime<chrono::Utc>> = things
                .iter()
                .map(|t| crate::record::ms_to_datetime(marks[t].0))
                .collect();
            let received: Vec<chrono::DateTime<chrono::Utc>> = things
                .iter()
                .map(|t| crate::record::ms_to_datetime(marks[t].1))
                .collect();
            let (noted_things, noted_buckets) = rollup::to_note(records);
            let statement = format!(
                "WITH {}
                 INSERT INTO things (thing, last_created, last_received_at, updated_at)
                 SELECT * , now() FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[])
                 ON CONFLICT (thing) DO UPDATE SET
                   last_created = GREATEST(things.last_created, EXCLUDED.last_created),
                   last_received_at = GREATEST(things.last_received_at, EXCLUDED.last_received_at),
                   updated_at = now()",
                rollup::NOTE_BUCKETS
            );
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(&things)
                .bind(&created)
                .bind(&received)
                .bind(&noted_things)
                .bind(&noted_buckets)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        for (thing, (created, _)) in marks {
            let mark = marks_out.entry(thing.to_owned()).or_insert(created);
            *mark = (*mark).max(created);
        }
        for (table, count) in written {
            self.metrics.rows_written(SinkName::Postgres, table, count);
        }
        Ok(())
    }
}

/// Splits `records` in two halves as even in rows as whole things allow (the largest things
/// first, each to the lighter half), keeping each half in its order. A thing's records never
/// straddle the halves: its watermark commits with them. Records of no thing go to the first.
fn split_by_thing<'a>(records: &[&'a Record]) -> (Vec<&'a Record>, Vec<&'a Record>) {
    let mut sizes: HashMap<&str, usize> = HashMap::new();
    for record in records {
        *sizes.entry(record.thing().unwrap_or_default()).or_default() += 1;
    }
    let mut by_size: Vec<(&str, usize)> = sizes.into_iter().collect();
    by_size.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut loads = [0usize; 2];
    let mut second_half = std::collections::HashSet::new();
    for (thing, size) in by_size {
        let lighter = usize::from(loads[1] < loads[0] && !thing.is_empty());
        loads[lighter] += size;
        if lighter == 1 {
            second_half.insert(thing);
        }
    }
    records
        .iter()
        .partition(|r| !second_half.contains(r.thing().unwrap_or_default()))
}

/// COPY `rows` rows (a binary COPY stream) into `table`; returns the rows added.
async fn copy_into(
    connection: &mut PgConnection,
    table: &'static str,
    columns: &'static str,
    data: &[u8],
    rows: usize,
) -> Result<u64, sqlx::Error> {
    if rows == 0 {
        return Ok(0);
    }
    let mut copy = connection
        .copy_in_raw(&format!(
            "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(data).await?;
    copy.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dweet(thing: &str, created_ms: i64) -> Record {
        Record::Dweet(crate::record::Normalized {
            thing: thing.to_owned(),
            created_ms,
            received_ms: created_ms,
            content: "{}".to_owned(),
            readings: Vec::new(),
        })
    }

    #[test]
    fn things_split_into_even_halves_whole_and_in_order() {
        // 20 things of 100 records each, interleaved as a batch arrives, and one outsized.
        let mut records: Vec<Record> = (0..2000)
            .map(|i| dweet(&format!("t{}", i % 20), i64::from(i)))
            .collect();
        records.extend((0..500).map(|i| dweet("big", i)));
        let refs: Vec<&Record> = records.iter().collect();
        let (first, second) = split_by_thing(&refs);
        assert_eq!(first.len() + second.len(), 2500);
        assert!(
            first.len().abs_diff(second.len()) <= 100,
            "{} / {}",
            first.len(),
            second.len()
        );
        let things = |half: &[&Record]| -> std::collections::BTreeSet<String> {
            half.iter()
                .filter_map(|r| r.thing())
                .map(str::to_owned)
                .collect()
        };
        assert!(things(&first).is_disjoint(&things(&second)));
        for half in [&first, &second] {
            for pair in half.windows(2) {
                if pair[0].thing() == pair[1].thing() {
                    assert!(pair[0].created_ms() < pair[1].created_ms());
                }
            }
        }
        // One thing alone stays whole.
        let lone: Vec<&Record> = records[2000..].iter().collect();
        let (first, second) = split_by_thing(&lone);
        assert_eq!((first.len(), second.len()), (500, 0));
    }

    #[test]
    fn the_url_never_prints() {
        let url = DatabaseUrl::new("postgres://user:hunter2@db/x");
        assert!(!format!("{url:?}").contains("hunter2"));
        let config = PostgresConfig::new(url);
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(
            strip_url(
                "failed at postgres://user:hunter2@db/x",
                "postgres://user:hunter2@db/x"
            ),
            "failed at <database url>"
        );
    }

    #[test]
    fn url_env_is_resolved_and_checked() {
        let mut config = PostgresConfig {
            url: None,
            url_env: Some("DB".to_owned()),
            ..PostgresConfig::new(DatabaseUrl::new(""))
        };
        config
            .resolve(|name| (name == "DB").then(|| "postgres://u@h/d".to_owned()))
            .unwrap();
        assert_eq!(config.url.unwrap().expose(), "postgres://u@h/d");
        let mut missing = PostgresConfig {
            url: None,
            url_env: Some("NOPE".to_owned()),
            ..PostgresConfig::new(DatabaseUrl::new(""))
        };
        let refused = missing.resolve(|_| None).unwrap_err();
        assert_eq!(refused.key, "url_env");
        assert!(refused.problem.contains("NOPE"));
    }
}
