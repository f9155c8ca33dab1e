//! The sandbox's HTTP face: routing, request decoding and the exact answer bytes. The rules
//! themselves live in the store; this module only translates between them and the wire.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::disk::{Change, Disk};
use super::evaluator::{Evaluator, NoVerdict};
use super::store::{PendingEvaluation, Store};
use super::{Refusal, SandboxConfig, content, names, pages, stored};
use crate::alert::condition::ConditionEngine;
use crate::client::Recipient;
use crate::http_server::Body;
use crate::protocol::{self, Failure, Success};

pub(super) struct App {
    store: Arc<Store>,
    disk: Arc<Disk>,
    evaluator: Evaluator,
    config: SandboxConfig,
    prefix: String,
    shutdown: CancellationToken,
}

enum Reply {
    Json(String),
    Csv(String),
    /// A page or asset for people, with its content type.
    Page(&'static str, String),
    NoContent,
    Stream(broadcast::Receiver<Bytes>),
    /// `/healthz`: plain text with its own status.
    Health(StatusCode, String),
}

/// The parts of a request every route may need.
struct Call<'a> {
    method: &'a Method,
    /// Path segments after the prefix, raw (still percent-encoded).
    segments: Vec<&'a str>,
    query: Vec<(String, String)>,
    /// The key from the `X-Dweet-Auth` header: pages send it there, so it never appears in an
    /// address a proxy or a browser history could keep.
    header_key: Option<String>,
}

impl Call<'_> {
    /// A named parameter; an empty one (`hour=`) is absent, as dweet.io treated it: clients
    /// send every optional parameter, filled or not.
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn key(&self) -> Option<&str> {
        self.param("key").or(self.header_key.as_deref())
    }
}

impl App {
    pub(super) fn new(
        store: Arc<Store>,
        disk: Arc<Disk>,
        evaluator: Evaluator,
        config: SandboxConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let prefix = config.prefix.trim_end_matches('/').to_owned();
        App {
            store,
            disk,
            evaluator,
            config,
            prefix,
            shutdown,
        }
    }

    pub(super) async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let query: Vec<(String, String)> = parts
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let callback = query
            .iter()
            .rev()
            .find(|(n, _)| n == "callback")
            .map(|(_, v)| v.clone());
        if parts.method == Method::OPTIONS {
            // A CORS preflight: a browser asks before POSTing JSON.
            let mut answer = respond(StatusCode::NO_CONTENT, None, Empty::new().boxed_unsync());
            let headers = answer.headers_mut();
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(protocol::CORS_ALLOW_METHODS),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(protocol::CORS_ALLOW_HEADERS),
            );
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("86400"),
            );
            return answer;
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let outcome = match self.split_path(parts.uri.path()) {
            Some(segments) => {
                let header_key = parts
                    .headers
                    .get("x-dweet-auth")
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned);
                let call = Call {
                    method: &parts.method,
                    segments,
                    query,
                    header_key,
                };
                self.route(&call, body, content_type).await
            }
            None => Err(unknown_path()),
        };
        match outcome {
            Ok(Reply::Json(text)) => json_response(StatusCode::OK, text, callback.as_deref()),
            Ok(Reply::Page(kind, text)) => respond(
                StatusCode::OK,
                Some(kind),
                Full::new(Bytes::from(text)).boxed_unsync(),
            ),
            Ok(Reply::Csv(text)) => respond(
                StatusCode::OK,
                Some("text/csv; charset=utf-8"),
                Full::new(Bytes::from(text)).boxed_unsync(),
            ),
            Ok(Reply::Health(status, text)) => respond(
                status,
                Some("text/plain; charset=utf-8"),
                Full::new(Bytes::from(text)).boxed_unsync(),
            ),
            Ok(Reply::NoContent) => {
                respond(StatusCode::NO_CONTENT, None, Empty::new().boxed_unsync())
            }
            Ok(Reply::Stream(receiver)) => respond(
                StatusCode::OK,
                Some("text/plain; charset=utf-8"),
                listen_body(receiver, self.config.idle_close, self.shutdown.clone()),
            ),
            Err(refusal) => {
                let status = StatusCode::from_u16(refusal.http_status).unwrap_or(StatusCode::OK);
                let text = encode(&Failure::new(refusal.code, &refusal.because));
                json_response(status, text, callback.as_deref())
            }
        }
    }

    /// The raw segments after the prefix, or `None` when the path is outside the prefix.
    fn split_path<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let rest = path.strip_prefix(self.prefix.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        Some(if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        })
    }

    async fn route(
        &self,
        call: &Call<'_>,
        body: Incoming,
        content_type: Option<&str>,
    ) -> Result<Reply, Refusal> {
        if !matches!(*call.method, Method::GET | Method::POST | Method::HEAD) {
            return Err(Refusal::new(
                405,
                format!("method {} is not supported; use GET or POST", call.method),
            )
            .with_http_status(405));
        }
        let key = call.key();
        if matches!(*call.method, Method::GET | Method::HEAD)
            && let Some((kind, page)) = pages::page(&call.segments, &self.prefix)
        {
            return Ok(Reply::Page(kind, page));
        }
        match call.segments.as_slice() {
            ["healthz"] => Ok(self.health()),
            ["dweet"] => {
                let content = self.read_content(body, content_type, call).await?;
                let thing = self.store.claim_generated_name({
                    let mut attempt = 0;
                    move || {
                        attempt += 1;
                        names::generate(&mut rand::rng(), attempt)
                    }
                });
                self.write(&thing, content, key, false).await
            }
            ["dweet", "for", thing] => {
                let thing = decode_segment(thing)?;
                let content = self.read_content(body, content_type, call).await?;
                self.write(&thing, content, key, false).await
            }
            ["dweet", "quietly", "for", thing] => {
                let thing = decode_segment(thing)?;
                let content = self.read_content(body, content_type, call).await?;
                self.write(&thing, content, key, true).await
            }
            ["get", "latest", "dweet", "for", thing] => self.read(&decode_segment(thing)?, key, 1),
            ["get", "dweets", "for", thing] => self.read(&decode_segment(thing)?, key, usize::MAX),
            ["listen", "for", "dweets", "from", thing] => {
                let receiver = self.store.listen(&decode_segment(thing)?, key)?;
                Ok(Reply::Stream(receiver))
            }
            ["lock", thing] => {
                let thing = decode_segment(thing)?;
                let lock = call.param("lock").ok_or_else(|| {
                    Refusal::new(400, "a lock is required: /lock/THING?lock=LOCK&key=KEY")
                })?;
                let changes = self.store.lock(&thing, lock, key)?;
                self.commit(changes).await?;
                succeeded("locking", "lock", &thing)
            }
            ["unlock", thing] => {
                let thing = decode_segment(thing)?;
                let changes = self.store.unlock(&thing, key)?;
                self.commit(changes).await?;
                succeeded("unlocking", "lock", &thing)
            }
            ["remove", "lock", lock] => {
                let lock = decode_segment(lock)?;
                let changes = self.store.remove_lock(&lock, key)?;
                self.commit(changes).await?;
                succeeded("removing", "lock", &lock)
            }
            ["alert", who, "when", thing, condition @ ..] if !condition.is_empty() => {
                let recipients = parse_recipients(&decode_segment(who)?)?;
                let thing = decode_segment(thing)?;
                let condition = decode_condition(&condition.join("/"))?;
                let (alert, change) = self.store.set_alert(&thing, recipients, condition, key)?;
                self.commit(vec![change]).await?;
                succeeded("alerting", "alert", &alert)
            }
            ["get", "alert", "for", thing] => {
                let alert = self.store.get_alert(&decode_segment(thing)?, key)?;
                succeeded("getting", "alert", &alert)
            }
            ["remove", "alert", "for", thing] => {
                let thing = decode_segment(thing)?;
                let change = self.store.remove_alert(&thing, key)?;
                self.commit(vec![change]).await?;
                let removed = serde_json::json!({ "thing": thing });
                succeeded("removing", "alert", &removed)
            }
            ["get", "recent", "dweets"] => self.recent(call),
            ["get", "stored", "dweets", "for", thing] => self.stored_dweets(call, thing, key),
            ["get", "stored", "alerts", "for", thing] => self.stored_alerts(call, thing, key),
            _ => Err(unknown_path()),
        }
    }

    /// Whether the store commits: 503 with the reason while it cannot (a full disk), so a
    /// probe or an operator learns what the failed requests already said.
    fn health(&self) -> Reply {
        match self.disk.problem() {
            None => Reply::Health(StatusCode::OK, "ok: the store commits\n".to_owned()),
            Some(problem) => Reply::Health(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the store cannot commit: {problem}\n"),
            ),
        }
    }

    /// The newest dweets of every thing, `limit` (1 to 1000) at most.
    fn recent(&self, call: &Call<'_>) -> Result<Reply, Refusal> {
        let limit = call
            .param("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(100usize)
            .clamp(1, 1000);
        let recent = self.store.recent(limit, RECENT_WITHIN);
        succeeded("getting", "dweets", &json_array(&recent)?)
    }

    /// A thing's dweets of one stored day, as JSON or CSV.
    fn stored_dweets(
        &self,
        call: &Call<'_>,
        thing: &str,
        key: Option<&str>,
    ) -> Result<Reply, Refusal> {
        let (thing, csv, window) = self.stored_request(call, thing, key)?;
        let dweets = self
            .disk
            .stored_dweets(&thing, window.day, window.from_ms, window.to_ms)
            .map_err(|e| Refusal::new(500, e.to_string()))?;
        stored_reply(csv, "dweets", &dweets, stored::dweets_csv)
    }

    /// A thing's alert events of one stored day, as JSON or CSV.
    fn stored_alerts(
        &self,
        call: &Call<'_>,
        thing: &str,
        key: Option<&str>,
    ) -> Result<Reply, Refusal> {
        let (thing, csv, window) = self.stored_request(call, thing, key)?;
        let events: Vec<String> = self
            .disk
            .alert_events(&thing, window.day)
            .map_err(|e| Refusal::new(500, e.to_string()))?
            .into_iter()
            .filter(|event| {
                serde_json::from_str::<serde_json::Value>(event)
                    .ok()
                    .and_then(|v| v.get("at_ms")?.as_i64())
                    .is_some_and(|at| (window.from_ms..window.to_ms).contains(&at))
            })
            .collect();
        stored_reply(csv, "alerts", &events, stored::events_csv)
    }

    /// A stored-dweets or stored-alerts request checked: the thing (locked, the key right),
    /// whether CSV is wanted, and the day and `[from, to)` window.
    fn stored_request(
        &self,
        call: &Call<'_>,
        raw_thing: &str,
        key: Option<&str>,
    ) -> Result<(String, bool, stored::Window), Refusal> {
        let thing = decode_segment(raw_thing)?;
        self.store.check_stored_access(&thing, key)?;
        let csv = stored::wants_csv(call.param("responseType"))?;
        let window = stored::window(call.param("date"), call.param("hour"))?;
        Ok((thing, csv, window))
    }

    /// Commits `changes` before the answer goes out: a request answered as succeeded survives
    /// a crash.
    async fn commit(&self, changes: Vec<Change>) -> Result<(), Refusal> {
        self.disk.commit(changes).await.map_err(|error| {
            Refusal::new(500, format!("the sandbox could not store this: {error}"))
        })
    }

    async fn read_content(
        &self,
        body: Incoming,
        content_type: Option<&str>,
        call: &Call<'_>,
    ) -> Result<serde_json::Map<String, serde_json::Value>, Refusal> {
        let limit = self.config.max_body_bytes;
        let bytes = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|_| {
                Refusal::new(
                    413,
                    format!("the request body is larger than {limit} bytes"),
                )
            })?
            .to_bytes();
        let content = content::from_request(&bytes, content_type, &call.query)?;
        Ok(content)
    }

    async fn write(
        &self,
        thing: &str,
        content: serde_json::Map<String, serde_json::Value>,
        key: Option<&str>,
        quietly: bool,
    ) -> Result<Reply, Refusal> {
        let max = self.config.max_content_chars;
        let chars = serde_json::to_string(&content)
            .map(|text| text.chars().count())
            .unwrap_or(usize::MAX);
        if chars > max {
            return Err(Refusal::new(
                413,
                format!("the dweet content is {chars} characters long; the limit is {max}"),
            ));
        }
        let gate = self.store.write_gate(thing);
        let turn = gate.lock().await;
        let written = self.store.write(thing, content, key)?;
        self.commit(vec![written.change.clone()]).await?;
        self.store.publish(&written.change);
        drop(turn);
        if let Some(evaluation) = written.evaluation {
            self.evaluate_alert(thing, evaluation).await;
        }
        if quietly {
            return Ok(Reply::NoContent);
        }
        // Only the answer carries a transaction id, so only an answer pays for one.
        let dweet = crate::client::Dweet {
            transaction: Some(uuid::Uuid::new_v4().to_string()),
            ..written.dweet
        };
        Ok(Reply::Json(encode(&Success::new(
            "dweeting", "dweet", &dweet,
        ))))
    }

    /// Runs the thing's alert condition on the dweet just written, before answering, so a
    /// client that reads the alert after its dweet sees the verdict. A broken or runaway
    /// condition is logged; the dweet stands either way.
    async fn evaluate_alert(&self, thing: &str, mut evaluation: PendingEvaluation) {
        let content = std::mem::take(&mut evaluation.content_json);
        let verdict = self
            .evaluator
            .evaluate(thing, Arc::clone(&evaluation.condition), content)
            .await;
        let verdict = match verdict {
            Ok(verdict) => verdict,
            Err(NoVerdict::Condition(error)) => {
                tracing::warn!(thing, %error, "alert condition gave no verdict; the dweet is kept");
                return;
            }
            Err(NoVerdict::Abandoned { culprit, waited }) => {
                if culprit {
                    self.store.suspend_alert(thing, &evaluation);
                    tracing::warn!(
                        thing,
                        ?waited,
                        "alert condition could not be stopped in time; it will not run again until the alert is set anew"
                    );
                } else {
                    tracing::warn!(
                        thing,
                        "alert evaluation skipped: another condition held its thread"
                    );
                }
                return;
            }
        };
        let Some(notification) = self.store.record_verdict(thing, &evaluation, &verdict) else {
            return;
        };
        // The new status, and the opening or closing for the stored-alerts calls.
        let event = serde_json::json!({
            "thing": thing,
            "created": notification.created,
            "at_ms": evaluation.created_ms(),
            "kind": notification.kind.as_str(),
            "message": notification.message,
        });
        let changes = vec![
            self.store.alert_change(thing),
            Change::AlertEvent {
                thing: thing.to_owned(),
                at_ms: evaluation.created_ms(),
                json: event.to_string(),
            },
        ];
        if let Err(refusal) = self.commit(changes).await {
            tracing::warn!(thing, because = %refusal.because, "an alert's status change was not stored");
        }
        let notification = Arc::new(notification);
        for notifier in &self.config.notifiers {
            let notifier = Arc::clone(notifier);
            let notification = Arc::clone(&notification);
            tokio::spawn(async move {
                if let Err(error) = notifier.notify(&notification).await {
                    tracing::warn!(thing = %notification.thing, %error, "alert notification failed");
                }
            });
        }
    }

    fn read(&self, thing: &str, key: Option<&str>, limit: usize) -> Result<Reply, Refusal> {
        let kept = self.store.read(thing, key, limit)?;
        Ok(Reply::Json(encode(&Success::new(
            "getting",
            "dweets",
            &json_array(&kept)?,
        ))))
    }
}

/// The listen stream body: each dweet's frame as one HTTP chunk, ended after `idle` without a
/// dweet, at shutdown, or when the listener fell too far behind (it reconnects and backfills).
fn listen_body(
    receiver: broadcast::Receiver<Bytes>,
    idle: Duration,
    shutdown: CancellationToken,
) -> Body {
    let frames = futures_util::stream::unfold(receiver, move |mut receiver| {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => None,
                next = tokio::time::timeout(idle, receiver.recv()) => match next {
                    Ok(Ok(frame)) => Some((Ok(Frame::data(frame)), receiver)),
                    Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                        tracing::debug!(missed, "ending a listen stream that fell behind");
                        None
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => None,
                },
            }
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

fn respond(status: StatusCode, content_type: Option<&'static str>, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(content_type) = content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    // Browser dashboards read dweets straight from the service.
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(protocol::CORS_ALLOW_HEADERS),
    );
    response
}

/// A JSON answer, wrapped as JSONP (`NAME({...});`) when a valid `callback` was given.
fn json_response(status: StatusCode, json: String, callback: Option<&str>) -> Response<Body> {
    match callback {
        Some(name) if is_jsonp_name(name) => respond(
            status,
            Some("application/javascript"),
            Full::new(Bytes::from(format!("{name}({json});"))).boxed_unsync(),
        ),
        Some(_) => {
            let refusal = Failure::new(
                400,
                "the callback parameter must be a JavaScript identifier",
            );
            respond(
                status,
                Some("application/json"),
                Full::new(Bytes::from(encode(&refusal))).boxed_unsync(),
            )
        }
        None => respond(
            status,
            Some("application/json"),
            Full::new(Bytes::from(json)).boxed_unsync(),
        ),
    }
}

/// Letters, digits, `_`, `$` and dots (`jQuery123.cb`): enough for every JSONP client, and
/// nothing that could break out of the call expression.
fn is_jsonp_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.'))
}

/// A stored day's rows as CSV, or as the JSON answer `getting` `the`.
fn stored_reply(
    csv: bool,
    the: &str,
    rows: &[String],
    as_csv: fn(&[String]) -> String,
) -> Result<Reply, Refusal> {
    if csv {
        return Ok(Reply::Csv(as_csv(rows)));
    }
    succeeded("getting", the, &json_array(rows)?)
}

/// A success answer: `{"this":"succeeded","by":by,"the":the,"with":with}`.
fn succeeded<T: Serialize>(by: &str, the: &str, with: T) -> Result<Reply, Refusal> {
    Ok(Reply::Json(encode(&Success::new(by, the, with))))
}

fn encode<T: Serialize>(value: &T) -> String {
    // Our own envelopes of strings, numbers and maps with string keys always serialise.
    serde_json::to_string(value).unwrap_or_default()
}

/// What "recently" means for the fleet page and `/see`.
const RECENT_WITHIN: Duration = Duration::from_secs(60 * 60);

/// Pieces of JSON already encoded, joined into one array without parsing them again.
fn json_array<S: AsRef<str>>(items: &[S]) -> Result<Box<RawValue>, Refusal> {
    let mut array =
        String::with_capacity(items.iter().map(|j| j.as_ref().len() + 1).sum::<usize>() + 2);
    array.push('[');
    for (i, json) in items.iter().enumerate() {
        if i > 0 {
            array.push(',');
        }
        array.push_str(json.as_ref());
    }
    array.push(']');
    RawValue::from_string(array)
        .map_err(|e| Refusal::new(500, format!("could not encode the answer: {e}")))
}

fn unknown_path() -> Refusal {
    Refusal::new(
        404,
        "this is not a dweet.io API path; see /dweet/for/THING and /get/dweets/for/THING",
    )
    .with_http_status(404)
}

fn decode_segment(raw: &str) -> Result<String, Refusal> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| Refusal::new(400, "the path is not valid UTF-8 once percent-decoded"))
}

/// Some clients encode spaces in the condition as `+` (a literal plus arrives as `%2B`).
fn decode_condition(raw: &str) -> Result<String, Refusal> {
    let condition = decode_segment(&raw.replace('+', " "))?;
    // An alert whose condition never parses would never fire: refuse it now, saying why.
    let mut engine = ConditionEngine::new(Default::default())
        .map_err(|e| Refusal::new(500, format!("the condition engine failed: {e}")))?;
    engine
        .check(&condition)
        .map_err(|e| Refusal::new(400, e.to_string()))?;
    Ok(condition)
}

fn parse_recipients(who: &str) -> Result<Vec<Recipient>, Refusal> {
    let addresses: Vec<&str> = who
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() {
        return Err(Refusal::new(
            400,
            "an alert needs at least one e-mail address",
        ));
    }
    addresses
        .into_iter()
        .map(|address| {
            if protocol::is_plausible_email(address) {
                Ok(Recipient::email(address))
            } else {
                Err(Refusal::new(
                    400,
                    format!("{address:?} is not an e-mail address"),
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonp_names_are_restricted() {
        for ok in ["cb", "jQuery1234_5678", "a.b.c", "$x"] {
            assert!(is_jsonp_name(ok), "{ok}");
        }
        for bad in ["", "1cb", "alert(1)", "a b", "x;y", &"a".repeat(200)] {
            assert!(!is_jsonp_name(bad), "{bad}");
        }
    }

    #[test]
    fn conditions_decode_plus_as_space_and_percent_2b_as_plus() {
        assert_eq!(
            decode_condition("if(dweet.a+%3E+1%2B1)+return+'hot';").unwrap(),
            "if(dweet.a > 1+1) return 'hot';"
        );
    }

    #[test]
    fn recipients_are_checked() {
        let recipients = parse_recipients("a@x.io, b@y.org").unwrap();
        assert_eq!(recipients[1], Recipient::email("b@y.org"));
        assert!(parse_recipients("not-an-address").is_err());
        assert!(parse_recipients(",").is_err());
    }
}
