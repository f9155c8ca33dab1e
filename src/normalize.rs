//! Turns a dweet into rows: one lossless raw record, and one reading per numeric leaf of its
//! content, named by the leaf's dotted path (`sensors.TemperatureC`, `globals.dweet-count`).
//!
//! Booleans become 0/1; strings and nulls live only in the raw record. What cannot be turned
//! into rows (content that is not an object, nests too deep, has a bad timestamp, is a line
//! that was not a dweet at all) becomes a dead letter with the reason: nothing is dropped
//! silently and nothing here can panic.

use serde_json::Value;

use crate::client::Dweet;
use crate::record::{DeadLetter, Normalized, Reading, Record};

/// Deeper content is refused: no sensor payload nests this far, and recursion must be bounded.
pub const MAX_DEPTH: usize = 32;
/// More numeric leaves than this in one dweet is refused as unusable (the public service's
/// 2000-character limit allows a few hundred).
pub const MAX_READINGS: usize = 10_000;

/// Normalises one dweet received at `received_ms`.
pub fn normalize(dweet: &Dweet, received_ms: i64) -> Record {
    let created_ms = dweet.created.to_datetime().map(|at| at.timestamp_millis());
    normalize_parsed(dweet, created_ms, received_ms)
}

/// [`normalize`] for a caller that has already parsed `created` (to ms; `None` when it is not
/// a timestamp), so the hot path parses it once.
pub fn normalize_parsed(dweet: &Dweet, created_ms: Option<i64>, received_ms: i64) -> Record {
    let dead = |reason: String| {
        Record::DeadLetter(DeadLetter {
            thing: Some(dweet.thing.clone()),
            created: Some(dweet.created.as_str().to_owned()),
            created_ms,
            received_ms,
            payload: serde_json::to_string(dweet).unwrap_or_default(),
            reason,
        })
    };
    if dweet.thing.is_empty() {
        return dead("the dweet has an empty thing name".to_owned());
    }
    let Some(created_ms) = created_ms else {
        return dead(format!(
            "`created` {:?} is not an RFC 3339 timestamp",
            dweet.created.as_str()
        ));
    };
    let Value::Object(content) = &dweet.content else {
        return dead(format!(
            "the content is {}, not a JSON object",
            crate::protocol::json_kind(&dweet.content)
        ));
    };
    let mut readings = Vec::new();
    let mut path = String::new();
    for (name, value) in content {
        if let Err(reason) = collect(value, name, &mut path, 1, &mut readings) {
            return dead(reason);
        }
    }
    Record::Dweet(Normalized {
        thing: dweet.thing.clone(),
        created_ms,
        received_ms,
        content: serde_json::to_string(&dweet.content).unwrap_or_default(),
        readings,
    })
}

/// A stream line that was not a dweet, as a dead letter of `thing`.
pub fn undecodable_line(thing: &str, line: String, reason: String, received_ms: i64) -> Record {
    Record::DeadLetter(DeadLetter {
        thing: Some(thing.to_owned()),
        created: None,
        created_ms: None,
        received_ms,
        payload: line,
        reason,
    })
}

fn collect(
    value: &Value,
    name: &str,
    path: &mut String,
    depth: usize,
    readings: &mut Vec<Reading>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("the content nests deeper than {MAX_DEPTH} levels"));
    }
    let parent_len = path.len();
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(name);
    let number = match value {
        Value::Number(number) => number.as_f64(),
        Value::Bool(flag) => Some(f64::from(u8::from(*flag))),
        Value::Object(map) => {
            for (child, value) in map {
                collect(value, child, path, depth + 1, readings)?;
            }
            None
        }
        Value::Array(items) => {
            for (index, value) in items.iter().enumerate() {
                collect(value, &index.to_string(), path, depth + 1, readings)?;
            }
            None
        }
        Value::String(_) | Value::Null => None,
    };
    if let Some(value) = number.filter(|v| v.is_finite()) {
        if readings.len() >= MAX_READINGS {
            return Err(format!(
                "the content has more than {MAX_READINGS} numeric values"
            ));
        }
        readings.push(Reading {
            sensor: path.clone(),
            value,
        });
    }
    path.truncate(parent_len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Created;
    use serde_json::json;

    fn dweet(content: Value) -> Dweet {
        Dweet {
            thing: "S5D9-63de".to_owned(),
            created: Created::new("2014-03-19T10:38:46.010Z"),
            content,
            transaction: None,
        }
    }

    fn readings(record: &Record) -> Vec<(&str, f64)> {
        match record {
            Record::Dweet(n) => n
                .readings
                .iter()
                .map(|r| (r.sensor.as_str(), r.value))
                .collect(),
            Record::DeadLetter(letter) => panic!("dead letter: {}", letter.reason),
        }
    }

    #[test]
    #[cfg(feature = "sandbox")]
    fn an_s5d9_dweet_gives_thirteen_readings_named_by_path() {
        let payload = crate::sandbox::simulator::S5d9Board::new(1).next_payload();
        let record = normalize(&dweet(payload), 1);
        let got = readings(&record);
        assert_eq!(got.len(), 13, "12 sensors + dweet-count: {got:?}");
        assert_eq!(got[0].0, "globals.dweet-count");
        assert!(got.iter().any(|(s, _)| *s == "sensors.TemperatureC"));
        let Record::Dweet(n) = record else {
            unreachable!()
        };
        assert_eq!(n.created_ms, 1_395_225_526_010);
        assert_eq!(n.thing, "S5D9-63de");
    }

    #[test]
    fn booleans_are_numbers_strings_and_nulls_are_not() {
        let record = normalize(
            &dweet(json!({"on": true, "off": false, "s": "x", "n": null, "a": [1.5, {"b": 2}]})),
            1,
        );
        assert_eq!(
            readings(&record),
            vec![("on", 1.0), ("off", 0.0), ("a.0", 1.5), ("a.1.b", 2.0)]
        );
        let Record::Dweet(n) = record else {
            unreachable!()
        };
        assert_eq!(
            n.content, r#"{"on":true,"off":false,"s":"x","n":null,"a":[1.5,{"b":2}]}"#,
            "raw keeps everything"
        );
    }

    #[test]
    fn big_integers_stay_exact_in_the_raw_record() {
        let Record::Dweet(n) = normalize(&dweet(json!({"big": 6816513845u64})), 1) else {
            unreachable!()
        };
        assert_eq!(n.content, r#"{"big":6816513845}"#);
        assert_eq!(n.readings[0].value, 6816513845.0);
    }

    #[test]
    fn unusable_content_becomes_a_dead_letter_with_a_reason() {
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!({ "d": deep });
        }
        let wide: serde_json::Map<String, Value> = (0..=MAX_READINGS)
            .map(|i| (i.to_string(), json!(i)))
            .collect();
        let cases = [
            (dweet(json!([1, 2])), "not a JSON object"),
            (dweet(json!("text")), "not a JSON object"),
            (dweet(deep), "deeper than 32"),
            (dweet(Value::Object(wide)), "more than 10000"),
            (
                Dweet {
                    created: Created::new("yesterday"),
                    ..dweet(json!({}))
                },
                "not an RFC 3339",
            ),
            (
                Dweet {
                    thing: String::new(),
                    ..dweet(json!({}))
                },
                "empty thing",
            ),
        ];
        for (input, reason) in cases {
            match normalize(&input, 7) {
                Record::DeadLetter(letter) => {
                    assert!(
                        letter.reason.contains(reason),
                        "{} vs {reason}",
                        letter.reason
                    );
                    assert_eq!(letter.received_ms, 7);
                    assert!(!letter.payload.is_empty(), "the payload is kept");
                }
                Record::Dweet(_) => panic!("expected a dead letter for {reason}"),
            }
        }
    }
}
