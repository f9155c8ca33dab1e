//! The `[postgres]` section and the database URL, which never prints its password.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use sqlx::postgres::PgConnectOptions;

use super::PostgresError;

use crate::settings::Invalid;

/// A database URL. It carries the password, so it never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub(super) fn options(&self) -> Result<PgConnectOptions, PostgresError> {
        self.0
            .parse::<PgConnectOptions>()
            .map_err(|e| PostgresError::Url(strip_url(&e.to_string(), &self.0)))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(DatabaseUrl)
    }
}

/// An error text with the URL (and so the password) cut out.
pub(super) fn strip_url(text: &str, url: &str) -> String {
    text.replace(url, "<database url>")
}

/// The `[postgres]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host/db`; or `url_env` names a variable holding it.
    pub url: Option<DatabaseUrl>,
    pub url_env: Option<String>,
    /// Records per statement (and per transaction) at most. Default 5000.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// Removed: batches are written as soon as the previous one commits, so no record waits
    /// on a timer. Kept only to refuse files that still set it with a clear message.
    #[serde(default, rename = "max_age")]
    pub removed_max_age: Option<serde::de::IgnoredAny>,
    /// Records held in memory while PostgreSQL is slow or down, before the spool. Default 100,000.
    #[serde(default = "crate::sink::backlog::default_memory_max_rows")]
    pub memory_max_rows: usize,
    /// Where records wait on disk while PostgreSQL is down. Default `data/spool`.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: std::path::PathBuf,
    /// The spool's bound; past it records are dropped, counted and logged. Default 1GiB.
    #[serde(
        default = "crate::sink::backlog::default_spool_max",
        deserialize_with = "crate::settings::byte_size"
    )]
    pub spool_max: u64,
    /// How much time one partition of the history tables spans (UTC-aligned). Default "1d".
    #[serde(
        default = "default_partition",
        deserialize_with = "crate::settings::duration"
    )]
    pub partition: Duration,
    /// Raw rows (`dweets`, `readings`) older than this go, a whole partition at a time.
    /// Default: kept for ever.
    #[serde(default, deserialize_with = "crate::settings::optional_duration")]
    pub retention: Option<Duration>,
    /// The same for the rollups (`readings_1m`, `readings_1h`), which may outlive the raw
    /// rows. Default: kept for ever.
    #[serde(default, deserialize_with = "crate::settings::optional_duration")]
    pub rollup_retention: Option<Duration>,
}

fn default_partition() -> Duration {
    Duration::from_secs(24 * 60 * 60)
}

fn default_spool_dir() -> std::path::PathBuf {
    std::path::PathBuf::from("data/spool")
}

/// A catch-up's transactions: larger ones spend less of PostgreSQL's time between batches
/// (the catch-up benchmark's timeline, issue 26); live batches are what has queued, far less.
fn default_max_rows() -> usize {
    20_000
}

impl PostgresConfig {
    /// The buffer settings of this section.
    pub fn backlog(&self) -> crate::sink::backlog::BacklogConfig {
        crate::sink::backlog::BacklogConfig {
            memory_max_rows: self.memory_max_rows,
            spool_dir: self.spool_dir.clone(),
            spool_max: self.spool_max,
        }
    }

    pub fn new(url: DatabaseUrl) -> Self {
        PostgresConfig {
            url: Some(url),
            url_env: None,
            max_rows: default_max_rows(),
            removed_max_age: None,
            memory_max_rows: crate::sink::backlog::default_memory_max_rows(),
            spool_dir: default_spool_dir(),
            spool_max: crate::sink::backlog::default_spool_max(),
            partition: default_partition(),
            retention: None,
            rollup_retention: None,
        }
    }

    /// Resolves `url_env` into `url` and checks values; keys in the error are relative to `[postgres]`.
    pub fn resolve(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        let url = crate::settings::address(
            ("url", self.url.as_ref().map(|u| u.0.as_str())),
            ("url_env", self.url_env.as_deref()),
            &env,
            None,
            "name a database: url = \"postgres://...\" or url_env = \"DATABASE_URL\"",
        )?;
        self.url = Some(DatabaseUrl(url));
        if let Some(url) = &self.url
            && let Err(error) = url.options()
        {
            return Err(Invalid::new(
                "url",
                error.to_string(),
                "write it as postgres://user:password@host:5432/database".to_owned(),
            ));
        }
        if self.max_rows == 0 {
            return Err(Invalid::new(
                "max_rows",
                "must be at least 1".to_owned(),
                "the default is 5000".to_owned(),
            ));
        }
        if self.removed_max_age.is_some() {
            return Err(Invalid::new(
                    "max_age",
                    "was removed: records are written as soon as the previous batch commits, so none waits on a timer".to_owned(),
                "delete the line; max_rows still bounds each statement".to_owned(),
            ));
        }
        validate_partition(self.partition)?;
        for (key, retention) in [
            ("retention", self.retention),
            ("rollup_retention", self.rollup_retention),
        ] {
            if retention.is_some_and(|kept| kept < Duration::from_secs(60 * 60)) {
                return Err(Invalid::new(
                    key,
                    "must be at least 1h",
                    "give how long to keep, like \"90d\"; leave it out to keep everything",
                ));
            }
        }
        Ok(())
    }
}

/// `partition` is whole hours, from 1h to 31d: a partition is a table, and retention drops
/// whole ones.
fn validate_partition(partition: Duration) -> Result<(), Invalid> {
    const HOUR: u64 = 60 * 60;
    let seconds = partition.as_secs();
    if partition.subsec_nanos() != 0
        || !seconds.is_multiple_of(HOUR)
        || !(HOUR..=31 * 24 * HOUR).contains(&seconds)
    {
        return Err(Invalid::new(
            "partition",
            format!(
                "{} is not a whole number of hours from 1h to 31d",
                humantime::format_duration(partition)
            ),
            "size it so the newest partition and its indexes fit in memory: \"1d\" (the default) for most fleets, \"1h\" for thousands of boards a second",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_never_prints() {
        let url = DatabaseUrl::new("postgres://user:hunter2@db/x");
        assert!(!format!("{url:?}").contains("hunter2"));
        let config = PostgresConfig::new(url);
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(
            strip_url(
                "failed at postgres://user:hunter2@db/x",
                "postgres://user:hunter2@db/x"
            ),
            "failed at <database url>"
        );
    }

    #[test]
    fn url_env_is_resolved_and_checked() {
        let mut config = PostgresConfig {
            url: None,
            url_env: Some("DB".to_owned()),
            ..PostgresConfig::new(DatabaseUrl::new(""))
        };
        config
            .resolve(|name| (name == "DB").then(|| "postgres://u@h/d".to_owned()))
            .unwrap();
        assert_eq!(config.url.unwrap().expose(), "postgres://u@h/d");
        let mut missing = PostgresConfig {
            url: None,
            url_env: Some("NOPE".to_owned()),
            ..PostgresConfig::new(DatabaseUrl::new(""))
        };
        let refused = missing.resolve(|_| None).unwrap_err();
        assert_eq!(refused.key, "url_env");
        assert!(refused.problem.contains("NOPE"));
    }
}
