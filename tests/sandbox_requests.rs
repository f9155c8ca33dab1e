//! Property tests for the sandbox's request handling (fuzzing that runs in CI): arbitrary
//! methods, paths built from the protocol's own segments mixed with junk and percent-escapes,
//! query strings, content types and bodies, sent as raw bytes over TCP to one running sandbox.
//! Every request must get a well-formed HTTP answer; failures must be the protocol's envelope;
//! the server must keep serving. `PROPTEST_CASES=20000 cargo test --release --test
//! sandbox_requests` runs a longer campaign.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use dweetpipe::client::Key;
use dweetpipe::sandbox::{self, EvaluationLimits, SandboxConfig};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One sandbox and runtime for every case (starting one per case would measure start-up).
fn server() -> &'static (tokio::runtime::Runtime, SocketAddr) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, SocketAddr)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let addr = runtime.block_on(async {
            let handle = sandbox::start(SandboxConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                locks: vec![("fuzz-lock".to_owned(), Key::new("fuzz-key"))],
                idle_close: Duration::from_millis(50),
                alert_limits: EvaluationLimits {
                    time: Duration::from_millis(20),
                    ..EvaluationLimits::default()
                },
                ..SandboxConfig::default()
            })
            .await
            .expect("the sandbox starts");
            let addr = handle.local_addr();
            // Kept running for the whole test binary.
            std::mem::forget(handle);
            addr
        });
        (runtime, addr)
    })
}

/// Sends `request` and reads the answer (a listen stream is cut after its head and a little
/// body: enough to check it).
async fn exchange(addr: SocketAddr, request: Vec<u8>) -> Vec<u8> {
    let mut socket = TcpStream::connect(addr).await.expect("the sandbox accepts");
    socket
        .write_all(&request)
        .await
        .expect("the request is sent");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_millis(500), socket.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
        }
        if answer.len() > 64 * 1024 {
            break;
        }
    }
    answer
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "dweet", "for", "quietly", "get", "latest", "dweets", "listen", "from", "lock",
            "unlock", "remove", "alert", "when", "fuzz-thing", "fuzz-lock", "a@b.io,c@d.io",
            "if(dweet.v%3E1)return+'x';", "while(true){}", "%", "%zz", "%00", "%ff%fe",
            "..", "", "%2F", "S5D9-0001",
        ])
        .prop_map(str::to_owned),
        1 => "[ -~]{0,12}".prop_map(|s| s.replace([' ', '?', '#'], "")),
    ]
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        6 => Just("GET"),
        3 => Just("POST"),
        1 => prop::sample::select(vec!["HEAD", "PUT", "OPTIONS", "DELETE", "G3T"]),
    ];
    // Mostly the protocol's own routes with arbitrary fillings, so the handlers behind the
    // router are reached; sometimes any path at all.
    let route = prop::sample::select(vec![
        "dweet",
        "dweet/for/{}",
        "dweet/quietly/for/{}",
        "get/latest/dweet/for/{}",
        "get/dweets/for/{}",
        "listen/for/dweets/from/{}",
        "lock/{}",
        "unlock/{}",
        "remove/lock/{}",
        "alert/{}/when/{}/{}",
        "get/alert/for/{}",
        "remove/alert/for/{}",
    ]);
    let templated = (route, prop::collection::vec(segment(), 3)).prop_map(|(route, fills)| {
        let mut path = String::from("/");
        let mut fills = fills.into_iter();
        for (i, piece) in route.split("{}").enumerate() {
            if i > 0 {
                path.push_str(&fills.next().unwrap_or_default());
            }
            path.push_str(piece);
        }
        path
    });
    let path = prop_oneof![
        4 => templated,
        1 => prop::collection::vec(segment(), 0..7).prop_map(|s| format!("/{}", s.join("/"))),
    ];
    let query = prop::collection::vec(
        (
            prop::sample::select(vec!["key", "lock", "callback", "v", "hello", "k%20y", ""]),
            prop_oneof![
                Just("fuzz-key".to_owned()),
                Just("fuzz-lock".to_owned()),
                "[ -~]{0,10}".prop_map(|s| s.replace([' ', '#', '&'], "")),
                Just("1.5e3".to_owned()),
            ],
        ),
        0..4,
    )
    .prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    });
    let content_type = prop::sample::select(vec![
        "",
        "application/json",
        "application/x-www-form-urlencoded",
        "text/plain",
    ]);
    let body = prop_oneof![
        Just(Vec::new()),
        Just(br#"{"v": 2, "nested": {"a": [1, 2, {"b": null}]}}"#.to_vec()),
        Just(b"v=2&text=hi".to_vec()),
        prop::collection::vec(any::<u8>(), 0..200),
        "[\\[\\]{}:,\"0-9a-z ]{0,60}".prop_map(String::into_bytes),
    ];
    (method, path, query, content_type, body).prop_map(
        |(method, path, query, content_type, body)| {
            let target = if query.is_empty() {
                path
            } else {
                format!("{path}?{query}")
            };
            let mut head =
                format!("{method} {target} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n");
            if !content_type.is_empty() {
                head.push_str(&format!("Content-Type: {content_type}\r\n"));
            }
            head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            let mut bytes = head.into_bytes();
            bytes.extend(body);
            bytes
        },
    )
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    (parts.next()? == "HTTP/1.1").then_some(())?;
    parts.next()?.parse().ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_request_gets_a_well_formed_answer(request in request()) {
        let (runtime, addr) = server();
        let answer = runtime.block_on(exchange(*addr, request.clone()));
        let status = status_of(&answer);
        prop_assert!(status.is_some(), "no HTTP answer to {:?}: {:?}", String::from_utf8_lossy(&request), String::from_utf8_lossy(&answer));
        let body_start = answer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        prop_assert!(body_start.is_some(), "no end of head");
        let body = &answer[body_start.unwrap_or(0)..];
        let text = String::from_utf8_lossy(body);
        // A failure is always the protocol's envelope (plain or JSONP-wrapped, maybe chunked).
        if text.contains("\"this\":\"failed\"") {
            prop_assert!(text.contains("\"because\":"), "{text}");
        }
        prop_assert!(!text.contains("panicked"), "{text}");
    }
}

#[test]
fn the_sandbox_still_serves_after_the_campaign() {
    // Runs in the same binary as the campaign; whatever order the harness picks, the shared
    // server must answer a plain dweet and read it back.
    let (runtime, addr) = server();
    let answer = runtime.block_on(exchange(
        *addr,
        b"GET /dweet/for/after-campaign?v=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            .to_vec(),
    ));
    assert_eq!(status_of(&answer), Some(200));
    assert!(String::from_utf8_lossy(&answer).contains(r#""this":"succeeded""#));
    let read = runtime.block_on(exchange(
        *addr,
        b"GET /get/latest/dweet/for/after-campaign HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    ));
    assert!(String::from_utf8_lossy(&read).contains(r#""v":1"#));
}
