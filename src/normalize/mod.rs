//! Turns a dweet into rows: one lossless raw record, and one reading per numeric leaf of its
//! content, named by the leaf's dotted path (`sensors.TemperatureC`, `globals.dweet-count`).
//!
//! Booleans become 0/1; strings and nulls live only in the raw record. What cannot be turned
//! into rows (content that is not an object, nests too deep, has a bad timestamp, is a line
//! that was not a dweet at all) becomes a dead letter with the reason: nothing is dropped
//! silently and nothing here can panic.

mod frame;
mod leaves;
mod line;
mod shape;

pub use frame::StreamReader;
pub use line::{read_dweet_line, read_dweet_text};

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::client::{Dweet, RawDweet, TextDweet};
use crate::record::{DeadLetter, Normalized, Reading, Record, created_text_to_keep};

/// Deeper content is refused: no sensor payload nests this far, and recursion must be bounded.
pub const MAX_DEPTH: usize = 32;
/// More numeric leaves than this in one dweet is refused as unusable (the public service's
/// 2000-character limit allows a few hundred).
pub const MAX_READINGS: usize = 10_000;

/// Normalises one dweet received at `received_ms`. For a stream of dweets, a [`Normalizer`]
/// per thing shares sensor names between them.
pub fn normalize(dweet: &Dweet, received_ms: i64) -> Record {
    let created_ms = dweet.created.to_ms();
    let content = serde_json::value::to_raw_value(&dweet.content)
        .unwrap_or_else(|_| RawValue::NULL.to_owned());
    let raw = RawDweet {
        thing: dweet.thing.clone(),
        created: dweet.created.clone(),
        content,
    };
    Normalizer::default().normalize(raw, created_ms, received_ms)
}

/// Normalises one thing's dweets. It walks each content's JSON text once, without building a
/// tree, keeps that text as the raw record, and reuses the previous dweet's sensor names
/// while a board keeps sending the same shape: a reading then costs no allocation.
#[derive(Debug, Default)]
pub struct Normalizer {
    /// The sensor names of the last dweet whose names were not all reused; never two alike.
    sensors: Vec<Arc<str>>,
    /// The last content walked: the next one of the same shape is read without a walk.
    shape: shape::Shape,
    /// When that shape is tried.
    tries: shape::Tries,
    /// Room for a leaf's dotted path, kept between dweets.
    path: String,
}

impl Normalizer {
    /// Normalises `dweet`, received at `received_ms`, whose `created` the caller has already
    /// parsed (to ms; `None` when it is not a timestamp) so the hot path parses it once.
    pub fn normalize(
        &mut self,
        dweet: impl Into<TextDweet>,
        created_ms: Option<i64>,
        received_ms: i64,
    ) -> Record {
        assemble(dweet.into(), created_ms, received_ms, |content| {
            self.readings(content)
        })
    }

    /// The readings of an object's JSON text, in document order. A name that repeats within
    /// one object keeps its first place and its last value, as a parsed JSON object would.
    fn readings(&mut self, content: &str) -> Result<Vec<Reading>, String> {
        self.walk(content)
            .map(|(readings, _)| readings)
            .map_err(leaves::Stop::reason)
    }

    /// The readings of the JSON value at the start of `text` and where it ends (for the line
    /// reader, which finds the content's end this way); `None` where the walk stops (not
    /// JSON, too deep, too many readings), which `normalize` then reports.
    fn readings_at_start(&mut self, text: &str) -> Option<(Vec<Reading>, usize)> {
        self.walk(text).ok()
    }

    /// Frees the last content's shape, for a reader that keeps a shape of its own (5 MiB of
    /// ten thousand streams' memory at load, measured by the fan-in harness).
    fn drop_shape(&mut self) {
        self.shape = shape::Shape::default();
    }

    fn walk(&mut self, text: &str) -> Result<(Vec<Reading>, usize), leaves::Stop> {
        let tried = self.tries.due();
        if tried && let Some(read) = self.shape.read(text) {
            self.tries.fitted();
            return Ok(read);
        }
        self.tries.missed();
        let mut path = std::mem::take(&mut self.path);
        path.clear();
        // The walk's slots are the shape's from then on: a thing keeps one set, not two. Sized
        // as the last names were, they are allocated once.
        let mut slots = Vec::with_capacity(self.sensors.len() + 4);
        let walked = leaves::walk(text, &self.sensors, &mut path, &mut slots);
        self.path = path;
        // Content the walk stops at leaves the shape as it was, for the next content.
        let (mut readings, all_known, end) = walked?;
        // Names all reused from a list with none alike cannot repeat; anything else is
        // checked, and becomes the list the next dweet's names are compared with.
        let mut merged = false;
        if !all_known {
            merged = keep_last_of_repeated_names(&mut readings);
            self.sensors = readings.iter().map(|r| Arc::clone(&r.sensor)).collect();
        }
        // Readings merged under a repeated name are not one per slot: no shape holds them.
        match text.get(..end) {
            Some(content) if tried && !merged => {
                self.shape.keep(content, slots, &readings);
            }
            _ if tried => self.shape.forget(),
            _ => {}
        }
        Ok((readings, end))
    }
}

/// A dweet as an ingest source read it: its text, and its readings when the line reader
/// ([`read_dweet_line`]) found them already; a dweet serde_json read has none yet.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "RawDweet")]
pub struct ReadDweet {
    pub dweet: TextDweet,
    pub readings: Option<Vec<Reading>>,
}

impl From<RawDweet> for ReadDweet {
    fn from(raw: RawDweet) -> Self {
        ReadDweet {
            dweet: raw.into(),
            readings: None,
        }
    }
}

impl ReadDweet {
    /// The record, with the readings already found or found now by `normalizer`.
    pub fn normalize(
        self,
        normalizer: &mut Normalizer,
        created_ms: Option<i64>,
        received_ms: i64,
    ) -> Record {
        match self.readings {
            // They are only used once the content is known to be an object.
            Some(readings) => assemble(self.dweet, created_ms, received_ms, |_| Ok(readings)),
            None => normalizer.normalize(self.dweet, created_ms, received_ms),
        }
    }
}

/// The checks every dweet goes through, in order, with its readings from `readings` once it
/// is known to have an object for content.
fn assemble(
    dweet: TextDweet,
    created_ms: Option<i64>,
    received_ms: i64,
    readings: impl FnOnce(&str) -> Result<Vec<Reading>, String>,
) -> Record {
    let dead = |dweet: &TextDweet, reason: String| {
        Record::DeadLetter(DeadLetter {
            thing: Some(dweet.thing().to_owned()),
            created: Some(dweet.created().as_str().to_owned()),
            created_ms,
            received_ms,
            payload: dweet.to_json(),
            reason,
        })
    };
    if dweet.thing().is_empty() {
        return dead(&dweet, "the dweet has an empty thing name".to_owned());
    }
    let Some(created_ms) = created_ms else {
        let reason = format!(
            "`created` {:?} is not an RFC 3339 timestamp",
            dweet.created().as_str()
        );
        return dead(&dweet, reason);
    };
    let kind = json_kind(dweet.content());
    if kind != "an object" {
        return dead(&dweet, format!("the content is {kind}, not a JSON object"));
    }
    let readings = match readings(dweet.content()) {
        Ok(readings) => readings,
        Err(reason) => return dead(&dweet, reason),
    };
    let (thing, created, content) = dweet.into_parts();
    Record::Dweet(Normalized {
        created_text: created_text_to_keep(created.as_str(), created_ms),
        thing,
        created_ms,
        received_ms,
        content,
        readings,
    })
}

/// Merges readings of one name into the first's place with the last's value; whether any were.
fn keep_last_of_repeated_names(readings: &mut Vec<Reading>) -> bool {
    let mut first: HashMap<Arc<str>, usize> = HashMap::with_capacity(readings.len());
    let mut keep = vec![true; readings.len()];
    for index in 0..readings.len() {
        match first.entry(Arc::clone(&readings[index].sensor)) {
            std::collections::hash_map::Entry::Occupied(place) => {
                readings[*place.get()].value = readings[index].value;
                keep[index] = false;
            }
            std::collections::hash_map::Entry::Vacant(place) => {
                place.insert(index);
            }
        }
    }
    let before = readings.len();
    let mut flags = keep.into_iter();
    readings.retain(|_| flags.next().unwrap_or(true));
    readings.len() != before
}

/// What a JSON text is, named for a dead letter's reason, from its first character (the
/// text has already been validated as JSON).
fn json_kind(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Created;
    use serde_json::{Value, json};

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
            Record::Dweet(n) => n.readings.iter().map(|r| (&*r.sensor, r.value)).collect(),
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

    fn raw(thing: &str, content: &str) -> RawDweet {
        RawDweet {
            thing: thing.to_owned(),
            created: Created::new("2014-03-19T10:38:46.010Z"),
            content: RawValue::from_string(content.to_owned()).unwrap(),
        }
    }

    #[test]
    fn the_content_is_kept_byte_for_byte_as_it_arrived() {
        let text =
            r#"{ "z": 1, "big": 123456789012345678901234567890, "a": {"\u00e9t\u00e9": -0} }"#;
        let Record::Dweet(n) = Normalizer::default().normalize(raw("t", text), Some(1), 2) else {
            panic!("expected a dweet");
        };
        assert_eq!(
            n.content, text,
            "spacing, key order, big integers and escapes intact"
        );
        let got: Vec<(&str, f64)> = n.readings.iter().map(|r| (&*r.sensor, r.value)).collect();
        assert_eq!(
            got,
            vec![("z", 1.0), ("big", 1.2345678901234568e29), ("a.été", 0.0)]
        );
        assert!(
            n.readings[2].value.is_sign_positive(),
            "-0 is the integer 0, which has no sign"
        );
    }

    #[test]
    fn a_repeated_name_keeps_its_first_place_and_last_value() {
        let mut normalizer = Normalizer::default();
        let Record::Dweet(n) = normalizer.normalize(raw("t", r#"{"a":1,"b":2,"a":3}"#), Some(1), 2)
        else {
            panic!("expected a dweet");
        };
        let got: Vec<(&str, f64)> = n.readings.iter().map(|r| (&*r.sensor, r.value)).collect();
        assert_eq!(
            got,
            vec![("a", 3.0), ("b", 2.0)],
            "as a parsed object has it"
        );
    }

    #[test]
    fn sensor_names_are_shared_from_one_dweet_to_the_next() {
        let mut normalizer = Normalizer::default();
        let mut next = |content: &str| match normalizer.normalize(raw("t", content), Some(1), 2) {
            Record::Dweet(n) => n.readings,
            Record::DeadLetter(letter) => panic!("dead letter: {}", letter.reason),
        };
        let first = next(r#"{"s":{"x":1,"y":2}}"#);
        let second = next(r#"{"s":{"x":3,"y":4}}"#);
        assert!(
            first
                .iter()
                .zip(&second)
                .all(|(a, b)| Arc::ptr_eq(&a.sensor, &b.sensor))
        );
        let changed = next(r#"{"s":{"x":5,"z":6}}"#);
        assert_eq!(&*changed[1].sensor, "s.z", "a new shape gets its own names");
        assert!(Arc::ptr_eq(&changed[0].sensor, &first[0].sensor));
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
