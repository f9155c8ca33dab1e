//! `dweetpipe query`: the Parquet dataset read back with nothing else installed. Parses the
//! flags into a [`dweetpipe::query::Query`], runs it, and prints a table, JSON Lines or CSV.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, NaiveDate, NaiveDateTime};
use clap::Args;
use dweetpipe::config::Config;
use dweetpipe::query::{Aggregate, Answer, Pattern, Query, Rows, Shape, rfc3339};
use dweetpipe::record::now_ms;

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  dweetpipe query S5D9-0001 --dir data/demo/run-1 --sensor sensors.TemperatureC --every 1m
  dweetpipe query 'S5D9-*' --config things.toml --since 7d --every 1h --agg avg,max
  dweetpipe query --config things.toml --latest --sensor 'sensors.Temp*'
  dweetpipe query S5D9-0001 --dir data/parquet --from 2026-12-01 --to 2026-12-02 --format csv > day.csv")]
pub struct QueryArgs {
    /// Boards to read: names or globs (`S5D9-*`; quote them from the shell). None: every board.
    #[arg(value_name = "THING")]
    things: Vec<String>,
    /// The things file whose `[parquet] dir` holds the dataset.
    #[arg(
        long,
        short,
        value_name = "FILE",
        conflicts_with = "dir",
        required_unless_present = "dir"
    )]
    config: Option<PathBuf>,
    /// The dataset's folder (the one holding readings/), instead of --config.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Sensors to read: names or globs (`sensors.Accel?`); repeat it or separate with commas.
    /// None: every sensor.
    #[arg(long, short, value_name = "SENSOR", value_delimiter = ',')]
    sensor: Vec<String>,
    /// How far back from now (`30m`, `1h`, `7d`). Default 1d, when neither it nor --from is given.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "from")]
    since: Option<Duration>,
    /// The start, inclusive: RFC 3339 (`2026-12-03T10:00:00Z`), or a UTC date or time
    /// (`2026-12-03`, `2026-12-03T10:00`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    from: Option<i64>,
    /// The end, exclusive; same forms as --from. Default: now.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    to: Option<i64>,
    /// Aggregate into buckets this wide (`1m`, `1h`, `1d`; UTC-aligned). Without it, every
    /// reading comes out.
    #[arg(long, value_name = "DURATION", value_parser = parse_every, conflicts_with = "latest")]
    every: Option<Duration>,
    /// What each bucket reports, with --every: avg, min, max, count, last (comma-separated).
    #[arg(
        long,
        value_name = "AGGREGATES",
        value_delimiter = ',',
        default_value = "avg",
        requires = "every"
    )]
    agg: Vec<Aggregate>,
    /// Each board's newest value of each sensor in the range.
    #[arg(long)]
    latest: bool,
    /// `table` (aligned columns), `jsonl` or `csv`. Default: table on a terminal, csv otherwise.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Also print, on stderr, how many dates, files and row groups were read and skipped.
    #[arg(long)]
    explain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Jsonl,
    Csv,
}

fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.timestamp_millis());
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(time) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(time.and_utc().timestamp_millis());
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date
            .and_hms_opt(0, 0, 0)
            .map_or(0, |t| t.and_utc().timestamp_millis()));
    }
    Err(format!(
        "{text:?} is not a time: give RFC 3339 (2026-12-03T10:00:00Z) or a UTC date or time (2026-12-03, 2026-12-03T10:00)"
    ))
}

fn parse_every(text: &str) -> Result<Duration, String> {
    let every = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if every.as_millis() < 1000 || every.subsec_millis() != 0 {
        return Err(format!(
            "{text:?} is not a whole number of seconds of at least 1s; try 1m, 1h or 1d"
        ));
    }
    Ok(every)
}

impl QueryArgs {
    fn query(&self, now: i64) -> anyhow::Result<Query> {
        let to_ms = self.to.unwrap_or(now);
        let from_ms = match (self.from, self.since) {
            (Some(from), _) => from,
            (None, since) => dweetpipe::record::ms_before(
                to_ms.min(now),
                since.unwrap_or(Duration::from_secs(24 * 60 * 60)),
            ),
        };
        if from_ms >= to_ms {
            bail!(
                "the range is empty: --from/--since gives {} and --to gives {}; the start must come before the end",
                rfc3339(from_ms),
                rfc3339(to_ms)
            );
        }
        let shape = match (self.every, self.latest) {
            (Some(every), _) => Shape::Every {
                every_ms: i64::try_from(every.as_millis()).unwrap_or(i64::MAX),
                aggregates: self.agg.clone(),
            },
            (None, true) => Shape::Latest,
            (None, false) => Shape::Raw,
        };
        Ok(Query {
            things: self.things.iter().map(Pattern::new).collect(),
            sensors: self.sensor.iter().map(Pattern::new).collect(),
            from_ms,
            to_ms,
            shape,
        })
    }

    fn dataset(&self) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &self.dir {
            return Ok(dir.clone());
        }
        let path = self
            .config
            .as_deref()
            .unwrap_or(std::path::Path::new("things.toml"));
        let config = Config::load(path)?;
        match config.parquet {
            Some(parquet) => Ok(parquet.dir),
            None => bail!(
                "--config {}: the things file has no [parquet] section, so there is no dataset to read; name one with --dir",
                path.display()
            ),
        }
    }
}

pub fn query(args: QueryArgs) -> anyhow::Result<()> {
    let query = args.query(now_ms())?;
    let dir = args.dataset()?;
    let answer = dweetpipe::query::run(&dir, &query).map_err(|error| match error {
        dweetpipe::query::QueryError::NotADataset { .. } => {
            let flag = if args.dir.is_some() {
                "--dir"
            } else {
                "--config"
            };
            anyhow::anyhow!("{flag}: {error}")
        }
        other => other.into(),
    })?;
    let format = args.format.unwrap_or(if std::io::stdout().is_terminal() {
        Format::Table
    } else {
        Format::Csv
    });
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    print(&mut out, &answer, &query, format).context("writing the answer")?;
    out.flush().context("writing the answer")?;
    if args.explain {
        let e = &answer.explain;
        eprintln!(
            "explain: {} date folder(s) read, {} skipped by the range; {} file(s) read; {} of {} row groups read ({} skipped by thing statistics, {} by time statistics); {} rows read, {} matched",
            e.dates_read,
            e.dates_skipped,
            e.files_read,
            e.row_groups_read,
            e.row_groups(),
            e.row_groups_skipped_by_thing,
            e.row_groups_skipped_by_time,
            e.rows_read,
            e.rows_matched
        );
    }
    if answer.rows.is_empty() {
        eprintln!(
            "no readings from {} to {}; widen the range with --since, --from or --to",
            rfc3339(query.from_ms),
            rfc3339(query.to_ms)
        );
    }
    Ok(())
}

/// The header and the rows as text cells.
fn cells(answer: &Answer, query: &Query) -> (Vec<String>, Vec<Vec<String>>) {
    match &answer.rows {
        Rows::Readings(rows) => (
            ["time", "thing", "sensor", "value"]
                .map(str::to_owned)
                .to_vec(),
            rows.iter()
                .map(|r| {
                    vec![
                        rfc3339(r.time_ms),
                        r.thing.clone(),
                        r.sensor.clone(),
                        r.value.to_string(),
                    ]
                })
                .collect(),
        ),
        Rows::Buckets(rows) => {
            let aggregates = match &query.shape {
                Shape::Every { aggregates, .. } => aggregates.as_slice(),
                _ => &[],
            };
            let mut header: Vec<String> = ["bucket", "thing", "sensor"].map(str::to_owned).to_vec();
            header.extend(aggregates.iter().map(|a| a.name().to_owned()));
            let rows = rows
                .iter()
                .map(|b| {
                    let mut row = vec![rfc3339(b.start_ms), b.thing.clone(), b.sensor.clone()];
                    row.extend(b.values.iter().map(f64::to_string));
                    row
                })
                .collect();
            (header, rows)
        }
    }
}

fn print(
    out: &mut impl Write,
    answer: &Answer,
    query: &Query,
    format: Format,
) -> std::io::Result<()> {
    let (header, rows) = cells(answer, query);
    match format {
        Format::Table => {
            let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
            for row in &rows {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.chars().count());
                }
            }
            for row in std::iter::once(&header).chain(&rows) {
                let line: Vec<String> = row
                    .iter()
                    .zip(&widths)
                    .map(|(cell, width)| format!("{cell:<width$}"))
                    .collect();
                writeln!(out, "{}", line.join("  ").trim_end())?;
            }
        }
        Format::Csv => {
            for row in std::iter::once(&header).chain(&rows) {
                let line: Vec<String> = row.iter().map(|cell| csv_cell(cell)).collect();
                writeln!(out, "{}", line.join(","))?;
            }
        }
        Format::Jsonl => {
            for row in &rows {
                let mut object = serde_json::Map::new();
                for (index, (name, cell)) in header.iter().zip(row).enumerate() {
                    // Times and names are strings, the rest numbers.
                    let value = if index < 3 {
                        serde_json::Value::String(cell.clone())
                    } else {
                        cell.parse::<f64>()
                            .ok()
                            .and_then(serde_json::Number::from_f64)
                            .map_or(serde_json::Value::Null, serde_json::Value::Number)
                    };
                    object.insert(name.clone(), value);
                }
                writeln!(out, "{}", serde_json::Value::Object(object))?;
            }
        }
    }
    Ok(())
}

/// A CSV field, quoted when it must be (RFC 4180).
fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_documented_form() {
        let dec3 = 1_796_256_000_000;
        for (text, ms) in [
            ("2026-12-03", dec3),
            ("2026-12-03T10:00", dec3 + 10 * 3_600_000),
            ("2026-12-03T10:00:30", dec3 + 10 * 3_600_000 + 30_000),
            ("2026-12-03T10:00:00Z", dec3 + 10 * 3_600_000),
            ("2026-12-03T11:00:00+01:00", dec3 + 10 * 3_600_000),
            ("2026-12-03T10:00:00.250Z", dec3 + 10 * 3_600_000 + 250),
        ] {
            assert_eq!(parse_time(text), Ok(ms), "{text}");
        }
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn bucket_widths_are_whole_seconds() {
        assert_eq!(parse_every("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_every("500ms").is_err());
        assert!(parse_every("1.5s").is_err());
        assert!(parse_every("soon").is_err());
    }

    #[test]
    fn csv_quotes_only_what_needs_it() {
        assert_eq!(csv_cell("S5D9-0001"), "S5D9-0001");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn an_empty_range_is_refused_naming_the_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: QueryArgs,
        }
        let args = Wrapper::try_parse_from([
            "query",
            "--dir",
            "x",
            "--from",
            "2026-12-03",
            "--to",
            "2026-12-02",
        ])
        .unwrap()
        .args;
        let error = args.query(now_ms()).unwrap_err().to_string();
        assert!(
            error.contains("--from") && error.contains("--to"),
            "{error}"
        );
    }
}
