//! Where dweets come from: the `[source]` section, each configured thing, and one subscription
//! task per thing (subscribe, backfill, stream, reconnect) that turns them into records.

pub mod subscription;

use std::time::Duration;

use serde::Deserialize;

use crate::alert::AlertSpec;
use crate::client::{Client, Key};
use crate::settings::{Invalid, redact_url};

/// How the worker reads a thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceMode {
    /// Hold a listen stream open (the default).
    #[default]
    Stream,
    /// Poll `get_dweets_for` every `poll_interval`, for servers without streaming.
    Poll,
}

impl<'de> Deserialize<'de> for SourceMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "stream" => Ok(SourceMode::Stream),
            "poll" => Ok(SourceMode::Poll),
            other => Err(serde::de::Error::custom(format!(
                "mode {other:?} is not \"stream\" or \"poll\""
            ))),
        }
    }
}

/// The `[source]` section. Only `url` is needed; the rest are tuning knobs with defaults for
/// the public service's behaviour.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub url: String,
    #[serde(default)]
    pub mode: SourceMode,
    #[serde(
        default = "defaults::poll_interval",
        deserialize_with = "crate::settings::duration"
    )]
    pub poll_interval: Duration,
    /// A stream silent for this long is reopened; above the server's own 60 s idle close.
    #[serde(
        default = "defaults::idle_timeout",
        deserialize_with = "crate::settings::duration"
    )]
    pub idle_timeout: Duration,
    #[serde(
        default = "defaults::reconnect_min",
        deserialize_with = "crate::settings::duration"
    )]
    pub reconnect_min: Duration,
    #[serde(
        default = "defaults::reconnect_max",
        deserialize_with = "crate::settings::duration"
    )]
    pub reconnect_max: Duration,
    /// A connection up this long resets the backoff.
    #[serde(
        default = "defaults::healthy_after",
        deserialize_with = "crate::settings::duration"
    )]
    pub healthy_after: Duration,
    /// Wait after a refusal (locked, wrong key, unknown thing) before trying again.
    #[serde(
        default = "defaults::refused_retry",
        deserialize_with = "crate::settings::duration"
    )]
    pub refused_retry: Duration,
    /// Subscriptions start at random offsets within this window, so a restart is no herd.
    #[serde(
        default = "defaults::start_spread",
        deserialize_with = "crate::settings::duration"
    )]
    pub start_spread: Duration,
    #[serde(
        default = "defaults::request_timeout",
        deserialize_with = "crate::settings::duration"
    )]
    pub request_timeout: Duration,
    /// How far back the source keeps a thing's history (dweet.io: 24h; a `dweetpipe sandbox`:
    /// its `--retention`). Parquet's start-up recovery reads what it wrote this far back, and
    /// two days more.
    #[serde(
        default = "defaults::history",
        deserialize_with = "crate::settings::duration"
    )]
    pub history: Duration,
}

mod defaults {
    use std::time::Duration;
    pub fn poll_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(90)
    }
    pub fn reconnect_min() -> Duration {
        Duration::from_secs(1)
    }
    pub fn reconnect_max() -> Duration {
        Duration::from_secs(60)
    }
    pub fn healthy_after() -> Duration {
        Duration::from_secs(30)
    }
    pub fn refused_retry() -> Duration {
        Duration::from_secs(5 * 60)
    }
    pub fn start_spread() -> Duration {
        Duration::from_secs(5)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn history() -> Duration {
        Duration::from_secs(24 * 60 * 60)
    }
}

/// Shows the URL without a password it may carry (`https://user:***@host`).
impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &redact_url(&self.url))
            .field("mode", &self.mode)
            .field("poll_interval", &self.poll_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("healthy_after", &self.healthy_after)
            .field("refused_retry", &self.refused_retry)
            .field("start_spread", &self.start_spread)
            .field("request_timeout", &self.request_timeout)
            .field("history", &self.history)
            .finish()
    }
}

impl SourceConfig {
    pub fn new(url: impl Into<String>) -> Self {
        SourceConfig {
            url: url.into(),
            mode: SourceMode::Stream,
            poll_interval: defaults::poll_interval(),
            idle_timeout: defaults::idle_timeout(),
            reconnect_min: defaults::reconnect_min(),
            reconnect_max: defaults::reconnect_max(),
            healthy_after: defaults::healthy_after(),
            refused_retry: defaults::refused_retry(),
            start_spread: defaults::start_spread(),
            request_timeout: defaults::request_timeout(),
            history: defaults::history(),
        }
    }

    /// Checks values; keys in the error are relative to `[source]`.
    pub fn validate(&self) -> Result<(), Invalid> {
        const FIX: &str = "see the [source] section of config/things.example.toml";
        if let Err(error) = Client::new(&self.url) {
            return Err(Invalid::new(
                "url",
                format!("{:?}: {error}", self.url),
                "write it as https://dweet.io or http://host:port of a dweetpipe sandbox",
            ));
        }
        for (key, value) in [
            ("poll_interval", self.poll_interval),
            ("idle_timeout", self.idle_timeout),
            ("reconnect_min", self.reconnect_min),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return Err(Invalid::new(key, "must be above zero", FIX));
            }
        }
        if self.reconnect_max < self.reconnect_min {
            return Err(Invalid::new(
                "reconnect_max",
                "must not be below reconnect_min",
                FIX,
            ));
        }
        Ok(())
    }

    /// A client for this source, with its request timeout.
    pub fn client(&self) -> Result<Client, crate::client::Error> {
        Client::builder(&self.url)
            .request_timeout(self.request_timeout)
            .build()
    }
}

/// One thing to ingest, with its key resolved, and the lock and alert it should carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingConfig {
    pub name: String,
    pub key: Option<Key>,
    /// Where the key came from, for reports (`env S5D9_KEY`); never the key itself.
    pub key_source: Option<String>,
    /// The lock id the thing should be locked with; `None` for unlocked.
    pub lock: Option<String>,
    pub alert: Option<AlertSpec>,
    /// Whether dweetpipe keeps the thing's lock and alert as declared: only when the entry
    /// declares a `lock`, an `[thing.alert]` or `manage = true`.
    pub manage: bool,
}

impl ThingConfig {
    pub fn unlocked(name: impl Into<String>) -> Self {
        ThingConfig {
            name: name.into(),
            key: None,
            key_source: None,
            lock: None,
            alert: None,
            manage: false,
        }
    }

    /// Whether a running subscription for `self` can keep serving `other` (same name and key;
    /// lock and alert changes are the lifecycle's business, not the stream's).
    pub fn reads_like(&self, other: &ThingConfig) -> bool {
        self.name == other.name && self.key == other.key
    }
}
