//! Re-keying a closed `readings` partition for reading: its unique key `(time, thing, sensor)`
//! (fast to write: rows arrive in time order) is replaced by `(thing, time, sensor) INCLUDE
//! (value)` (fast to read: one board's range is one contiguous, index-only run). See
//! migration 5 for the measurements behind the split.
//!
//! No writer waits on it: the board-led index is built `CONCURRENTLY`, the catalog marks the
//! partition arranged, then the time-led index is dropped `CONCURRENTLY`. Each step is safe to repeat, so a crash
//! between them is finished by the next run: a half-built (invalid) index is dropped and built
//! again, a partition with both keys loses the time-led one. Both keys are unique on the same
//! columns, so a late dweet is refused as a repeat at every step.
//!
//! A bulk load (`import`) skips all this for the closed partitions it makes: they get the
//! board-led key when created (see `PostgresSink::for_bulk_load`).

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

/// How long after a partition's span ends it is re-keyed: late dweets of the last minutes
/// still go to the write-friendly key.
pub const ARRANGE_AFTER: Duration = Duration::from_secs(60 * 60);

/// One process re-keys at a time (an import beside a worker would otherwise build the same
/// index twice).
const LOCK_KEY: i64 = 0x6477_6565_7470_0003;

/// The name of a readings partition's write-friendly key.
pub fn time_key(partition: &str) -> String {
    format!("{partition}_by_time")
}

/// The name of a readings partition's read-friendly key.
pub fn board_key(partition: &str) -> String {
    format!("{partition}_by_board")
}

/// The statement that gives a new readings partition its write-friendly key.
pub fn create_time_key(partition: &str) -> String {
    format!(
        "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {partition} (time, thing, sensor)",
        time_key(partition)
    )
}

/// The statement that gives a readings partition its read-friendly key; `CONCURRENTLY` where
/// writers may be at the table.
fn board_key_statement(partition: &str, concurrently: &str) -> String {
    format!(
        "CREATE UNIQUE INDEX {concurrently} IF NOT EXISTS {} ON {partition} (thing, time, sensor) INCLUDE (value)",
        board_key(partition)
    )
}

/// The statement that gives a new, still empty readings partition its read-friendly key.
pub fn create_board_key(partition: &str) -> String {
    board_key_statement(partition, "")
}

/// Re-keys every readings partition that ended at least [`ARRANGE_AFTER`] before `now_ms`
/// and is not yet; returns their names. Returns nothing when another process is at it.
pub async fn arrange_closed(pool: &PgPool, now_ms: i64) -> Result<Vec<String>, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *connection)
        .await?;
    if !locked {
        return Ok(Vec::new());
    }
    let arranged = arrange_under_lock(&mut connection, now_ms).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *connection)
        .await;
    if unlocked.is_err() {
        // A session lock outlives the statement that failed: never hand that session back.
        connection.close_on_drop();
    }
    arranged
}

async fn arrange_under_lock(
    connection: &mut PgConnection,
    now_ms: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let closed: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM dweetpipe_partitions
          WHERE parent = 'readings'
            AND to_time <= to_timestamp($1::double precision / 1000)
            AND (NOT arranged OR to_regclass(name || '_by_time') IS NOT NULL)
          ORDER BY from_time",
    )
    .bind(crate::record::ms_before(now_ms, ARRANGE_AFTER) as f64)
    .fetch_all(&mut *connection)
    .await?;
    let mut done = Vec::with_capacity(closed.len());
    for name in closed {
        let started = std::time::Instant::now();
        arrange(connection, &name).await?;
        tracing::info!(partition = %name, took = ?started.elapsed(), "re-keyed a closed partition by board for reading");
        done.push(name);
    }
    Ok(done)
}

/// The steps for one partition, each safe to repeat.
async fn arrange(connection: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    let board_key = board_key(name);
    let valid: Option<bool> = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          WHERE c.relname = $1",
    )
    .bind(&board_key)
    .fetch_optional(&mut *connection)
    .await?;
    if valid == Some(false) {
        // Left by a build that was interrupted: it is maintained but never read. Start over.
        execute(
            connection,
            format!("DROP INDEX CONCURRENTLY IF EXISTS {board_key}"),
        )
        .await?;
    }
    execute(connection, board_key_statement(name, "CONCURRENTLY")).await?;
    // Marked before the time-led key goes: the rollups read a partition per board as soon as
    // they see it marked, and must never find it without the key they read by.
    sqlx::query("UPDATE dweetpipe_partitions SET arranged = true WHERE name = $1")
        .bind(name)
        .execute(&mut *connection)
        .await?;
    execute(
        connection,
        format!("DROP INDEX CONCURRENTLY IF EXISTS {}", time_key(name)),
    )
    .await?;
    Ok(())
}

/// One statement, outside a transaction: CONCURRENTLY refuses to run inside one.
async fn execute(connection: &mut PgConnection, statement: String) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(connection)
        .await?;
    Ok(())
}
