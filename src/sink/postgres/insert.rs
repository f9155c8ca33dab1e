//! Small batches, and batches that may repeat stored rows, as one `INSERT ... SELECT FROM
//! unnest(...)` per table.
//!
//! COPY is the fastest way in for bulk loads, but sqlx leaves Nagle's algorithm on, so the
//! message that ends a COPY waits for the server's delayed ACK of the data before it (about
//! 40 ms on Linux) — once per table, whatever the batch size. For the live stream's small
//! batches that wait was nearly all of the commit latency. An INSERT goes out as one message
//! and has no such wait; with `ON CONFLICT DO NOTHING` it also skips rows already stored,
//! which makes it the tolerant path too.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::copy::without_nul;
use crate::record::{DeadLetter, Record, ms_to_datetime};

/// Batches with at least this many readings go by COPY (when no stored row can repeat).
pub const COPY_FROM_READINGS: usize = 4000;

/// Rows added per table: (dweets, readings, dead_letters).
pub type Added = (u64, u64, u64);

#[derive(Default)]
struct Columns<'a> {
    dweet_things: Vec<&'a str>,
    dweet_created: Vec<DateTime<Utc>>,
    dweet_received: Vec<DateTime<Utc>>,
    dweet_content: Vec<&'a str>,
    reading_time: Vec<DateTime<Utc>>,
    reading_things: Vec<&'a str>,
    reading_sensors: Vec<&'a str>,
    reading_values: Vec<f64>,
    letter_things: Vec<Option<String>>,
    letter_created: Vec<Option<String>>,
    letter_at: Vec<String>,
    letter_received: Vec<DateTime<Utc>>,
    letter_payloads: Vec<String>,
    letter_reasons: Vec<String>,
}

impl<'a> Columns<'a> {
    fn of(records: &[&'a Record]) -> Self {
        let mut columns = Columns::default();
        for record in records {
            match record {
                Record::Dweet(dweet) => {
                    let created = ms_to_datetime(dweet.created_ms);
                    columns.dweet_things.push(&dweet.thing);
                    columns.dweet_created.push(created);
                    columns
                        .dweet_received
                        .push(ms_to_datetime(dweet.received_ms));
                    columns.dweet_content.push(&dweet.content);
                    for reading in &dweet.readings {
                        columns.reading_time.push(created);
                        columns.reading_things.push(&dweet.thing);
                        columns.reading_sensors.push(&reading.sensor);
                        columns.reading_values.push(reading.value);
                    }
                }
                Record::DeadLetter(letter) => {
                    let text = |value: &Option<String>| {
                        value.as_deref().map(|v| without_nul(v).into_owned())
                    };
                    columns.letter_things.push(text(&letter.thing));
                    columns.letter_created.push(text(&letter.created));
                    columns.letter_at.push(letter_at(letter));
                    columns
                        .letter_received
                        .push(ms_to_datetime(letter.received_ms));
                    columns
                        .letter_payloads
                        .push(without_nul(&letter.payload).into_owned());
                    columns
                        .letter_reasons
                        .push(without_nul(&letter.reason).into_owned());
                }
            }
        }
        columns
    }
}

/// Inserts `records`; `tolerant` skips rows whose key is already stored (otherwise a repeat
/// is a unique violation, for the caller to classify).
pub async fn insert(
    connection: &mut PgConnection,
    records: &[&Record],
    tolerant: bool,
) -> Result<Added, sqlx::Error> {
    let columns = Columns::of(records);
    let on_conflict = if tolerant {
        " ON CONFLICT DO NOTHING"
    } else {
        ""
    };
    let mut added = (0, 0, 0);
    if !columns.dweet_things.is_empty() {
        added.0 = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO dweets (thing, created, received_at, content)
             SELECT thing, created, received_at, content::jsonb
             FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[])
               AS incoming(thing, created, received_at, content){on_conflict}"
        )))
        .bind(&columns.dweet_things)
        .bind(&columns.dweet_created)
        .bind(&columns.dweet_received)
        .bind(&columns.dweet_content)
        .execute(&mut *connection)
        .await?
        .rows_affected();
    }
    if !columns.reading_things.is_empty() {
        added.1 = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO readings (time, thing, sensor, value)
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::float8[]){on_conflict}"
        )))
        .bind(&columns.reading_time)
        .bind(&columns.reading_things)
        .bind(&columns.reading_sensors)
        .bind(&columns.reading_values)
        .execute(&mut *connection)
        .await?
        .rows_affected();
    }
    added.2 = insert_letter_columns(connection, &columns).await?;
    Ok(added)
}

/// Inserts only the dead letters of `records`, skipping those already stored.
pub async fn insert_letters(
    connection: &mut PgConnection,
    records: &[&Record],
) -> Result<u64, sqlx::Error> {
    let letters: Vec<&Record> = records
        .iter()
        .copied()
        .filter(|r| matches!(r, Record::DeadLetter(_)))
        .collect();
    insert_letter_columns(connection, &Columns::of(&letters)).await
}

/// Dead letters are always tolerant: their natural key (thing, `letter_at`, payload) makes a
/// repeat a no-op.
async fn insert_letter_columns(
    connection: &mut PgConnection,
    columns: &Columns<'_>,
) -> Result<u64, sqlx::Error> {
    if columns.letter_received.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(
        "INSERT INTO dead_letters (thing, created, received_at, payload, reason, letter_at)
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[])
         ON CONFLICT DO NOTHING",
    )
    .bind(&columns.letter_things)
    .bind(&columns.letter_created)
    .bind(&columns.letter_received)
    .bind(&columns.letter_payloads)
    .bind(&columns.letter_reasons)
    .bind(&columns.letter_at)
    .execute(&mut *connection)
    .await?
    .rows_affected())
}

/// When a dead letter happened, for its natural key: `created` as sent, or the arrival time
/// in ms for a line that had none.
fn letter_at(letter: &DeadLetter) -> String {
    match &letter.created {
        Some(created) => without_nul(created).into_owned(),
        None => letter.received_ms.to_string(),
    }
}

/// Readings in `records`: what decides between COPY and INSERT.
pub fn readings_in(records: &[&Record]) -> usize {
    records
        .iter()
        .map(|record| match record {
            Record::Dweet(dweet) => dweet.readings.len(),
            Record::DeadLetter(_) => 0,
        })
        .sum()
}
