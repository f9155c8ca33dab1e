//! Helpers shared by the integration tests.

use std::net::SocketAddr;
use std::time::Duration;

use dweetpipe::client::{Client, Key};
use dweetpipe::sandbox::{self, SandboxConfig, SandboxHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const LOCK: &str = "lock-a";
pub const KEY: &str = "key-a-7f3d91";
pub const OTHER_LOCK: &str = "lock-b";
pub const OTHER_KEY: &str = "key-b-0c2e55";

pub fn key() -> Key {
    Key::new(KEY)
}

/// A sandbox on a free port with two locks, tuned by `tune`.
pub async fn sandbox_with(tune: impl FnOnce(&mut SandboxConfig)) -> SandboxHandle {
    let mut config = SandboxConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        locks: vec![
            (LOCK.to_owned(), Key::new(KEY)),
            (OTHER_LOCK.to_owned(), Key::new(OTHER_KEY)),
        ],
        ..SandboxConfig::default()
    };
    tune(&mut config);
    sandbox::start(config).await.expect("sandbox starts")
}

pub async fn sandbox() -> SandboxHandle {
    sandbox_with(|_| {}).await
}

pub fn client_for(handle: &SandboxHandle) -> Client {
    Client::builder(&handle.base_url())
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client builds")
}

/// Dweets `content(i)` to `thing` `count` times, `every` apart, in the background. The task's
/// result is how many dweets failed (a test that restarts the server expects some to).
pub fn dweet_repeatedly(
    client: &Client,
    thing: &str,
    count: usize,
    every: Duration,
    content: impl Fn(usize) -> serde_json::Value + Send + 'static,
) -> tokio::task::JoinHandle<usize> {
    let client = client.clone();
    let thing = thing.to_owned();
    tokio::spawn(async move {
        let mut failed = 0;
        for i in 0..count {
            if client.dweet_for(&thing, &content(i), None).await.is_err() {
                failed += 1;
            }
            tokio::time::sleep(every).await;
        }
        failed
    })
}

/// A loopback port free now (for a server the test starts as a process or on a fixed port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|probe| probe.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A thing name no other test uses.
pub fn thing(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4())
}

/// Sends raw request bytes on a fresh connection and reads until the server closes it.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("server answered in time")
        .expect("read");
    answer
}

/// A GET with `Connection: close`, so the answer ends with the connection.
pub async fn raw_get(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    split_head(raw_exchange(addr, request.as_bytes()).await)
}

/// Splits an HTTP answer into its head (as text) and its body bytes.
pub fn split_head(answer: Vec<u8>) -> (String, Vec<u8>) {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("answer has a head");
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    (head, answer[end + 4..].to_vec())
}

/// A one-shot HTTP server that answers every connection with `answer` verbatim: stands in for
/// misbehaving servers and clones.
pub async fn canned_server(answer: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Checks the protocol's `created` shape: `2014-03-19T10:38:46.010Z`.
pub fn assert_created_format(created: &str) {
    let bytes = created.as_bytes();
    assert_eq!(bytes.len(), 24, "{created}");
    assert!(
        bytes[10] == b'T' && bytes[19] == b'.' && bytes[23] == b'Z',
        "{created}"
    );
    assert!(
        dweetpipe::protocol::parse_created(created).is_some(),
        "{created}"
    );
}

/// A plain HTTP client for tests that talk to pages and metrics directly.
pub fn http() -> reqwest::Client {
    install_tls_provider();
    reqwest::Client::new()
}

/// reqwest is built without a default TLS provider; the library installs ring when it builds
/// its own client, and a test that builds one itself does the same, so it may come first.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The body of a GET of `url` (empty when it does not answer).
pub async fn get_text(url: &str) -> String {
    match http().get(url).send().await {
        Ok(answer) => answer.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}
