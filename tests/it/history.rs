//! History at scale in PostgreSQL: the partitioned tables, migration 4 on a database the
//! previous release filled, the rollups' exactness, and retention.

use std::time::Duration;

use dweetpipe::record::{Normalized, Reading, Record, now_ms};
use dweetpipe::sink::postgres::{DatabaseUrl, PostgresSink};
use dweetpipe::telemetry::Metrics;
use sqlx::PgConnection;
use tokio::process::Command;

use crate::postgres::TestDatabase;

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");
const MINUTE: i64 = 60_000;
const DAY: i64 = 24 * 60 * MINUTE;

/// Rows of each rollup that disagree with the raw readings (count, min and max exactly, the
/// sum to floating-point rounding), and how many buckets each holds.
pub(crate) async fn rollup_mismatches(connection: &mut PgConnection) -> [(i64, i64); 2] {
    let mut out = [(0, 0); 2];
    for (slot, (table, unit)) in [("readings_1m", "minute"), ("readings_1h", "hour")]
        .into_iter()
        .enumerate()
    {
        let query = format!(
            "WITH raw AS (
                SELECT date_trunc('{unit}', time, 'UTC') AS bucket, thing, sensor,
                       count(*) AS n, sum(value) AS s, min(value) AS lo, max(value) AS hi
                  FROM readings GROUP BY 1, 2, 3)
             SELECT count(*) FILTER (WHERE r.n IS DISTINCT FROM m.n
                                        OR r.lo IS DISTINCT FROM m.min
                                        OR r.hi IS DISTINCT FROM m.max
                                        OR m.sum IS NULL OR r.s IS NULL
                                        OR abs(r.s - m.sum) > 1e-9 * greatest(1, abs(r.s))),
                    count(m.bucket)
               FROM raw r FULL JOIN {table} m USING (bucket, thing, sensor)"
        );
        out[slot] = sqlx::query_as(sqlx::AssertSqlSafe(query))
            .fetch_one(&mut *connection)
            .await
            .unwrap();
    }
    out
}

/// Asserts both rollups agree with the raw rows and hold something.
pub(crate) async fn assert_rollups_exact(connection: &mut PgConnection) {
    let [(minute_bad, minutes), (hour_bad, hours)] = rollup_mismatches(connection).await;
    assert_eq!(
        (minute_bad, hour_bad),
        (0, 0),
        "rollups agree with readings ({minutes} minute and {hours} hour buckets)"
    );
    assert!(minutes > 0 && hours > 0, "the rollups hold buckets");
}

fn dweet(thing: &str, created_ms: i64, value: f64) -> Record {
    Record::Dweet(Normalized {
        thing: thing.to_owned(),
        created_ms,
        created_text: None,
        received_ms: created_ms,
        content: format!(r#"{{"t":{value},"h":{}}}"#, value * 2.0),
        readings: vec![
            Reading {
                sensor: "t".into(),
                value,
            },
            Reading {
                sensor: "h".into(),
                value: value * 2.0,
            },
        ],
    })
}

/// A sink of its own on `db`, with metrics of its own.
async fn connect_sink(db: &TestDatabase) -> PostgresSink {
    let metrics = std::sync::Arc::new(Metrics::new().unwrap());
    PostgresSink::connect(&db.sink_config(), metrics, Duration::from_secs(10))
        .await
        .unwrap()
}

async fn count(connection: &mut PgConnection, query: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
        .fetch_one(connection)
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_3_database_is_partitioned_in_place_and_keeps_every_row() {
    let db = TestDatabase::create().await;
    let url = DatabaseUrl::new(db.url.clone());
    // What the previous release left: schema 3, filled over three days by its sink.
    assert_eq!(
        dweetpipe::sink::postgres::migrate_to(&url, 3)
            .await
            .unwrap(),
        3
    );
    let mut connection = db.connect().await;
    sqlx::raw_sql(
        "INSERT INTO dweets (thing, created, received_at, content)
         SELECT 'board-' || (g % 4), now() - g * interval '1 minute', now(), jsonb_build_object('t', g)
           FROM generate_series(1, 3 * 1440) g;
         INSERT INTO readings (time, thing, sensor, value)
         SELECT created, thing, s, (content->>'t')::float8 + length(s) FROM dweets, unnest(ARRAY['t', 'hum']) s;
         INSERT INTO things (thing, last_created) SELECT thing, max(created) FROM dweets GROUP BY thing;",
    )
    .execute(&mut connection)
    .await
    .unwrap();

    let output = Command::new(BIN)
        .args(["migrate", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("3 migration(s) applied now"));
    assert_eq!(
        index_keys(&mut connection, "readings_legacy").await,
        ["readings_legacy_by_board"],
        "the old rows are closed: keyed by board for reading"
    );

    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM dweets").await,
        3 * 1440
    );
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM readings").await,
        2 * 3 * 1440
    );
    assert_eq!(
        count(
            &mut connection,
            "SELECT count(*) FROM pg_class WHERE relname IN ('dweets', 'readings', 'readings_1m', 'readings_1h') AND relkind = 'p'"
        )
        .await,
        4,
        "every history table is partitioned"
    );
    assert_eq!(
        count(
            &mut connection,
            "SELECT count(*) FROM pg_inherits WHERE inhrelid IN ('readings_legacy'::regclass, 'dweets_legacy'::regclass)"
        )
        .await,
        2,
        "the old tables are the first partitions, not copies"
    );
    assert_rollups_exact(&mut connection).await;
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM s5d9_readings").await,
        3 * 1440,
        "the wide view reads the new table"
    );

    // The sink goes on: a dweet of tomorrow gets a partition of its own, one inside the old
    // range lands in the legacy partition, a repeat changes nothing.
    let mut sink = connect_sink(&db).await;
    let tomorrow = now_ms() + DAY;
    let old = now_ms() - 2 * DAY + 30_000;
    let records = [dweet("board-0", tomorrow, 1.0), dweet("board-9", old, 2.0)];
    sink.write(&records).await;
    sink.write(&records).await;
    sink.history().refresh_rollups().await.unwrap();
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM dweets").await,
        3 * 1440 + 2
    );
    let legacy_holds: i64 = count(
        &mut connection,
        "SELECT count(*) FROM readings_legacy WHERE thing = 'board-9'",
    )
    .await;
    assert_eq!(legacy_holds, 2, "an old dweet goes where its time belongs");
    assert!(
        count(
            &mut connection,
            "SELECT count(*) FROM dweetpipe_partitions WHERE parent = 'readings' AND from_time > now()"
        )
        .await
            == 1,
        "tomorrow's partition was made"
    );
    let tomorrow_partition: String = sqlx::query_scalar(
        "SELECT name FROM dweetpipe_partitions WHERE parent = 'readings' AND from_time > now()",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap();
    assert_eq!(
        index_keys(&mut connection, &tomorrow_partition).await,
        [format!("{tomorrow_partition}_by_time")],
        "an open partition is keyed by time for writing"
    );
    assert_rollups_exact(&mut connection).await;
    drop(connection);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rollups_agree_with_the_raw_rows_after_bulk_live_late_and_repeated_writes() {
    let db = TestDatabase::create().await;
    let mut sink = connect_sink(&db).await;
    let start = (now_ms() / DAY - 3) * DAY;
    // Bulk: three boards, a dweet a minute each over three days (COPY-sized batches).
    let bulk: Vec<Record> = (0..3 * 4320)
        .map(|i| {
            dweet(
                &format!("b{}", i % 3),
                start + (i / 3) * MINUTE,
                (i % 97) as f64,
            )
        })
        .collect();
    for chunk in bulk.chunks(5000) {
        sink.write(chunk).await;
    }
    // Live: one dweet at a time, newer than everything.
    for i in 0..20 {
        sink.write(&[dweet("b0", start + 3 * DAY + i * 7_000, -(i as f64))])
            .await;
    }
    // The closed days are re-keyed by board, so the late dweets below land in partitions of
    // both keys, and the rollups read both.
    sink.history().refresh_rollups().await.unwrap();
    let arranged = sink.history().arrange(now_ms()).await.unwrap();
    assert!(arranged.len() >= 2, "{arranged:?}");
    // Late: between stored dweets (an import of older history) and repeats of stored ones.
    let late: Vec<Record> = (0..50)
        .map(|i| dweet("b1", start + i * 20_000 + 10_000, 1000.0 + i as f64))
        .chain(bulk[..30].iter().cloned())
        .collect();
    sink.write(&late).await;
    sink.history().refresh_rollups().await.unwrap();

    let mut connection = db.connect().await;
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM dweets").await,
        3 * 4320 + 20 + 50
    );
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM rollup_pending").await,
        0,
        "every noted bucket was recomputed"
    );
    assert!(
        count(
            &mut connection,
            "SELECT count(*) FROM dweetpipe_partitions WHERE parent = 'readings'"
        )
        .await
            >= 4,
        "a partition per day"
    );
    assert_rollups_exact(&mut connection).await;
    let late_bucket: (i64, f64) = sqlx::query_as(
        "SELECT n, max FROM readings_1m WHERE thing = 'b1' AND sensor = 't' ORDER BY bucket LIMIT 1",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap();
    assert_eq!(
        late_bucket.0, 4,
        "1 bulk and 3 late dweets in the first minute"
    );
    assert!(late_bucket.1 >= 1000.0, "the late values are in the bucket");
    drop(connection);
    db.drop_now().await;
}

/// The unique indexes of a table, by name, valid ones only.
async fn index_keys(connection: &mut PgConnection, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          WHERE i.indrelid = $1::regclass AND i.indisunique AND i.indisvalid ORDER BY 1",
    )
    .bind(table)
    .fetch_all(connection)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_readings_partitions_are_rekeyed_by_board_and_each_step_can_be_repeated() {
    let db = TestDatabase::create().await;
    let mut sink = connect_sink(&db).await;
    let today = now_ms() / DAY * DAY;
    // Three boards, a dweet every ten minutes, from four days ago to today's first minute.
    let records: Vec<Record> = (0..3 * 4 * 144 + 3)
        .map(|i| {
            dweet(
                &format!("b{}", i % 3),
                today - 4 * DAY + (i / 3) * 10 * MINUTE,
                i as f64,
            )
        })
        .collect();
    sink.write(&records).await;
    let mut connection = db.connect().await;
    let partition = |ms: i64| dweetpipe::sink::postgres::partitions::partition_name("readings", ms);
    let (oldest, second, today_partition) = (
        partition(today - 4 * DAY),
        partition(today - 3 * DAY),
        partition(today),
    );
    for name in [&oldest, &second, &today_partition] {
        assert_eq!(
            index_keys(&mut connection, name).await,
            [format!("{name}_by_time")],
            "written by time"
        );
    }

    // What a crash leaves. The oldest: a board-led build cancelled half-way (an invalid
    // index), as CREATE INDEX CONCURRENTLY leaves it when interrupted while it waits for a
    // writer. The second: both keys, marked arranged, the time-led key not yet dropped.
    let mut writer = db.connect().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; DELETE FROM {oldest} WHERE false; SELECT 1"
    )))
    .execute(&mut writer)
    .await
    .unwrap();
    let mut builder = db.connect().await;
    let builder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut builder)
        .await
        .unwrap();
    let build = tokio::spawn(async move {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE UNIQUE INDEX CONCURRENTLY {oldest}_by_board ON {oldest} (thing, time, sensor) INCLUDE (value)",
            oldest = partition(today - 4 * DAY)
        )))
        .execute(&mut builder)
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count(
        &mut connection,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {builder_pid} AND wait_event_type = 'Lock'"
        ),
    )
    .await
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never waited on the writer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(builder_pid)
        .execute(&mut connection)
        .await
        .unwrap();
    assert!(build.await.unwrap().is_err(), "the build was cancelled");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut writer)
        .await
        .unwrap();
    let invalid = count(
        &mut connection,
        &format!(
            "SELECT count(*) FROM pg_index WHERE indexrelid = '{oldest}_by_board'::regclass AND NOT indisvalid"
        ),
    )
    .await;
    assert_eq!(invalid, 1, "the cancelled build left an invalid index");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE UNIQUE INDEX {second}_by_board ON {second} (thing, time, sensor) INCLUDE (value);
         UPDATE dweetpipe_partitions SET arranged = true WHERE name = '{second}'"
    )))
    .execute(&mut connection)
    .await
    .unwrap();

    let arranged = sink.history().arrange(now_ms()).await.unwrap();
    assert!(
        arranged.contains(&oldest) && arranged.contains(&second),
        "both interrupted partitions are finished: {arranged:?}"
    );
    assert!(!arranged.contains(&today_partition), "today is open");
    for name in [&oldest, &second] {
        assert_eq!(
            index_keys(&mut connection, name).await,
            [format!("{name}_by_board")],
            "keyed by board, the time-led key gone"
        );
    }
    assert_eq!(
        index_keys(&mut connection, &today_partition).await,
        [format!("{today_partition}_by_time")]
    );
    assert_eq!(
        count(
            &mut connection,
            "SELECT count(*) FROM dweetpipe_partitions WHERE parent = 'readings' AND arranged AND to_time > now()"
        )
        .await,
        0,
        "the catalog marks the closed ones only"
    );
    assert!(
        sink.history().arrange(now_ms()).await.unwrap().is_empty(),
        "a second run has nothing to do"
    );

    // One board's day is read through the board-led key.
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN SELECT time, value FROM readings
          WHERE thing = 'b1' AND sensor = 't'
            AND time >= '{}' AND time < '{}'",
        chrono::DateTime::from_timestamp_millis(today - 4 * DAY).unwrap(),
        chrono::DateTime::from_timestamp_millis(today - 3 * DAY).unwrap()
    )))
    .fetch_all(&mut connection)
    .await
    .unwrap();
    assert!(
        plan.iter()
            .any(|line| line.contains(&format!("{oldest}_by_board"))),
        "{plan:#?}"
    );

    // Repeats are refused by either key; a late dweet goes in.
    let stored = count(&mut connection, "SELECT count(*) FROM readings").await;
    sink.write(&records).await;
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM readings").await,
        stored
    );
    sink.write(&[dweet("b1", today - 4 * DAY + 5 * MINUTE, -1.0)])
        .await;
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM readings").await,
        stored + 2
    );
    sink.history().refresh_rollups().await.unwrap();
    assert_rollups_exact(&mut connection).await;
    drop((connection, writer));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_load_keys_closed_partitions_by_board_and_adds_its_minutes_as_it_goes() {
    let db = TestDatabase::create().await;
    let mut sink = connect_sink(&db).await.for_bulk_load();
    let today = now_ms() / DAY * DAY;
    // Two boards, a dweet every 30 s from three days ago, and one in today's first minute:
    // COPY-sized batches. Yesterday closes an hour into today, so only the two days before it
    // are sure to have closed.
    let records: Vec<Record> = (0..2 * 3 * 2880 + 2)
        .map(|i| {
            dweet(
                &format!("b{}", i % 2),
                today - 3 * DAY + (i / 2) * 30_000,
                (i % 101) as f64 / 7.0,
            )
        })
        .collect();
    // Written in two halves split inside a minute, the rollups refreshed between: the second
    // half adds to minutes that already have rows.
    let split = today - 2 * DAY + 30_000;
    let (first, second): (Vec<&Record>, Vec<&Record>) = records
        .iter()
        .partition(|r| r.created_ms().is_some_and(|ms| ms < split));
    sink.write(first).await;
    sink.history().refresh_rollups().await.unwrap();
    sink.write(second).await;
    let mut connection = db.connect().await;
    assert_eq!(
        count(
            &mut connection,
            "SELECT count(*) FROM rollup_pending WHERE NOT minute_known"
        )
        .await,
        0,
        "a bulk COPY adds its minutes itself and leaves only their hours noted"
    );
    assert!(count(&mut connection, "SELECT count(*) FROM readings_1m").await > 0);

    let partition = |ms: i64| dweetpipe::sink::postgres::partitions::partition_name("readings", ms);
    for closed in [partition(today - 3 * DAY), partition(today - 2 * DAY)] {
        assert_eq!(
            index_keys(&mut connection, &closed).await,
            [format!("{closed}_by_board")],
            "made closed: keyed by board at once"
        );
    }
    let today_partition = partition(today);
    assert_eq!(
        index_keys(&mut connection, &today_partition).await,
        [format!("{today_partition}_by_time")],
        "today is open: keyed for writing"
    );
    assert_eq!(
        count(
            &mut connection,
            "SELECT count(*) FROM dweetpipe_partitions WHERE parent = 'readings' AND arranged"
        )
        .await,
        2 + i64::from(now_ms() - today >= 60 * MINUTE),
        "the catalog says which key each has"
    );
    assert!(
        sink.history().arrange(now_ms()).await.unwrap().is_empty(),
        "nothing is left to re-key"
    );

    // A late dweet in a minute the bulk write added itself, before any refresh: its note
    // takes the minute back to a whole recomputation.
    let noted = count(&mut connection, "SELECT count(*) FROM rollup_pending").await;
    sink.write(&[dweet("b0", split - 15_000, 1e6)]).await;
    assert_eq!(
        count(
            &mut connection,
            "SELECT count(*) FROM rollup_pending WHERE NOT minute_known"
        )
        .await,
        1
    );
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM rollup_pending").await,
        noted,
        "the same note, its mark cleared"
    );
    // Written again (a rerun of the import): the board-led key refuses every repeat.
    let stored = count(&mut connection, "SELECT count(*) FROM readings").await;
    assert_eq!(stored, 2 * records.len() as i64 + 2, "two readings a dweet");
    sink.write(&records).await;
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM readings").await,
        stored
    );
    sink.history().refresh_rollups().await.unwrap();
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM rollup_pending").await,
        0
    );
    assert_rollups_exact(&mut connection).await;
    drop(connection);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_copy_waits_for_a_refresh_in_progress_before_adding_its_minutes() {
    let db = TestDatabase::create().await;
    let mut sink = connect_sink(&db).await.for_bulk_load();
    // A refresh in progress: it holds the rollups' lock (rollup.rs, LOCK_KEY) until it ends.
    let mut refresher = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT pg_advisory_xact_lock(7239366412440961026)")
        .execute(&mut refresher)
        .await
        .unwrap();
    let start = (now_ms() / DAY - 3) * DAY;
    let records: Vec<Record> = (0..3000)
        .map(|i| dweet("b0", start + i * 1000, i as f64))
        .collect();
    let write = tokio::spawn(async move {
        sink.write(&records).await;
        sink
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !write.is_finished(),
        "the COPY does not commit its minutes while a refresh may be reading them"
    );
    let mut connection = db.connect().await;
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM readings").await,
        0
    );
    sqlx::raw_sql("COMMIT")
        .execute(&mut refresher)
        .await
        .unwrap();
    let sink = write.await.unwrap();
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM readings").await,
        6000
    );
    sink.history().refresh_rollups().await.unwrap();
    assert_rollups_exact(&mut connection).await;
    drop((connection, refresher));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_that_commits_while_a_refresh_runs_keeps_its_note() {
    let db = TestDatabase::create().await;
    let mut sink = connect_sink(&db).await;
    let minute = (now_ms() / DAY - 1) * DAY + 10 * MINUTE;
    sink.write(&[dweet("b0", minute, 1.0)]).await;
    // A writer in the middle of its commit holds the minute's note...
    let mut writer = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT 1 FROM rollup_pending FOR UPDATE")
        .execute(&mut writer)
        .await
        .unwrap();
    let history = sink.history();
    let refresh = tokio::spawn(async move { history.refresh_rollups_once(None).await });
    // ...while a refresh recomputes the minute and then waits to clear that note.
    let mut watcher = db.connect().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count(
        &mut watcher,
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND query LIKE '%DELETE FROM rollup_pending%'",
    )
    .await
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh never reached its DELETE"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The writer commits a reading the recomputation did not see, noting the minute again.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO readings (time, thing, sensor, value)
         VALUES (to_timestamp({}), 'b0', 't', 5.0);
         UPDATE rollup_pending SET minute_known = minute_known;
         COMMIT",
        (minute + 5_000) as f64 / 1000.0
    )))
    .execute(&mut writer)
    .await
    .unwrap();
    refresh.await.unwrap().unwrap();
    assert_eq!(
        count(&mut watcher, "SELECT count(*) FROM rollup_pending").await,
        1,
        "the note of the write that committed meanwhile stays for the next refresh"
    );
    sink.history().refresh_rollups().await.unwrap();
    assert_rollups_exact(&mut watcher).await;
    drop((watcher, writer));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_drops_whole_old_partitions_and_keeps_the_rest() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("things.toml");
    let write_config = |retention: &str| {
        std::fs::write(
            &config,
            format!(
                "[postgres]\nurl_env = \"PRUNE_DB\"\nspool_dir = \"{}\"\n{retention}",
                dir.path().join("spool").display()
            ),
        )
        .unwrap();
    };
    let prune = || {
        let mut command = Command::new(BIN);
        command
            .args(["prune", "--config", config.to_str().unwrap()])
            .env("PRUNE_DB", &db.url);
        async move { command.output().await.unwrap() }
    };
    write_config("");
    let refused = prune().await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no retention is configured"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Five days of one board, a dweet an hour.
    let mut sink = connect_sink(&db).await;
    let today = now_ms() / DAY * DAY;
    let records: Vec<Record> = (0..5 * 24)
        .map(|h| dweet("old-board", today - 4 * DAY + h * 60 * MINUTE, h as f64))
        .collect();
    sink.write(&records).await;
    sink.history().refresh_rollups().await.unwrap();
    drop(sink);

    // Raw rows for two days (today and yesterday survive), the rollups for ever.
    write_config("retention = \"2d\"\n");
    let output = prune().await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("prune: 4 partition(s) dropped"),
        "the two days wholly older than 2d × (dweets, readings): {stdout}"
    );
    let mut connection = db.connect().await;
    let kept_from: i64 = count(
        &mut connection,
        "SELECT (extract(epoch FROM min(created)) * 1000)::bigint FROM dweets",
    )
    .await;
    assert!(
        kept_from == today - 2 * DAY,
        "whole days went, the partly old one stayed whole"
    );
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM dweets").await,
        3 * 24,
        "the three newest days are whole"
    );
    assert_eq!(
        count(
            &mut connection,
            "SELECT sum(n)::bigint FROM readings_1h WHERE sensor = 't'"
        )
        .await,
        5 * 24,
        "the rollups outlive the raw rows"
    );
    assert_eq!(
        count(
            &mut connection,
            "SELECT count(*) FROM dweetpipe_partitions d LEFT JOIN pg_class c ON c.relname = d.name WHERE c.oid IS NULL"
        )
        .await,
        0,
        "the catalog lists only tables that exist"
    );
    let again = prune().await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("prune: 0 partition(s) dropped"));

    // The importer of old history is told what retention skipped.
    let history = dir.path().join("old.jsonl");
    std::fs::write(
        &history,
        format!(
            "{{\"thing\":\"old-board\",\"created\":\"{}\",\"content\":{{\"t\":1}}}}\n{{\"thing\":\"old-board\",\"created\":\"{}\",\"content\":{{\"t\":2}}}}\n",
            dweetpipe::protocol::format_created(dweetpipe::record::ms_to_datetime(today - 10 * DAY)),
            dweetpipe::protocol::format_created(dweetpipe::record::ms_to_datetime(now_ms() - 60_000)),
        ),
    )
    .unwrap();
    let import = Command::new(BIN)
        .args(["import", "--config", config.to_str().unwrap()])
        .arg(&history)
        .env("PRUNE_DB", &db.url)
        .output()
        .await
        .unwrap();
    let summary = String::from_utf8_lossy(&import.stdout);
    assert!(
        summary.contains("PostgreSQL: 1 dweets")
            && summary.contains("1 older than [postgres] retention skipped"),
        "{summary}{}",
        String::from_utf8_lossy(&import.stderr)
    );
    drop(connection);
    db.drop_now().await;
}

/// Rows of a panel query: (time in epoch seconds, series, value).
async fn panel_rows(connection: &mut PgConnection, sql: &str) -> Vec<(f64, String, f64)> {
    let wrapped = format!(
        "SELECT \"time\"::float8, metric::text, value::float8 FROM (\n{sql}\n) AS panel ORDER BY 2, 1"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(wrapped))
        .fetch_all(connection)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_sensor_panel_downsamples_and_matches_the_raw_rows() {
    use crate::grafana::Query;
    let db = TestDatabase::create().await;
    let mut sink = connect_sink(&db).await;
    // Two boards, a dweet every 5 minutes for 35 days, with every sensor the panels show.
    let sensors = [
        "sensors.TemperatureC",
        "sensors.Humidity",
        "sensors.Pressure",
        "sensors.AccelX",
        "sensors.AccelY",
        "sensors.AccelZ",
        "sensors.MagX",
        "sensors.MagY",
        "sensors.MagZ",
        "sensors.SoundLevel",
    ];
    let things = vec!["S5D9-0001".to_owned(), "S5D9-0002".to_owned()];
    let now = now_ms() / MINUTE * MINUTE;
    let records: Vec<Record> = (0..35 * 288)
        .flat_map(|step: i64| {
            let created = now - 35 * DAY + step * 5 * MINUTE;
            things.iter().enumerate().map(move |(board, thing)| {
                Record::Dweet(Normalized {
                    thing: thing.clone(),
                    created_ms: created,
                    created_text: None,
                    received_ms: created,
                    content: "{}".to_owned(),
                    readings: sensors
                        .iter()
                        .enumerate()
                        .map(|(i, sensor)| Reading {
                            sensor: (*sensor).into(),
                            value: ((step * 7 + i as i64 * 13 + board as i64) % 101) as f64 / 3.0,
                        })
                        .collect(),
                })
            })
        })
        .collect();
    for chunk in records.chunks(5000) {
        sink.write(chunk).await;
    }
    sink.history().refresh_rollups().await.unwrap();
    let mut connection = db.connect().await;
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(&mut connection)
        .await
        .unwrap();

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/dashboards/s5d9-sensors.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 7, "six sensor panels and the fleet's");
    let to = now / (60 * MINUTE) * (60 * MINUTE);
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        let sql = panel["targets"][0]["rawSql"].as_str().unwrap();
        assert!(
            sql.contains("$__timeGroupAlias(time, $__interval)")
                || sql.contains("$__timeGroupAlias(bucket, $__interval)"),
            "{title} groups by Grafana's interval"
        );
        let min_interval = panel["interval"].as_str().map_or(0, |text| {
            humantime::parse_duration(text).unwrap().as_millis() as i64
        });
        for range in [60 * MINUTE, DAY, 7 * DAY, 30 * DAY] {
            let from = to - range;
            let interval_ms = Query::interval_for(from, to, 1000, min_interval);
            let query = Query {
                from_ms: from,
                to_ms: to,
                interval_ms,
                things: &things,
            };
            let shown = panel_rows(&mut connection, &query.expand(sql)).await;
            // The same grouping over the raw rows: the raw branch forced, or for the fleet
            // panel (rollup only) its average written against `readings`.
            let reference_sql = if sql.contains("FROM readings\n") {
                sql.replace("$__interval_ms", "1")
            } else {
                "SELECT $__timeGroupAlias(time, $__interval), 'fleet' AS metric, avg(value) AS value
                 FROM readings WHERE $__timeFilter(time) AND sensor = 'sensors.TemperatureC'
                 GROUP BY 1, 2"
                    .to_owned()
            };
            let reference = panel_rows(&mut connection, &query.expand(&reference_sql)).await;
            let mut series: std::collections::BTreeMap<&str, Vec<(f64, f64)>> = Default::default();
            for (time, metric, value) in &shown {
                series.entry(metric).or_default().push((*time, *value));
            }
            assert!(!series.is_empty(), "{title} over {range} ms shows data");
            for (metric, points) in &series {
                assert!(
                    points.len() <= 1500,
                    "{title} over {range} ms: {metric} has {} points",
                    points.len()
                );
                let expected: std::collections::BTreeMap<i64, f64> = reference
                    .iter()
                    .filter(|(_, m, _)| m == metric)
                    .map(|(t, _, v)| (*t as i64, *v))
                    .collect();
                // The edges may hold part of a bucket: compare the inside (a short range at
                // the top of the hour may show one or two points, all edge).
                let inside = points
                    .get(1..points.len().saturating_sub(1))
                    .unwrap_or_default();
                for (time, value) in inside {
                    let raw = expected
                        .get(&(*time as i64))
                        .unwrap_or_else(|| panic!("{title}: no raw rows at {time}"));
                    assert!(
                        (value - raw).abs() <= 1e-9 * raw.abs().max(1.0),
                        "{title} over {range} ms, {metric} at {time}: {value} shown, {raw} in the raw rows"
                    );
                }
            }
        }
    }
    drop(connection);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_worker_applies_retention_at_start() {
    let db = TestDatabase::create().await;
    let server = crate::worker::big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let today = now_ms() / DAY * DAY;
    {
        let metrics = std::sync::Arc::new(Metrics::new().unwrap());
        let mut sink = PostgresSink::connect(&db.sink_config(), metrics, Duration::from_secs(10))
            .await
            .unwrap();
        let records: Vec<Record> = (0..5)
            .map(|day| dweet("kept-board", today - day * DAY + MINUTE, day as f64))
            .collect();
        sink.write(&records).await;
    }
    let things = vec![crate::common::thing("retention")];
    let mut config = crate::worker::test_config(&server.base_url(), &things, dir.path());
    config.parquet = None;
    config.postgres = Some(dweetpipe::sink::postgres::PostgresConfig {
        // A whole number of partitions: what goes does not depend on the time of day.
        retention: Some(Duration::from_secs(2 * 24 * 60 * 60)),
        ..db.sink_config()
    });
    let (worker, metrics) = crate::worker::start_worker(config).await;
    let dropped = |table: &str| {
        metrics.value(
            "dweetpipe_retention_partitions_dropped_total",
            &[("table", table)],
        )
    };
    // The day before yesterday has closed whatever the time of day: it is re-keyed by board.
    crate::worker::wait_for(
        "retention and re-keying at start",
        Duration::from_secs(20),
        || {
            dropped("readings") == 2.0
                && dropped("dweets") == 2.0
                && metrics.value("dweetpipe_partitions_arranged_total", &[]) >= 1.0
        },
    )
    .await;
    assert_eq!(
        metrics.value("dweetpipe_cluster_leader", &[]),
        1.0,
        "a process of its own has the leader's duties, and says so"
    );
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    let mut connection = db.connect().await;
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM dweets").await,
        3,
        "the three newest days stay; the two older went whole"
    );
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}

/// JSON Lines of `things` × `count` dweets, one every `every_ms`, from `start_ms`.
fn history_file(path: &std::path::Path, things: &[&str], start_ms: i64, every_ms: i64, count: i64) {
    let mut text = String::new();
    for i in 0..count {
        for thing in things {
            let created = dweetpipe::protocol::format_created(dweetpipe::record::ms_to_datetime(
                start_ms + i * every_ms,
            ));
            text.push_str(&format!(
                "{{\"thing\":\"{thing}\",\"created\":\"{created}\",\"content\":{{\"t\":{i}}}}}\n"
            ));
        }
    }
    std::fs::write(path, text).unwrap();
}

fn files_of(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_parquet_dates_are_compacted_by_hand_and_by_run_and_old_ones_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("parquet");
    let config = dir.path().join("things.toml");
    std::fs::write(
        &config,
        format!(
            "[parquet]\ndir = \"{}\"\ncompact_after = \"1s\"\nretention = \"3d\"\n",
            parquet.display()
        ),
    )
    .unwrap();
    let today = now_ms() / DAY * DAY;
    let run = |verb: &'static str, file: Option<&std::path::Path>| {
        let mut command = Command::new(BIN);
        command.args([verb, "--config", config.to_str().unwrap()]);
        if let Some(file) = file {
            command.arg(file);
        }
        async move {
            let output = command.output().await.unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "{verb}: {text}");
            text
        }
    };
    // Two imports of 2 days ago (two generations) and one of 5 days ago.
    let older = dir.path().join("older.jsonl");
    history_file(&older, &["b1", "b2"], today - 2 * DAY, 60_000, 30);
    let newer = dir.path().join("newer.jsonl");
    history_file(
        &newer,
        &["b1", "b2"],
        today - 2 * DAY + 40 * 60_000,
        60_000,
        30,
    );
    let ancient = dir.path().join("ancient.jsonl");
    history_file(&ancient, &["b1"], today - 5 * DAY, 60_000, 10);
    let summary = run("import", Some(&newer)).await;
    run("import", Some(&older)).await;
    assert!(summary.contains("Parquet: 60 dweets"), "{summary}");
    let skipped = run("import", Some(&ancient)).await;
    assert!(
        skipped.contains("10 older than [parquet] retention skipped"),
        "{skipped}"
    );
    let two_days_ago = dweetpipe::record::ms_to_datetime(today - 2 * DAY).date_naive();
    let date_dir = |dataset: &str| parquet.join(dataset).join(format!("date={two_days_ago}"));
    assert_eq!(
        files_of(&date_dir("dweets")).len(),
        2,
        "one file per import"
    );
    let before = crate::worker::parquet_dweets(&parquet);
    assert_eq!(before.len(), 120);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let compacted = run("compact", None).await;
    assert!(
        compacted.contains(&format!(
            "compacted dweets/date={two_days_ago}: 2 files -> 1, 120 rows"
        )),
        "{compacted}"
    );
    assert_eq!(files_of(&date_dir("dweets")).len(), 1);
    let mut after = crate::worker::parquet_dweets(&parquet);
    let mut sorted_before = before.clone();
    sorted_before.sort();
    assert_eq!(
        after,
        {
            let mut by_board = sorted_before.clone();
            by_board.sort();
            by_board
        },
        "the same dweets, now in board and time order"
    );
    after.sort();
    assert_eq!(after, sorted_before);

    // A late import into the compacted date: the worker compacts it again by itself.
    let late = dir.path().join("late.jsonl");
    history_file(&late, &["b3"], today - 2 * DAY + 5_000, 60_000, 5);
    run("import", Some(&late)).await;
    assert_eq!(files_of(&date_dir("dweets")).len(), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let server = crate::worker::big_sandbox().await;
    let mut worker_config = crate::worker::test_config(
        &server.base_url(),
        &[crate::common::thing("compact")],
        dir.path(),
    );
    let mut parquet_config = worker_config.parquet.take().unwrap();
    parquet_config.dir = parquet.clone();
    parquet_config.compact_after = Duration::from_secs(1);
    worker_config.parquet = Some(parquet_config);
    let (worker, metrics) = crate::worker::start_worker(worker_config).await;
    crate::worker::wait_for("a compaction by run", Duration::from_secs(20), || {
        metrics.value(
            "dweetpipe_parquet_dates_compacted_total",
            &[("dataset", "dweets")],
        ) >= 1.0
    })
    .await;
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    server.shutdown().await;
    assert_eq!(files_of(&date_dir("dweets")).len(), 1);
    assert_eq!(crate::worker::parquet_dweets(&parquet).len(), 125);

    // Retention removes whole dates: with 1d, the date of 2 days ago goes.
    std::fs::write(
        &config,
        format!(
            "[parquet]\ndir = \"{}\"\nretention = \"1d\"\n",
            parquet.display()
        ),
    )
    .unwrap();
    let pruned = run("prune", None).await;
    assert!(
        pruned.contains(&format!("removed dweets/date={two_days_ago}")),
        "{pruned}"
    );
    assert!(!date_dir("dweets").exists() && !date_dir("readings").exists());
    assert!(crate::worker::parquet_dweets(&parquet).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_dropped_under_a_running_sink_is_made_again_not_dead_lettered() {
    let db = TestDatabase::create().await;
    let mut sink = connect_sink(&db).await;
    let day = (now_ms() / DAY - 1) * DAY;
    sink.write(&[dweet("gone-board", day + MINUTE, 1.0)]).await;
    // Another process (a retention elsewhere) drops the day this sink knows exists.
    let mut connection = db.connect().await;
    let partitions: Vec<(String, String)> = sqlx::query_as(
        "SELECT parent, name FROM dweetpipe_partitions WHERE parent IN ('dweets', 'readings')",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    assert_eq!(partitions.len(), 2);
    for (parent, name) in &partitions {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {parent} DETACH PARTITION {name}; DROP TABLE {name};
             DELETE FROM dweetpipe_partitions WHERE name = '{name}'"
        )))
        .execute(&mut connection)
        .await
        .unwrap();
    }
    sink.write(&[dweet("gone-board", day + 2 * MINUTE, 2.0)])
        .await;
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM dweets").await,
        1,
        "the later dweet is stored in a partition made again"
    );
    assert_eq!(
        count(&mut connection, "SELECT count(*) FROM dead_letters").await,
        0,
        "a missing partition is not the dweet's fault"
    );
    drop(connection);
    db.drop_now().await;
}
