//! The values the dweet.io API speaks in: dweets, alerts, and the key of a locked thing.
//!
//! They serialise in the protocol's key order, so the sandbox answers with the very structs the
//! client decodes and the two cannot disagree about field names or order.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::protocol;

/// One dweet. `transaction` is present only on the answer to a write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dweet {
    pub thing: String,
    pub created: Created,
    /// The content as sent. Normally a JSON object; kept as a `Value` so that a clone which
    /// sends something else is still decoded and can be dead-lettered by the caller.
    pub content: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<String>,
}

/// A dweet whose content stays the JSON text it arrived as: what the ingest path decodes.
/// Content is then parsed once, for its readings, and never re-serialised, so big integers,
/// key order and every byte of it reach the sinks as sent. A `transaction` is ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawDweet {
    pub thing: String,
    pub created: Created,
    pub content: Box<RawValue>,
}

/// A dweet whose content is JSON text already checked: what an import holds and the
/// normaliser reads. It comes only from a [`RawDweet`] (serde_json checked it) or from the
/// normaliser's line reader (which holds it to JSON's grammar as it walks it), so its content
/// is always JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct TextDweet {
    thing: String,
    created: Created,
    content: String,
}

impl TextDweet {
    /// Only for content checked to be JSON.
    pub(crate) fn from_checked_parts(thing: String, created: Created, content: String) -> Self {
        TextDweet {
            thing,
            created,
            content,
        }
    }

    pub fn thing(&self) -> &str {
        &self.thing
    }

    pub fn created(&self) -> &Created {
        &self.created
    }

    pub fn content(&self) -> &str {
        &self.content
    }

    pub fn into_parts(self) -> (String, Created, String) {
        (self.thing, self.created, self.content)
    }

    /// The dweet as JSON, as a [`RawDweet`] serialises: its content byte for byte.
    pub fn to_json(&self) -> String {
        let text = |value: &str| serde_json::to_string(value).unwrap_or_default();
        format!(
            r#"{{"thing":{},"created":{},"content":{}}}"#,
            text(&self.thing),
            text(self.created.as_str()),
            self.content
        )
    }
}

impl From<RawDweet> for TextDweet {
    fn from(raw: RawDweet) -> Self {
        let content: Box<str> = raw.content.into();
        TextDweet {
            thing: raw.thing,
            created: raw.created,
            content: content.into_string(),
        }
    }
}

/// A dweet's `created` timestamp, kept as the exact string the server sent so it round-trips
/// byte for byte (dedupe keys and re-exports must match what the server said, not our
/// re-rendering of it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Created(String);

impl Created {
    pub fn new(text: impl Into<String>) -> Self {
        Created(text.into())
    }

    pub fn from_datetime(at: DateTime<Utc>) -> Self {
        Created(protocol::format_created(at))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The instant, or `None` when the server sent something that is not RFC 3339.
    pub fn to_datetime(&self) -> Option<DateTime<Utc>> {
        protocol::parse_created(&self.0)
    }

    /// Milliseconds since the Unix epoch, as records carry it.
    pub fn to_ms(&self) -> Option<i64> {
        protocol::created_ms(&self.0)
    }
}

impl fmt::Display for Created {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The master key of a lock. Its `Debug` and `Display` never show the secret, so a key held in
/// a struct that gets logged does not leak.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(String);

impl Key {
    pub fn new(secret: impl Into<String>) -> Self {
        Key(secret.into())
    }

    /// The secret itself, for putting on the wire. Call sites are easy to audit by this name.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Key {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Key::new(text))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// An alert as `set_alert` returns it; `get_alert` adds `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub thing: String,
    pub condition: String,
    #[serde(default)]
    pub is_demo: bool,
    pub recipients: Vec<Recipient>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AlertStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    #[serde(rename = "type")]
    pub kind: String,
    pub address: String,
}

impl Recipient {
    pub fn email(address: impl Into<String>) -> Self {
        Recipient {
            kind: "email".to_owned(),
            address: address.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertStatus {
    pub message: String,
    pub since: Option<String>,
    pub open: bool,
    pub alerts_sent_today: u32,
    pub alerts_allowed_today: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dweet_keeps_key_order_and_big_integers() {
        let text = r#"{"thing":"t","created":"2014-03-19T10:38:46.010Z","content":{"z":6816513845,"a":1}}"#;
        let dweet: Dweet = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&dweet).unwrap(), text);
        assert_eq!(dweet.created.as_str(), "2014-03-19T10:38:46.010Z");
    }

    #[test]
    fn a_text_dweet_is_written_as_its_raw_dweet_is() {
        let text = r#"{"thing":"t\"\u00e9\n","created":"2014-03-19T10:38:46Z","content":{ "z" : [6816513845, "\u00e9"] }}"#;
        let raw: RawDweet = serde_json::from_str(text).unwrap();
        let expected = serde_json::to_string(&raw).unwrap();
        assert_eq!(TextDweet::from(raw).to_json(), expected);
    }

    #[test]
    fn key_is_redacted_in_debug() {
        let key = Key::new("hunter2");
        assert!(!format!("{key:?}").contains("hunter2"));
        assert_eq!(key.expose(), "hunter2");
    }
}

/// An alert's opening or closing, as `get_stored_alerts_for` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAlert {
    pub thing: String,
    /// The `created` of the dweet whose verdict opened or closed the alert.
    pub created: String,
    /// `opened` or `closed`.
    pub kind: String,
    /// What the condition returned (empty on a closing).
    #[serde(default)]
    pub message: String,
}

/// Which stored dweets or alert events to ask for: a UTC day, or one hour of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredWindow {
    pub date: chrono::NaiveDate,
    /// 0–23, or `None` for the whole day.
    pub hour: Option<u8>,
}
