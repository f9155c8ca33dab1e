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
//!
//! The rooms: `config` (the section and the URL), `schema` (migrations), `sink` (state,
//! watermarks, history upkeep), `transaction` (one batch's write), `copy` and `insert` (the
//! two row shapes), `partitions`, `rollup`, `arrange` and `retention` (the history's layout),
//! `run` (the loop). This file holds the errors and how they are classified.

pub mod arrange;
mod config;
mod copy;
mod insert;
pub mod partitions;
pub mod retention;
pub mod rollup;
mod run;
mod schema;
mod sink;
mod transaction;

pub use config::{DatabaseUrl, PostgresConfig};
pub use partitions::Partitions;
pub use schema::{migrate, migrate_to, probe, schema_version};
pub use sink::{History, PostgresSink, StreamStates};

use config::strip_url;

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
pub(super) fn database_message(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// How an error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
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
pub(super) fn classify(error: &sqlx::Error) -> Failure {
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
