//! The sink's state: its pool, its watermarks (each thing's newest committed `created`) and
//! the partitions it knows; the history upkeep over the same database; stream states.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::schema::{migrate_pool, schema_version};
use super::{DatabaseUrl, Partitions, PostgresConfig, PostgresError, arrange, retention, rollup};
use crate::backoff::Backoff;
use crate::sink::Watermarks;
use crate::telemetry::{Health, LoopBeat, Metrics, SinkName};

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
pub(super) type Marks = Watermarks;

pub struct PostgresSink {
    pub(super) url: DatabaseUrl,
    pub(super) pool: PgPool,
    /// Newest committed `created` (ms) per thing, from `things`.
    pub(super) watermarks: Watermarks,
    pub(super) metrics: Arc<Metrics>,
    /// Told while writes fail and retry (the worker's readiness and liveness); none for
    /// one-shot imports.
    pub(super) health: Option<(Arc<Health>, LoopBeat)>,
    pub(super) partitions: Arc<Partitions>,
    /// A bulk load of old history (see [`Self::for_bulk_load`]).
    pub(super) bulk_load: bool,
    /// `[postgres] retention`: older dweets are not stored.
    pub(super) retention: Option<Duration>,
    pub(super) past_retention: u64,
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
            bulk_load: false,
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

    /// For a bulk load of history (`import`), two things the load would otherwise do after
    /// its last batch, at more cost than the rows themselves (issue 26):
    /// - a readings partition this sink makes for a span that closed at least
    ///   [`arrange::ARRANGE_AFTER`] ago gets the board-led key at once, as re-keying would
    ///   leave it;
    /// - each COPY adds its minutes to `readings_1m` itself ([`rollup::add_minutes`]), so the
    ///   rollups' refresh recomputes only the hours.
    ///
    /// The live worker does neither: its partitions are made open, a backfill into a closed
    /// day is small, and its refresher defers while a catch-up drains.
    pub fn for_bulk_load(mut self) -> Self {
        self.bulk_load = true;
        self
    }

    /// Readings partitions for spans ending before this are made keyed by board.
    pub(super) fn board_keyed_before_ms(&self) -> Option<i64> {
        self.bulk_load
            .then(|| crate::record::ms_before(crate::record::now_ms(), arrange::ARRANGE_AFTER))
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

    pub(super) fn report(&self, problem: Option<String>) {
        if let Some((health, _)) = &self.health {
            health.set_sink_problem(SinkName::Postgres, problem);
        }
    }

    pub(super) fn beat(&self) {
        if let Some((_, beat)) = &self.health {
            beat.beat();
        }
    }

    pub fn watermarks(&self) -> &Watermarks {
        &self.watermarks
    }

    /// A handle for side writers (the stream-state reporter); shares the pool.
    pub fn states(&self) -> StreamStates {
        StreamStates {
            pool: self.pool.clone(),
            url: self.url.clone(),
        }
    }
}
