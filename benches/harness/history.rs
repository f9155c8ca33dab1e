//! `harness history`: what reading history costs at two fleet sizes, 4× apart. Each fleet is
//! S5D9 boards dweeting once a minute for three closed days, written through the sinks as an
//! import writes them (the fleet in time order). Then, per fleet: buffers and time of the
//! documented queries and of every dashboard panel (`EXPLAIN (ANALYZE, BUFFERS)` after
//! `VACUUM ANALYZE`), bytes per dweet in each sink, the rollups' cost per live batch, and how
//! long compaction and retention take.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use dweetpipe::client::{Created, Dweet};
use dweetpipe::record::{Record, ms_to_datetime, now_ms};
use dweetpipe::sandbox::simulator::S5d9Board;
use dweetpipe::sink::parquet::{ParquetConfig, ParquetSink};
use dweetpipe::sink::postgres::{DatabaseUrl, PostgresConfig, PostgresSink};
use dweetpipe::telemetry::Metrics;
use sqlx::Connection;

#[path = "../../tests/it/grafana.rs"]
mod grafana;

use super::ScratchDatabase;

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Fleet sizes, comma-separated (the issue asks for two, 4× apart).
    #[arg(long, value_delimiter = ',', default_values_t = [50, 200])]
    boards: Vec<usize>,
    /// Days of one dweet a minute per board.
    #[arg(long, default_value_t = 3)]
    days: i64,
    /// A server to create a scratch database on.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: String,
}

const MINUTE: i64 = 60_000;
const DAY: i64 = 24 * 60 * MINUTE;
const BOARD: &str = "S5D9-0007";

pub async fn history(args: HistoryArgs) -> anyhow::Result<()> {
    for boards in args.boards.clone() {
        one_fleet(boards, &args).await?;
    }
    Ok(())
}

/// Buffers (shared hit + read) and milliseconds of one query, and its rows, read from the
/// top node of `EXPLAIN (ANALYZE, BUFFERS)`.
async fn explain(
    connection: &mut sqlx::PgConnection,
    sql: &str,
) -> anyhow::Result<(i64, f64, i64)> {
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) {sql}"
    )))
    .fetch_all(&mut *connection)
    .await
    .with_context(|| format!("explaining {sql}"))?;
    let number_after = |line: &str, key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    let rows = lines
        .first()
        .and_then(|top| number_after(top, "rows=").and(top.rfind("rows=").map(|i| &top[i..])))
        .and_then(|actual| number_after(actual, "rows="))
        .unwrap_or(0.0) as i64;
    let buffers = lines
        .iter()
        .find(|line| line.trim_start().starts_with("Buffers:"))
        .map_or(0.0, |line| {
            number_after(line, "hit=").unwrap_or(0.0) + number_after(line, "read=").unwrap_or(0.0)
        }) as i64;
    let ms = lines
        .iter()
        .find_map(|line| number_after(line, "Execution Time: "))
        .unwrap_or(0.0);
    Ok((buffers, ms, rows))
}

fn print_row(what: &str, (buffers, ms, rows): (i64, f64, i64)) {
    println!("  {what:<58} {buffers:>9} buffers {ms:>9.1} ms {rows:>8} rows");
}

async fn one_fleet(boards: usize, args: &HistoryArgs) -> anyhow::Result<()> {
    let scratch =
        ScratchDatabase::create_labelled(&args.database_url, &format!("history_{boards}")).await?;
    let work = super::tempfile_dir()?;
    let metrics = Arc::new(Metrics::new()?);
    let postgres_config = PostgresConfig {
        spool_dir: work.join("spool"),
        ..PostgresConfig::new(DatabaseUrl::new(scratch.url.clone()))
    };
    let mut postgres = PostgresSink::connect(
        &postgres_config,
        Arc::clone(&metrics),
        Duration::from_secs(10),
    )
    .await?;
    let parquet_config = ParquetConfig {
        compact_after: Duration::ZERO,
        ..ParquetConfig::new(work.join("parquet"))
    };
    let (mut parquet, _) = ParquetSink::open(parquet_config, Duration::MAX, Arc::clone(&metrics))?;

    // The fleet: three closed days before today, a dweet a minute per board, in time order.
    let start = (now_ms() / DAY - args.days) * DAY;
    let minutes = args.days * 24 * 60;
    let mut board_state: Vec<S5d9Board> = (0..boards as u64).map(S5d9Board::new).collect();
    let loading = Instant::now();
    let mut batch: Vec<Record> = Vec::with_capacity(50_000);
    let mut dweets = 0usize;
    for minute in 0..minutes {
        for (index, board) in board_state.iter_mut().enumerate() {
            let created = start + minute * MINUTE + index as i64;
            let dweet = Dweet {
                thing: format!("S5D9-{:04}", index + 1),
                created: Created::from_datetime(ms_to_datetime(created)),
                content: board.next_payload(),
                transaction: None,
            };
            batch.push(dweetpipe::normalize::normalize(&dweet, created + 500));
        }
        if batch.len() >= 50_000 || minute == minutes - 1 {
            parquet.write(&batch)?;
            postgres.write(&batch).await;
            dweets += batch.len();
            batch.clear();
            if (minute + 1) % (24 * 60) == 0 {
                parquet.close()?;
            }
        }
    }
    parquet.close()?;
    let loaded = loading.elapsed();
    let refreshing = Instant::now();
    let refreshed = postgres.history().refresh_rollups().await?;
    let refresh = refreshing.elapsed();
    let arranging = Instant::now();
    let arranged = postgres.history().arrange(now_ms()).await?;
    let arrange = arranging.elapsed();
    let mut connection = sqlx::PgConnection::connect(&scratch.url).await?;
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(&mut connection)
        .await?;
    println!(
        "== {boards} boards × {} days, a dweet a minute: {dweets} dweets loaded in {:.1} s; rollups of {refreshed} minutes refreshed in {:.1} s; {} closed readings partitions re-keyed by board in {:.1} s",
        args.days,
        loaded.as_secs_f64(),
        refresh.as_secs_f64(),
        arranged.len(),
        arrange.as_secs_f64()
    );

    let yesterday = start + (args.days - 1) * DAY;
    let literal = |ms: i64| format!("'{}'", ms_to_datetime(ms).format("%Y-%m-%dT%H:%M:%SZ"));
    let queries = [
        (
            "one board's day, one sensor, per minute (raw)",
            format!(
                "SELECT date_trunc('minute', time), avg(value) FROM readings
                 WHERE thing = '{BOARD}' AND sensor = 'sensors.TemperatureC'
                   AND time >= {} AND time < {} GROUP BY 1 ORDER BY 1",
                literal(yesterday),
                literal(yesterday + DAY)
            ),
        ),
        (
            "one board's week, one sensor, hourly (readings_1h)",
            format!(
                "SELECT bucket, sum / n FROM readings_1h
                 WHERE thing = '{BOARD}' AND sensor = 'sensors.TemperatureC'
                   AND bucket >= {} AND bucket < {} ORDER BY 1",
                literal(start + args.days * DAY - 7 * DAY),
                literal(start + args.days * DAY)
            ),
        ),
        (
            "the newest value of every board",
            "SELECT t.thing, r.value FROM things t
             JOIN readings r ON r.thing = t.thing AND r.time = t.last_created
             WHERE r.sensor = 'sensors.TemperatureC'"
                .to_owned(),
        ),
        (
            "the fleet's hourly average over a day (readings_1h)",
            format!(
                "SELECT bucket, sum(sum) / sum(n) FROM readings_1h
                 WHERE sensor = 'sensors.TemperatureC' AND bucket >= {} AND bucket < {}
                 GROUP BY 1 ORDER BY 1",
                literal(yesterday),
                literal(yesterday + DAY)
            ),
        ),
        (
            "the fleet's hourly average over a day (raw, for comparison)",
            format!(
                "SELECT date_trunc('hour', time), avg(value) FROM readings
                 WHERE sensor = 'sensors.TemperatureC' AND time >= {} AND time < {}
                 GROUP BY 1 ORDER BY 1",
                literal(yesterday),
                literal(yesterday + DAY)
            ),
        ),
    ];
    for (what, sql) in &queries {
        print_row(what, explain(&mut connection, sql).await?);
    }

    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/s5d9-sensors.json"
    ))?)?;
    let things = vec![BOARD.to_owned()];
    let end = start + args.days * DAY;
    for (label, range) in [("1 day", DAY), ("3 days", 3 * DAY)] {
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            let sql = panel["targets"][0]["rawSql"].as_str().unwrap_or("");
            let min_interval = panel["interval"]
                .as_str()
                .and_then(|text| humantime::parse_duration(text).ok())
                .map_or(0, |d| d.as_millis() as i64);
            let query = grafana::Query {
                from_ms: end - range,
                to_ms: end,
                interval_ms: grafana::Query::interval_for(end - range, end, 1000, min_interval),
                things: &things,
            };
            let (buffers, ms, rows) = explain(&mut connection, &query.expand(sql)).await?;
            print_row(&format!("panel {title}, {label}"), (buffers, ms, rows));
        }
    }

    // Bytes per dweet.
    let raw_bytes: i64 = sqlx::query_scalar(
        "SELECT sum(pg_total_relation_size(relid))::bigint FROM (
            SELECT relid FROM pg_partition_tree('dweets') UNION ALL SELECT relid FROM pg_partition_tree('readings')) p",
    )
    .fetch_one(&mut connection)
    .await?;
    let rollup_bytes: i64 = sqlx::query_scalar(
        "SELECT sum(pg_total_relation_size(relid))::bigint FROM (
            SELECT relid FROM pg_partition_tree('readings_1m') UNION ALL SELECT relid FROM pg_partition_tree('readings_1h')) p",
    )
    .fetch_one(&mut connection)
    .await?;
    let dataset_bytes = |dir: &std::path::Path| -> u64 {
        walk(dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    let parquet_dir = work.join("parquet");
    let files_before = walk(&parquet_dir.join("readings")).len();
    let bytes_before = dataset_bytes(&parquet_dir);
    let compacting = Instant::now();
    let compacted = parquet.compact(now_ms())?;
    let compaction = compacting.elapsed();
    let bytes_after = dataset_bytes(&parquet_dir);
    println!(
        "  PostgreSQL bytes per dweet: {} raw (dweets + readings, tables and indexes), {} rollups",
        raw_bytes / dweets as i64,
        rollup_bytes / dweets as i64
    );
    // Where the raw bytes go, for the closed days (the open partition is empty here).
    let parts: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT parent, sum(pg_relation_size(relid))::bigint,
                sum(pg_table_size(relid) - pg_relation_size(relid))::bigint,
                sum(pg_indexes_size(relid))::bigint
           FROM (SELECT 'dweets' AS parent, relid FROM pg_partition_tree('dweets') WHERE isleaf
                 UNION ALL
                 SELECT 'readings', relid FROM pg_partition_tree('readings') WHERE isleaf) p
          GROUP BY parent ORDER BY parent",
    )
    .fetch_all(&mut connection)
    .await?;
    let readings_per_dweet: f64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM readings)::float8 / greatest((SELECT count(*) FROM dweets), 1)",
    )
    .fetch_one(&mut connection)
    .await?;
    for (parent, heap, toast_and_maps, indexes) in parts {
        println!(
            "    {parent}: {} table + {} TOAST and maps + {} index bytes per dweet",
            heap / dweets as i64,
            toast_and_maps / dweets as i64,
            indexes / dweets as i64
        );
    }
    println!("    ({readings_per_dweet:.1} readings rows per dweet)");
    println!(
        "  Parquet bytes per dweet: {} as written ({files_before} readings files), {} compacted",
        bytes_before / dweets as u64,
        bytes_after / dweets as u64
    );
    println!(
        "  compaction: {} dataset-dates in {:.1} s; yesterday's readings: {}",
        compacted.len(),
        compaction.as_secs_f64(),
        row_groups_admitting(&parquet_dir, yesterday)?
    );
    query_beside_duckdb(&parquet_dir, yesterday)?;

    // The rollups' cost per live batch: a dweet from every board, as the live stream commits.
    let mut writes = Vec::new();
    let mut refreshes = Vec::new();
    for round in 0..20i64 {
        let at = now_ms() + round * 1000;
        let records: Vec<Record> = board_state
            .iter_mut()
            .enumerate()
            .map(|(index, board)| {
                let dweet = Dweet {
                    thing: format!("S5D9-{:04}", index + 1),
                    created: Created::from_datetime(ms_to_datetime(at + index as i64)),
                    content: board.next_payload(),
                    transaction: None,
                };
                dweetpipe::normalize::normalize(&dweet, at)
            })
            .collect();
        let writing = Instant::now();
        postgres.write(&records).await;
        writes.push(writing.elapsed().as_secs_f64() * 1000.0);
        let refreshing = Instant::now();
        postgres.history().refresh_rollups().await?;
        refreshes.push(refreshing.elapsed().as_secs_f64() * 1000.0);
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    println!(
        "  a live batch of {boards} dweets: commit {:.1} ms, then its rollup refresh {:.1} ms (medians of 20)",
        median(&mut writes),
        median(&mut refreshes)
    );

    // Retention: keep one day.
    let pruning = Instant::now();
    let dropped = postgres
        .history()
        .prune(
            &PostgresConfig {
                retention: Some(Duration::from_secs(24 * 60 * 60)),
                ..postgres_config.clone()
            },
            now_ms(),
        )
        .await?;
    println!(
        "  retention: {} partitions dropped in {:.0} ms",
        dropped.len(),
        pruning.elapsed().as_secs_f64() * 1000.0
    );
    drop(connection);
    drop(postgres);
    scratch.drop().await;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// "<k> of <n> row groups admit BOARD" for the readings files of the date of `day_ms`.
fn row_groups_admitting(dir: &std::path::Path, day_ms: i64) -> anyhow::Result<String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let date = ms_to_datetime(day_ms).date_naive();
    let folder = dir.join("readings").join(format!("date={date}"));
    let (mut admitting, mut total, mut files) = (0, 0, 0);
    for path in walk(&folder) {
        if path.extension().is_none_or(|e| e != "parquet") {
            continue;
        }
        files += 1;
        let reader = SerializedFileReader::new(std::fs::File::open(&path)?)?;
        for group in reader.metadata().row_groups() {
            total += 1;
            let thing = group
                .columns()
                .iter()
                .find(|c| c.column_path().string() == "thing");
            let admits = match thing.and_then(|c| c.statistics()) {
                Some(parquet::file::statistics::Statistics::ByteArray(stats)) => {
                    stats
                        .min_opt()
                        .is_none_or(|min| min.data() <= BOARD.as_bytes())
                        && stats
                            .max_opt()
                            .is_none_or(|max| max.data() >= BOARD.as_bytes())
                }
                _ => true,
            };
            admitting += usize::from(admits);
        }
    }
    Ok(format!(
        "{files} file(s), {admitting} of {total} row groups admit one board"
    ))
}

/// One board's day per minute from the compacted dataset: `dweetpipe query`'s reader against
/// DuckDB's `read_parquet` over the same files, same run (best of five each; DuckDB's time is
/// measured inside Python, so its start-up is not counted).
fn query_beside_duckdb(dir: &std::path::Path, day_ms: i64) -> anyhow::Result<()> {
    use dweetpipe::query::{Aggregate, Pattern, Query, Shape};
    let query = Query {
        things: vec![Pattern::new(BOARD)],
        sensors: vec![Pattern::new("sensors.TemperatureC")],
        from_ms: day_ms,
        to_ms: day_ms + DAY,
        shape: Shape::Every {
            every_ms: MINUTE,
            aggregates: vec![Aggregate::Avg],
        },
    };
    let mut best = f64::MAX;
    let mut answer = None;
    for _ in 0..5 {
        let started = Instant::now();
        answer = Some(dweetpipe::query::run(dir, &query)?);
        best = best.min(started.elapsed().as_secs_f64() * 1000.0);
    }
    let answer = answer.ok_or_else(|| anyhow::anyhow!("no answer"))?;
    println!(
        "  dweetpipe query, one board's day per minute: {} rows in {best:.1} ms; {} of {} row groups read",
        answer.rows.len(),
        answer.explain.row_groups_read,
        answer.explain.row_groups()
    );
    let python = std::env::var("DWEETPIPE_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = format!(
        "import duckdb, time\n\
         con = duckdb.connect()\n\
         sql = \"SELECT time_bucket(INTERVAL 1 minute, time) AS m, avg(value) FROM read_parquet('{}/readings/**/*.parquet', hive_partitioning = true) WHERE thing = '{BOARD}' AND sensor = 'sensors.TemperatureC' AND time >= epoch_ms({day_ms}) AND time < epoch_ms({}) GROUP BY 1\"\n\
         best = 1e9\n\
         for _ in range(5):\n\
         \x20   t = time.perf_counter(); rows = con.execute(sql).fetchall(); best = min(best, time.perf_counter() - t)\n\
         print(len(rows), round(best * 1000, 1))\n",
        dir.display(),
        day_ms + DAY
    );
    match std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut words = text.split_whitespace();
            println!(
                "  DuckDB read_parquet, the same: {} rows in {} ms",
                words.next().unwrap_or("?"),
                words.next().unwrap_or("?")
            );
        }
        _ => println!(
            "  DuckDB read_parquet: skipped (needs {python} with duckdb: pip install duckdb, or set DWEETPIPE_PYTHON)"
        ),
    }
    Ok(())
}
