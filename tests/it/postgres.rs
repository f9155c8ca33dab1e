//! The PostgreSQL sink against a real server: each test creates its own database from
//! `DATABASE_URL` (scripts/test provides one), so tests run in parallel without sharing rows.

use std::collections::BTreeSet;
use std::time::Duration;

use dweetpipe::sandbox::simulator::{FleetConfig, FleetStats, run_fleet, thing_name};
use dweetpipe::sink::postgres::{DatabaseUrl, PostgresConfig};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::process::Command;

use crate::common::{client_for, thing};
use crate::worker::{
    WorkerProcess, big_sandbox, received, sandbox_dweets, start_worker, test_config, wait_for,
    wait_streams_up, write_config,
};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");

/// A database of this test's own, dropped by `drop_now` (left behind if the test fails, for a
/// look; they are named `dweetpipe_test_*`).
pub(crate) struct TestDatabase {
    pub url: String,
    admin: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin = std::env::var("DATABASE_URL").expect(
            "DATABASE_URL is not set: run the tests with scripts/test, which finds or starts PostgreSQL",
        );
        let name = format!("dweetpipe_test_{}", uuid::Uuid::new_v4().simple());
        let mut connection = PgConnection::connect(&admin)
            .await
            .expect("DATABASE_URL answers");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut connection)
            .await
            .expect("create database");
        let mut url = reqwest::Url::parse(&admin).expect("DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        TestDatabase {
            url: url.to_string(),
            admin,
            name,
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("test database answers")
    }

    /// Drops the database, retrying while the worker's connections are still closing.
    pub async fn drop_now(self) {
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let mut last_error = String::new();
        for _ in 0..10 {
            match PgConnection::connect(&self.admin).await {
                Ok(mut connection) => match sqlx::query(sqlx::AssertSqlSafe(drop.clone()))
                    .execute(&mut connection)
                    .await
                {
                    Ok(_) => return,
                    Err(error) => last_error = error.to_string(),
                },
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "warning: test database {} was left behind: {last_error}",
            self.name
        );
    }

    /// A sink config for this database, spooling into a directory of its own.
    pub fn sink_config(&self) -> PostgresConfig {
        PostgresConfig {
            spool_dir: std::env::temp_dir().join(format!("{}-spool", self.name)),
            ..PostgresConfig::new(DatabaseUrl::new(self.url.clone()))
        }
    }
}

pub(crate) async fn stored(connection: &mut PgConnection) -> Vec<(String, i64)> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT thing, (extract(epoch FROM created) * 1000)::bigint FROM dweets",
    )
    .fetch_all(connection)
    .await
    .unwrap()
}

pub(crate) fn assert_same(stored: Vec<(String, i64)>, expected: &BTreeSet<(String, i64)>) {
    let unique: BTreeSet<_> = stored.iter().cloned().collect();
    assert_eq!(
        stored.len(),
        unique.len(),
        "the primary key holds, so this only fails on a schema bug"
    );
    let missing: Vec<_> = expected.difference(&unique).take(5).collect();
    let extra: Vec<_> = unique.difference(expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_the_schema_once() {
    let db = TestDatabase::create().await;
    for expected in ["6 migration(s) applied now", "0 migration(s) applied now"] {
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
        assert!(String::from_utf8_lossy(&output.stdout).contains(expected));
    }
    let mut connection = db.connect().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    for table in [
        "dead_letters",
        "dweets",
        "readings",
        "s5d9_readings",
        "things",
    ] {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }
    // The README's table of the schema names each key as PostgreSQL has it.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for table in ["dweets"] {
        let key: String = sqlx::query_scalar(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1",
        )
        .bind(format!("{table}_pkey"))
        .fetch_one(&mut connection)
        .await
        .unwrap();
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{table}` |")))
            .unwrap_or_else(|| panic!("README.md has no row for {table}"));
        let columns = key.trim_start_matches("PRIMARY KEY ").replace('"', "");
        assert!(
            row.contains(&format!("primary key `{columns}`")),
            "README says {row:?}; PostgreSQL has {key:?}"
        );
    }
    // `readings` has no key of its own: each partition has one, by time while it is open
    // and by board once closed, as the README says.
    let readings_row = readme
        .lines()
        .find(|l| l.starts_with("| `readings` |"))
        .expect("README.md has a row for readings");
    for key in [
        "`(time, thing, sensor)`",
        "`(thing, time, sensor) INCLUDE (value)`",
    ] {
        assert!(readings_row.contains(key), "README says {readings_row:?}");
    }
    let parent_indexes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_indexes WHERE tablename = 'readings'")
            .fetch_one(&mut connection)
            .await
            .unwrap();
    assert_eq!(parent_indexes, 0, "readings itself has no index to copy");
    let bad = Command::new(BIN)
        .args([
            "migrate",
            "--database-url",
            "postgres://nobody:secret-pw@127.0.0.1:1/x",
        ])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        !String::from_utf8_lossy(&bad.stderr).contains("secret-pw"),
        "the password is never printed"
    );
    drop(connection);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_lands_in_postgres_exactly_once_with_a_wide_view() {
    let db = TestDatabase::create().await;
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("pgfleet"));
    let things: Vec<String> = (1..=5).map(|i| thing_name(&prefix, i)).collect();
    let mut config = test_config(&server.base_url(), &things, dir.path());
    config.postgres = Some(db.sink_config());
    let (worker, metrics) = start_worker(config).await;
    wait_streams_up(&metrics, 5).await;
    let stats = std::sync::Arc::new(FleetStats::default());
    let fleet = FleetConfig {
        things: 5,
        interval: Duration::from_millis(50),
        count: Some(10),
        prefix,
        ..FleetConfig::default()
    };
    run_fleet(client_for(&server), fleet, stats.clone()).await;
    wait_for("50 dweets", Duration::from_secs(10), || {
        received(&metrics) >= 50.0
    })
    .await;
    worker.shutdown(Duration::from_secs(10)).await.unwrap();

    let expected = sandbox_dweets(&client_for(&server), &things, None).await;
    assert_eq!(expected.len(), 50);
    let mut connection = db.connect().await;
    assert_same(stored(&mut connection).await, &expected);
    let readings: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(readings, 50 * 13, "13 numeric leaves per S5D9 dweet");
    let wide: Vec<(String, Option<f64>, Option<f64>)> =
        sqlx::query_as("SELECT thing, temperature_c, humidity FROM s5d9_readings")
            .fetch_all(&mut connection)
            .await
            .unwrap();
    assert_eq!(wide.len(), 50);
    assert!(wide.iter().all(|(_, t, h)| t.is_some() && h.is_some()));
    let watermarks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM things t WHERE last_created = (SELECT max(created) FROM dweets d WHERE d.thing = t.thing)",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap();
    assert_eq!(
        watermarks, 5,
        "each thing's watermark is its newest stored dweet"
    );
    crate::history::assert_rollups_exact(&mut connection).await;
    assert_eq!(
        metrics.value(
            "dweetpipe_sink_rows_written_total",
            &[("sink", "postgres"), ("table", "dweets")]
        ),
        50.0
    );
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_and_backfill_overlap_add_no_duplicate_rows() {
    let db = TestDatabase::create().await;
    let server = big_sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let name = thing("pgrestart");
    let things = vec![name.clone()];
    for i in 0..4 {
        client
            .dweet_for(&name, &json!({ "i": i }), None)
            .await
            .unwrap();
    }
    let only_postgres = |dir: &std::path::Path| {
        let mut config = test_config(&server.base_url(), &things, dir);
        config.parquet = None;
        config.postgres = Some(db.sink_config());
        config
    };
    let (first, metrics) = start_worker(only_postgres(dir.path())).await;
    wait_for("the backfill", Duration::from_secs(10), || {
        received(&metrics) == 4.0
    })
    .await;
    wait_streams_up(&metrics, 1).await;
    client
        .dweet_for(&name, &json!({"i": 4}), None)
        .await
        .unwrap();
    wait_for("5 dweets", Duration::from_secs(10), || {
        received(&metrics) == 5.0
    })
    .await;
    first.shutdown(Duration::from_secs(10)).await.unwrap();

    client
        .dweet_for(&name, &json!({"i": 5}), None)
        .await
        .unwrap();
    let (second, metrics) = start_worker(only_postgres(dir.path())).await;
    wait_for("the gap", Duration::from_secs(10), || {
        received(&metrics) == 1.0
    })
    .await;
    assert_eq!(
        metrics.value("dweetpipe_duplicates_dropped_total", &[]),
        5.0
    );
    second.shutdown(Duration::from_secs(10)).await.unwrap();

    let mut connection = db.connect().await;
    assert_same(
        stored(&mut connection).await,
        &sandbox_dweets(&client, &things, None).await,
    );
    crate::history::assert_rollups_exact(&mut connection).await;
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_error_quarantines_only_the_bad_dweet() {
    let db = TestDatabase::create().await;
    let server = big_sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let name = thing("pgbad");
    let mut config = test_config(&server.base_url(), std::slice::from_ref(&name), dir.path());
    config.postgres = Some(db.sink_config());
    let (worker, metrics) = start_worker(config).await;
    wait_streams_up(&metrics, 1).await;
    // jsonb cannot hold \u0000: PostgreSQL refuses that one dweet (SQLSTATE 22P05).
    for content in [
        json!({"ok": 1}),
        json!({"text": "nul\u{0}inside"}),
        json!({"ok": 2}),
    ] {
        client.dweet_for(&name, &content, None).await.unwrap();
    }
    wait_for("3 dweets", Duration::from_secs(10), || {
        received(&metrics) == 3.0
    })
    .await;
    worker.shutdown(Duration::from_secs(15)).await.unwrap();

    let mut connection = db.connect().await;
    let good: Vec<serde_json::Value> =
        sqlx::query_scalar::<_, String>("SELECT content::text FROM dweets ORDER BY created")
            .fetch_all(&mut connection)
            .await
            .unwrap()
            .iter()
            .map(|text| serde_json::from_str(text).unwrap())
            .collect();
    assert_eq!(good, vec![json!({"ok": 1}), json!({"ok": 2})]);
    let letters: Vec<(Option<String>, String, String)> =
        sqlx::query_as("SELECT thing, payload, reason FROM dead_letters")
            .fetch_all(&mut connection)
            .await
            .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0.as_deref(), Some(name.as_str()));
    assert!(
        letters[0].1.contains("nul"),
        "the payload is kept: {letters:?}"
    );
    assert!(letters[0].2.contains("PostgreSQL refused"), "{letters:?}");
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_postgresql_refuses_too_is_retried_until_stored_and_nothing_passes_it() {
    let db = TestDatabase::create().await;
    let server = big_sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let name = thing("pgbadletter");
    let mut config = test_config(&server.base_url(), std::slice::from_ref(&name), dir.path());
    config.postgres = Some(db.sink_config());
    let (worker, metrics) = start_worker(config).await;
    wait_streams_up(&metrics, 1).await;
    // An operator's mistake: dead_letters refuses what the worker writes there.
    let mut connection = db.connect().await;
    sqlx::raw_sql(
        "ALTER TABLE dead_letters ADD CONSTRAINT no_refusals CHECK (reason NOT LIKE 'PostgreSQL refused%')",
    )
    .execute(&mut connection)
    .await
    .unwrap();
    for content in [json!({"text": "nul\u{0}inside"}), json!({"ok": 1})] {
        client.dweet_for(&name, &content, None).await.unwrap();
    }
    wait_for("2 dweets", Duration::from_secs(10), || {
        received(&metrics) == 2.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let passed: i64 = sqlx::query_scalar("SELECT count(*) FROM dweets")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(
        passed, 0,
        "nothing after the refused dweet is stored before its dead letter"
    );
    assert!(
        metrics.value("dweetpipe_sink_errors_total", &[("sink", "postgres")]) > 0.0,
        "the failing dead-letter write counts as a sink error"
    );
    sqlx::raw_sql("ALTER TABLE dead_letters DROP CONSTRAINT no_refusals")
        .execute(&mut connection)
        .await
        .unwrap();
    wait_for(
        "the dead letter and the next dweet",
        Duration::from_secs(20),
        || {
            metrics.value(
                "dweetpipe_sink_rows_written_total",
                &[("sink", "postgres"), ("table", "dweets")],
            ) == 1.0
        },
    )
    .await;
    worker.shutdown(Duration::from_secs(15)).await.unwrap();
    let letters: Vec<String> = sqlx::query_scalar("SELECT payload FROM dead_letters")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].contains("nul"), "{letters:?}");
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_batch_leaves_postgres_exactly_once() {
    let db = TestDatabase::create().await;
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("pgkill"));
    let things: Vec<String> = (1..=3).map(|i| thing_name(&prefix, i)).collect();
    let entries: Vec<(&str, Option<&str>)> = things.iter().map(|t| (t.as_str(), None)).collect();
    let config = write_config(
        dir.path(),
        &server.base_url(),
        &entries,
        &format!(
            "[postgres]\nurl_env = \"TEST_DATABASE_URL\"\nspool_dir = \"{}\"\n",
            dir.path().join("spool").display()
        ),
    );
    let stats = std::sync::Arc::new(FleetStats::default());
    let fleet_config = FleetConfig {
        things: 3,
        interval: Duration::from_millis(10),
        prefix,
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(run_fleet(client_for(&server), fleet_config, stats.clone()));

    let env = [("TEST_DATABASE_URL", db.url.as_str())];
    let mut first = WorkerProcess::spawn(&config, &env, dir.path().join("first.log"));
    let mut connection = db.connect().await;
    let mut rows = 0i64;
    for _ in 0..200 {
        rows = sqlx::query_scalar("SELECT count(*) FROM dweets")
            .fetch_one(&mut connection)
            .await
            .unwrap_or(0);
        if rows > 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rows > 50, "the first worker wrote: {}", first.log());
    first.signal("-KILL");
    first.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = WorkerProcess::spawn(&config, &env, dir.path().join("second.log"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.abort();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    second.signal("-TERM");
    assert!(second.wait().await.success(), "{}", second.log());

    let expected = sandbox_dweets(&client_for(&server), &things, None).await;
    assert_same(stored(&mut connection).await, &expected);
    eprintln!(
        "PostgreSQL SIGKILL test: {} dweets accepted, all stored once",
        expected.len()
    );
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn import_loads_history_files_exactly_once_in_any_order() {
    let db = TestDatabase::create().await;
    let server = big_sandbox().await;
    let client = client_for(&server);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (thing("imp-a"), thing("imp-b"));
    for i in 0..20 {
        client
            .dweet_for(&a, &json!({ "i": i, "t": 20.5 }), None)
            .await
            .unwrap();
    }
    for i in 0..10 {
        client
            .dweet_for(&b, &json!({ "i": i }), None)
            .await
            .unwrap();
    }
    // Export with the CLI: newest first, as users do.
    let url = server.base_url();
    let history = |name: String| {
        let url = url.clone();
        async move {
            let output = Command::new(BIN)
                .args(["--server", &url, "history", &name])
                .output()
                .await
                .unwrap();
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let a_lines: Vec<String> = history(a.clone())
        .await
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(a_lines.len(), 20);
    // The newest ten of `a` first, the older ten (overlapping by two) later, and `b` with a bad line.
    let newer = dir.path().join("newer.jsonl");
    std::fs::write(&newer, a_lines[..10].join("\n")).unwrap();
    let older = dir.path().join("older.jsonl");
    std::fs::write(&older, a_lines[8..].join("\n")).unwrap();
    let with_bad = dir.path().join("b.jsonl");
    // A broken line (a dead letter everywhere), and a dweet whose content holds a NUL: Parquet
    // keeps it, PostgreSQL's jsonb refuses it and holds it as one more dead letter, with its
    // `created` spelled as it came (an offset, not dweet.io's `Z`).
    std::fs::write(
        &with_bad,
        format!(
            "{}\nthis line is broken\n{{\"thing\":\"{b}\",\"created\":\"2026-11-30T01:00:00+01:00\",\"content\":{{\"s\":\"nul\\u0000here\"}}}}\n",
            history(b.clone()).await
        ),
    )
    .unwrap();
    let config = dir.path().join("import.toml");
    std::fs::write(
        &config,
        format!(
            "[parquet]\ndir = \"{}\"\n[postgres]\nurl_env = \"IMPORT_DB\"\nspool_dir = \"{}\"\n",
            dir.path().join("parquet").display(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();

    let import = |files: Vec<&std::path::Path>| {
        let mut command = Command::new(BIN);
        command
            .args(["import", "--config", config.to_str().unwrap()])
            .env("IMPORT_DB", &db.url);
        for file in files {
            command.arg(file);
        }
        async move {
            let output = command.output().await.unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let summary = import(vec![&newer, &with_bad]).await;
    assert!(summary.contains("1 unusable (dead letters)"), "{summary}");
    // Each sink says what it stored: PostgreSQL one dead letter more than Parquet.
    assert!(
        summary.contains("Parquet: 21 dweets") && summary.contains("and 1 dead letters written"),
        "{summary}"
    );
    assert!(
        summary.contains("PostgreSQL: 20 dweets") && summary.contains("and 2 dead letters written"),
        "{summary}"
    );
    import(vec![&older]).await;
    let again = import(vec![&newer, &older, &with_bad]).await;
    assert!(
        again.contains("PostgreSQL: 0 dweets") && again.contains("Parquet: 0 dweets"),
        "a second import writes nothing new: {again}"
    );
    assert!(
        again.contains("31 already stored, skipped"),
        "Parquet says what it skipped: {again}"
    );

    let mut connection = db.connect().await;
    let expected = sandbox_dweets(&client, &[a.clone(), b.clone()], None).await;
    assert_same(stored(&mut connection).await, &expected);
    crate::history::assert_rollups_exact(&mut connection).await;
    // Older history imported after newer is in Parquet too, once (with the NUL dweet that
    // only PostgreSQL refused).
    let mut in_parquet = expected.clone();
    in_parquet.insert((b.clone(), 1_795_996_800_000));
    assert_same(
        crate::worker::parquet_dweets(&dir.path().join("parquet")),
        &in_parquet,
    );
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM dead_letters")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    assert!(
        reasons.iter().any(|r| r.contains("b.jsonl line 12")),
        "{reasons:?}"
    );
    let refused: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT created FROM dead_letters WHERE reason LIKE 'PostgreSQL refused%'",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    assert_eq!(refused, vec![Some("2026-11-30T01:00:00+01:00".to_owned())]);
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}

/// The ```sql blocks of README.md.
fn readme_queries() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .split("```sql\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_readme_query_runs_against_a_filled_database() {
    let db = TestDatabase::create().await;
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let things: Vec<String> = (1..=2).map(|i| thing_name("S5D9-", i)).collect();
    let mut config = test_config(&server.base_url(), &things, dir.path());
    config.parquet = None;
    config.postgres = Some(db.sink_config());
    let (worker, metrics) = start_worker(config).await;
    wait_streams_up(&metrics, 2).await;
    let fleet = FleetConfig {
        things: 2,
        interval: Duration::from_millis(20),
        count: Some(5),
        ..FleetConfig::default()
    };
    run_fleet(
        client_for(&server),
        fleet,
        std::sync::Arc::new(FleetStats::default()),
    )
    .await;
    wait_for("10 dweets", Duration::from_secs(10), || {
        received(&metrics) == 10.0
    })
    .await;
    worker.shutdown(Duration::from_secs(10)).await.unwrap();

    let queries = readme_queries();
    assert!(queries.len() >= 5, "the README has its example queries");
    let mut connection = db.connect().await;
    for query in &queries {
        let rows = sqlx::query(sqlx::AssertSqlSafe(query.clone()))
            .fetch_all(&mut connection)
            .await;
        let rows = rows.unwrap_or_else(|e| panic!("README query failed: {e}\n{query}"));
        if query.contains("S5D9-0001")
            || query.contains("whole fleet")
            || query.contains("raw dweet")
        {
            assert!(
                !rows.is_empty(),
                "the query finds the fleet's rows:\n{query}"
            );
        }
    }
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}

/// A PostgreSQL cluster of this test's own, which it may stop and start.
pub(crate) struct PrivateCluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
    /// initdb refuses root; the cluster then runs as this user.
    owner: Option<&'static str>,
}

impl PrivateCluster {
    fn pg_bin() -> std::path::PathBuf {
        if let Some(dir) = std::env::var_os("DWEETPIPE_PG_BIN") {
            return dir.into();
        }
        let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|bin| bin.join("pg_ctl").exists())
            .collect();
        dirs.sort();
        dirs.pop()
            .expect("PostgreSQL server binaries not found: install postgresql, or run scripts/test")
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let program = self.bin.join(tool);
        match self.owner {
            Some(owner) => {
                let mut command = std::process::Command::new("runuser");
                command.args(["-u", owner, "--"]).arg(program);
                command
            }
            None => std::process::Command::new(program),
        }
    }

    pub(crate) fn create() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let is_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
        let owner = is_root.then_some("postgres");
        if let Some(owner) = owner {
            assert!(
                std::process::Command::new("chown")
                    .args([owner, dir.path().to_str().unwrap()])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let port = crate::common::free_port();
        let cluster = PrivateCluster {
            dir,
            bin: Self::pg_bin(),
            port,
            owner,
        };
        let data = cluster.dir.path().join("data");
        let initdb = cluster
            .command("initdb")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            initdb.status.success(),
            "{}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        cluster.start();
        cluster
    }

    pub(crate) fn start(&self) {
        let data = self.dir.path().join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let status = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-l",
                self.dir.path().join("log").to_str().unwrap(),
                "-w",
                "-o",
                &options,
                "start",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl start");
    }

    pub(crate) fn stop(&self) {
        let data = self.dir.path().join("data");
        let status = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl stop");
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_mid_stream_loses_nothing_and_parquet_keeps_going() {
    let cluster = PrivateCluster::create();
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("outage"));
    let things: Vec<String> = (1..=3).map(|i| thing_name(&prefix, i)).collect();
    let mut config = test_config(&server.base_url(), &things, dir.path());
    config.postgres = Some(PostgresConfig {
        spool_dir: dir.path().join("spool"),
        memory_max_rows: 50,
        ..PostgresConfig::new(DatabaseUrl::new(cluster.url()))
    });
    let (worker, metrics) = start_worker(config).await;
    wait_streams_up(&metrics, 3).await;
    let fleet_config = FleetConfig {
        things: 3,
        interval: Duration::from_millis(20),
        prefix,
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(run_fleet(
        client_for(&server),
        fleet_config,
        std::sync::Arc::new(FleetStats::default()),
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;

    cluster.stop();
    let during = received(&metrics);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        received(&metrics) > during + 50.0,
        "ingestion went on while PostgreSQL was down"
    );
    assert!(
        metrics.value("dweetpipe_spool_bytes", &[]) > 0.0,
        "past the memory bound, records went to the spool"
    );
    cluster.start();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.abort();

    let expected = sandbox_dweets(&client_for(&server), &things, None).await;
    let mut connection = PgConnection::connect(&cluster.url()).await.unwrap();
    let mut rows = 0;
    for _ in 0..300 {
        rows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dweets")
            .fetch_one(&mut connection)
            .await
            .unwrap();
        if rows as usize >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        rows as usize,
        expected.len(),
        "the backlog drained into PostgreSQL"
    );
    assert_same(stored(&mut connection).await, &expected);
    assert_eq!(
        metrics.value("dweetpipe_spool_bytes", &[]),
        0.0,
        "the spool is empty again"
    );
    crate::worker::assert_exactly_once(dir.path(), &expected);
    eprintln!(
        "outage test: {} dweets, all in PostgreSQL and Parquet exactly once",
        expected.len()
    );
    server.shutdown().await;
}

/// The same S5D9 dweets written as one bulk batch (COPY) and as small batches (INSERT) give
/// the same rows, and writing them again (older than the watermark) adds nothing.
#[tokio::test]
async fn copy_and_insert_batches_store_the_same_rows() {
    use dweetpipe::record::Record;

    let db = TestDatabase::create().await;
    let (mut sink, metrics) = sink_for(&db).await;
    let records = |thing: &str| {
        s5d9_records(thing, 7, |_, content| {
            // Values whose text and binary forms are easy to get wrong.
            content["edge"] = serde_json::json!([-0.0, 1e308, 5e-324, 0.1, -123456789012345678i64]);
            content["note"] = serde_json::json!("tab\there, a \\ and \u{e9}");
        })
    };
    let (bulk, small) = (records("bulk\t\\\u{e9}"), records("small\t\\\u{e9}"));
    sink.write(bulk.iter()).await; // 7,200 readings: COPY
    for batch in small.chunks(20) {
        sink.write(batch.iter()).await; // 360 readings each: INSERT
    }
    let written =
        |table: &str| metrics.value("dweetpipe_sink_rows_written_total", &[("table", table)]);
    assert_eq!((written("dweets"), written("readings")), (800.0, 14_400.0));
    sink.write(bulk.iter().chain(small.iter())).await; // all older than the watermarks
    assert_eq!(written("dweets"), 800.0, "nothing is stored twice");

    let mut connection = db.connect().await;
    let per_thing = |thing: &'static str| {
        sqlx::query_as::<_, (String, String, String, f64)>(
            "SELECT created::text, content::text, r.sensor, r.value FROM dweets d \
             JOIN readings r ON r.thing = d.thing AND r.time = d.created \
             WHERE d.thing = $1 ORDER BY created, sensor",
        )
        .bind(thing)
    };
    let bulk_rows = per_thing("bulk\t\\\u{e9}")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    let small_rows = per_thing("small\t\\\u{e9}")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    assert_eq!(bulk_rows.len(), 14_400 / 2);
    let edge: Vec<f64> = bulk_rows[..18]
        .iter()
        .filter(|row| row.2.starts_with("edge."))
        .map(|row| row.3)
        .collect();
    let Record::Dweet(first) = &bulk[0] else {
        panic!("{:?}", bulk[0])
    };
    let sent: Vec<u64> = first
        .readings
        .iter()
        .filter(|r| r.sensor.starts_with("edge."))
        .map(|r| r.value.to_bits())
        .collect();
    assert_eq!(sent.len(), 5);
    assert_eq!(
        edge.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        sent,
        "doubles are stored bit for bit"
    );
    assert_eq!(bulk_rows, small_rows, "both paths store identical rows");
    drop(connection);
    db.drop_now().await;
}

/// A dweet PostgreSQL refuses inside a bulk batch (binary COPY): the batch is bisected, that
/// dweet becomes a dead letter with the reason, and every other row is stored once.
#[tokio::test]
async fn a_refused_dweet_in_a_bulk_batch_is_quarantined_and_the_rest_stored() {
    let db = TestDatabase::create().await;
    let (mut sink, metrics) = sink_for(&db).await;
    let records = s5d9_records("bulk-refused", 3, |i, content| {
        if i == 123 {
            // jsonb cannot hold \u0000 (SQLSTATE 22P05), in COPY's binary form as in text.
            content["note"] = serde_json::json!("nul\u{0}inside");
        }
    });
    sink.write(records.iter()).await; // 5,200 readings: binary COPY
    let written =
        |table: &str| metrics.value("dweetpipe_sink_rows_written_total", &[("table", table)]);
    assert_eq!(written("dweets"), 399.0);
    assert_eq!(written("dead_letters"), 1.0);
    let mut connection = db.connect().await;
    let created: Vec<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM created) * 1000)::bigint FROM dweets ORDER BY created",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    let expected: Vec<i64> = (0..400)
        .filter(|i| *i != 123)
        .map(|i| 1_795_000_000_000 + i * 1000)
        .collect();
    assert_eq!(created, expected, "every other dweet, once");
    let readings: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(readings, 399 * 13);
    let (payload, reason): (String, String) =
        sqlx::query_as("SELECT payload, reason FROM dead_letters")
            .fetch_one(&mut connection)
            .await
            .unwrap();
    assert!(payload.contains("nul"), "the payload is kept: {payload}");
    assert!(reason.contains("PostgreSQL refused"), "{reason}");
    drop(connection);
    db.drop_now().await;
}

/// A sink written to directly (no worker), with its metrics.
async fn sink_for(
    db: &TestDatabase,
) -> (
    dweetpipe::sink::postgres::PostgresSink,
    std::sync::Arc<dweetpipe::telemetry::Metrics>,
) {
    let metrics = std::sync::Arc::new(dweetpipe::telemetry::Metrics::new().unwrap());
    let sink = dweetpipe::sink::postgres::PostgresSink::connect(
        &db.sink_config(),
        metrics.clone(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    (sink, metrics)
}

/// 400 S5D9 dweets of `thing`, a second apart, normalised; `edit` may change the content of
/// the i-th.
fn s5d9_records(
    thing: &str,
    seed: u64,
    edit: impl Fn(i64, &mut serde_json::Value),
) -> Vec<dweetpipe::record::Record> {
    use dweetpipe::client::{Created, Dweet};
    use dweetpipe::record::ms_to_datetime;
    let mut board = dweetpipe::sandbox::simulator::S5d9Board::new(seed);
    (0..400)
        .map(|i| {
            let mut content = board.next_payload();
            edit(i, &mut content);
            let dweet = Dweet {
                thing: thing.to_owned(),
                created: Created::from_datetime(ms_to_datetime(1_795_000_000_000 + i * 1000)),
                content,
                transaction: None,
            };
            dweetpipe::normalize::normalize(&dweet, 1_795_000_500_000)
        })
        .collect()
}
