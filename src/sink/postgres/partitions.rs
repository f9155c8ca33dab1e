//! The time partitions of the history tables (`dweets`, `readings` and the rollups): which span
//! a moment belongs in (pure, [`span_for`]), and creating the missing ones before a batch needs
//! them.
//!
//! Spans are `length`-aligned from the Unix epoch (so "1d" means UTC days) and cut back where
//! they would overlap a partition that already exists (the legacy partition of a migrated
//! database, or spans made under another length), so any change of `[postgres] partition`
//! keeps working. `dweetpipe_partitions` lists them; it is read under one advisory lock, so
//! two writers (the sink's two sessions, cluster members, an import) never race to make one.
//!
//! A partition is made as a plain table and then attached: `CREATE TABLE … PARTITION OF` would
//! wait on every open writing transaction, `ATTACH PARTITION` does not.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use sqlx::{PgConnection, PgPool};

use crate::record::ms_to_datetime;

/// The tables partitioned by time, each with its time column.
pub const PARTITIONED: [(&str, &str); 4] = [
    ("dweets", "created"),
    ("readings", "time"),
    ("readings_1m", "bucket"),
    ("readings_1h", "bucket"),
];

/// Hourly rollups are small: a month per partition.
const HOURLY_ROLLUP_SPAN: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Serialises partition changes across every process that writes the database.
const LOCK_KEY: i64 = 0x6477_6565_7470_0001;

/// A partition's time span in ms: `from` inclusive, `to` exclusive; `i64::MIN` and `i64::MAX`
/// stand for no bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub from_ms: i64,
    pub to_ms: i64,
}

impl Span {
    pub fn contains(&self, ms: i64) -> bool {
        self.from_ms <= ms && ms < self.to_ms
    }
}

/// The span to create so that `ms` has a partition: `length_ms`-aligned, cut back to the
/// neighbours in `existing`; `None` when an existing one already holds `ms`.
pub fn span_for(ms: i64, length_ms: i64, existing: &[Span]) -> Option<Span> {
    if existing.iter().any(|span| span.contains(ms)) {
        return None;
    }
    let from = ms.div_euclid(length_ms) * length_ms;
    let mut span = Span {
        from_ms: from,
        to_ms: from.saturating_add(length_ms),
    };
    for other in existing {
        if other.to_ms <= ms {
            span.from_ms = span.from_ms.max(other.to_ms);
        } else if other.from_ms > ms {
            span.to_ms = span.to_ms.min(other.from_ms);
        }
    }
    Some(span)
}

/// Whether one of `spans` (sorted, not overlapping) holds `ms`: a binary search, so a batch
/// costs the same after a year of daily partitions as on the first day.
pub fn covers(spans: &[Span], ms: i64) -> bool {
    let after = spans.partition_point(|span| span.to_ms <= ms);
    spans.get(after).is_some_and(|span| span.contains(ms))
}

/// The name of `parent`'s partition starting at `from_ms`: `readings_20261203`, or
/// `readings_20261203_1300` when it starts inside a day.
pub fn partition_name(parent: &str, from_ms: i64) -> String {
    let from = ms_to_datetime(from_ms);
    if from.time() == chrono::NaiveTime::MIN {
        format!("{parent}_{}", from.format("%Y%m%d"))
    } else if from.second() == 0 {
        format!("{parent}_{}", from.format("%Y%m%d_%H%M"))
    } else {
        format!("{parent}_{}", from.format("%Y%m%d_%H%M%S"))
    }
}

/// The partitions this process knows exist, and the lengths new ones get.
pub struct Partitions {
    raw_length_ms: i64,
    known: Mutex<HashMap<&'static str, Vec<Span>>>,
}

impl Partitions {
    /// `length` is `[postgres] partition`, for the raw tables and the minute rollup.
    pub fn new(length: Duration) -> Self {
        Partitions {
            raw_length_ms: duration_ms(length),
            known: Mutex::new(HashMap::new()),
        }
    }

    fn length_ms(&self, parent: &str) -> i64 {
        if parent == "readings_1h" {
            duration_ms(HOURLY_ROLLUP_SPAN).max(self.raw_length_ms)
        } else {
            self.raw_length_ms
        }
    }

    /// Forgets what it knew (a partition it counted on was dropped by retention elsewhere).
    pub fn forget(&self) {
        self.lock_known().clear();
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Vec<Span>>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes sure `parent` has a partition for each of `times` (ms). Cheap when they exist.
    pub async fn ensure(
        &self,
        pool: &PgPool,
        parent: &'static str,
        times: impl IntoIterator<Item = i64>,
    ) -> Result<(), sqlx::Error> {
        self.ensure_keyed(pool, parent, times, None).await
    }

    /// [`Self::ensure`], except that a readings partition it makes for a span that ended
    /// before `board_keyed_before_ms` is keyed by board from the start (and marked arranged),
    /// as re-keying would leave it: for a bulk load of old history, which then needs no
    /// re-keying (see `arrange`).
    pub async fn ensure_keyed(
        &self,
        pool: &PgPool,
        parent: &'static str,
        times: impl IntoIterator<Item = i64>,
        board_keyed_before_ms: Option<i64>,
    ) -> Result<(), sqlx::Error> {
        let mut missing: Vec<i64> = {
            let known = self.lock_known();
            let spans = known.get(parent).map(Vec::as_slice).unwrap_or_default();
            times.into_iter().filter(|ms| !covers(spans, *ms)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        let mut connection = pool.acquire().await?;
        let mut spans = self
            .create_covering(&mut connection, parent, &missing, board_keyed_before_ms)
            .await?;
        spans.sort_unstable();
        self.lock_known().insert(parent, spans);
        Ok(())
    }

    /// Under the advisory lock: reads `parent`'s partitions, creates what `times` lack,
    /// and returns them all.
    async fn create_covering(
        &self,
        connection: &mut PgConnection,
        parent: &'static str,
        times: &[i64],
        board_keyed_before_ms: Option<i64>,
    ) -> Result<Vec<Span>, sqlx::Error> {
        let mut tx = sqlx::Connection::begin(connection).await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        let mut spans = existing(&mut tx, parent).await?;
        for &ms in times {
            let Some(span) = span_for(ms, self.length_ms(parent), &spans) else {
                continue;
            };
            let name = partition_name(parent, span.from_ms);
            let bound = |ms: i64, unbounded: &str| {
                if ms == i64::MIN || ms == i64::MAX {
                    unbounded.to_owned()
                } else {
                    format!("'{}'", sql_time(ms))
                }
            };
            let (from, to) = (
                bound(span.from_ms, "MINVALUE"),
                bound(span.to_ms, "MAXVALUE"),
            );
            let mut statements = vec![format!(
                "CREATE TABLE IF NOT EXISTS {name} (LIKE {parent} INCLUDING ALL)"
            )];
            // The parent has no key to copy: each readings partition is keyed for writing
            // until it closes (see `arrange`), or by board when it is made closed.
            let board_keyed = parent == "readings"
                && board_keyed_before_ms.is_some_and(|before| span.to_ms <= before);
            if board_keyed {
                statements.push(super::arrange::create_board_key(&name));
            } else if parent == "readings" {
                statements.push(super::arrange::create_time_key(&name));
            }
            statements.push(format!(
                "ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES FROM ({from}) TO ({to})"
            ));
            for statement in statements {
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(
                "INSERT INTO dweetpipe_partitions (name, parent, from_time, to_time, arranged)
                 VALUES ($1, $2, to_timestamp($3::double precision / 1000), to_timestamp($4::double precision / 1000), $5)",
            )
            .bind(&name)
            .bind(parent)
            .bind(epoch_ms_or_infinity(span.from_ms))
            .bind(epoch_ms_or_infinity(span.to_ms))
            .bind(board_keyed)
            .execute(&mut *tx)
            .await?;
            tracing::info!(partition = %name, from = %sql_time(span.from_ms.max(0)), "created a partition");
            spans.push(span);
        }
        tx.commit().await?;
        Ok(spans)
    }
}

/// `parent`'s partitions as the catalog lists them.
pub async fn existing(
    connection: &mut PgConnection,
    parent: &str,
) -> Result<Vec<Span>, sqlx::Error> {
    existing_where(connection, parent, "true").await
}

/// Those of `parent`'s partitions whose catalog row meets `condition` (SQL, on the catalog's
/// columns).
pub async fn existing_where(
    connection: &mut PgConnection,
    parent: &str,
    condition: &'static str,
) -> Result<Vec<Span>, sqlx::Error> {
    let rows: Vec<(f64, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT extract(epoch FROM from_time)::double precision * 1000,
                extract(epoch FROM to_time)::double precision * 1000
           FROM dweetpipe_partitions WHERE parent = $1 AND ({condition})"
    )))
    .bind(parent)
    .fetch_all(connection)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(from, to)| Span {
            from_ms: ms_or_unbounded(from),
            to_ms: ms_or_unbounded(to),
        })
        .collect())
}

/// A catalog time (±infinity as a float) as ms, infinities as the unbounded ends.
fn ms_or_unbounded(ms: f64) -> i64 {
    if ms.is_infinite() {
        if ms < 0.0 { i64::MIN } else { i64::MAX }
    } else {
        ms.round() as i64
    }
}

fn epoch_ms_or_infinity(ms: i64) -> f64 {
    match ms {
        i64::MIN => f64::NEG_INFINITY,
        i64::MAX => f64::INFINITY,
        ms => ms as f64,
    }
}

/// A time as an SQL literal's text, in UTC.
fn sql_time(ms: i64) -> String {
    let time: DateTime<Utc> = ms_to_datetime(ms);
    time.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string()
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 60 * 60 * 1000;
    const DAY: i64 = 24 * HOUR;
    /// 2026-12-03T00:00:00Z
    const DEC3: i64 = 1_796_256_000_000;

    fn span(from_ms: i64, to_ms: i64) -> Span {
        Span { from_ms, to_ms }
    }

    /// (what the case is, the moment, the partition length, what exists, what to create)
    type Case<'a> = (&'a str, i64, i64, &'a [Span], Option<Span>);

    #[test]
    fn spans_are_aligned_and_cut_to_their_neighbours() {
        let legacy = span(i64::MIN, DEC3 + DAY);
        let cases: &[Case] = &[
            (
                "nothing yet: the UTC day",
                DEC3 + 5 * HOUR,
                DAY,
                &[],
                Some(span(DEC3, DEC3 + DAY)),
            ),
            (
                "the day's first ms",
                DEC3,
                DAY,
                &[],
                Some(span(DEC3, DEC3 + DAY)),
            ),
            (
                "the day's last ms",
                DEC3 + DAY - 1,
                DAY,
                &[],
                Some(span(DEC3, DEC3 + DAY)),
            ),
            ("before 1970", -1, DAY, &[], Some(span(-DAY, 0))),
            (
                "held by the legacy partition",
                DEC3 - 400 * DAY,
                DAY,
                &[legacy],
                None,
            ),
            (
                "after the legacy partition",
                DEC3 + DAY + 1,
                DAY,
                &[legacy],
                Some(span(DEC3 + DAY, DEC3 + 2 * DAY)),
            ),
            (
                "hours",
                DEC3 + 5 * HOUR + 1,
                HOUR,
                &[],
                Some(span(DEC3 + 5 * HOUR, DEC3 + 6 * HOUR)),
            ),
            (
                "a week cut back by the legacy partition below",
                DEC3 + 2 * DAY,
                7 * DAY,
                &[legacy],
                // Epoch weeks begin on Thursdays: 2026-12-03 is one.
                Some(span(DEC3 + DAY, DEC3 + 7 * DAY)),
            ),
            (
                "days after hours: cut to the hours above",
                DEC3 + HOUR,
                DAY,
                &[span(DEC3 + 6 * HOUR, DEC3 + 7 * HOUR)],
                Some(span(DEC3, DEC3 + 6 * HOUR)),
            ),
            (
                "a gap between two",
                DEC3 + 3 * HOUR,
                DAY,
                &[
                    span(DEC3, DEC3 + 2 * HOUR),
                    span(DEC3 + 4 * HOUR, DEC3 + 5 * HOUR),
                ],
                Some(span(DEC3 + 2 * HOUR, DEC3 + 4 * HOUR)),
            ),
            (
                "inside an existing one",
                DEC3 + 3 * HOUR,
                HOUR,
                &[span(DEC3, DEC3 + DAY)],
                None,
            ),
        ];
        for (label, ms, length, existing, expected) in cases {
            assert_eq!(span_for(*ms, *length, existing), *expected, "{label}");
            if let Some(made) = span_for(*ms, *length, existing) {
                assert!(made.contains(*ms), "{label}: holds the moment");
                assert!(
                    existing
                        .iter()
                        .all(|e| e.to_ms <= made.from_ms || e.from_ms >= made.to_ms),
                    "{label}: overlaps nothing"
                );
            }
        }
    }

    #[test]
    fn a_sorted_list_of_spans_is_searched() {
        let spans = [
            span(i64::MIN, DEC3),
            span(DEC3, DEC3 + DAY),
            span(DEC3 + 2 * DAY, DEC3 + 3 * DAY),
        ];
        for (ms, held) in [
            (DEC3 - 400 * DAY, true),
            (DEC3, true),
            (DEC3 + DAY - 1, true),
            (DEC3 + DAY, false),
            (DEC3 + 2 * DAY + 5, true),
            (DEC3 + 3 * DAY, false),
        ] {
            assert_eq!(covers(&spans, ms), held, "{ms}");
        }
        assert!(!covers(&[], DEC3));
    }

    #[test]
    fn names_say_where_a_partition_starts() {
        assert_eq!(partition_name("readings", DEC3), "readings_20261203");
        assert_eq!(
            partition_name("readings_1m", DEC3 + 13 * HOUR),
            "readings_1m_20261203_1300"
        );
        assert_eq!(
            partition_name("dweets", DEC3 + 1000),
            "dweets_20261203_000001"
        );
    }
}
