//! An async client for the dweet.io HTTP API: every call the Python client dweepy has, over
//! one reusable HTTP session.
//!
//! A [`Client`] is cheap to clone (it shares one connection pool), so a fleet of tasks should
//! share a single one. Failures, whatever HTTP status carried them, come back as the one
//! [`Error`] type, classified so callers can tell "retry later" from "fix your key".
//!
//! ```no_run
//! # async fn demo() -> dweetpipe::client::Result<()> {
//! use dweetpipe::client::Client;
//! let client = Client::new("http://127.0.0.1:8080")?;
//! let sent = client.dweet_for("S5D9-63de", &serde_json::json!({"TemperatureC": 29}), None).await?;
//! let latest = client.get_latest_dweet_for("S5D9-63de", None).await?;
//! assert_eq!(sent.created, latest.created);
//! # Ok(()) }
//! ```

mod decoder;
mod error;
mod listen;
mod plain;
mod types;

use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

pub use decoder::{
    DEFAULT_MAX_LINE, Decoded, EXCERPT_BYTES, FrameDecoder, ObjectReader, SkipReason, SkippedLine,
};
pub use error::{Error, Result};
pub use listen::{DweetStream, ListenEvent, ListenOptions, ListenStats};
pub use types::{
    Alert, AlertStatus, Created, Dweet, Key, RawDweet, Recipient, StoredAlert, StoredWindow,
    TextDweet,
};

/// The public service's address, kept as the default for users of other compatible hosts.
pub const DEFAULT_BASE_URL: &str = "https://dweet.io";

/// Characters left as they are in a path segment or query value: RFC 3986 unreserved.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode(component: &str) -> percent_encoding::PercentEncode<'_> {
    utf8_percent_encode(component, COMPONENT)
}

/// Options for building a [`Client`]. Every option has a default fit for a long-running
/// service; change only what you need.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base_url: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    user_agent: String,
    proxy: Option<String>,
    http: Option<reqwest::Client>,
}

impl ClientBuilder {
    /// How long to wait for a TCP (and TLS) connection. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a whole non-streaming call may take. Listen streams are not bound by it; they
    /// have an idle timeout of their own ([`ListenOptions::idle_timeout`]). Default 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Sends every request through this proxy (`http://host:port`, `socks5://...` is not
    /// supported). Without it, the usual `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` variables apply.
    pub fn proxy(mut self, url: impl Into<String>) -> Self {
        self.proxy = Some(url.into());
        self
    }

    /// Uses an existing `reqwest::Client` (its pool, proxies and timeouts) instead of building
    /// one; the connect timeout, user agent and proxy options are then the given client's.
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    pub fn build(self) -> Result<Client> {
        let base_url = normalise_base_url(&self.base_url)?;
        let plain_listen = self.http.is_none()
            && self.proxy.is_none()
            && reqwest::Url::parse(&base_url).is_ok_and(|url| plain::usable_for(&url));
        let listen_transport = if plain_listen {
            listen::Transport::Plain {
                user_agent: self.user_agent.clone(),
                connect_timeout: self.connect_timeout,
            }
        } else {
            listen::Transport::Reqwest
        };
        let http = match self.http {
            Some(http) => http,
            None => {
                install_tls_provider();
                let mut builder = reqwest::Client::builder()
                    .connect_timeout(self.connect_timeout)
                    .user_agent(self.user_agent)
                    .tcp_nodelay(true);
                if let Some(proxy) = &self.proxy {
                    let proxy = reqwest::Proxy::all(proxy.as_str())
                        .map_err(|e| Error::Config(format!("proxy {proxy:?}: {e}")))?;
                    builder = builder.proxy(proxy);
                }
                builder
                    .build()
                    .map_err(|e| Error::Config(format!("HTTP client: {e}")))?
            }
        };
        Ok(Client {
            http,
            base_url,
            request_timeout: self.request_timeout,
            listen_transport,
        })
    }
}

/// reqwest is built without a default crypto provider (aws-lc is slow to compile); ring is
/// installed once per process. An already installed provider is fine too.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Checks `scheme://host[:port][/prefix]` and drops a trailing slash so paths join cleanly.
fn normalise_base_url(raw: &str) -> Result<String> {
    let url = reqwest::Url::parse(raw)
        .map_err(|e| Error::Config(format!("base URL {raw:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::Config(format!(
            "base URL {raw:?} must start with http:// or https://"
        )));
    }
    if url.host_str().is_none() {
        return Err(Error::Config(format!("base URL {raw:?} has no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Error::Config(format!(
            "base URL {raw:?} must not have a query or fragment"
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// A dweet.io API client. Clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    request_timeout: Duration,
    /// How listen streams connect; see [`plain`] for why plain HTTP gets its own.
    listen_transport: listen::Transport,
}

/// The envelope before its payload is decoded into the caller's type.
#[derive(Deserialize)]
struct RawEnvelope<'a> {
    this: &'a str,
    #[serde(borrow)]
    with: Option<&'a RawValue>,
    because: Option<String>,
}

impl Client {
    /// A client with default options for `base_url` (e.g. `https://dweet.io` or
    /// `http://127.0.0.1:8080/prefix`).
    pub fn new(base_url: &str) -> Result<Self> {
        Self::builder(base_url).build()
    }

    pub fn builder(base_url: &str) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.to_owned(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            user_agent: concat!("dweetpipe/", env!("CARGO_PKG_VERSION")).to_owned(),
            proxy: None,
            http: None,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Dweets `content` to a thing whose name the server makes up; the answer carries it.
    pub async fn dweet(&self, content: &(impl Serialize + ?Sized)) -> Result<Dweet> {
        let url = self.url("/dweet", &[], None);
        self.call(self.post_json(url, content)?, "dweet").await
    }

    /// Dweets `content` (normally a JSON object: a [`Value`] or anything that serialises to
    /// one) to `thing`.
    pub async fn dweet_for(
        &self,
        thing: &str,
        content: &(impl Serialize + ?Sized),
        key: Option<&Key>,
    ) -> Result<Dweet> {
        let url = self.url("/dweet/for/", &[thing], key);
        self.call(self.post_json(url, content)?, "dweet_for").await
    }

    /// Like [`Client::dweet_for`] but the server answers `204 No Content`: less to send back
    /// when the caller does not need the transaction id.
    pub async fn dweet_quietly_for(
        &self,
        thing: &str,
        content: &(impl Serialize + ?Sized),
        key: Option<&Key>,
    ) -> Result<()> {
        let url = self.url("/dweet/quietly/for/", &[thing], key);
        let request = self.post_json(url, content)?;
        let (status, body) = self.send(request).await?;
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(());
        }
        parse_answer::<Value>(status, &body, "dweet_quietly_for").map(drop)
    }

    /// The newest dweet of `thing`.
    pub async fn get_latest_dweet_for(&self, thing: &str, key: Option<&Key>) -> Result<Dweet> {
        let url = self.url("/get/latest/dweet/for/", &[thing], key);
        let dweets: Vec<Dweet> = self
            .call(self.http.get(url), "get_latest_dweet_for")
            .await?;
        dweets.into_iter().next().ok_or_else(|| Error::NotFound {
            because: crate::protocol::NOT_FOUND.to_owned(),
        })
    }

    /// The dweets the server keeps for `thing`, newest first. How many is the server's choice
    /// (500 on the Renesas sandbox, 5 later on dweet.io); assume no number.
    pub async fn get_dweets_for(&self, thing: &str, key: Option<&Key>) -> Result<Vec<Dweet>> {
        let url = self.url("/get/dweets/for/", &[thing], key);
        self.call(self.http.get(url), "get_dweets_for").await
    }

    /// [`Client::get_dweets_for`] with each content kept as the JSON text the server sent.
    pub async fn get_raw_dweets_for(
        &self,
        thing: &str,
        key: Option<&Key>,
    ) -> Result<Vec<RawDweet>> {
        let url = self.url("/get/dweets/for/", &[thing], key);
        self.call(self.http.get(url), "get_dweets_for").await
    }

    /// Opens the real-time stream of `thing`'s new dweets. It resolves once the server has
    /// subscribed us (a dweet sent afterwards is delivered), or with the error that refused
    /// the stream. See [`ListenOptions`] for reconnects and the idle timeout.
    pub async fn listen_for_dweets_from(
        &self,
        thing: &str,
        key: Option<&Key>,
        options: ListenOptions,
    ) -> Result<DweetStream> {
        self.listen_for_dweets_read_by(thing, key, options, |_: &str| None)
            .await
    }

    /// [`Client::listen_for_dweets_from`] with each content kept as the JSON text the server
    /// sent, for a caller that parses it once itself.
    pub async fn listen_for_raw_dweets_from(
        &self,
        thing: &str,
        key: Option<&Key>,
        options: ListenOptions,
    ) -> Result<DweetStream<RawDweet>> {
        self.listen_for_dweets_read_by(thing, key, options, |_: &str| None)
            .await
    }

    /// [`Client::listen_for_dweets_from`] with each dweet a `D`: `reader` is offered each
    /// line's JSON object first (see [`ObjectReader`]), and serde_json reads what it declines
    /// (`None`). It must accept only what serde_json would read as a `D`, and give the same;
    /// the ingest path reads a common dweet and finds its readings in one pass this way.
    pub async fn listen_for_dweets_read_by<D: DeserializeOwned + Send + 'static>(
        &self,
        thing: &str,
        key: Option<&Key>,
        options: ListenOptions,
        reader: impl ObjectReader<D> + Send + 'static,
    ) -> Result<DweetStream<D>> {
        let url = self.url("/listen/for/dweets/from/", &[thing], key);
        listen::open(
            self.http.clone(),
            self.listen_transport.clone(),
            url,
            options,
            Box::new(reader),
        )
        .await
    }

    /// Attaches `lock` to `thing`; from then on every call on the thing needs `key`. Returns
    /// the server's `with` as is (the public service's shape is not recorded).
    pub async fn lock(&self, thing: &str, lock: &str, key: &Key) -> Result<Value> {
        let url = self.url_with_query("/lock/", &[thing], &[("lock", lock)], Some(key));
        self.call(self.http.get(url), "lock").await
    }

    /// Detaches whatever lock `thing` carries.
    pub async fn unlock(&self, thing: &str, key: &Key) -> Result<Value> {
        let url = self.url("/unlock/", &[thing], Some(key));
        self.call(self.http.get(url), "unlock").await
    }

    /// Detaches `lock` from whatever thing holds it.
    pub async fn remove_lock(&self, lock: &str, key: &Key) -> Result<Value> {
        let url = self.url("/remove/lock/", &[lock], Some(key));
        self.call(self.http.get(url), "remove_lock").await
    }

    /// Sets (or replaces) the alert of a locked thing: `condition` is a JavaScript function
    /// body over `dweet` that returns a message when the alert should fire.
    pub async fn set_alert(
        &self,
        thing: &str,
        recipients: &[&str],
        condition: &str,
        key: &Key,
    ) -> Result<Alert> {
        let who = recipients
            .iter()
            .map(|address| encode(address).to_string())
            .collect::<Vec<_>>()
            .join(",");
        let path = format!("/alert/{who}/when/{}/{}", encode(thing), encode(condition));
        let url = self.url(&path, &[], Some(key));
        self.call(self.http.get(url), "set_alert").await
    }

    /// A locked thing's stored dweets of one day (or hour), oldest first. The server keeps
    /// them for its stored retention (the public service: 30 days).
    pub async fn get_stored_dweets_for(
        &self,
        thing: &str,
        key: &Key,
        window: StoredWindow,
    ) -> Result<Vec<Dweet>> {
        let url = self.stored_url("/get/stored/dweets/for/", thing, key, window, "json");
        self.call(self.http.get(url), "get_stored_dweets_for").await
    }

    /// Like [`Client::get_stored_dweets_for`], as the server's CSV: `thing,created,` then a
    /// column per content leaf.
    pub async fn get_stored_dweets_csv_for(
        &self,
        thing: &str,
        key: &Key,
        window: StoredWindow,
    ) -> Result<String> {
        let url = self.stored_url("/get/stored/dweets/for/", thing, key, window, "csv");
        let (status, body) = self.send(self.http.get(url)).await?;
        if body.first() == Some(&b'{') {
            // A failure envelope: the error it carries (or a decode error if it is not one).
            return parse_answer::<serde_json::Value>(status, &body, "get_stored_dweets_for")
                .and_then(|_| {
                    Err(Error::Decode {
                        context: "get_stored_dweets_for",
                        detail: "the server answered JSON where CSV was asked for".to_owned(),
                    })
                });
        }
        if !status.is_success() {
            return Err(Error::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        String::from_utf8(body.to_vec()).map_err(|_| Error::Decode {
            context: "get_stored_dweets_for",
            detail: "the CSV is not UTF-8".to_owned(),
        })
    }

    /// A locked thing's alert openings and closings of one day (or hour), oldest first.
    pub async fn get_stored_alerts_for(
        &self,
        thing: &str,
        key: &Key,
        window: StoredWindow,
    ) -> Result<Vec<StoredAlert>> {
        let url = self.stored_url("/get/stored/alerts/for/", thing, key, window, "json");
        self.call(self.http.get(url), "get_stored_alerts_for").await
    }

    fn stored_url(
        &self,
        path: &str,
        thing: &str,
        key: &Key,
        window: StoredWindow,
        response_type: &str,
    ) -> String {
        let date = window.date.format("%Y-%m-%d").to_string();
        let hour = window.hour.map(|h| format!("{h:02}"));
        let mut query = vec![("date", date.as_str())];
        if let Some(hour) = &hour {
            query.push(("hour", hour.as_str()));
        }
        query.push(("responseType", response_type));
        self.url_with_query(path, &[thing], &query, Some(key))
    }

    pub async fn get_alert(&self, thing: &str, key: &Key) -> Result<Alert> {
        let url = self.url("/get/alert/for/", &[thing], Some(key));
        self.call(self.http.get(url), "get_alert").await
    }

    pub async fn remove_alert(&self, thing: &str, key: &Key) -> Result<Value> {
        let url = self.url("/remove/alert/for/", &[thing], Some(key));
        self.call(self.http.get(url), "remove_alert").await
    }

    fn post_json(
        &self,
        url: String,
        content: &(impl Serialize + ?Sized),
    ) -> Result<reqwest::RequestBuilder> {
        let body = serde_json::to_string(content).map_err(Error::Encode)?;
        Ok(self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body))
    }

    fn url(&self, path: &str, segments: &[&str], key: Option<&Key>) -> String {
        self.url_with_query(path, segments, &[], key)
    }

    /// Joins the base URL, `path`, the percent-encoded `segments` and the query; the key goes
    /// last so that it is easy to spot and strip in any diagnostic.
    fn url_with_query(
        &self,
        path: &str,
        segments: &[&str],
        query: &[(&str, &str)],
        key: Option<&Key>,
    ) -> String {
        let mut url = format!("{}{path}", self.base_url);
        url.push_str(
            &segments
                .iter()
                .map(|segment| encode(segment).to_string())
                .collect::<Vec<_>>()
                .join("/"),
        );
        let key_param = key.map(|key| ("key", key.expose()));
        let mut separator = '?';
        for (name, value) in query.iter().copied().chain(key_param) {
            url.push(separator);
            url.push_str(name);
            url.push('=');
            url.push_str(&encode(value).to_string());
            separator = '&';
        }
        url
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes)> {
        let response = request
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(Error::transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(Error::transport)?;
        Ok((status, body))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        context: &'static str,
    ) -> Result<T> {
        let (status, body) = self.send(request).await?;
        parse_answer(status, &body, context)
    }
}

/// Turns an answer into the payload or the error it carries. A failure envelope is an error
/// whatever the status; a success envelope under a non-2xx status is distrusted.
fn parse_answer<T: DeserializeOwned>(
    status: reqwest::StatusCode,
    body: &[u8],
    context: &'static str,
) -> Result<T> {
    let envelope = serde_json::from_slice::<RawEnvelope>(strip_jsonp(body));
    match envelope {
        Ok(envelope) if envelope.this == "failed" => {
            let code = envelope
                .with
                .and_then(|with| serde_json::from_str::<u16>(with.get()).ok());
            let because = envelope
                .because
                .unwrap_or_else(|| "the server reported a failure without a reason".to_owned());
            Err(Error::from_failure(code, because))
        }
        Ok(envelope) if envelope.this == "succeeded" && status.is_success() => {
            let with = envelope.with.ok_or_else(|| Error::Decode {
                context,
                detail: "success envelope without `with`".to_owned(),
            })?;
            serde_json::from_str(with.get()).map_err(|e| Error::Decode {
                context,
                detail: e.to_string(),
            })
        }
        _ if !status.is_success() => Err(Error::Status {
            status: status.as_u16(),
            body: snippet(body),
        }),
        Ok(envelope) => Err(Error::Decode {
            context,
            detail: format!("unexpected envelope `this`: {:?}", envelope.this),
        }),
        Err(e) => Err(Error::Decode {
            context,
            detail: format!("{e}; body starts {:?}", snippet(body)),
        }),
    }
}

/// Accepts a JSONP-wrapped answer (`cb({...});`) as well, for servers that force it.
fn strip_jsonp(body: &[u8]) -> &[u8] {
    let trimmed = body.trim_ascii();
    if trimmed.first() == Some(&b'{') {
        return trimmed;
    }
    match (
        trimmed.iter().position(|&b| b == b'('),
        trimmed.iter().rposition(|&b| b == b')'),
    ) {
        (Some(open), Some(close)) if open < close => &trimmed[open + 1..close],
        _ => trimmed,
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    #[test]
    fn base_url_accepts_prefixes_and_rejects_junk() {
        assert_eq!(
            normalise_base_url("http://127.0.0.1:8080/dweet/").unwrap(),
            "http://127.0.0.1:8080/dweet"
        );
        assert_eq!(
            normalise_base_url("https://dweet.io").unwrap(),
            "https://dweet.io"
        );
        assert!(matches!(
            normalise_base_url("dweet.io"),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            normalise_base_url("ftp://x"),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            normalise_base_url("http://x/?a=1"),
            Err(Error::Config(_))
        ));
    }

    #[tokio::test]
    async fn content_that_is_not_json_is_refused_before_anything_is_sent() {
        // Nothing listens on port 9 here: an attempt to send would be a transport error.
        let client = Client::new("http://127.0.0.1:9").unwrap();
        let pairs: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let refused = client.dweet_quietly_for("t", &pairs, None).await;
        assert!(matches!(refused, Err(Error::Encode(_))), "{refused:?}");
        assert!(matches!(
            client.dweet_for("t", &pairs, None).await,
            Err(Error::Encode(_))
        ));
    }

    #[test]
    fn urls_encode_segments_and_put_the_key_last() {
        let client = Client::new("http://h:1/p").unwrap();
        let key = Key::new("k y");
        assert_eq!(
            client.url_with_query("/lock/", &["a b/c"], &[("lock", "L&1")], Some(&key)),
            "http://h:1/p/lock/a%20b%2Fc?lock=L%261&key=k%20y"
        );
    }

    #[test]
    fn failure_is_an_error_under_any_status() {
        let body = br#"{"this":"failed","with":404,"because":"we couldn't find this"}"#;
        for status in [StatusCode::OK, StatusCode::NOT_FOUND] {
            let err = parse_answer::<Value>(status, body, "t").unwrap_err();
            assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
            assert_eq!(err.to_string(), "we couldn't find this");
        }
    }

    #[test]
    fn non_json_and_bad_status_are_distinct_errors() {
        let err = parse_answer::<Value>(StatusCode::BAD_GATEWAY, b"<html>", "t").unwrap_err();
        assert!(matches!(err, Error::Status { status: 502, .. }), "{err:?}");
        let err = parse_answer::<Value>(StatusCode::OK, b"<html>", "t").unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    }

    #[test]
    fn jsonp_answers_are_unwrapped() {
        let body = br#"cb({"this":"succeeded","by":"getting","the":"dweets","with":[1]});"#;
        let with: Vec<u8> = parse_answer(StatusCode::OK, body, "t").unwrap();
        assert_eq!(with, vec![1]);
    }
}
