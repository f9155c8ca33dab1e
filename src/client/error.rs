//! The client's one error type. Each variant is something a caller can act on: retry later,
//! supply a key, fix the thing name, or give up.

use crate::protocol;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unknown or expired thing, or no alert. Display is the server's reason.
    #[error("{because}")]
    NotFound { because: String },
    /// The thing is locked and the call carried no key.
    #[error("{because}")]
    Locked { because: String },
    /// The key does not open the thing or the lock.
    #[error("{because}")]
    WrongKey { because: String },
    /// `remove_lock` on a lock attached to nothing.
    #[error("{because}")]
    LockNotInUse { because: String },
    /// The server asked us to slow down.
    #[error("{because}")]
    RateLimited { because: String },
    /// Any other `{"this":"failed"}` answer.
    #[error("{because}")]
    Api { code: Option<u16>, because: String },
    /// A non-2xx answer that was not a failure envelope.
    #[error("the server answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    /// The request never got an answer: DNS, connect, TLS, timeout, reset.
    /// The cause's whole chain is in the message (logs print `Display` only), and is not a
    /// `source`, so `{:#}` says it once.
    #[error("could not talk to the dweet server: {}", chain(.0))]
    Transport(reqwest::Error),
    /// A listen stream's own connection failed (plain-HTTP transport).
    #[error("could not talk to the dweet server: {0}")]
    Connection(std::io::Error),
    /// The answer was not what the protocol says.
    #[error("could not decode the server's answer to {context}: {detail}")]
    Decode {
        context: &'static str,
        detail: String,
    },
    /// The content to send does not serialise to JSON (a map with keys that are not text,
    /// a `Serialize` implementation that failed).
    #[error("the content cannot be sent as JSON: {0}")]
    Encode(serde_json::Error),
    /// The base URL or a client option is unusable.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

/// An error and its sources as one line, each text once (reqwest and hyper repeat theirs).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

impl Error {
    /// Classifies a `{"this":"failed"}` envelope by its reason.
    pub fn from_failure(code: Option<u16>, because: String) -> Self {
        match because.as_str() {
            protocol::NOT_FOUND => Error::NotFound { because },
            protocol::LOCKED => Error::Locked { because },
            protocol::WRONG_KEY => Error::WrongKey { because },
            protocol::LOCK_NOT_IN_USE => Error::LockNotInUse { because },
            text if text
                .to_ascii_lowercase()
                .contains(protocol::RATE_LIMIT_PHRASE) =>
            {
                Error::RateLimited { because }
            }
            _ => Error::Api { code, because },
        }
    }

    /// Wraps a transport error without its URL: URLs carry `?key=`, and errors get logged.
    pub(crate) fn transport(error: reqwest::Error) -> Self {
        Error::Transport(error.without_url())
    }

    /// Whether the same call may succeed later without the caller changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport(_) | Error::Connection(_) | Error::RateLimited { .. } => true,
            Error::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_their_reason() {
        let classify = |text: &str| Error::from_failure(Some(400), text.to_owned());
        assert!(matches!(
            classify(protocol::NOT_FOUND),
            Error::NotFound { .. }
        ));
        assert!(matches!(classify(protocol::LOCKED), Error::Locked { .. }));
        assert!(matches!(
            classify(protocol::WRONG_KEY),
            Error::WrongKey { .. }
        ));
        assert!(matches!(
            classify(protocol::LOCK_NOT_IN_USE),
            Error::LockNotInUse { .. }
        ));
        assert!(matches!(
            classify("Rate limit exceeded, try again later"),
            Error::RateLimited { .. }
        ));
        let other = classify("something else");
        assert!(matches!(
            other,
            Error::Api {
                code: Some(400),
                ..
            }
        ));
        assert_eq!(other.to_string(), "something else");
    }
}
