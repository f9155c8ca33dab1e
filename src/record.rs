//! What flows from normalisation to the sinks: a dweet's raw record with its readings, or a
//! dead letter. Every layer below the worker can import these without going up.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A dweet that normalised: its raw record and its readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalized {
    pub thing: String,
    /// `created`, milliseconds since the Unix epoch (UTC).
    pub created_ms: i64,
    /// `created` as it arrived, kept only when formatting `created_ms` would not give it back
    /// (another precision, an offset, lower case): the common case carries nothing extra.
    /// Read it through [`Normalized::created`].
    pub created_text: Option<Box<str>>,
    pub received_ms: i64,
    /// The content's JSON text exactly as it arrived (big integers and key order intact).
    pub content: String,
    pub readings: Vec<Reading>,
}

impl Normalized {
    /// `created` exactly as the dweet arrived with it.
    pub fn created(&self) -> Cow<'_, str> {
        match &self.created_text {
            Some(text) => Cow::Borrowed(text),
            None => Cow::Owned(crate::protocol::format_created(ms_to_datetime(
                self.created_ms,
            ))),
        }
    }
}

/// What [`Normalized::created_text`] keeps of `text`, which parsed to `created_ms`: nothing
/// when dweet.io's own format of that instant is the same text.
pub fn created_text_to_keep(text: &str, created_ms: i64) -> Option<Box<str>> {
    if crate::protocol::is_canonical_created(text) {
        return None;
    }
    let canonical = crate::protocol::format_created(ms_to_datetime(created_ms));
    (canonical != text).then(|| text.into())
}

/// One numeric leaf; its time and thing are the dweet's. The sensor name is shared: a board
/// sends the same names in every dweet, and normalisation hands out one copy of each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub sensor: Arc<str>,
    pub value: f64,
}

/// Something that could not become rows, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub thing: Option<String>,
    /// The dweet's `created` as sent, when there was one.
    pub created: Option<String>,
    /// `created` in ms, when it parsed: the sinks' dedupe key.
    pub created_ms: Option<i64>,
    pub received_ms: i64,
    pub payload: String,
    pub reason: String,
}

/// What the pipeline carries from sources to sinks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Dweet(Normalized),
    DeadLetter(DeadLetter),
}

impl Record {
    pub fn thing(&self) -> Option<&str> {
        match self {
            Record::Dweet(dweet) => Some(&dweet.thing),
            Record::DeadLetter(letter) => letter.thing.as_deref(),
        }
    }

    /// The dweet's `created` in ms: the sinks' dedupe key, when there is one.
    pub fn created_ms(&self) -> Option<i64> {
        match self {
            Record::Dweet(dweet) => Some(dweet.created_ms),
            Record::DeadLetter(letter) => letter.created_ms,
        }
    }

    pub fn received_ms(&self) -> i64 {
        match self {
            Record::Dweet(dweet) => dweet.received_ms,
            Record::DeadLetter(letter) => letter.received_ms,
        }
    }

    /// The dweet, when this record is one.
    pub fn as_dweet(&self) -> Option<&Normalized> {
        match self {
            Record::Dweet(dweet) => Some(dweet),
            Record::DeadLetter(_) => None,
        }
    }
}

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// The ms `span` before `ms` (retention cut-offs, grace periods, horizons), saturating.
pub fn ms_before(ms: i64, span: std::time::Duration) -> i64 {
    ms.saturating_sub(i64::try_from(span.as_millis()).unwrap_or(i64::MAX))
}

pub fn ms_to_datetime(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// A dweet record for unit tests: received as created, empty content, the given readings.
#[cfg(test)]
pub(crate) fn test_dweet(thing: &str, created_ms: i64, readings: &[(&str, f64)]) -> Record {
    Record::Dweet(Normalized {
        thing: thing.to_owned(),
        created_ms,
        created_text: None,
        received_ms: created_ms,
        content: "{}".to_owned(),
        readings: readings
            .iter()
            .map(|(sensor, value)| Reading {
                sensor: (*sensor).into(),
                value: *value,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_created_text_that_formatting_would_not_give_back_is_kept() {
        let cases = [
            ("2014-03-19T10:38:46.010Z", false),
            ("2014-03-19T10:38:46Z", true),
            ("2014-03-19T10:38:46.010123Z", true),
            ("2014-03-19T11:38:46.010+01:00", true),
            ("2014-03-19t10:38:46.010z", true),
            ("2016-12-31T23:59:60.500Z", true),
        ];
        for (text, kept) in cases {
            let ms = crate::protocol::parse_created(text)
                .map(|at| at.timestamp_millis())
                .expect(text);
            let keep = created_text_to_keep(text, ms);
            assert_eq!(keep.is_some(), kept, "{text}");
            let dweet = Normalized {
                thing: "t".to_owned(),
                created_ms: ms,
                created_text: keep,
                received_ms: ms,
                content: "{}".to_owned(),
                readings: Vec::new(),
            };
            assert_eq!(dweet.created(), text, "{text}");
        }
    }

    #[test]
    fn a_span_before_a_moment_saturates() {
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(ms_before(10 * 86_400_000, day), 9 * 86_400_000);
        assert!(ms_before(0, std::time::Duration::MAX) <= i64::MIN + 1);
    }
}
