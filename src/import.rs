//! Reading dweets from JSON Lines files (as `history` and `listen` print them) into records
//! for the sinks.
//!
//! The sinks rely on each thing's dweets arriving oldest first, while `history` prints newest
//! first and files may overlap; so an import is read whole, grouped by thing, sorted, and
//! exact repeats are dropped before anything is written. A line that is not a dweet becomes a
//! dead letter naming its file and line.

use std::collections::HashMap;
use std::io::BufRead;

use crate::client::RawDweet;
use crate::normalize::Normalizer;
use crate::record::{DeadLetter, Record};
use crate::sink::parquet::DatasetError;
use crate::sink::parquet::ParquetSink;
use crate::sink::postgres::PostgresSink;

/// Records per write: one PostgreSQL transaction per shard each. Large, because an import is
/// a bulk load; a crash mid-way is harmless (rerun it: what is stored is skipped).
pub const BATCH: usize = 50_000;

/// What [`write_to_sinks`] did besides writing.
#[derive(Debug, Default)]
pub struct Written {
    /// Records Parquet skipped as already stored.
    pub parquet_skipped: usize,
    /// Closed readings partitions re-keyed by board (the import filled them by time).
    pub partitions_arranged: Vec<String>,
}

/// Writes `records` (from [`Imported::into_records`]) to the sinks, batch by batch, then
/// brings PostgreSQL's rollups up to date and re-keys the partitions that closed for reading;
/// `progress` is told how many are done after each batch.
pub async fn write_to_sinks(
    records: &[Record],
    mut parquet: Option<&mut ParquetSink>,
    mut postgres: Option<&mut PostgresSink>,
    mut progress: impl FnMut(usize),
) -> Result<Written, ImportError> {
    let mut done = 0;
    let mut written = Written::default();
    for batch in records.chunks(BATCH) {
        if let Some(sink) = parquet.as_deref_mut() {
            written.parquet_skipped += sink.write(batch)?;
        }
        if let Some(sink) = postgres.as_deref_mut() {
            sink.write(batch).await;
        }
        done += batch.len();
        progress(done);
    }
    if let Some(sink) = postgres {
        sink.history().refresh_rollups().await?;
        written.partitions_arranged = sink.history().arrange(crate::record::now_ms()).await?;
    }
    if let Some(sink) = parquet {
        sink.close()?;
    }
    Ok(written)
}

/// An import could not finish; what was written stays (rerun it: what is stored is skipped).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("refreshing the rollups or re-keying closed partitions: {0}")]
    Postgres(#[from] crate::sink::postgres::PostgresError),
}

/// What the input files held.
#[derive(Debug, Default)]
pub struct Imported {
    by_thing: HashMap<String, Vec<RawDweet>>,
    dead_letters: Vec<Record>,
    pub lines: u64,
    pub dweets: u64,
}

impl Imported {
    /// Reads one JSON Lines input; `name` labels its dead letters (`-` for stdin).
    pub fn read(
        &mut self,
        name: &str,
        input: impl BufRead,
        received_ms: i64,
    ) -> std::io::Result<()> {
        for (index, line) in input.split(b'\n').enumerate() {
            let line = line?;
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            self.lines += 1;
            match serde_json::from_str::<RawDweet>(text) {
                Ok(dweet) => {
                    self.dweets += 1;
                    self.by_thing
                        .entry(dweet.thing.clone())
                        .or_default()
                        .push(dweet);
                }
                Err(error) => self.dead_letters.push(Record::DeadLetter(DeadLetter {
                    thing: None,
                    created: None,
                    created_ms: None,
                    received_ms,
                    payload: text.chars().take(crate::client::EXCERPT_BYTES).collect(),
                    reason: format!("{name} line {}: not a dweet: {error}", index + 1),
                })),
            }
        }
        Ok(())
    }

    /// Every record to write, repeats removed, in time order across the things (each
    /// thing's oldest first; at equal times, things by name): the order a fleet's rows
    /// arrive in live, which PostgreSQL's time-led key appends fastest, and which puts every
    /// thing in every batch so sessions share the work evenly. Returns them with the number
    /// of repeats.
    pub fn into_records(self, received_ms: i64) -> (Vec<Record>, u64) {
        let mut records = self.dead_letters;
        let (things, repeats) = sorted_by_thing(self.by_thing);
        for (_, dweets) in things {
            let mut normalizer = Normalizer::default();
            records.extend(dweets.into_iter().map(|dweet| {
                let created_ms = dweet.created.to_ms();
                normalizer.normalize(dweet, created_ms, received_ms)
            }));
        }
        // Stable: each thing keeps its order, and letters without a time stay first.
        records.sort_by_key(Record::created_ms);
        (records, repeats)
    }

    /// Each thing's dweets, oldest first, repeats removed, things by name; with the lines that
    /// were not dweets, as dead letters.
    pub fn into_dweets(self) -> (Vec<(String, Vec<RawDweet>)>, Vec<Record>) {
        let (things, _) = sorted_by_thing(self.by_thing);
        (things, self.dead_letters)
    }
}

fn sorted_by_thing(
    by_thing: HashMap<String, Vec<RawDweet>>,
) -> (Vec<(String, Vec<RawDweet>)>, u64) {
    let mut repeats = 0;
    let mut things: Vec<_> = by_thing.into_iter().collect();
    things.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, dweets) in &mut things {
        dweets.sort_by_cached_key(|dweet| dweet.created.to_datetime());
        let before = dweets.len();
        dweets.dedup_by(|later, earlier| later.created == earlier.created);
        repeats += (before - dweets.len()) as u64;
    }
    (things, repeats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_sorts_deduplicates_and_dead_letters_bad_lines() {
        let input = concat!(
            r#"{"thing":"b","created":"2026-01-01T00:00:02.000Z","content":{"v":2}}"#,
            "\n",
            r#"{"thing":"a","created":"2026-01-01T00:00:01.000Z","content":{"v":1}}"#,
            "\n",
            "\n",
            "not json at all\n",
            r#"{"thing":"b","created":"2026-01-01T00:00:01.000Z","content":{"v":1},"transaction":"x"}"#,
            "\n",
            r#"{"thing":"b","created":"2026-01-01T00:00:02.000Z","content":{"v":2}}"#,
            "\n",
            r#"{"thing":"a","created":"2026-01-01T00:00:03.000Z","content":{"v":3}}"#,
            "\n",
        );
        let mut imported = Imported::default();
        imported.read("history.jsonl", input.as_bytes(), 9).unwrap();
        assert_eq!((imported.lines, imported.dweets), (6, 5));
        let (records, repeats) = imported.into_records(9);
        assert_eq!(repeats, 1);
        let Record::DeadLetter(letter) = &records[0] else {
            panic!("{records:?}")
        };
        assert!(
            letter
                .reason
                .starts_with("history.jsonl line 4: not a dweet"),
            "{}",
            letter.reason
        );
        let order: Vec<(&str, i64)> = records[1..]
            .iter()
            .map(|r| match r {
                Record::Dweet(d) => (d.thing.as_str(), d.created_ms % 10_000),
                Record::DeadLetter(_) => ("dead", 0),
            })
            .collect();
        // Time order across things, each thing oldest first, ties by thing.
        assert_eq!(
            order,
            vec![("a", 1000), ("b", 1000), ("b", 2000), ("a", 3000)]
        );
    }
}
