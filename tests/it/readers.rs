//! The Parquet output read by the tools the README sends people to: DuckDB and pyarrow (from
//! the virtualenv `scripts/test` makes), with the README's own queries. Column types,
//! hive `date` partitions, and row counts equal to PostgreSQL's, for all three datasets.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use dweetpipe::sandbox::simulator::{FleetConfig, FleetStats, run_fleet, thing_name};
use serde_json::{Value, json};

use crate::common::{client_for, thing};
use crate::postgres::TestDatabase;
use crate::worker::{WorkerProcess, big_sandbox, write_config};

fn python() -> String {
    std::env::var("DWEETPIPE_PYTHON").expect(
        "DWEETPIPE_PYTHON is not set: run the tests with scripts/test, which makes target/pyenv with duckdb and pyarrow",
    )
}

/// Runs `script` with the virtualenv's Python; its stdout, which must be JSON.
fn run_python(script: &str) -> Value {
    let output = std::process::Command::new(python())
        .args(["-c", script])
        .output()
        .expect("the virtualenv's python runs");
    assert!(
        output.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "python printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Every fenced `sh` block line of README.md that starts with `prefix`, with continuation
/// lines joined.
fn readme_commands(prefix: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let mut commands = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with(prefix) {
            let mut command = lines[i].to_owned();
            // A quoted argument may run over several lines.
            while command.matches('"').count() % 2 == 1 && i + 1 < lines.len() {
                i += 1;
                command.push('\n');
                command.push_str(lines[i]);
            }
            commands.push(command);
        }
        i += 1;
    }
    commands
}

/// The text between the first pair of double quotes after `marker`.
fn quoted_after(command: &str, marker: &str) -> String {
    let rest = &command[command.find(marker).expect("marker") + marker.len()..];
    let start = rest.find('"').expect("an opening quote") + 1;
    let end = start + rest[start..].find('"').expect("a closing quote");
    rest[start..end].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn duckdb_and_pyarrow_read_every_dataset_as_the_readme_says() {
    let db = TestDatabase::create().await;
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}-", thing("readers"));
    let things: Vec<String> = (1..=3).map(|i| thing_name(&prefix, i)).collect();
    let entries: Vec<(&str, Option<&str>)> = things.iter().map(|t| (t.as_str(), None)).collect();
    let config = write_config(
        dir.path(),
        &server.base_url(),
        &entries,
        &format!(
            "[postgres]\nurl = \"{}\"\nspool_dir = \"{}\"\n",
            db.url,
            dir.path().join("spool").display()
        ),
    );
    let mut worker = WorkerProcess::spawn(&config, &[], dir.path().join("worker.log"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let fleet = FleetConfig {
        things: 3,
        interval: Duration::from_millis(20),
        count: Some(30),
        prefix,
        odd_every: Some(4),
        ..FleetConfig::default()
    };
    run_fleet(
        client_for(&server),
        fleet,
        std::sync::Arc::new(FleetStats::default()),
    )
    .await;
    // Dead letters too: content nested past normalisation's limit.
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!({ "d": deep });
    }
    for name in &things {
        client_for(&server)
            .dweet_for(name, &deep, None)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    worker.signal("-TERM");
    assert!(worker.wait().await.success(), "{}", worker.log());

    let parquet = dir.path().join("parquet");
    let mut connection = db.connect().await;
    let mut in_postgres = BTreeMap::new();
    for table in ["readings", "dweets", "dead_letters"] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&mut connection)
                .await
                .unwrap();
        in_postgres.insert(table, rows);
    }
    assert!(in_postgres["dead_letters"] >= 3, "{in_postgres:?}");

    let read = run_python(&format!(
        r#"
import json, duckdb, pyarrow.dataset as ds
root = {root:?}
out = {{}}
for name in ["readings", "dweets", "dead_letters"]:
    glob = f"{{root}}/{{name}}/**/*.parquet"
    con = duckdb.connect()
    types = {{row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{{glob}}', hive_partitioning = true)").fetchall()}}
    count = con.execute(f"SELECT count(*) FROM read_parquet('{{glob}}', hive_partitioning = true)").fetchone()[0]
    table = ds.dataset(f"{{root}}/{{name}}", format="parquet", partitioning="hive").to_table()
    out[name] = {{
        "duckdb_types": types,
        "duckdb_rows": count,
        "arrow_types": {{field.name: str(field.type) for field in table.schema}},
        "arrow_rows": table.num_rows,
    }}
print(json.dumps(out))
"#,
        root = parquet.display().to_string()
    ));
    for table in ["readings", "dweets", "dead_letters"] {
        let seen = &read[table];
        assert_eq!(seen["duckdb_rows"], in_postgres[table], "{table}: {seen}");
        assert_eq!(seen["arrow_rows"], in_postgres[table], "{table}: {seen}");
        assert_eq!(
            seen["duckdb_types"]["date"], "DATE",
            "{table}: hive partitions: {seen}"
        );
        assert!(seen["arrow_types"]["date"].is_string(), "{table}: {seen}");
    }
    let readings = &read["readings"];
    assert_eq!(readings["duckdb_types"]["time"], "TIMESTAMP WITH TIME ZONE");
    assert_eq!(readings["duckdb_types"]["value"], "DOUBLE");
    assert_eq!(readings["arrow_types"]["time"], "timestamp[ms, tz=UTC]");
    assert_eq!(readings["arrow_types"]["value"], "double");
    // The sink hands `parquet` the names as keys into a file's names; readers see text.
    for name in ["thing", "sensor"] {
        assert_eq!(readings["duckdb_types"][name], "VARCHAR", "{readings}");
        assert_eq!(readings["arrow_types"][name], "string", "{readings}");
    }
    let dweets = &read["dweets"];
    assert_eq!(
        dweets["duckdb_types"]["created"],
        "TIMESTAMP WITH TIME ZONE"
    );
    assert_eq!(
        dweets["duckdb_types"]["content"], "JSON",
        "content is Parquet JSON"
    );
    assert_eq!(
        read["dead_letters"]["duckdb_types"]["received_at"],
        "TIMESTAMP WITH TIME ZONE"
    );

    // The README's own queries, pointed at this test's data.
    let duckdb_sql = readme_commands("duckdb -c ")
        .into_iter()
        .map(|command| quoted_after(&command, "duckdb -c "))
        .find(|sql| sql.contains("data/parquet/readings"))
        .expect("the README shows a DuckDB query on data/parquet/readings");
    let pyarrow_line = readme_commands("python3 -c ")
        .into_iter()
        .map(|command| quoted_after(&command, "python3 -c "))
        .find(|code| code.contains("data/parquet/readings"))
        .expect("the README shows a pyarrow line on data/parquet/readings");
    let root = parquet.display().to_string();
    let answered = run_python(&format!(
        r#"
import io, json, contextlib, duckdb
rows = duckdb.connect().execute({sql:?}).fetchall()
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec({code:?})
print(json.dumps({{"duckdb_rows": len(rows), "pyarrow_printed": printed.getvalue().strip()}}))
"#,
        sql = duckdb_sql.replace("data/parquet", &root),
        code = pyarrow_line.replace("data/parquet", &root),
    ));
    assert!(
        answered["duckdb_rows"].as_u64().unwrap() > 0,
        "the README's DuckDB query answers: {answered}"
    );
    assert_eq!(
        answered["pyarrow_printed"],
        in_postgres["readings"].to_string(),
        "the README's pyarrow line counts every reading"
    );
    drop(connection);
    db.drop_now().await;
    server.shutdown().await;
}
