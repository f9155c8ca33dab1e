//! Stored dweets and alert events of locked things, by day or hour: the request's window, and
//! the CSV form. (The JSON form is the usual `getting` envelope, oldest first; the exact shape
//! the public service used is unknown, so this is our choice, written down in the protocol
//! notes of README.md.)

use chrono::{NaiveDate, NaiveTime, TimeDelta};
use serde_json::Value;

use super::Refusal;

/// What a request asks for: a day (days since the epoch), and `[from_ms, to_ms)` within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub day: i64,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// The window that `date` and `hour` name.
pub fn window(date: Option<&str>, hour: Option<&str>) -> Result<Window, Refusal> {
    let date = date.ok_or_else(|| {
        Refusal::new(
            400,
            "a date is required: ?date=YYYY-MM-DD (and &hour=HH for one hour)",
        )
    })?;
    let day = NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|_| {
        Refusal::new(
            400,
            format!("the date {date:?} is not a day written YYYY-MM-DD"),
        )
    })?;
    let start = day.and_time(NaiveTime::MIN).and_utc().timestamp_millis();
    let (from, to) = match hour {
        None => (start, start + TimeDelta::days(1).num_milliseconds()),
        Some(text) => {
            let hour: i64 = text
                .parse()
                .ok()
                .filter(|h| (0..24).contains(h))
                .ok_or_else(|| {
                    Refusal::new(
                        400,
                        format!("the hour {text:?} is not an hour from 00 to 23"),
                    )
                })?;
            let from = start + TimeDelta::hours(hour).num_milliseconds();
            (from, from + TimeDelta::hours(1).num_milliseconds())
        }
    };
    Ok(Window {
        day: super::disk::day_of(start),
        from_ms: from,
        to_ms: to,
    })
}

/// Whether the answer is CSV (`responseType=csv`) or JSON (the default).
pub fn wants_csv(response_type: Option<&str>) -> Result<bool, Refusal> {
    match response_type {
        None | Some("json") => Ok(false),
        Some("csv") => Ok(true),
        Some(other) => Err(Refusal::new(
            400,
            format!("responseType {other:?} is not json or csv"),
        )),
    }
}

/// Dweets as CSV: `thing,created,` then every leaf of the contents by dotted path, in the order
/// first seen; an absent leaf is an empty cell.
pub fn dweets_csv(dweets: &[String]) -> String {
    let parsed: Vec<Value> = dweets
        .iter()
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect();
    let mut columns: Vec<String> = Vec::new();
    let mut rows = Vec::with_capacity(parsed.len());
    for dweet in &parsed {
        let mut leaves = Vec::new();
        if let Some(content) = dweet.get("content") {
            flatten("", content, &mut leaves);
        }
        for (path, _) in &leaves {
            if !columns.contains(path) {
                columns.push(path.clone());
            }
        }
        rows.push((dweet, leaves));
    }
    let mut out = String::from("thing,created");
    for column in &columns {
        out.push(',');
        out.push_str(&cell(column));
    }
    out.push('\n');
    for (dweet, leaves) in rows {
        let text = |key: &str| dweet.get(key).and_then(Value::as_str).unwrap_or_default();
        out.push_str(&cell(text("thing")));
        out.push(',');
        out.push_str(&cell(text("created")));
        for column in &columns {
            out.push(',');
            if let Some((_, value)) = leaves.iter().find(|(path, _)| path == column) {
                out.push_str(&cell(value));
            }
        }
        out.push('\n');
    }
    out
}

/// Alert events as CSV: `thing,created,kind,message`.
pub fn events_csv(events: &[String]) -> String {
    let mut out = String::from("thing,created,kind,message\n");
    for event in events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
    {
        let text = |key: &str| {
            event
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let line = [
            text("thing"),
            text("created"),
            text("kind"),
            text("message"),
        ]
        .iter()
        .map(|t| cell(t))
        .collect::<Vec<_>>()
        .join(",");
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn flatten(prefix: &str, value: &Value, into: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, inner, into);
            }
        }
        Value::String(text) => into.push((prefix.to_owned(), text.clone())),
        Value::Null => into.push((prefix.to_owned(), String::new())),
        other => into.push((prefix.to_owned(), other.to_string())),
    }
}

/// A CSV cell, quoted when it holds a comma, a quote or a line break.
fn cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_and_an_hour_are_windows_and_bad_ones_say_why() {
        let day = window(Some("2026-12-01"), None).unwrap();
        assert_eq!(day.to_ms - day.from_ms, 24 * 3_600_000);
        assert_eq!(day.day, day.from_ms / 86_400_000);
        let hour = window(Some("2026-12-01"), Some("13")).unwrap();
        assert_eq!(hour.from_ms, day.from_ms + 13 * 3_600_000);
        assert_eq!(hour.to_ms - hour.from_ms, 3_600_000);
        assert!(
            window(None, None)
                .unwrap_err()
                .because
                .contains("date is required")
        );
        assert!(
            window(Some("2026-13-01"), None)
                .unwrap_err()
                .because
                .contains("YYYY-MM-DD")
        );
        assert!(
            window(Some("2026-12-01"), Some("24"))
                .unwrap_err()
                .because
                .contains("00 to 23")
        );
        assert!(wants_csv(Some("xml")).is_err());
    }

    #[test]
    fn csv_has_a_column_per_leaf_and_quotes_what_needs_it() {
        let dweets = [
            r#"{"thing":"t","created":"2026-12-01T00:00:00.000Z","content":{"a":1,"b":{"c":"x,y"}}}"#.to_owned(),
            r#"{"thing":"t","created":"2026-12-01T00:00:01.000Z","content":{"a":2,"d":true}}"#.to_owned(),
        ];
        assert_eq!(
            dweets_csv(&dweets),
            "thing,created,a,b.c,d\nt,2026-12-01T00:00:00.000Z,1,\"x,y\",\nt,2026-12-01T00:00:01.000Z,2,,true\n"
        );
    }
}
