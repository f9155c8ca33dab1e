//! things.toml: loading, environment overrides and validation.
//!
//! The file is parsed as TOML with strict types (a number where a path belongs is an error
//! naming the key), then `DWEETPIPE__SECTION__KEY` variables override it
//! (`DWEETPIPE__SOURCE__URL=...`), each checked on its own so a mistake names the variable. Every section's struct lives next to the code it
//! configures; this module assembles them and checks what crosses sections. Every error names
//! the file, the key and what to do, and never contains a key's value.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::alert::AlertSpec;
use crate::alert::condition::ConditionEngine;
use crate::client::Key;
use crate::cluster::ClusterConfig;
use crate::lifecycle::LifecycleConfig;
use crate::settings::Invalid;
use crate::sink::SinkConfig;
use crate::sink::nats::NatsConfig;
use crate::sink::parquet::ParquetConfig;
use crate::sink::postgres::PostgresConfig;
use crate::source::{SourceConfig, ThingConfig};
use crate::telemetry::MetricsConfig;

/// The prefix of environment overrides: `DWEETPIPE__SOURCE__URL`.
pub const ENV_OVERRIDE: &str = "DWEETPIPE__";

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
    lifecycle: Option<LifecycleConfig>,
    cluster: Option<ClusterConfig>,
    nats: Option<NatsConfig>,
    #[serde(default, deserialize_with = "crate::settings::optional_duration")]
    shutdown_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThingEntry {
    name: String,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
    lock: Option<String>,
    alert: Option<AlertSpec>,
    manage: Option<bool>,
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
    /// Set when the file has a `[lifecycle]` section or declares a lock or an alert: `run`
    /// then reconciles locks and alerts.
    pub lifecycle: Option<LifecycleConfig>,
    /// With its address resolved and its member named: `run` joins the cluster.
    pub cluster: Option<ClusterConfig>,
    /// The JetStream output, with its address resolved.
    pub nats: Option<NatsConfig>,
    pub shutdown_timeout: Duration,
}

impl Config {
    /// The embedded configuration of the demo and the benchmarks: the simulator's boards
    /// (`S5D9-0001` ... `S5D9-{things}`) read from `source` into `parquet`.
    pub fn for_simulated_fleet(
        source: SourceConfig,
        things: impl IntoIterator<Item = String>,
        parquet: ParquetConfig,
    ) -> Config {
        Config {
            path: PathBuf::from("(embedded)"),
            source: Some(source),
            things: things.into_iter().map(ThingConfig::unlocked).collect(),
            parquet: Some(parquet),
            postgres: None,
            metrics: None,
            lifecycle: None,
            cluster: None,
            nats: None,
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
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: file.clone(),
            key: String::new(),
            problem: format!("cannot read it: {error}"),
            fix: "check the path and its permissions".to_owned(),
        })?;
        let mut raw = parse_strictly(&text).map_err(|(key, problem)| ConfigError {
            file: file.clone(),
            key,
            problem,
            fix: "compare with config/things.example.toml".to_owned(),
        })?;
        let overrides: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| name.starts_with(ENV_OVERRIDE))
            .collect();
        if !overrides.is_empty() {
            raw = apply_overrides(&text, overrides)?;
        }
        let invalid = |error: Invalid| ConfigError {
            file: file.clone(),
            key: error.key,
            problem: error.problem,
            fix: error.fix,
        };
        resolve_sections(&mut raw, &env).map_err(invalid)?;
        let things = resolve_things(&raw.thing, &env).map_err(invalid)?;
        let declares_lifecycle = things.iter().any(|t| t.manage);
        let lifecycle = raw
            .lifecycle
            .or_else(|| declares_lifecycle.then(LifecycleConfig::default));

        Ok(Config {
            path: path.to_path_buf(),
            source: raw.source,
            things,
            parquet: raw.parquet,
            postgres: raw.postgres,
            metrics: raw.metrics,
            lifecycle,
            cluster: raw.cluster,
            nats: raw.nats,
            shutdown_timeout: raw.shutdown_timeout.unwrap_or(Duration::from_secs(10)),
        })
    }

    /// The configured sinks, in the order the worker starts them. A new sink is one more
    /// line here (and its section above).
    pub fn sinks(&self) -> Vec<&dyn SinkConfig> {
        let mut sinks: Vec<&dyn SinkConfig> = Vec::new();
        sinks.extend(self.parquet.as_ref().map(|c| c as &dyn SinkConfig));
        sinks.extend(self.postgres.as_ref().map(|c| c as &dyn SinkConfig));
        sinks.extend(self.nats.as_ref().map(|c| c as &dyn SinkConfig));
        sinks
    }

    /// The sections `newer` changes that take effect only at the next start (a reload keeps
    /// the running ones).
    pub fn changes_needing_restart(&self, newer: &Config) -> Vec<String> {
        let changed = [
            ("parquet", self.parquet != newer.parquet),
            ("postgres", self.postgres != newer.postgres),
            (
                "metrics",
                self.metrics.as_ref().map(|m| m.listen) != newer.metrics.as_ref().map(|m| m.listen),
            ),
            ("nats", self.nats != newer.nats),
            ("cluster", self.cluster != newer.cluster),
        ];
        changed
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(section, _)| section.to_owned())
            .collect()
    }

    /// `newer` with the running values of the sections a reload cannot change.
    pub fn keeping_restart_sections(&self, newer: Config) -> Config {
        Config {
            parquet: self.parquet.clone(),
            postgres: self.postgres.clone(),
            metrics: self.metrics.clone(),
            nats: self.nats.clone(),
            cluster: self.cluster.clone(),
            ..newer
        }
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

/// The file as typed TOML: an error is (the key at fault, or empty, and what is wrong).
fn parse_strictly(text: &str) -> Result<ConfigFile, (String, String)> {
    toml::from_str(text).map_err(|error| {
        let key = error
            .span()
            .map(|span| key_at(text, span.start))
            .unwrap_or_default();
        (key, error.message().to_owned())
    })
}

/// Checks each section on its own and resolves what the environment holds (URLs from
/// `*_env`); keys in the error are dotted from the file's top.
fn resolve_sections(
    raw: &mut ConfigFile,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), Invalid> {
    if let Some(source) = &raw.source {
        source.validate().map_err(|e| e.within("source"))?;
    }
    if let Some(parquet) = &raw.parquet {
        parquet.validate().map_err(|e| e.within("parquet"))?;
    }
    if let Some(lifecycle) = &raw.lifecycle {
        lifecycle.validate().map_err(|e| e.within("lifecycle"))?;
    }
    if let Some(postgres) = raw.postgres.as_mut() {
        postgres.resolve(env).map_err(|e| e.within("postgres"))?;
    }
    if let Some(cluster) = raw.cluster.as_mut() {
        cluster.resolve(env).map_err(|e| e.within("cluster"))?;
    }
    if let Some(nats) = raw.nats.as_mut() {
        let cluster_url = raw.cluster.as_ref().and_then(|c| c.nats_url.as_deref());
        nats.resolve(env, cluster_url)
            .map_err(|e| e.within("nats"))?;
    }
    check_spools(raw)?;
    if let Some(member) = raw.cluster.as_ref().map(|c| c.member().to_owned()) {
        give_member_its_directories(raw, member);
    }
    Ok(())
}

/// The things, each listed once, with keys read and lifecycle declarations checked.
fn resolve_things(
    entries: &[ThingEntry],
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<ThingConfig>, Invalid> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    // One engine checks every condition of the file (made only if there is one).
    let mut condition_engine = None;
    let mut things = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        if let Some(first) = seen.insert(&entry.name, index) {
            return Err(Invalid::new(
                format!("thing[{index}].name"),
                format!("{:?} is already thing[{first}]", entry.name),
                "list each thing once",
            ));
        }
        let thing = entry
            .resolve(env, &mut condition_engine)
            .map_err(|e| e.within(&format!("thing[{index}]")))?;
        things.push(thing);
    }
    Ok(things)
}

/// `section.key` of the line holding byte `at` (the nearest `[section]` above it).
fn key_at(text: &str, at: usize) -> String {
    let before = &text[..at.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or_default();
    let Some((key, _)) = line.split_once('=') else {
        return String::new();
    };
    let section = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').to_owned());
    match section {
        Some(section) => format!("{section}.{}", key.trim()),
        None => key.trim().to_owned(),
    }
}

/// Applies `DWEETPIPE__SECTION__KEY=value` variables to the file, one at a time, so a variable
/// that names no key or holds the wrong type is named in the error (not blamed on the file).
fn apply_overrides(
    text: &str,
    mut overrides: Vec<(String, String)>,
) -> Result<ConfigFile, ConfigError> {
    overrides.sort();
    let mut document: toml::Table = toml::from_str(text).unwrap_or_default();
    let refused = |name: &str, problem: String| ConfigError {
        file: format!("the environment variable {name}"),
        key: String::new(),
        problem,
        fix: "name a key as DWEETPIPE__SECTION__KEY (e.g. DWEETPIPE__SOURCE__URL), or unset it"
            .to_owned(),
    };
    for (name, value) in &overrides {
        let path: Vec<String> = name[ENV_OVERRIDE.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let mut table = &mut document;
        for section in &path[..path.len() - 1] {
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let is_list = entry.is_array();
            table = entry.as_table_mut().ok_or_else(|| {
                if is_list {
                    refused(
                        name,
                        format!("`[[{section}]]` is a list of entries, which variables cannot reach; change it in the file (a thing's key comes from its key_env or key_file)"),
                    )
                } else {
                    refused(name, format!("`{section}` is not a section"))
                }
            })?;
        }
        let key = path.last().cloned().unwrap_or_default();
        let typed = override_value(table.get(&key), value);
        table.insert(key, typed);
        let rendered = toml::to_string(&document).unwrap_or_default();
        parse_strictly(&rendered).map_err(|(key, problem)| {
            refused(
                name,
                format!(
                    "`{}`: {problem}",
                    if key.is_empty() { path.join(".") } else { key }
                ),
            )
        })?;
    }
    let rendered = toml::to_string(&document).unwrap_or_default();
    parse_strictly(&rendered).map_err(|(_, problem)| refused("DWEETPIPE__*", problem))
}

/// An override's text as the type the file has at that key (or the type it reads as).
fn override_value(existing: Option<&toml::Value>, text: &str) -> toml::Value {
    let parsed = || {
        toml::from_str::<toml::Table>(&format!("v = {text}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| !v.is_table() && !v.is_array())
    };
    match existing {
        Some(toml::Value::String(_)) => toml::Value::String(text.to_owned()),
        _ => parsed().unwrap_or_else(|| toml::Value::String(text.to_owned())),
    }
}

impl ThingEntry {
    /// The entry with its key read (from the environment or a file) and its lifecycle
    /// checked; keys in the error are relative to the thing.
    fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
        engine: &mut Option<ConditionEngine>,
    ) -> Result<ThingConfig, Invalid> {
        if self.name.trim().is_empty() {
            return Err(Invalid::new(
                "name",
                "a thing needs a name",
                "set name = \"S5D9-63de\" (the board's ThingName.txt)",
            ));
        }
        let (key, key_source) = match (&self.key_env, &self.key_file) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new(
                    "key_env",
                    "key_env and key_file are both set",
                    "keep one of them",
                ));
            }
            (Some(variable), None) => match env(variable).filter(|v| !v.trim().is_empty()) {
                Some(value) => (
                    Some(Key::new(value.trim())),
                    Some(format!("env {variable}")),
                ),
                None => {
                    return Err(Invalid::new(
                        "key_env",
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
                    return Err(Invalid::new(
                        "key_file",
                        format!("{} is empty", path.display()),
                        "write the lock's master key into it",
                    ));
                }
                Err(error) => {
                    return Err(Invalid::new(
                        "key_file",
                        format!("cannot read {}: {error}", path.display()),
                        "check the path and its permissions",
                    ));
                }
            },
            (None, None) => (None, None),
        };
        // A key alone (for reading a locked thing) never hands its lock and alert over to
        // dweetpipe: only a declared lock or alert, or `manage = true`, does.
        let manage = self
            .manage
            .unwrap_or(self.lock.is_some() || self.alert.is_some());
        let thing = ThingConfig {
            name: self.name.clone(),
            key,
            key_source,
            lock: self.lock.clone(),
            alert: self.alert.clone(),
            manage,
        };
        crate::lifecycle::validate(&thing, self.manage, engine)?;
        Ok(thing)
    }
}

/// Sections that must not share a directory: each spool is locked by its own sink.
fn check_spools(raw: &ConfigFile) -> Result<(), Invalid> {
    let mut taken: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(parquet) = &raw.parquet {
        taken.push(("parquet.dir", parquet.dir.clone()));
        taken.push(("parquet.spool_dir", parquet.spool_dir()));
    }
    if let Some(postgres) = &raw.postgres {
        taken.push(("postgres.spool_dir", postgres.spool_dir.clone()));
    }
    if let Some(nats) = &raw.nats {
        taken.push(("nats.spool_dir", nats.spool_dir.clone()));
    }
    for (index, (key, dir)) in taken.iter().enumerate() {
        if let Some((other, _)) = taken[..index].iter().find(|(_, d)| d == dir) {
            return Err(Invalid::new(
                *key,
                format!("{} is also used as {other}", dir.display()),
                "give each sink a spool directory of its own",
            ));
        }
    }
    Ok(())
}

/// In a cluster each member writes Parquet files named after it and keeps its spools in a
/// folder of its own, so members may share a dataset directory (and a working directory).
fn give_member_its_directories(raw: &mut ConfigFile, member: String) {
    if let Some(parquet) = raw.parquet.as_mut() {
        parquet.spool_dir_setting = Some(parquet.spool_dir().join(&member));
        parquet.member = Some(member.clone());
    }
    if let Some(postgres) = raw.postgres.as_mut() {
        postgres.spool_dir = postgres.spool_dir.join(&member);
    }
    if let Some(nats) = raw.nats.as_mut() {
        nats.spool_dir = nats.spool_dir.join(&member);
    }
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
    fn a_cluster_member_gets_its_own_files_and_spools_and_the_output_its_address() {
        let config = load(
            r#"
[source]
url = "http://127.0.0.1:1"
[[thing]]
name = "a"
[parquet]
dir = "shared/parquet"
[postgres]
url = "postgres://localhost/db"
spool_dir = "spool/pg"
[nats]
[cluster]
nats_url = "nats://10.0.0.5:4222"
member = "worker-a"
lease = "5s"
"#,
        )
        .unwrap();
        let parquet = config.parquet.unwrap();
        assert_eq!(parquet.member.as_deref(), Some("worker-a"));
        assert_eq!(
            parquet.spool_dir(),
            Path::new("shared/parquet-spool/worker-a")
        );
        assert_eq!(
            config.postgres.unwrap().spool_dir,
            Path::new("spool/pg/worker-a")
        );
        let nats = config.nats.unwrap();
        assert_eq!(nats.url.as_deref(), Some("nats://10.0.0.5:4222"));
        assert_eq!(nats.spool_dir, Path::new("data/nats-spool/worker-a"));
        assert_eq!(config.cluster.unwrap().lease, Duration::from_secs(5));
        let error = load("[nats]\nurl = \"nats://h\"\nspool_dir = \"x\"\n[postgres]\nurl = \"postgres://h/d\"\nspool_dir = \"x\"\n")
            .unwrap_err();
        assert_eq!(error.key, "nats.spool_dir", "{error}");
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
                "source.urll",
                "unknown field `urll`",
            ),
            ("[source]\nurl = \"dweet.io\"\n", "source.url", "not a URL"),
            (
                "[source]\nurl = \"https://dweet.io\"\nmode = \"push\"\n",
                "source.mode",
                "is not \"stream\" or \"poll\"",
            ),
            (
                "[source]\nurl = \"https://dweet.io\"\npoll_interval = \"soon\"\n",
                "source.poll_interval",
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
            (
                "[[thing]]\nname = \"a\"\nlock = \"l\"\n",
                "thing[0].lock",
                "needs its master key",
            ),
            (
                "[[thing]]\nname = \"a\"\nkey_env = \"S5D9_KEY\"\n[thing.alert]\nto = [\"a@b.io\"]\nwhen = \"return 1;\"\n",
                "thing[0].alert",
                "need a locked thing",
            ),
            (
                "[[thing]]\nname = \"a\"\nlock = \"l\"\nkey_env = \"S5D9_KEY\"\n[thing.alert]\nto = [\"ops at example\"]\nwhen = \"return 1;\"\n",
                "thing[0].alert.to",
                "not an e-mail address",
            ),
            (
                "[[thing]]\nname = \"a\"\nlock = \"l\"\nkey_env = \"S5D9_KEY\"\n[thing.alert]\nto = []\nwhen = \"return 1;\"\n",
                "thing[0].alert.to",
                "at least one recipient",
            ),
            (
                &format!(
                    "[[thing]]\nname = \"a\"\nlock = \"l\"\nkey_env = \"S5D9_KEY\"\n[thing.alert]\nto = [\"a@b.io\"]\nwhen = \"{}\"\n",
                    "x".repeat(2001)
                ),
                "thing[0].alert.when",
                "2001 characters",
            ),
            (
                "[[thing]]\nname = \"a\"\nlock = \"l\"\nkey_env = \"S5D9_KEY\"\n[thing.alert]\nto = [\"a@b.io\"]\nwhen = \"if(\"\n",
                "thing[0].alert.when",
                "does not parse",
            ),
            (
                "[[thing]]\nname = \"a\"\nlock = \"l\"\nkey_env = \"S5D9_KEY\"\nmanage = false\n",
                "thing[0].manage",
                "manage = false",
            ),
            (
                "[lifecycle]\ninterval = \"0s\"\n",
                "lifecycle.interval",
                "at least 1s",
            ),
            (
                "[postgres]\nurl = \"postgres://h/d\"\nmax_age = \"1s\"\n",
                "postgres.max_age",
                "was removed",
            ),
        ];
        for (text, key, problem) in cases {
            let text: &str = text;
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

    /// The keys the structs accept in `section`, read from serde's own "expected one of" list.
    fn struct_keys(section: &str) -> std::collections::BTreeSet<String> {
        let probe = match section {
            "" => "zz_probe = 1\n".to_owned(),
            "thing" => "[[thing]]\nname = \"a\"\nzz_probe = 1\n".to_owned(),
            "thing.alert" => "[[thing]]\nname = \"a\"\n[thing.alert]\nzz_probe = 1\n".to_owned(),
            other => format!("[{other}]\nzz_probe = 1\n"),
        };
        let (_, problem) = parse_strictly(&probe).expect_err("an unknown key is refused");
        // serde says "expected one of `a`, `b`", or "expected `a` or `b`" for two.
        let list = problem
            .split("expected ")
            .nth(1)
            .unwrap_or_else(|| panic!("{section}: {problem}"))
            .trim_start_matches("one of ");
        list.split([',', ' '])
            .filter(|word| word.starts_with('`'))
            .map(|key| key.trim_matches('`').to_owned())
            .filter(|key| key != "max_age") // removed: refused with an explanation
            .collect()
    }

    /// Each section's keys as config/things.example.toml shows them, set or commented out.
    fn example_keys() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/things.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut keys: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            if line.starts_with('[') && line.ends_with(']') {
                section = line.trim_matches(|c| c == '[' || c == ']').to_owned();
                continue;
            }
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.entry(section.clone())
                    .or_default()
                    .insert(key.to_owned());
            }
        }
        keys
    }

    #[test]
    fn the_example_shows_every_key_and_only_real_keys() {
        let example = example_keys();
        for section in [
            "",
            "source",
            "thing",
            "thing.alert",
            "lifecycle",
            "parquet",
            "postgres",
            "metrics",
            "nats",
            "cluster",
        ] {
            let mut accepted = struct_keys(section);
            // Sections are not keys: the top level's, and [thing.alert] inside [[thing]].
            let nested = |key: &String| match section {
                "" => example.contains_key(key.as_str()),
                _ => example.contains_key(&format!("{section}.{key}")),
            };
            accepted.retain(|key| !nested(key));
            let shown = example.get(section).cloned().unwrap_or_default();
            let missing: Vec<_> = accepted.difference(&shown).collect();
            let unknown: Vec<_> = shown.difference(&accepted).collect();
            assert!(
                missing.is_empty() && unknown.is_empty(),
                "[{section}]: the example lacks {missing:?} and shows unknown {unknown:?}"
            );
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
    fn keys_never_appear_in_errors_or_debug() {
        let config = load("[[thing]]\nname = \"a\"\nkey_env = \"S5D9_KEY\"\n").unwrap();
        assert!(!format!("{config:?}").contains("s3cret-key"));
        let error = load("[[thing]]\nname = \"a\"\nkey_env = \"S5D9_KEY\"\nkey_file = \"/x\"\n")
            .unwrap_err();
        assert!(!error.to_string().contains("s3cret-key"));
    }

    #[test]
    fn a_declared_lock_or_alert_turns_the_lifecycle_on() {
        let plain = load("[[thing]]\nname = \"a\"\nkey_env = \"S5D9_KEY\"\n").unwrap();
        assert_eq!(
            plain.lifecycle, None,
            "an ingest-only file is not reconciled by run"
        );
        let locked = load(
            "[[thing]]\nname = \"a\"\nlock = \"l\"\nkey_env = \"S5D9_KEY\"\n[thing.alert]\nto = [\"a@b.io\", \"c@d.io\"]\nwhen = \"if(dweet.t > 4) return 'hot';\"\n",
        )
        .unwrap();
        assert_eq!(locked.lifecycle, Some(LifecycleConfig::default()));
        let thing = &locked.things[0];
        assert_eq!(thing.lock.as_deref(), Some("l"));
        assert_eq!(thing.alert.as_ref().unwrap().to.len(), 2);
        let explicit = load("[lifecycle]\ninterval = \"30s\"\n").unwrap();
        assert_eq!(
            explicit.lifecycle.unwrap().interval,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn wrong_types_are_refused_naming_the_key_and_the_type() {
        for (text, key, expected) in [
            ("[parquet]\ndir = 42\n", "parquet.dir", "integer"),
            ("[[thing]]\nname = 5\n", "thing.name", "integer"),
            (
                "[[thing]]\nname = \"a\"\nmanage = \"no\"\n",
                "thing.manage",
                "bool",
            ),
            (
                "[postgres]\nmax_rows = \"many\"\nurl = \"postgres://h/d\"\n",
                "postgres.max_rows",
                "string",
            ),
        ] {
            let error = load(text).unwrap_err();
            assert_eq!(error.key, key, "{text}: {error}");
            assert!(error.problem.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn an_override_with_a_typo_names_the_variable_not_the_file() {
        let text = "[source]\nurl = \"http://127.0.0.1:1\"\n";
        let typo = apply_overrides(
            text,
            vec![("DWEETPIPE__SOURCE__ULR".to_owned(), "http://x".to_owned())],
        )
        .unwrap_err();
        assert_eq!(typo.file, "the environment variable DWEETPIPE__SOURCE__ULR");
        assert!(typo.problem.contains("ulr"), "{typo}");
        let wrong_type = apply_overrides(
            "[parquet]\ndir = \"p\"\nmax_rows = 10\n",
            vec![("DWEETPIPE__PARQUET__MAX_ROWS".to_owned(), "many".to_owned())],
        )
        .unwrap_err();
        assert_eq!(
            wrong_type.file,
            "the environment variable DWEETPIPE__PARQUET__MAX_ROWS"
        );
        assert!(wrong_type.problem.contains("max_rows"), "{wrong_type}");
        let good = apply_overrides(
            text,
            vec![
                (
                    "DWEETPIPE__SOURCE__URL".to_owned(),
                    "http://10.0.0.1:80".to_owned(),
                ),
                ("DWEETPIPE__PARQUET__DIR".to_owned(), "/tmp/p".to_owned()),
                ("DWEETPIPE__PARQUET__MAX_ROWS".to_owned(), "5000".to_owned()),
            ],
        )
        .unwrap();
        assert_eq!(good.source.unwrap().url, "http://10.0.0.1:80");
        assert_eq!(good.parquet.unwrap().max_rows, 5000);
        let thing = apply_overrides(
            "[[thing]]\nname = \"a\"\n",
            vec![("DWEETPIPE__THING__NAME".to_owned(), "b".to_owned())],
        )
        .unwrap_err();
        assert!(
            thing.problem.contains("`[[thing]]` is a list")
                && thing.problem.contains("in the file"),
            "{thing}"
        );
    }

    #[test]
    fn a_key_alone_never_hands_a_things_lock_and_alert_over() {
        // The README's pattern for ingesting a locked thing, beside a managed one.
        let mixed = load(
            "[[thing]]\nname = \"S5D9-63de\"\nkey_env = \"S5D9_KEY\"\n\n[[thing]]\nname = \"b\"\nlock = \"other-lock\"\nkey_env = \"S5D9_KEY\"\n",
        )
        .unwrap();
        assert!(!mixed.things[0].manage, "a key is for reading only");
        assert!(mixed.things[1].manage);
        let asked =
            load("[[thing]]\nname = \"a\"\nkey_env = \"S5D9_KEY\"\nmanage = true\n").unwrap();
        assert!(asked.things[0].manage, "manage = true asks for it");
        assert!(asked.lifecycle.is_some());
        let error = load("[[thing]]\nname = \"a\"\nmanage = true\n").unwrap_err();
        assert_eq!(error.key, "thing[0].manage");
    }
}
