//! One batch's write: the records newer than each thing's watermark in one transaction with
//! the watermarks (COPY or INSERT by size), retried on connection trouble, and narrowed down
//! by bisection when the data is at fault, so only the offending dweets go to `dead_letters`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use super::config::strip_url;
use super::copy::BinaryRows;
use super::sink::Marks;
use super::{Failure, PostgresSink, classify, database_message, insert, rollup};
use crate::backoff::Backoff;
use crate::record::{DeadLetter, Record};
use crate::telemetry::{SinkName, Table};

impl PostgresSink {
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
        self.watermarks
            .raise_all(marks.into_iter().chain(odd_marks));
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
            (Some(thing), Some(created)) => !self.watermarks.holds(thing, created),
            _ => true,
        }
    }

    /// Replaces a refused record by a dead letter saying why, written in its place so the
    /// thing's watermark still moves past it.
    async fn quarantine(&self, record: &Record, reason: &str, marks: &mut Marks) {
        let letter = match record {
            Record::Dweet(dweet) => Record::DeadLetter(DeadLetter {
                thing: Some(dweet.thing.clone()),
                created: Some(dweet.created().into_owned()),
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
        //
        // Retried whatever the error: the thing's later records would otherwise move its
        // watermark past a dweet stored nowhere. A refusal here is a schema or permission
        // problem an operator fixes; meanwhile the sink is not ready and says why.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut last_problem = String::new();
        loop {
            self.beat();
            match self.write_batch(&[&letter], false, marks).await {
                Ok(()) => {
                    if !last_problem.is_empty() {
                        self.report(None);
                    }
                    return;
                }
                Err(error) => {
                    self.metrics.sink_error(SinkName::Postgres);
                    let text = strip_url(&database_message(&error), self.url.expose());
                    if text != last_problem {
                        tracing::error!(error = %text, thing = letter.thing().unwrap_or(""), "could not store a dead letter; retrying until it is stored");
                        self.report(Some(format!(
                            "a dead letter cannot be stored and is retried: {text}"
                        )));
                        last_problem = text;
                    }
                    let delay = backoff.next_delay(&mut rand::rng());
                    tokio::time::sleep(delay).await;
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
        let board_keyed_before_ms = self.board_keyed_before_ms();
        for parent in ["dweets", "readings"] {
            let times = records
                .iter()
                .filter_map(|r| r.as_dweet())
                .map(|d| d.created_ms);
            self.partitions
                .ensure_keyed(&self.pool, parent, times, board_keyed_before_ms)
                .await?;
        }
        let by_copy = !tolerant && insert::readings_in(records) >= insert::COPY_FROM_READINGS;
        // A bulk load adds its minutes as it stores their rows (see `rollup::add_minutes`).
        let minute_totals = (by_copy && self.bulk_load).then(|| rollup::MinuteTotals::of(records));
        if let Some(totals) = &minute_totals {
            self.partitions
                .ensure(&self.pool, "readings_1m", totals.minutes_ms())
                .await?;
        }
        let mut tx = self.pool.begin().await?;
        let (dweets, readings, dead_letters) = if !by_copy {
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
        if let Some(totals) = minute_totals.as_ref().filter(|t| !t.is_empty()) {
            rollup::add_minutes(&mut tx, totals).await?;
        }
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
                .bind(minute_totals.is_some())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        for (thing, (created, _)) in marks {
            marks_out.raise(thing, created);
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
        crate::record::test_dweet(thing, created_ms, &[])
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
}
