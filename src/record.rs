//! What flows from normalisation to the sinks: a dweet's raw record with its readings, or a
//! dead letter. Every layer below the worker can import these without going up.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A dweet that normalised: its raw record and its readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalized {
    pub thing: String,
    /// `created`, milliseconds since the Unix epoch (UTC).
    pub created_ms: i64,
    pub received_ms: i64,
    /// The content's JSON text exactly as it arrived (big integers and key order intact).
    pub content: String,
    pub readings: Vec<Reading>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_before_a_moment_saturates() {
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(ms_before(10 * 86_400_000, day), 9 * 86_400_000);
        assert!(ms_before(0, std::time::Duration::MAX) <= i64::MIN + 1);
    }
}
