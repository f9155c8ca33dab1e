//! The listen stream: one HTTP connection's body fed through the [`FrameDecoder`], with an idle
//! timeout and, optionally, dweepy-style reconnects until an overall deadline.
//!
//! The public service closed idle streams after about a minute and sent no keepalives, so an
//! idle close is a normal end of a connection, not an error. Callers that need their own
//! reconnect policy (the ingest worker, with backoff and backfill) use a single connection and
//! reopen it themselves.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::decoder::{Decoded, FrameDecoder, ObjectReader, SkippedLine};
use super::error::{Error, Result};
use super::types::Dweet;

/// How a listen stream behaves.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// Reconnect whenever the connection ends or fails, until this much time has passed since
    /// the stream was opened, then end (dweepy's `timeout=`). `None`: one connection only.
    pub reconnect_for: Option<Duration>,
    /// A connection that sends nothing for this long is treated as dead. Keep it above the
    /// server's own idle close (60 s on the public service). Default 90 s.
    pub idle_timeout: Duration,
    /// Pause between reconnect attempts. Default 1 s.
    pub reconnect_delay: Duration,
    /// The longest stream line kept; see [`FrameDecoder::with_max_line`].
    pub max_line: usize,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            reconnect_for: None,
            idle_timeout: Duration::from_secs(90),
            reconnect_delay: Duration::from_secs(1),
            max_line: super::decoder::DEFAULT_MAX_LINE,
        }
    }
}

/// Counters of one listen stream, readable while it runs.
#[derive(Debug, Default)]
pub struct ListenStats {
    connects: AtomicU64,
    dweets: AtomicU64,
    skipped_lines: AtomicU64,
}

impl ListenStats {
    /// Connections opened (the first one included).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
    pub fn dweets(&self) -> u64 {
        self.dweets.load(Ordering::Relaxed)
    }
    /// Lines that were not a dweet and were skipped.
    pub fn skipped_lines(&self) -> u64 {
        self.skipped_lines.load(Ordering::Relaxed)
    }
}

/// What a listen stream delivers: a dweet, or a line that was not one (the stream goes on).
#[derive(Debug, Clone, PartialEq)]
pub enum ListenEvent<D = Dweet> {
    Dweet(D),
    /// Kept for callers that store such lines as dead letters; counted in [`ListenStats`].
    Skipped(SkippedLine),
}

/// A stream of dweets from `listen_for_dweets_from`. It ends when the connection ends (or,
/// with `reconnect_for`, when the deadline passes); it yields an error and ends when the
/// server refuses the stream (unknown lock key, say) or the connection fails without
/// reconnects. Lines that are not dweets are skipped and counted; [`DweetStream::events`]
/// yields them too.
pub struct DweetStream<D = Dweet> {
    inner: BoxStream<'static, Result<ListenEvent<D>>>,
    stats: Arc<ListenStats>,
}

impl<D> DweetStream<D> {
    pub fn stats(&self) -> Arc<ListenStats> {
        Arc::clone(&self.stats)
    }

    /// Every event, skipped lines included; `Err` only for failures.
    pub fn events(self) -> BoxStream<'static, Result<ListenEvent<D>>> {
        self.inner
    }
}

impl<D> std::fmt::Debug for DweetStream<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DweetStream")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<D> Stream for DweetStream<D> {
    type Item = Result<D>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            return match self.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(ListenEvent::Skipped(_)))) => continue,
                Poll::Ready(Some(Ok(ListenEvent::Dweet(dweet)))) => Poll::Ready(Some(Ok(dweet))),
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// How a listen connection is made.
#[derive(Debug, Clone)]
pub(super) enum Transport {
    /// Through the client's reqwest session (TLS, proxies, a caller's own client).
    Reqwest,
    /// Plain TCP with no per-connection buffers while idle.
    Plain {
        user_agent: String,
        connect_timeout: Duration,
    },
}

/// Largest finished (Content-Length) answer read on the listen path.
const MAX_FINISHED_ANSWER: usize = 1024 * 1024;

struct Listener<D> {
    http: reqwest::Client,
    transport: Transport,
    url: String,
    options: ListenOptions,
    deadline: Option<Instant>,
    decoder: FrameDecoder,
    body: Option<BoxStream<'static, Result<Bytes>>>,
    stats: Arc<ListenStats>,
    finished: bool,
    /// Offered each object before serde_json (see [`FrameDecoder::next_event_read_by`]).
    reader: LineReader<D>,
}

/// What a listen stream offers each JSON object before serde_json reads it as a dweet.
pub(super) type LineReader<D> = Box<dyn ObjectReader<D> + Send>;

/// Opens the first connection before returning, so that once this resolves the server has
/// subscribed us: a dweet sent afterwards is delivered. A refusal or a failure to connect is
/// returned here; later connections follow `options`.
pub(super) async fn open<D: DeserializeOwned + Send + 'static>(
    http: reqwest::Client,
    transport: Transport,
    url: String,
    options: ListenOptions,
    reader: LineReader<D>,
) -> Result<DweetStream<D>> {
    let stats = Arc::new(ListenStats::default());
    let mut listener = Listener {
        http,
        transport,
        url,
        deadline: options.reconnect_for.map(|d| Instant::now() + d),
        decoder: FrameDecoder::with_max_line(options.max_line),
        options,
        body: None,
        stats: Arc::clone(&stats),
        finished: false,
        reader,
    };
    listener.connect().await?;
    let inner = futures_util::stream::unfold(listener, |mut listener| async move {
        let item = listener.next_item().await?;
        Some((item, listener))
    })
    .boxed();
    Ok(DweetStream { inner, stats })
}

enum Step<D> {
    Yield(Result<ListenEvent<D>>),
    End,
    Continue,
}

impl<D: DeserializeOwned> Listener<D> {
    async fn next_item(&mut self) -> Option<Result<ListenEvent<D>>> {
        loop {
            if self.finished {
                return None;
            }
            match self.step().await {
                Step::Yield(item) => return Some(item),
                Step::End => {
                    self.finished = true;
                    return None;
                }
                Step::Continue => {}
            }
        }
    }

    fn reconnecting(&self) -> bool {
        self.deadline.is_some()
    }

    fn time_left(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    fn deadline_passed(&self) -> bool {
        self.time_left() == Some(Duration::ZERO)
    }

    async fn step(&mut self) -> Step<D> {
        if let Some(event) = self.decoder.next_event_read_by(&mut *self.reader) {
            return self.on_event(event);
        }
        if self.deadline_passed() {
            return Step::End;
        }
        let wait = self.time_left().map_or(self.options.idle_timeout, |left| {
            left.min(self.options.idle_timeout)
        });
        let reconnecting = self.reconnecting();
        match self.body.as_mut() {
            None if !reconnecting => Step::End,
            None => self.reconnect().await,
            Some(body) => {
                match tokio::time::timeout(wait, body.next()).await {
                    Ok(Some(Ok(bytes))) => {
                        self.decoder.push_read(bytes);
                        Step::Continue
                    }
                    Ok(Some(Err(error))) => self.connection_lost(Some(error)),
                    Ok(None) => {
                        // The server ended the stream (idle close): normal, and a last line
                        // without a newline still counts.
                        let last = self.decoder.finish_read_by(&mut *self.reader);
                        let step = self.connection_lost(None);
                        match last {
                            Some(event) => self.on_event(event),
                            None => step,
                        }
                    }
                    Err(_elapsed) if self.deadline_passed() => Step::End,
                    Err(_elapsed) => self.connection_lost(None),
                }
            }
        }
    }

    fn on_event(&mut self, event: Decoded<D>) -> Step<D> {
        match event {
            Decoded::Dweet(dweet) => {
                self.stats.dweets.fetch_add(1, Ordering::Relaxed);
                Step::Yield(Ok(ListenEvent::Dweet(dweet)))
            }
            Decoded::Skipped(line) => {
                self.stats.skipped_lines.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(reason = %line.reason, "skipped a listen stream line");
                Step::Yield(Ok(ListenEvent::Skipped(line)))
            }
            Decoded::Failure { code, because } => {
                // A refusal (locked, wrong key) will not change by reconnecting.
                self.finished = true;
                Step::Yield(Err(Error::from_failure(code, because)))
            }
        }
    }

    /// The connection is gone; with reconnects on, the next step opens a new one.
    fn connection_lost(&mut self, error: Option<Error>) -> Step<D> {
        self.body = None;
        self.decoder.reset();
        match error {
            _ if self.reconnecting() => Step::Continue,
            Some(error) => {
                self.finished = true;
                Step::Yield(Err(error))
            }
            None => Step::End,
        }
    }

    /// Opens the next connection after a pause; only reached with reconnects on.
    async fn reconnect(&mut self) -> Step<D> {
        let pause = self
            .time_left()
            .map_or(self.options.reconnect_delay, |left| {
                left.min(self.options.reconnect_delay)
            });
        tokio::time::sleep(pause).await;
        if self.deadline_passed() {
            return Step::End;
        }
        let attempt = match self.time_left() {
            Some(left) => match tokio::time::timeout(left, self.connect()).await {
                Ok(attempt) => attempt,
                Err(_elapsed) => return Step::End,
            },
            None => self.connect().await,
        };
        match attempt {
            Ok(()) => Step::Continue,
            Err(error) if error.is_transient() => {
                tracing::debug!(%error, "listen reconnect failed; retrying");
                Step::Continue
            }
            Err(error) => {
                // A refusal (locked, wrong key) will not change by retrying.
                self.finished = true;
                Step::Yield(Err(error))
            }
        }
    }

    /// One connection attempt. A stream is open-ended (chunked); an answer with a length is a
    /// finished answer, normally a failure envelope, and is read whole.
    async fn connect(&mut self) -> Result<()> {
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        let (status, finished, mut body) = match &self.transport {
            Transport::Reqwest => {
                let response = self
                    .http
                    .get(&self.url)
                    .send()
                    .await
                    .map_err(Error::transport)?;
                let status = response.status().as_u16();
                let finished = response.content_length().is_some();
                let body = response
                    .bytes_stream()
                    .map(|r| r.map_err(Error::transport))
                    .boxed();
                (status, finished, body)
            }
            Transport::Plain {
                user_agent,
                connect_timeout,
            } => {
                let url = reqwest::Url::parse(&self.url)
                    .map_err(|e| Error::Config(format!("listen URL: {e}")))?;
                let response = super::plain::get(&url, user_agent, *connect_timeout).await?;
                (
                    response.status,
                    response.content_length.is_some(),
                    response.body,
                )
            }
        };
        if (200..300).contains(&status) && !finished {
            self.body = Some(body);
            return Ok(());
        }
        let mut whole = Vec::new();
        while let Some(piece) = body.next().await {
            whole.extend_from_slice(&piece?);
            if whole.len() > MAX_FINISHED_ANSWER {
                break;
            }
        }
        let status =
            reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
        match super::parse_answer::<serde_json::Value>(status, &whole, "listen") {
            // Not an envelope: a clone that answered with a fixed batch of lines.
            Err(Error::Decode { .. }) | Ok(_) if status.is_success() => {
                self.decoder.push(&whole);
                self.decoder.push(b"\n");
                Ok(())
            }
            Err(error) => Err(error),
            Ok(_) => Err(Error::Status {
                status: status.as_u16(),
                body: super::snippet(&whole),
            }),
        }
    }
}
