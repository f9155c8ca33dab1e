//! Where an alert goes when it opens or closes: the sandbox's pluggable notifiers.
//!
//! dweet.io e-mailed an alert's recipients. The sandbox always logs, by default also appends
//! one JSON line per notification to an outbox file (which a mail bridge, a test or a human can
//! read), and sends e-mail itself when given an SMTP relay. Notifications are sent after the
//! dweet is answered and never fail it; a notifier that fails is logged and the others go on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;

pub use crate::alert::condition::NotificationKind;
use tokio::io::AsyncWriteExt;

/// One alert notification, as written to the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification {
    pub thing: String,
    pub kind: NotificationKind,
    /// What the condition returned (empty on close).
    pub message: String,
    /// `created` of the dweet that caused it.
    pub created: String,
    pub condition: String,
    pub recipients: Vec<String>,
    /// False when the day's allowance of alerts was already used: recorded, not e-mailed.
    pub within_allowance: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("could not append to the alert outbox {path}: {source}")]
    Outbox {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not e-mail the alert: {0}")]
    Smtp(String),
}

/// A way of telling someone about an alert.
pub trait Notify: fmt::Debug + Send + Sync {
    fn notify<'a>(
        &'a self,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<(), NotifyError>>;
}

/// A log line per notification, always on.
#[derive(Debug, Default)]
pub struct LogNotifier;

impl Notify for LogNotifier {
    fn notify<'a>(
        &'a self,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            tracing::info!(
                thing = %notification.thing,
                kind = ?notification.kind,
                says = %notification.message,
                recipients = notification.recipients.len(),
                within_allowance = notification.within_allowance,
                "alert"
            );
            Ok(())
        })
    }
}

/// Appends each notification as one JSON line to a file.
#[derive(Debug)]
pub struct OutboxNotifier {
    path: PathBuf,
    /// One writer at a time, so lines never interleave.
    file: tokio::sync::Mutex<Option<tokio::fs::File>>,
}

impl OutboxNotifier {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        OutboxNotifier {
            path: path.into(),
            file: tokio::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let mut file = self.file.lock().await;
        if file.is_none() {
            *file = Some(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .await?,
            );
        }
        let Some(open) = file.as_mut() else {
            return Ok(());
        };
        let written = async {
            open.write_all(line).await?;
            open.flush().await
        }
        .await;
        if written.is_err() {
            // Reopen next time: the file may have been rotated or its disk remounted.
            *file = None;
        }
        written
    }
}

impl Notify for OutboxNotifier {
    fn notify<'a>(
        &'a self,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let mut line = serde_json::to_vec(notification).map_err(|e| NotifyError::Outbox {
                path: self.path.clone(),
                source: e.into(),
            })?;
            line.push(b'\n');
            self.append(&line)
                .await
                .map_err(|source| NotifyError::Outbox {
                    path: self.path.clone(),
                    source,
                })
        })
    }
}

/// E-mails opened alerts (within the day's allowance) through an SMTP relay.
pub struct SmtpNotifier {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
    /// For `Debug`: the relay's host, never its credentials.
    relay: String,
}

impl fmt::Debug for SmtpNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpNotifier")
            .field("relay", &self.relay)
            .field("from", &self.from.email.to_string())
            .finish()
    }
}

impl SmtpNotifier {
    /// `url` is lettre's form: `smtp://host:25` (plain), `smtp://host:587?tls=required`
    /// (STARTTLS), `smtps://user:password@host:465` (TLS); `from` is the sender address.
    pub fn new(url: &str, from: &str) -> Result<Self, NotifyError> {
        let from: lettre::message::Mailbox = from
            .parse()
            .map_err(|e| NotifyError::Smtp(format!("the sender {from:?} is not valid: {e}")))?;
        let relay = url
            .split_once("://")
            .map(|(_, rest)| rest.rsplit('@').next().unwrap_or(rest))
            .unwrap_or("(unparsed)")
            .split(['/', '?'])
            .next()
            .unwrap_or_default()
            .to_owned();
        let transport = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(url)
            // The URL may hold a password, so the error must not repeat it.
            .map_err(|_| {
                NotifyError::Smtp(format!(
                    "the SMTP URL for {relay} is not valid; write smtp://host:port, \
                     smtp://host:587?tls=required or smtps://user:password@host:465"
                ))
            })?
            .timeout(Some(Duration::from_secs(20)))
            .build();
        Ok(SmtpNotifier {
            transport,
            from,
            relay,
        })
    }

    fn message(&self, notification: &Notification) -> Result<lettre::Message, NotifyError> {
        let mut builder = lettre::Message::builder()
            .from(self.from.clone())
            .subject(format!(
                "dweet alert for {}: {}",
                notification.thing, notification.message
            ));
        for address in &notification.recipients {
            let mailbox = address
                .parse()
                .map_err(|e| NotifyError::Smtp(format!("{address:?}: {e}")))?;
            builder = builder.to(mailbox);
        }
        let body = format!(
            "The alert on {thing} opened at {created}.\n\nMessage: {message}\n\nCondition:\n{condition}\n",
            thing = notification.thing,
            created = notification.created,
            message = notification.message,
            condition = notification.condition,
        );
        builder
            .body(body)
            .map_err(|e| NotifyError::Smtp(e.to_string()))
    }
}

impl Notify for SmtpNotifier {
    fn notify<'a>(
        &'a self,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            if notification.kind != NotificationKind::Opened || !notification.within_allowance {
                return Ok(());
            }
            let message = self.message(notification)?;
            lettre::AsyncTransport::send(&self.transport, message)
                .await
                .map(|_| ())
                .map_err(|e| NotifyError::Smtp(format!("via {}: {e}", self.relay)))
        })
    }
}
