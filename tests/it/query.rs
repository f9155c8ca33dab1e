//! `dweetpipe query` over the Parquet dataset: its answers equal DuckDB's for the same filters
//! and aggregates (on datasets written by `import` and by `run`, before and after
//! compaction), one board's day of a compacted fleet reads a few row groups, and every bad
//! input is refused naming what to fix.

use std::path::Path;
use std::time::Duration;

use dweetpipe::sandbox::simulator::{FleetConfig, FleetStats, run_fleet, thing_name};
use serde_json::Value;
use tokio::process::Command;

use crate::common::{client_for, thing};
use crate::worker::{WorkerProcess, big_sandbox, write_config};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");
const MINUTE: i64 = 60_000;
const DAY: i64 = 24 * 60 * MINUTE;

/// Runs `dweetpipe query` with `args`; (success, stdout, stderr).
async fn query(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .arg("query")
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// One answer row as compared: the time or bucket (ms), board, sensor, then the numbers.
type Row = (i64, String, String, Vec<f64>);

/// `dweetpipe query … --format jsonl` as rows.
async fn query_rows(dir: &Path, args: &[&str]) -> Vec<Row> {
    let mut all = vec!["--dir", dir.to_str().unwrap(), "--format", "jsonl"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = query(&all).await;
    assert!(ok, "query {args:?} failed: {stderr}");
    stdout
        .lines()
        .map(|line| {
            let object: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            let mut fields = object.into_iter();
            let (_, time) = fields.next().unwrap();
            let time = chrono::DateTime::parse_from_rfc3339(time.as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            let text = |v: Option<(String, Value)>| v.unwrap().1.as_str().unwrap().to_owned();
            let thing = text(fields.next());
            let sensor = text(fields.next());
            let numbers = fields.map(|(_, v)| v.as_f64().unwrap()).collect();
            (time, thing, sensor, numbers)
        })
        .collect()
}

/// DuckDB's rows for `sql` over the dataset (a view `readings`); the first three columns are
/// the time in ms, board and sensor, the rest numbers.
fn duckdb_rows(dir: &Path, sql: &str) -> Vec<Row> {
    let python = std::env::var("DWEETPIPE_PYTHON").expect(
        "DWEETPIPE_PYTHON is not set: run the tests with scripts/test, which makes target/pyenv with duckdb",
    );
    let script = format!(
        "import duckdb, json\n\
         con = duckdb.connect()\n\
         con.execute(\"CREATE VIEW readings AS SELECT * FROM read_parquet('{}/readings/**/*.parquet', hive_partitioning = true)\")\n\
         print(json.dumps([list(r) for r in con.execute('''{sql}''').fetchall()]))\n",
        dir.display()
    );
    let output = std::process::Command::new(python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "duckdb: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Vec<Value>> = serde_json::from_slice(&output.stdout).unwrap();
    rows.into_iter()
        .map(|row| {
            (
                row[0].as_i64().unwrap(),
                row[1].as_str().unwrap().to_owned(),
                row[2].as_str().unwrap().to_owned(),
                row[3..].iter().map(|v| v.as_f64().unwrap()).collect(),
            )
        })
        .collect()
}

fn assert_same(label: &str, ours: &[Row], duckdb: &[Row]) {
    assert!(!ours.is_empty(), "{label}: an answer to compare");
    assert_eq!(ours.len(), duckdb.len(), "{label}: as many rows as DuckDB");
    for (a, b) in ours.iter().zip(duckdb) {
        assert_eq!((a.0, &a.1, &a.2), (b.0, &b.1, &b.2), "{label}");
        assert_eq!(a.3.len(), b.3.len(), "{label}");
        for (x, y) in a.3.iter().zip(&b.3) {
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(1.0),
                "{label}: {a:?} against DuckDB's {b:?}"
            );
        }
    }
}

/// The same questions asked of `query` and of DuckDB over `dir`, for boards named
/// `<prefix>N`, between `from_ms` and `to_ms`.
async fn agrees_with_duckdb(label: &str, dir: &Path, prefix: &str, from_ms: i64, to_ms: i64) {
    let (from, to) = (
        dweetpipe::query::rfc3339(from_ms),
        dweetpipe::query::rfc3339(to_ms),
    );
    let one = format!("{prefix}2");
    let glob = format!("{prefix}*");
    let range = format!("epoch_ms(time) >= {from_ms} AND epoch_ms(time) < {to_ms}");
    let cases: Vec<(&str, Vec<&str>, String)> = vec![
        (
            "one board's raw readings of one sensor",
            vec![
                &one,
                "--sensor",
                "sensors.TemperatureC",
                "--from",
                &from,
                "--to",
                &to,
            ],
            format!(
                "SELECT epoch_ms(time), thing, sensor, value FROM readings
                  WHERE thing = '{one}' AND sensor = 'sensors.TemperatureC' AND {range}
                  ORDER BY thing, epoch_ms(time), sensor"
            ),
        ),
        (
            "every aggregate per minute, boards and sensors by glob",
            vec![
                &glob,
                "--sensor",
                "sensors.*",
                "--from",
                &from,
                "--to",
                &to,
                "--every",
                "1m",
                "--agg",
                "avg,min,max,count,last",
            ],
            format!(
                "SELECT (epoch_ms(time) // 60000) * 60000 AS b, thing, sensor,
                        avg(value), min(value), max(value), count(*), arg_max(value, time)
                   FROM readings
                  WHERE thing GLOB '{glob}' AND sensor GLOB 'sensors.*' AND {range}
                  GROUP BY ALL ORDER BY thing, sensor, b"
            ),
        ),
        (
            "the hourly average of every board, two sensors",
            vec![
                "--sensor",
                "sensors.Humidity,sensors.TemperatureC",
                "--from",
                &from,
                "--to",
                &to,
                "--every",
                "1h",
            ],
            format!(
                "SELECT (epoch_ms(time) // 3600000) * 3600000 AS b, thing, sensor, avg(value)
                   FROM readings
                  WHERE sensor IN ('sensors.Humidity', 'sensors.TemperatureC') AND {range}
                  GROUP BY ALL ORDER BY thing, sensor, b"
            ),
        ),
        (
            "the newest value of every board and sensor",
            vec![&glob, "--latest", "--from", &from, "--to", &to],
            format!(
                "SELECT max(epoch_ms(time)), thing, sensor, arg_max(value, time)
                   FROM readings WHERE thing GLOB '{glob}' AND {range}
                  GROUP BY thing, sensor ORDER BY thing, sensor"
            ),
        ),
    ];
    for (what, args, sql) in cases {
        let ours = query_rows(dir, &args).await;
        let theirs = duckdb_rows(dir, &sql);
        assert_same(&format!("{label}: {what}"), &ours, &theirs);
    }
}

/// `dweetpipe VERB --config CONFIG [ARGS]`, which must succeed.
async fn dweetpipe_ok(verb: &str, config: &Path, args: &[&Path]) {
    let output = Command::new(BIN)
        .args([verb, "--config"])
        .arg(config)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "dweetpipe {verb}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// JSON Lines of `boards` dweeting every `every_ms` from `start_ms`, `count` times each.
fn history_file(path: &Path, boards: &[String], start_ms: i64, every_ms: i64, count: i64) {
    let mut text = String::new();
    for i in 0..count {
        for (b, board) in boards.iter().enumerate() {
            let created = dweetpipe::protocol::format_created(dweetpipe::record::ms_to_datetime(
                start_ms + i * every_ms + b as i64,
            ));
            let temperature = ((i * 7 + b as i64) % 23) as f64 / 4.0;
            let humidity = 40.0 + ((i * 3) % 11) as f64 / 3.0;
            text.push_str(&format!(
                "{{\"thing\":\"{board}\",\"created\":\"{created}\",\"content\":{{\"sensors\":{{\"TemperatureC\":{temperature},\"Humidity\":{humidity}}},\"n\":{i}}}}}\n"
            ));
        }
    }
    std::fs::write(path, text).unwrap();
}

fn date_folders_with_files(dir: &Path) -> Vec<usize> {
    let mut counts = Vec::new();
    for entry in std::fs::read_dir(dir.join("readings")).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("date=") {
            counts.push(
                std::fs::read_dir(entry.path())
                    .unwrap()
                    .flatten()
                    .filter(|f| !f.file_name().to_string_lossy().starts_with('.'))
                    .count(),
            );
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn query_agrees_with_duckdb_on_an_imported_dataset_before_and_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("parquet");
    let config = dir.path().join("things.toml");
    // No grace: the dates are long closed and the files were just written.
    std::fs::write(
        &config,
        format!(
            "[parquet]\ndir = \"{}\"\ncompact_after = \"0s\"\n",
            parquet.display()
        ),
    )
    .unwrap();
    let prefix = format!("{}-", thing("query-import"));
    let boards: Vec<String> = (1..=4).map(|i| format!("{prefix}{i}")).collect();
    // Three closed days, a dweet every 10 minutes, imported in two halves (older second), so
    // each date holds several files before compaction.
    let start = (dweetpipe::record::now_ms() / DAY - 3) * DAY;
    let (newer, older) = (
        dir.path().join("newer.jsonl"),
        dir.path().join("older.jsonl"),
    );
    history_file(&newer, &boards, start + 216 * 10 * MINUTE, 10 * MINUTE, 216);
    history_file(&older, &boards, start, 10 * MINUTE, 216);
    for file in [&newer, &older] {
        dweetpipe_ok("import", &config, &[file]).await;
    }
    let (from, to) = (start + 5 * MINUTE, start + 3 * DAY - 7 * MINUTE);
    agrees_with_duckdb("imported", &parquet, &prefix, from, to).await;

    dweetpipe_ok("compact", &config, &[]).await;
    assert_eq!(
        date_folders_with_files(&parquet),
        [1, 1, 1],
        "one compacted file per closed date"
    );
    agrees_with_duckdb("imported, compacted", &parquet, &prefix, from, to).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn query_agrees_with_duckdb_on_a_dataset_written_by_run_before_and_after_compaction() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("query-run"));
    let things: Vec<String> = (1..=3).map(|i| thing_name(&prefix, i)).collect();
    let entries: Vec<(&str, Option<&str>)> = things.iter().map(|t| (t.as_str(), None)).collect();
    let config = write_config(dir.path(), &server.base_url(), &entries, "");
    let started = dweetpipe::record::now_ms();
    let mut worker = WorkerProcess::spawn(&config, &[], dir.path().join("worker.log"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let fleet = FleetConfig {
        things: 3,
        interval: Duration::from_millis(20),
        count: Some(40),
        prefix: prefix.clone(),
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(run_fleet(
        client_for(&server),
        fleet,
        std::sync::Arc::new(FleetStats::default()),
    ));
    // Beside a worker that is writing: only sealed files are read, and no lock is taken.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let parquet_dir = dir.path().join("parquet");
    let (ok, _, stderr) = query(&["--dir", parquet_dir.to_str().unwrap(), "--latest"]).await;
    assert!(ok, "a query beside a running worker: {stderr}");
    fleet.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    worker.signal("-TERM");
    assert!(worker.wait().await.success(), "{}", worker.log());
    let parquet = dir.path().join("parquet");
    let (from, to) = (started - MINUTE, dweetpipe::record::now_ms() + MINUTE);
    // Board names end in a number from thing_name: the glob and the one board still hold.
    let one_prefix = thing_name(&prefix, 2);
    let prefix_of_two = &one_prefix[..one_prefix.len() - 1];
    agrees_with_duckdb("written by run", &parquet, prefix_of_two, from, to).await;

    // Compacted as the leader will once today has closed.
    let (mut sink, _) = dweetpipe::sink::parquet::ParquetSink::open(
        dweetpipe::sink::parquet::ParquetConfig::new(&parquet),
        Duration::MAX,
        std::sync::Arc::new(dweetpipe::telemetry::Metrics::new().unwrap()),
    )
    .unwrap();
    assert!(
        !sink
            .compact(dweetpipe::record::now_ms() + 2 * DAY)
            .unwrap()
            .is_empty()
    );
    drop(sink);
    agrees_with_duckdb(
        "written by run, compacted",
        &parquet,
        prefix_of_two,
        from,
        to,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_boards_day_reads_a_few_row_groups_of_a_compacted_200_board_fleet() {
    use dweetpipe::record::{Normalized, Reading, Record};
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("parquet");
    let (mut sink, _) = dweetpipe::sink::parquet::ParquetSink::open(
        dweetpipe::sink::parquet::ParquetConfig::new(&parquet),
        Duration::MAX,
        std::sync::Arc::new(dweetpipe::telemetry::Metrics::new().unwrap()),
    )
    .unwrap();
    // 200 boards, a dweet a minute for a closed day, sealed every two hours as a live worker
    // would (so the date is many files, every board in each).
    let day = (dweetpipe::record::now_ms() / DAY - 2) * DAY;
    for hours in (0..24).step_by(2) {
        let records: Vec<Record> = (hours * 60..(hours + 2) * 60)
            .flat_map(|minute| {
                (0..200).map(move |board| {
                    Record::Dweet(Normalized {
                        thing: format!("S5D9-{:04}", board + 1),
                        created_ms: day + minute * MINUTE + board,
                        created_text: None,
                        received_ms: day + minute * MINUTE + board,
                        content: "{}".to_owned(),
                        readings: vec![
                            Reading {
                                sensor: "sensors.TemperatureC".into(),
                                value: (minute % 50) as f64,
                            },
                            Reading {
                                sensor: "sensors.Humidity".into(),
                                value: board as f64,
                            },
                        ],
                    })
                })
            })
            .collect();
        sink.write(&records).unwrap();
        sink.close().unwrap();
    }
    let range = [
        "--from",
        &dweetpipe::query::rfc3339(day),
        "--to",
        &dweetpipe::query::rfc3339(day + DAY),
    ]
    .map(str::to_owned);
    let ask = |explain: bool| {
        let mut args = vec![
            "S5D9-0117".to_owned(),
            "--dir".to_owned(),
            parquet.display().to_string(),
            "--sensor".to_owned(),
            "sensors.TemperatureC".to_owned(),
            "--every".to_owned(),
            "1m".to_owned(),
            "--format".to_owned(),
            "csv".to_owned(),
        ];
        args.extend(range.iter().cloned());
        if explain {
            args.push("--explain".to_owned());
        }
        args
    };
    let row_groups = |stderr: &str| -> (u64, u64) {
        let at = stderr.find("explain: ").expect("an explain line");
        let words: Vec<&str> = stderr[at..].split_whitespace().collect();
        let of = words.iter().position(|w| *w == "of").unwrap();
        (
            words[of - 1].parse().unwrap(),
            words[of + 1].parse().unwrap(),
        )
    };
    let args = ask(true);
    let (ok, stdout, before) = query(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(ok, "{before}");
    assert_eq!(
        stdout.lines().count(),
        1 + 1440,
        "a header and a row a minute"
    );
    let (read, total) = row_groups(&before);
    assert_eq!(read, total, "sealed files interleave the boards: {before}");

    // As a run two hours on would: the generations just written have settled.
    let later = dweetpipe::record::now_ms() + 2 * 60 * MINUTE;
    assert!(!sink.compact(later).unwrap().is_empty());
    drop(sink);
    let (ok, compacted_out, after) =
        query(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(ok, "{after}");
    assert_eq!(compacted_out, stdout, "compaction changes no answer");
    let (read, total) = row_groups(&after);
    assert!(
        read * 10 <= total,
        "at most 10% of the row groups read after compaction: {after}"
    );
    let (_, plain, plain_err) =
        query(&ask(false).iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(plain, stdout);
    assert!(!plain_err.contains("explain"), "--explain alone prints it");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_naming_the_flag_and_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("parquet");
    let boards: Vec<String> = (1..=2).map(|i| format!("S5D9-000{i}")).collect();
    let start = (dweetpipe::record::now_ms() / DAY - 1) * DAY;
    let file = dir.path().join("h.jsonl");
    history_file(&file, &boards, start, 10 * MINUTE, 6);
    let config = dir.path().join("things.toml");
    std::fs::write(
        &config,
        format!("[parquet]\ndir = \"{}\"\n", parquet.display()),
    )
    .unwrap();
    dweetpipe_ok("import", &config, &[&file]).await;
    let no_parquet = dir.path().join("no-parquet.toml");
    std::fs::write(
        &no_parquet,
        "[postgres]\nurl = \"postgres://x@127.0.0.1:1/x\"\n",
    )
    .unwrap();
    let d = parquet.to_str().unwrap();
    let since = ["--since", "3d"];
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        (
            "an unknown board",
            vec!["S5D9-0009", "--dir", d, since[0], since[1]],
            vec!["\"S5D9-0009\"", "S5D9-0001, S5D9-0002"],
        ),
        (
            "a glob matching no board",
            vec!["X*", "--dir", d, since[0], since[1]],
            vec!["\"X*\"", "S5D9-0001"],
        ),
        (
            "a sensor matching nothing",
            vec![
                "S5D9-0001",
                "--dir",
                d,
                "--sensor",
                "sensors.Nope*",
                since[0],
                since[1],
            ],
            vec!["--sensor \"sensors.Nope*\"", "sensors.TemperatureC"],
        ),
        (
            "a range with nothing in it",
            vec![
                "S5D9-0001",
                "--dir",
                d,
                "--from",
                "2001-01-01",
                "--to",
                "2001-01-02",
            ],
            vec!["no readings", "widen it"],
        ),
        (
            "an empty range",
            vec!["--dir", d, "--from", "2026-12-03", "--to", "2026-12-01"],
            vec!["--from", "--to", "empty"],
        ),
        (
            "a folder that is not a dataset",
            vec!["--dir", dir.path().to_str().unwrap()],
            vec![
                "--dir",
                "not a dweetpipe Parquet dataset",
                "no readings/ folder",
            ],
        ),
        (
            "a folder that does not exist",
            vec!["--dir", "/nonexistent/dweetpipe"],
            vec!["--dir", "no such folder"],
        ),
        (
            "a things file without [parquet]",
            vec!["--config", no_parquet.to_str().unwrap()],
            vec!["--config", "no [parquet] section", "--dir"],
        ),
        (
            "neither --dir nor --config",
            vec!["S5D9-0001"],
            vec!["--config"],
        ),
        (
            "a bad time",
            vec!["--dir", d, "--from", "yesterday"],
            vec!["--from", "RFC 3339"],
        ),
        (
            "a bucket under a second",
            vec!["--dir", d, "--every", "10ms"],
            vec!["--every", "at least 1s"],
        ),
        (
            "an unknown aggregate",
            vec!["--dir", d, "--every", "1m", "--agg", "mean"],
            vec!["--agg", "avg, min, max, count or last"],
        ),
        (
            "--agg without --every",
            vec!["--dir", d, "--agg", "max"],
            vec!["--every"],
        ),
    ];
    for (what, args, expected) in cases {
        let (ok, stdout, stderr) = query(&args).await;
        assert!(!ok, "{what}: refused, not {stdout}");
        for text in expected {
            assert!(stderr.contains(text), "{what}: {text:?} in {stderr}");
        }
    }
}
