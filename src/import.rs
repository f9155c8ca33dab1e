//! Reading dweets from JSON Lines files (as `history` and `listen` print them) into records
//! for the sinks.
//!
//! The sinks rely on each thing's dweets arriving oldest first, while `history` prints newest
//! first and files may overlap; so an import is read whole, grouped by thing, sorted, and
//! exact repeats are dropped before anything is written. A line that is not a dweet becomes a
//! dead letter naming its file and line.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::BufRead;

use crate::client::TextDweet;
use crate::normalize::{Normalizer, ReadDweet, read_dweet_line};
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
    /// How long bringing PostgreSQL's rollups up to date took, after the last batch.
    pub rollups_took: std::time::Duration,
    /// How long re-keying the closed partitions took, after that.
    pub arranging_took: std::time::Duration,
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
        let started = std::time::Instant::now();
        sink.history().refresh_rollups().await?;
        written.rollups_took = started.elapsed();
        let started = std::time::Instant::now();
        written.partitions_arranged = sink.history().arrange(crate::record::now_ms()).await?;
        written.arranging_took = started.elapsed();
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
    /// Each thing's dweets with their `created` in ms, parsed once as they are read. Hashed
    /// by foldhash, as the sinks' watermarks are: SipHash cost 190 instructions a line.
    by_thing: HashMap<String, Timed, foldhash::fast::RandomState>,
    /// Names the readings of the lines read in one pass (shared across things: only equal
    /// names are shared, whichever board sent them).
    normalizer: Normalizer,
    dead_letters: Vec<Record>,
    pub lines: u64,
    pub dweets: u64,
}

impl Imported {
    /// Reads one JSON Lines input; `name` labels its dead letters (`-` for stdin).
    pub fn read(
        &mut self,
        name: &str,
        mut input: impl BufRead,
        received_ms: i64,
    ) -> std::io::Result<()> {
        // Lines are read where they lie in the input's buffer; only a line that the buffer
        // ends inside is copied, here. The newline is found by the `memchr` crate: std's
        // `read_until` searched at 450 instructions a line of `scripts/bench`'s import.
        let mut carried = Vec::new();
        let mut index = 0;
        loop {
            let available = match input.fill_buf() {
                Ok(available) => available,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            let Some(end) = memchr::memchr(b'\n', available) else {
                if available.is_empty() {
                    if !carried.is_empty() {
                        self.read_line(name, index, &carried, received_ms);
                    }
                    return Ok(());
                }
                carried.extend_from_slice(available);
                let used = available.len();
                input.consume(used);
                continue;
            };
            if carried.is_empty() {
                self.read_line(name, index, &available[..end], received_ms);
            } else {
                carried.extend_from_slice(&available[..end]);
                self.read_line(name, index, &carried, received_ms);
                carried.clear();
            }
            input.consume(end + 1);
            index += 1;
        }
    }

    /// Reads the line at `index` (from 0), without its newline.
    fn read_line(&mut self, name: &str, index: usize, line: &[u8], received_ms: i64) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.lines += 1;
        // The common line is read in one strict pass; anything else by serde_json, from the
        // bytes (it checks the UTF-8 of what it keeps, so only a refused line is copied).
        let parsed = match read_dweet_line(line, &mut self.normalizer) {
            Some(read) => Ok(read),
            None => serde_json::from_slice::<ReadDweet>(line),
        };
        match parsed {
            Ok(read) => {
                self.dweets += 1;
                let created_ms = read.dweet.created().to_ms();
                match self.by_thing.get_mut(read.dweet.thing()) {
                    Some(dweets) => dweets.push((created_ms, read)),
                    None => {
                        let thing = read.dweet.thing().to_owned();
                        self.by_thing.insert(thing, vec![(created_ms, read)]);
                    }
                }
            }
            Err(error) => {
                let text = String::from_utf8_lossy(line);
                self.dead_letters.push(Record::DeadLetter(DeadLetter {
                    thing: None,
                    created: None,
                    created_ms: None,
                    received_ms,
                    payload: text
                        .trim()
                        .chars()
                        .take(crate::client::EXCERPT_BYTES)
                        .collect(),
                    reason: format!("{name} line {}: not a dweet: {error}", index + 1),
                }))
            }
        }
    }

    /// Every record to write, repeats removed, in time order across the things (each
    /// thing's oldest first; at equal times, things by name): the order a fleet's rows
    /// arrive in live, which PostgreSQL's time-led key appends fastest, and which puts every
    /// thing in every batch so sessions share the work evenly. Returns them with the number
    /// of repeats.
    pub fn into_records(self, received_ms: i64) -> (Vec<Record>, u64) {
        let (things, repeats) = sorted_by_thing(self.by_thing);
        let total = self.dead_letters.len() + things.iter().map(|(_, d)| d.len()).sum::<usize>();
        let mut records = Vec::with_capacity(total);
        // Letters without a time first, then a merge of the things' sorted dweets by time, ties
        // to the things in name order: what a stable sort of them all would give, without
        // moving every record again (the sort cost about 800 instructions a dweet).
        records.extend(self.dead_letters);
        let mut streams: Vec<_> = things
            .into_iter()
            .map(|(_, dweets)| (Normalizer::default(), dweets.into_iter().peekable()))
            .collect();
        let mut next: BinaryHeap<Reverse<(Option<i64>, usize)>> = streams
            .iter_mut()
            .enumerate()
            .filter_map(|(index, (_, dweets))| dweets.peek().map(|(at, ..)| Reverse((*at, index))))
            .collect();
        while let Some(Reverse((_, index))) = next.pop() {
            let (normalizer, dweets) = &mut streams[index];
            if let Some((created_ms, read)) = dweets.next() {
                records.push(read.normalize(normalizer, created_ms, received_ms));
            }
            if let Some((at, ..)) = dweets.peek() {
                next.push(Reverse((*at, index)));
            }
        }
        (records, repeats)
    }

    /// Each thing's dweets, oldest first, repeats removed, things by name; with the lines that
    /// were not dweets, as dead letters.
    pub fn into_dweets(self) -> (Vec<(String, Vec<TextDweet>)>, Vec<Record>) {
        let (things, _) = sorted_by_thing(self.by_thing);
        let things = things
            .into_iter()
            .map(|(thing, dweets)| {
                (
                    thing,
                    dweets.into_iter().map(|(_, read)| read.dweet).collect(),
                )
            })
            .collect();
        (things, self.dead_letters)
    }
}

/// A thing's dweets, each with its `created` in ms.
type Timed = Vec<(Option<i64>, ReadDweet)>;

fn sorted_by_thing(
    by_thing: HashMap<String, Timed, foldhash::fast::RandomState>,
) -> (Vec<(String, Timed)>, u64) {
    let mut repeats = 0;
    let mut things: Vec<_> = by_thing.into_iter().collect();
    things.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, dweets) in &mut things {
        dweets.sort_by_key(|(created_ms, ..)| *created_ms);
        let before = dweets.len();
        dweets.dedup_by(|later, earlier| later.1.dweet.created() == earlier.1.dweet.created());
        repeats += (before - dweets.len()) as u64;
    }
    (things, repeats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines out of order, repeated, blank and not JSON.
    const MIXED: &str = concat!(
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

    #[test]
    fn groups_sorts_deduplicates_and_dead_letters_bad_lines() {
        let mut imported = Imported::default();
        imported.read("history.jsonl", MIXED.as_bytes(), 9).unwrap();
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

    #[test]
    fn lines_read_the_same_whatever_the_buffer_cuts_them_at() {
        for input in [MIXED, UNENDED] {
            let read = |capacity: usize| {
                let mut imported = Imported::default();
                let input = std::io::BufReader::with_capacity(capacity, input.as_bytes());
                imported.read("in.jsonl", input, 9).unwrap();
                let counts = (imported.lines, imported.dweets);
                (counts, format!("{:?}", imported.into_records(9)))
            };
            let whole = read(input.len() + 1);
            assert!(whole.1.contains("not a dweet"), "{}", whole.1);
            for capacity in 1..=input.len() {
                assert_eq!(read(capacity), whole, "a buffer of {capacity} bytes");
            }
        }
    }

    /// Hands out `bytes` a few at a time, each piece after an `Interrupted` error, and fails
    /// for good at `fails_at`.
    struct Flaky {
        bytes: &'static [u8],
        at: usize,
        interrupted: bool,
        fails_at: usize,
    }

    impl std::io::Read for Flaky {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let piece = std::io::BufRead::fill_buf(self)?;
            let n = piece.len().min(out.len());
            out[..n].copy_from_slice(&piece[..n]);
            std::io::BufRead::consume(self, n);
            Ok(n)
        }
    }

    impl std::io::BufRead for Flaky {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            if self.at >= self.fails_at {
                return Err(std::io::Error::other("the disk went away"));
            }
            self.interrupted = !self.interrupted;
            if self.interrupted {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let end = (self.at + 7).min(self.bytes.len()).min(self.fails_at);
            Ok(&self.bytes[self.at..end])
        }

        fn consume(&mut self, n: usize) {
            self.at += n;
        }
    }

    #[test]
    fn an_interrupted_read_is_retried_and_a_failed_one_ends_the_input_with_its_error() {
        let flaky = |fails_at| Flaky {
            bytes: MIXED.as_bytes(),
            at: 0,
            interrupted: false,
            fails_at,
        };
        let mut whole = Imported::default();
        whole.read("in.jsonl", MIXED.as_bytes(), 9).unwrap();
        let mut retried = Imported::default();
        retried.read("in.jsonl", flaky(usize::MAX), 9).unwrap();
        assert_eq!(
            format!("{:?}", retried.into_records(9)),
            format!("{:?}", whole.into_records(9))
        );

        // Failing in the fourth line: the three before it are read, the rest is not.
        let fourth = MIXED.find("not json").unwrap() + 3;
        let mut failed = Imported::default();
        let error = failed.read("in.jsonl", flaky(fourth), 9).unwrap_err();
        assert_eq!(error.to_string(), "the disk went away");
        assert_eq!(
            (failed.lines, failed.dweets),
            (2, 2),
            "the third line is blank"
        );
    }

    /// Windows line ends, a blank line and a last line without its newline.
    const UNENDED: &str = concat!(
        "\r\n",
        r#"{"thing":"a","created":"2026-01-01T00:00:01.000Z","content":{"v":1}}"#,
        "\r\n[1]\n",
        r#"{"thing":"a","created":"2026-01-01T00:00:02.000Z","content":{"v":2}}"#,
    );

    #[test]
    fn a_last_line_without_a_newline_is_read_and_lines_are_counted_from_one() {
        let mut imported = Imported::default();
        imported.read("-", UNENDED.as_bytes(), 9).unwrap();
        assert_eq!((imported.lines, imported.dweets), (3, 2));
        let (records, _) = imported.into_records(9);
        assert_eq!(records.len(), 3);
        let Record::DeadLetter(letter) = &records[0] else {
            panic!("{records:?}")
        };
        assert!(letter.reason.starts_with("- line 3: "), "{}", letter.reason);
    }

    #[test]
    fn a_line_that_is_not_utf_8_is_a_dead_letter_not_a_mended_dweet() {
        let mut input =
            br#"{"thing":"a","created":"2026-01-01T00:00:01.000Z","content":{"n":"#.to_vec();
        input.extend_from_slice(b"\"\xff\"}}\r\n");
        input.extend_from_slice(
            b"{\"thing\":\"a\",\"created\":\"2026-01-01T00:00:02.000Z\",\"content\":{\"v\":2}}\r\n",
        );
        let mut imported = Imported::default();
        imported.read("in.jsonl", &input[..], 9).unwrap();
        assert_eq!((imported.lines, imported.dweets), (2, 1));
        let (records, _) = imported.into_records(9);
        let Record::DeadLetter(letter) = &records[0] else {
            panic!("{records:?}")
        };
        assert!(
            letter.reason.starts_with("in.jsonl line 1: not a dweet"),
            "{}",
            letter.reason
        );
        assert!(letter.payload.contains('\u{fffd}'), "{}", letter.payload);
        assert!(matches!(&records[1], Record::Dweet(d) if d.created_ms % 10_000 == 2_000));
    }
}
