//! The NATS connection both the cluster membership and the JetStream output use: a list of
//! addresses (comma-separated, for a NATS cluster), reconnecting for ever, and errors and logs
//! that never show a password in an address.

use std::time::Duration;

use crate::settings::redact_url;

/// NATS could not be reached or refused a request.
#[derive(Debug, thiserror::Error)]
#[error("NATS at {url}: {problem}; check that nats-server runs there with JetStream on (-js)")]
pub struct NatsError {
    /// The addresses, passwords hidden.
    pub url: String,
    pub problem: String,
}

impl NatsError {
    pub fn new(urls: &str, problem: impl ToString) -> Self {
        NatsError {
            url: redact_urls(urls),
            problem: problem.to_string(),
        }
    }
}

/// Every address of a comma-separated list with its password hidden.
pub fn redact_urls(urls: &str) -> String {
    addresses(urls)
        .iter()
        .map(|u| redact_url(u))
        .collect::<Vec<_>>()
        .join(",")
}

fn addresses(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Connects to `urls` and keeps reconnecting for as long as the client lives. With `wait`
/// the first connection must succeed (a one-off command); without, it is retried in the
/// background and requests fail until NATS answers (a long-running worker).
pub async fn connect(urls: &str, name: &str, wait: bool) -> Result<async_nats::Client, NatsError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(3))
        .max_reconnects(None);
    if !wait {
        options = options.retry_on_initial_connect();
    }
    options
        .connect(addresses(urls))
        .await
        .map_err(|error| NatsError::new(urls, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_any_address_are_hidden() {
        let shown = redact_urls("nats://a:hunter2@h1:4222, nats://h2:4222");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("h1:4222") && shown.contains("h2:4222"),
            "{shown}"
        );
        let error = NatsError::new("nats://a:hunter2@h1:4222", "refused");
        assert!(!error.to_string().contains("hunter2"));
    }
}
