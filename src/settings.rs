//! What every configuration section shares without depending on `config`: human units
//! (durations like "5s", byte sizes like "512MiB") as serde deserialisers, and [`Invalid`], the
//! one validation error (key, problem, fix) each section returns.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A secret from the command line or a file (a lock spec with its key, an SMTP URL with its
/// password): `Debug` and `Display` never show it, so a struct holding one can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    /// The secret itself; call sites are easy to audit by this name.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_owned()))
    }
}

/// `url` with the password of any `user:password@` part replaced, for logs and reports.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// A value a section refuses: which key, what is wrong with it, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Relative to the section (`url`); [`Invalid::within`] adds the section.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Invalid {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// The same, with its key under `section` (`source` + `url` = `source.url`).
    pub fn within(mut self, section: &str) -> Self {
        self.key = format!("{section}.{}", self.key);
        self
    }
}

/// Deserialises a human duration: "5s", "2m", "1h 30m", "250ms".
/// An address that may hold a password, given in the file (`url_key`) or through an
/// environment variable named in the file (`env_key`): one of the two, and a named variable
/// must be set. Without either, `fallback` is used, or the error says `missing` (what to set).
pub fn address(
    (url_key, url): (&str, Option<&str>),
    (env_key, variable): (&str, Option<&str>),
    env: impl Fn(&str) -> Option<String>,
    fallback: Option<&str>,
    missing: &str,
) -> Result<String, Invalid> {
    match (url, variable) {
        (Some(_), Some(_)) => Err(Invalid::new(
            env_key,
            format!("{url_key} and {env_key} are both set"),
            "keep one of them",
        )),
        (Some(url), None) => Ok(url.to_owned()),
        (None, Some(variable)) => env(variable)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Invalid::new(
                    env_key,
                    format!("the environment variable {variable} is not set (or empty)"),
                    "export it (systemd: EnvironmentFile=, Kubernetes: a Secret)",
                )
            }),
        (None, None) => fallback
            .map(str::to_owned)
            .ok_or_else(|| Invalid::new(url_key, "no address is given", missing)),
    }
}

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

    #[test]
    fn secrets_and_url_passwords_never_print() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(
            redact_url("http://probe:hunter2@127.0.0.1:80/dweet?x=1"),
            "http://probe:***@127.0.0.1:80/dweet?x=1"
        );
        assert_eq!(redact_url("https://dweet.io"), "https://dweet.io");
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_byte_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_byte_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_byte_size("1000"), Some(1000));
        assert_eq!(parse_byte_size("lots"), None);
    }
}
