//! The schema: the embedded migrations, applying them, and asking a database which it has.

use std::borrow::Cow;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use super::config::strip_url;
use super::{DatabaseUrl, PostgresError};

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
    (
        6,
        "rollup minutes known",
        include_str!("../../../migrations/0006_rollup_minutes_known.sql"),
    ),
];

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
pub(super) async fn migrate_pool(
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
