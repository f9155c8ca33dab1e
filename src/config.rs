//! things.toml: loading, environment overrides and validation.
//!
//! The file is read with the `config` crate, then `DWEETPIPE__SECTION__KEY` variables override
//! it (`DWEETPIPE__SOURCE__URL=...`). Every section's struct lives next to the code it
//! configures; this module assembles them and checks what crosses sections. Every error names
//! the file, the key and what to do, and never contains a key's value.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::client::Key;
use crate::sink::parquet::ParquetConfig;
use crate::sink::postgres::PostgresConfig;
use crate::telemetry::MetricsConfig;
use crate::worker::SourceConfig;

/// The prefix of environment overrides: `DWEETPIPE__SOURCE__URL`.
pub const ENV_PREFIX: &str = "DWEETPIPE";

/// A bad configuration, said so that the user can fix it without reading our code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// The dotted key at fault (`thing[2].key_env`), or empty for the whole file.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.problem)?;
        } else {
            write!(f, "{}: `{}`: {}", self.file, self.key, self.problem)?;
        }
        if !self.fix.is_empty() {
            write!(f, "\n  fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// The file as written, before cross-section checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    source: Option<SourceConfig>,
    #[serde(default)]
    thing: Vec<ThingEntry>,
    parquet: Option<ParquetConfig>,
    postgres: Option<PostgresConfig>,
    metrics: Option<MetricsConfig>,
    #[serde(default, deserialize_with = "optional_duration")]
    shutdown_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThingEntry {
    name: String,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
}

/// One thing to ingest, with its key resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingConfig {
    pub name: String,
    pub key: Option<Key>,
    /// Where the key came from, for reports (`env S5D9_KEY`); never the key itself.
    pub key_source: Option<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub source: Option<SourceConfig>,
    pub things: Vec<ThingConfig>,
    pub parquet: Option<ParquetConfig>,
    /// With its URL resolved (`url_env` read).
    pub postgres: Option<PostgresConfig>,
    pub metrics: Option<MetricsConfig>,
    pub shutdown_timeout: Duration,
}

impl ThingConfig {
    pub fn unlocked(name: impl Into<String>) -> Self {
        ThingConfig {
            name: name.into(),
            key: None,
            key_source: None,
        }
    }
}

impl Config {
    /// The embedded configuration of the demo and the benchmarks: the simulator's boards
    /// (`S5D9-0001` ... `S5D9-{things}`) read from `source` into `parquet`.
    pub fn for_simulated_fleet(
        source: SourceConfig,
        things: usize,
        parquet: ParquetConfig,
    ) -> Config {
        Config {
            path: PathBuf::from("(embedded)"),
            source: Some(source),
            things: (1..=things)
                .map(|i| ThingConfig::unlocked(crate::sandbox::simulator::thing_name("S5D9-", i)))
                .collect(),
            parquet: Some(parquet),
            postgres: None,
            metrics: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    /// Reads, overrides from the environment, and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], resolving key variables with `env` (tests use a map).
    pub fn load_with_env(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        if !path.exists() {
            return Err(ConfigError {
                file,
                key: String::new(),
                problem: "the file does not exist".to_owned(),
                fix: "pass --config PATH; config/things.example.toml is a starting point"
                    .to_owned(),
            });
        }
        let mut raw: ConfigFile = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(|built| built.try_deserialize())
            .map_err(|error| ConfigError {
                file: file.clone(),
                key: String::new(),
                problem: error.to_string(),
                fix: "compare with config/things.example.toml".to_owned(),
            })?;
        let invalid = |key: String, problem: String, fix: &str| ConfigError {
            file: file.clone(),
            key,
            problem,
            fix: fix.to_owned(),
        };

        if let Some(source) = &raw.source {
            source.validate().map_err(|(key, problem)| {
                invalid(
                    format!("source.{key}"),
                    problem,
                    "see the [source] section of config/things.example.toml",
                )
            })?;
        }
        if let Some(parquet) = &raw.parquet {
            parquet.validate().map_err(|(key, problem)| {
                invalid(
                    format!("parquet.{key}"),
                    problem,
                    "see the [parquet] section of config/things.example.toml",
                )
            })?;
        }

        if let Some(postgres) = raw.postgres.as_mut() {
            postgres
                .resolve(&env)
                .map_err(|(key, problem, fix): (String, String, String)| {
                    invalid(format!("postgres.{key}"), problem, &fix)
                })?;
        }

        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut things = Vec::with_capacity(raw.thing.len());
        for (index, entry) in raw.thing.iter().enumerate() {
            let at = |field: &str| format!("thing[{index}].{field}");
            if entry.name.trim().is_empty() {
                return Err(invalid(
                    at("name"),
                    "a thing needs a name".to_owned(),
                    "set name = \"S5D9-63de\" (the board's ThingName.txt)",
                ));
            }
            if let Some(first) = seen.insert(&entry.name, index) {
                return Err(invalid(
                    at("name"),
                    format!("{:?} is already thing[{first}]", entry.name),
                    "list each thing once",
                ));
            }
            let (key, key_source) = match (&entry.key_env, &entry.key_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        at("key_env"),
                        "key_env and key_file are both set".to_owned(),
                        "keep one of them",
                    ));
                }
                (Some(variable), None) => match env(variable).filter(|v| !v.trim().is_empty()) {
                    Some(value) => (
                        Some(Key::new(value.trim())),
                        Some(format!("env {variable}")),
                    ),
                    None => {
                        return Err(invalid(
                            at("key_env"),
                            format!("the environment variable {variable} is not set (or empty)"),
                            "export it before starting dweetpipe (systemd: EnvironmentFile=, Kubernetes: a Secret)",
                        ));
                    }
                },
                (None, Some(path)) => match std::fs::read_to_string(path) {
                    Ok(text) if !text.trim().is_empty() => (
                        Some(Key::new(text.trim())),
                        Some(format!("file {}", path.display())),
                    ),
                    Ok(_) => {
                        return Err(invalid(
                            at("key_file"),
                            format!("{} is empty", path.display()),
                            "write the lock's master key into it",
                        ));
                    }
                    Err(error) => {
                        return Err(invalid(
                            at("key_file"),
                            format!("cannot read {}: {error}", path.display()),
                            "check the path and its permissions",
                        ));
                    }
                },
                (None, None) => (None, None),
            };
            things.push(ThingConfig {
                name: entry.name.clone(),
                key,
                key_source,
            });
        }

        Ok(Config {
            path: path.to_path_buf(),
            source: raw.source,
            things,
            parquet: raw.parquet,
            postgres: raw.postgres,
            metrics: raw.metrics,
            shutdown_timeout: raw.shutdown_timeout.unwrap_or(Duration::from_secs(10)),
        })
    }

    /// A configuration error about this file, for checks made after loading.
    pub fn error(
        &self,
        key: &str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.path.display().to_string(),
            key: key.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// Deserialises a human duration: "5s", "2m", "1h 30m", "250ms".
pub fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|error| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"5s\" or \"2m\" ({error})"
        ))
    })
}

/// Deserialises a byte size: "1GiB", "512MiB", "1000000".
pub fn byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Number(bytes) => Ok(bytes),
        Raw::Text(text) => parse_byte_size(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not a size like \"512MiB\" or \"1GiB\""
            ))
        }),
    }
}

fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

pub fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        let file = write(text);
        let env = |name: &str| (name == "S5D9_KEY").then(|| "s3cret-key".to_owned());
        Config::load_with_env(file.path(), env)
    }

    #[test]
    fn the_example_of_the_issue_loads() {
        let config = load(
            r#"
[source]
url = "https://dweet.io"
mode = "poll"
poll_interval = "5s"

[[thing]]
name = "S5D9-63de"
key_env = "S5D9_KEY"

[[thing]]
name = "S5D9-0002"

[parquet]
dir = "data/parquet"
rotate_after = "5m"
max_rows = 1000000

[metrics]
listen = "127.0.0.1:9187"
"#,
        )
        .unwrap();
        assert_eq!(config.things.len(), 2);
        assert_eq!(config.things[0].key, Some(Key::new("s3cret-key")));
        assert_eq!(config.things[0].key_source.as_deref(), Some("env S5D9_KEY"));
        let parquet = config.parquet.unwrap();
        assert_eq!(parquet.rotate_after, Duration::from_secs(300));
        assert_eq!(config.source.unwrap().poll_interval, Duration::from_secs(5));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    fn mistakes_are_named_with_file_key_and_fix() {
        let cases = [
            (
                "[source]\nurl = \"https://dweet.io\"\nurll = 1\n",
                "",
                "unknown field `urll`",
            ),
            ("[source]\nurl = \"dweet.io\"\n", "source.url", "not a URL"),
            (
                "[source]\nurl = \"https://dweet.io\"\nmode = \"push\"\n",
                "",
                "is not \"stream\" or \"poll\"",
            ),
            (
                "[source]\nurl = \"https://dweet.io\"\npoll_interval = \"soon\"\n",
                "",
                "is not a duration",
            ),
            (
                "[[thing]]\nname = \"a\"\n[[thing]]\nname = \"a\"\n",
                "thing[1].name",
                "already thing[0]",
            ),
            (
                "[[thing]]\nname = \"a\"\nkey_env = \"MISSING_VAR\"\n",
                "thing[0].key_env",
                "MISSING_VAR is not set",
            ),
            (
                "[[thing]]\nname = \"a\"\nkey_file = \"/nonexistent/key\"\n",
                "thing[0].key_file",
                "cannot read",
            ),
            ("[[thing]]\nname = \"\"\n", "thing[0].name", "needs a name"),
            (
                "[parquet]\ndir = \"x\"\nmax_rows = 0\n",
                "parquet.max_rows",
                "at least 1",
            ),
        ];
        for (text, key, problem) in cases {
            let error = load(text).unwrap_err();
            assert_eq!(error.key, key, "{text}: {error}");
            assert!(error.problem.contains(problem), "{text}: {error}");
            assert!(
                error.to_string().contains(".toml"),
                "names the file: {error}"
            );
            assert!(!error.fix.is_empty(), "says what to do: {error}");
        }
    }

    #[test]
    fn the_shipped_example_is_valid_and_runnable() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/things.example.toml");
        let config = Config::load_with_env(&path, |_| None).unwrap();
        assert_eq!(config.things.len(), 2);
        assert!(crate::worker::check_runnable(&config).is_ok());
        assert_eq!(config.metrics.unwrap().listen.port(), 9187);
    }

    #[test]
    fn a_missing_file_says_how_to_start() {
        let error = Config::load(Path::new("/nonexistent/things.toml")).unwrap_err();
        assert!(error.to_string().contains("does not exist"));
        assert!(error.fix.contains("things.example.toml"));
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_byte_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_byte_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_byte_size("1000"), Some(1000));
        assert_eq!(parse_byte_size("lots"), None);
    }

    #[test]
    fn keys_never_appear_in_errors_or_debug() {
        let config = load("[[thing]]\nname = \"a\"\nkey_env = \"S5D9_KEY\"\n").unwrap();
        assert!(!format!("{config:?}").contains("s3cret-key"));
        let error = load("[[thing]]\nname = \"a\"\nkey_env = \"S5D9_KEY\"\nkey_file = \"/x\"\n")
            .unwrap_err();
        assert!(!error.to_string().contains("s3cret-key"));
    }
}
