//! The JetStream output (`[nats]`): every stored dweet, with its readings, published to a
//! JetStream stream for applications that want the fleet live.
//!
//! ```text
//! subject  dweetpipe.dweets.<thing>            (bytes other than A-Z a-z 0-9 - _ as %XX)
//! header   Nats-Msg-Id: <thing>@<created>      (JetStream drops a repeat within its window)
//! payload  {"thing", "created", "content", "readings": {"sensor": value}}
//! ```
//!
//! Exactly once per dweet, in order per thing: a thing's dweets arrive oldest first, and the
//! sink skips any not newer than the last one the stream holds for its subject (asked of the
//! stream once per thing, and again after the thing moved between cluster members); a repeat
//! inside the duplicate window (a retried batch) is dropped by JetStream on its id.

mod run;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};

use crate::nats::{NatsError, redact_urls};
use crate::protocol::format_created;
use crate::record::{Normalized, Record, ms_to_datetime};
use crate::settings::Invalid;
use crate::sink::Watermarks;

/// Subjects of the stream: `dweetpipe.dweets.<thing>`.
/// Subjects start with this unless `[nats] subject_prefix` says otherwise.
pub const SUBJECT_PREFIX: &str = "dweetpipe.dweets";
/// The header carrying the dweet's `created` in ms, so the last one can be read back cheaply.
const CREATED_MS_HEADER: &str = "Dweetpipe-Created-Ms";
/// How long JetStream remembers message ids to drop repeats.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The `[nats]` section.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:4222` (several comma-separated). Default: `[cluster]`'s address.
    #[serde(default)]
    pub url: Option<String>,
    /// The variable holding `url`.
    #[serde(default)]
    pub url_env: Option<String>,
    /// The JetStream stream, created (file storage) when missing. Default `dweetpipe-dweets`.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Subjects are `<subject_prefix>.<thing>`; the stream takes `<subject_prefix>.>`. Two
    /// deployments sharing a NATS server need different ones (JetStream refuses two streams
    /// over the same subjects). Default `dweetpipe.dweets`.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// Records held in memory while NATS is down, before the spool. Default 100,000.
    #[serde(default = "crate::sink::backlog::default_memory_max_rows")]
    pub memory_max_rows: usize,
    /// Where records wait on disk while NATS is down. Default `data/nats-spool`.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// The spool's bound; past it records are dropped, counted and logged. Default 1GiB.
    #[serde(
        default = "crate::sink::backlog::default_spool_max",
        deserialize_with = "crate::settings::byte_size"
    )]
    pub spool_max: u64,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url.as_deref().map(redact_urls))
            .field("url_env", &self.url_env)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("memory_max_rows", &self.memory_max_rows)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max", &self.spool_max)
            .finish()
    }
}

fn default_subject_prefix() -> String {
    SUBJECT_PREFIX.to_owned()
}

fn default_stream() -> String {
    "dweetpipe-dweets".to_owned()
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("data/nats-spool")
}

impl NatsConfig {
    /// The buffer settings of this section.
    pub fn backlog(&self) -> crate::sink::backlog::BacklogConfig {
        crate::sink::backlog::BacklogConfig {
            memory_max_rows: self.memory_max_rows,
            spool_dir: self.spool_dir.clone(),
            spool_max: self.spool_max,
        }
    }

    /// Resolves `url_env` (or takes `cluster_url`) into `url` and checks values; keys in the
    /// error are relative to `[nats]`.
    pub fn resolve(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
        cluster_url: Option<&str>,
    ) -> Result<(), Invalid> {
        self.url = Some(crate::settings::address(
            ("url", self.url.as_deref()),
            ("url_env", self.url_env.as_deref()),
            &env,
            cluster_url,
            "set url = \"nats://127.0.0.1:4222\" (or url_env), or add a [cluster] section whose address it then uses",
        )?);
        let valid = !self.stream.is_empty()
            && self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(Invalid::new(
                "stream",
                format!("{:?} is not a usable stream name", self.stream),
                "use letters, digits, '-' and '_'",
            ));
        }
        let usable_token = |token: &str| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !self.subject_prefix.split('.').all(usable_token) {
            return Err(Invalid::new(
                "subject_prefix",
                format!("{:?} is not a usable subject prefix", self.subject_prefix),
                "use tokens of letters, digits, '-' and '_' joined by '.', e.g. \"site2.dweets\"",
            ));
        }
        Ok(())
    }
}

/// `thing`'s subject under `prefix`: bytes that NATS gives a meaning to (`.`, `*`, `>`,
/// spaces) and any other outside `A-Z a-z 0-9 - _` are written `%XX`, so every thing has one
/// token.
pub fn subject_of(prefix: &str, thing: &str) -> String {
    let mut subject = String::with_capacity(prefix.len() + 1 + thing.len());
    subject.push_str(prefix);
    subject.push('.');
    for byte in thing.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            subject.push(char::from(byte));
        } else {
            subject.push_str(&format!("%{byte:02X}"));
        }
    }
    subject
}

/// One published dweet, as consumers read it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Published {
    pub thing: String,
    pub created: String,
    pub content: Box<serde_json::value::RawValue>,
    pub readings: serde_json::Map<String, serde_json::Value>,
}

fn payload(dweet: &Normalized) -> Vec<u8> {
    // The content was decoded from JSON, so it is JSON; `null` is never reached.
    let content =
        serde_json::value::RawValue::from_string(dweet.content.clone()).unwrap_or_default();
    let published = Published {
        thing: dweet.thing.clone(),
        created: dweet.created().into_owned(),
        content,
        readings: dweet
            .readings
            .iter()
            .map(|r| (r.sensor.to_string(), serde_json::Value::from(r.value)))
            .collect(),
    };
    serde_json::to_vec(&published).unwrap_or_default()
}

/// A connection to the output stream, with what it holds per thing.
pub struct NatsSink {
    js: jetstream::Context,
    stream: stream::Stream,
    urls: String,
    /// `[nats] subject_prefix`.
    prefix: String,
    /// The newest `created` the stream holds per thing (asked once per thing).
    published: Watermarks,
}

impl NatsSink {
    /// Opens (creating when missing) the stream on `client`.
    pub async fn open(
        client: async_nats::Client,
        config: &NatsConfig,
    ) -> Result<NatsSink, NatsError> {
        let urls = config.url.clone().unwrap_or_default();
        let js = jetstream::new(client);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: vec![format!("{}.>", config.subject_prefix)],
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                NatsError::new(&urls, format!("cannot open stream {}: {e}", config.stream))
            })?;
        Ok(NatsSink {
            js,
            stream,
            urls,
            prefix: config.subject_prefix.clone(),
            published: Watermarks::new(),
        })
    }

    /// The newest `created` the stream holds for `thing`, asked of the stream the first time.
    async fn newest(&mut self, thing: &str) -> Result<i64, NatsError> {
        if let Some(mark) = self.published.get(thing) {
            return Ok(mark);
        }
        let mark = last_created(&self.stream, &subject_of(&self.prefix, thing))
            .await
            .map_err(|error| NatsError::new(&self.urls, error))?;
        self.published.set(thing.to_owned(), mark);
        Ok(mark)
    }

    /// Forgets what it learnt of the stream: another member may have published since (a thing
    /// moved here).
    pub fn forget(&mut self) {
        self.published.clear();
    }

    /// Publishes the dweets of `records` the stream does not hold yet and waits for every
    /// acknowledgement. Returns how many were skipped as already held.
    pub async fn publish(&mut self, records: &[&Record]) -> Result<usize, NatsError> {
        let mut acks = Vec::new();
        let mut newest: HashMap<&str, i64> = HashMap::new();
        let mut skipped = 0;
        for record in records {
            let Record::Dweet(dweet) = record else {
                continue;
            };
            let held = match newest.get(dweet.thing.as_str()) {
                Some(mark) => *mark,
                None => self.newest(&dweet.thing).await?,
            };
            if dweet.created_ms <= held {
                skipped += 1;
                continue;
            }
            let mut headers = async_nats::HeaderMap::new();
            // The id names the instant, not its spelling, so one dweet keeps one id whichever
            // way its `created` was written.
            let instant = format_created(ms_to_datetime(dweet.created_ms));
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("{}@{instant}", dweet.thing).as_str(),
            );
            headers.insert(CREATED_MS_HEADER, dweet.created_ms.to_string().as_str());
            let ack = self
                .js
                .publish_with_headers(
                    subject_of(&self.prefix, &dweet.thing),
                    headers,
                    payload(dweet).into(),
                )
                .await
                .map_err(|e| NatsError::new(&self.urls, e))?;
            acks.push((dweet.thing.as_str(), dweet.created_ms, ack));
            newest.insert(&dweet.thing, dweet.created_ms);
        }
        // Marks move only over what JetStream acknowledged, in order: after a refusal the
        // rest is published again (a repeat inside the duplicate window is dropped by its
        // id), rather than skipped below a later message the stream took.
        for (thing, created_ms, ack) in acks {
            ack.await.map_err(|e| NatsError::new(&self.urls, e))?;
            self.published.raise(thing, created_ms);
        }
        Ok(skipped)
    }

    /// The newest `created` the stream holds for each of `things` (start-up watermarks).
    /// Asked `START_QUERIES` at a time: a start with thousands of things would otherwise
    /// spend its whole patience on round trips, one after another.
    pub async fn watermarks(&mut self, things: &[String]) -> Result<Watermarks, NatsError> {
        use futures_util::StreamExt;
        let (stream, prefix) = (&self.stream, &self.prefix);
        // Owned names: a closure over borrowed ones is not `Send` for every lifetime, which
        // a boxed start-up future needs.
        let answers: Vec<(String, Result<i64, stream::LastRawMessageError>)> =
            futures_util::stream::iter(things.iter().cloned())
                .map(|thing| async move {
                    let answer = last_created(stream, &subject_of(prefix, &thing)).await;
                    (thing, answer)
                })
                .buffer_unordered(START_QUERIES)
                .collect()
                .await;
        let mut marks = Watermarks::new();
        for (thing, answer) in answers {
            let mark = answer.map_err(|error| NatsError::new(&self.urls, error))?;
            self.published.set(thing.clone(), mark);
            if mark != i64::MIN {
                marks.set(thing, mark);
            }
        }
        Ok(marks)
    }
}

/// Things asked about at once at start-up.
const START_QUERIES: usize = 64;

/// The `created` (ms) of the last message the stream holds on `subject` (a thing's),
/// `i64::MIN` for none.
async fn last_created(
    stream: &stream::Stream,
    subject: &str,
) -> Result<i64, stream::LastRawMessageError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(message
            .headers
            .get(CREATED_MS_HEADER)
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(i64::MIN)),
        Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(i64::MIN)
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Reading;

    #[test]
    fn every_thing_is_one_subject_token() {
        assert_eq!(
            subject_of(SUBJECT_PREFIX, "S5D9-0001"),
            "dweetpipe.dweets.S5D9-0001"
        );
        assert_eq!(
            subject_of(SUBJECT_PREFIX, "a.b c>*"),
            "dweetpipe.dweets.a%2Eb%20c%3E%2A"
        );
        assert_eq!(subject_of("site2.dweets", "café"), "site2.dweets.caf%C3%A9");
    }

    #[test]
    fn a_subject_prefix_is_checked_token_by_token() {
        for (prefix, usable) in [
            ("dweetpipe.dweets", true),
            ("site2", true),
            ("a-b.c_d.9", true),
            ("", false),
            ("a..b", false),
            (".a", false),
            ("a.", false),
            ("a.*", false),
            ("a.>", false),
            ("a b", false),
        ] {
            let mut config: NatsConfig =
                toml::from_str(&format!("subject_prefix = {prefix:?}")).unwrap();
            let checked = config.resolve(|_| None, Some("nats://h:4222"));
            assert_eq!(checked.is_ok(), usable, "{prefix:?}: {checked:?}");
            if let Err(invalid) = checked {
                assert_eq!(invalid.key, "subject_prefix");
            }
        }
    }

    #[test]
    fn the_payload_keeps_the_content_as_it_came() {
        let dweet = Normalized {
            thing: "t".to_owned(),
            created_ms: 1_795_000_000_000,
            created_text: None,
            received_ms: 1_795_000_000_005,
            content: r#"{"big":12345678901234567890,"t":1.5}"#.to_owned(),
            readings: vec![Reading {
                sensor: "t".into(),
                value: 1.5,
            }],
        };
        let read: Published = serde_json::from_slice(&payload(&dweet)).unwrap();
        assert_eq!(read.content.get(), dweet.content);
        assert_eq!(read.created, "2026-11-18T11:06:40.000Z");
        assert_eq!(read.readings["t"], 1.5);
        let spelled_otherwise = Normalized {
            created_text: Some("2026-11-18T12:06:40+01:00".into()),
            ..dweet
        };
        let read: Published = serde_json::from_slice(&payload(&spelled_otherwise)).unwrap();
        assert_eq!(read.created, "2026-11-18T12:06:40+01:00");
    }

    #[test]
    fn the_address_comes_from_the_cluster_or_must_be_given() {
        let mut config: NatsConfig = toml::from_str("").unwrap();
        assert_eq!(config.resolve(|_| None, None).unwrap_err().key, "url");
        config.resolve(|_| None, Some("nats://h:4222")).unwrap();
        assert_eq!(config.url.as_deref(), Some("nats://h:4222"));
        let mut secret: NatsConfig = toml::from_str("url = \"nats://u:hunter2@h\"").unwrap();
        secret.resolve(|_| None, None).unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
