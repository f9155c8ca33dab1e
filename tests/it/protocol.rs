//! The sandbox at the byte level, as devices and other clients see it: raw HTTP over TCP.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{self, raw_exchange, raw_get, sandbox, sandbox_with, split_head, thing};

fn text(body: &[u8]) -> &str {
    std::str::from_utf8(body).expect("UTF-8 body")
}

/// Extracts `"name":"value"` from compact JSON.
fn field<'a>(json: &'a str, name: &str) -> &'a str {
    let start = json.find(&format!("\"{name}\":\"")).expect(name) + name.len() + 4;
    let end = start + json[start..].find('"').unwrap();
    &json[start..end]
}

#[tokio::test(flavor = "multi_thread")]
async fn write_and_read_answers_are_byte_exact() {
    let server = sandbox().await;
    let addr = server.local_addr();
    let (head, body) = raw_get(addr, "/dweet/for/exact?hello=world&h=18.5&big=6816513845").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let body = text(&body);
    let created = field(body, "created");
    let transaction = field(body, "transaction");
    common::assert_created_format(created);
    assert_eq!(
        uuid::Uuid::parse_str(transaction)
            .unwrap()
            .get_version_num(),
        4
    );
    assert_eq!(
        body,
        format!(
            r#"{{"this":"succeeded","by":"dweeting","the":"dweet","with":{{"thing":"exact","created":"{created}","content":{{"hello":"world","h":18.5,"big":6816513845}},"transaction":"{transaction}"}}}}"#
        )
    );
    let (_, read) = raw_get(addr, "/get/latest/dweet/for/exact").await;
    assert_eq!(
        text(&read),
        format!(
            r#"{{"this":"succeeded","by":"getting","the":"dweets","with":[{{"thing":"exact","created":"{created}","content":{{"hello":"world","h":18.5,"big":6816513845}}}}]}}"#
        )
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_http_200_with_the_exact_envelope() {
    let server = sandbox().await;
    let (head, body) = raw_get(server.local_addr(), "/get/dweets/for/never-dweeted").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(
        text(&body),
        r#"{"this":"failed","with":404,"because":"we couldn't find this"}"#
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jsonp_wraps_answers_and_protocol_parameters_stay_out_of_content() {
    let server = sandbox().await;
    let addr = server.local_addr();
    let (head, body) = raw_get(addr, "/dweet/for/jsonp?v=1&callback=cb_1&_=1700000000000").await;
    assert!(
        head.contains("content-type: application/javascript"),
        "{head}"
    );
    let body = text(&body);
    assert!(
        body.starts_with(r#"cb_1({"this":"succeeded""#) && body.ends_with("}});"),
        "{body}"
    );
    assert!(body.contains(r#""content":{"v":1}"#), "{body}");
    let (_, failed) = raw_get(addr, "/get/dweets/for/none-such?callback=cb").await;
    assert_eq!(
        text(&failed),
        r#"cb({"this":"failed","with":404,"because":"we couldn't find this"});"#
    );
    let (_, hostile) = raw_get(addr, "/get/dweets/for/jsonp?callback=alert(1)").await;
    assert!(
        text(&hostile).starts_with(r#"{"this":"failed""#),
        "no injection: {}",
        text(&hostile)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_input_form_devices_use_is_accepted() {
    let server = sandbox().await;
    let addr = server.local_addr();
    // POST with a JSON body.
    let body = r#"{"TemperatureC":29,"nested":{"a":[1,2]}}"#;
    let post = format!(
        "POST /dweet/for/forms HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (_, answer) = split_head(raw_exchange(addr, post.as_bytes()).await);
    assert!(
        text(&answer).contains(r#""content":{"TemperatureC":29,"nested":{"a":[1,2]}}"#),
        "{}",
        text(&answer)
    );
    // POST with query content and no body (Arduino sketches).
    let arduino = "POST /dweet/for/forms?temp=21.5&id=007 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (_, answer) = split_head(raw_exchange(addr, arduino.as_bytes()).await);
    assert!(
        text(&answer).contains(r#""content":{"temp":21.5,"id":"007"}"#),
        "{}",
        text(&answer)
    );
    // GET carrying a JSON body `{}` (an old node client) plus query content.
    let node = "GET /dweet/for/forms?x=1 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let (_, answer) = split_head(raw_exchange(addr, node.as_bytes()).await);
    assert!(
        text(&answer).contains(r#""content":{"x":1}"#),
        "{}",
        text(&answer)
    );
    // A form-encoded body.
    let form = "POST /dweet/for/forms HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 13\r\nConnection: close\r\n\r\nh=40&s=a+b%21";
    let (_, answer) = split_head(raw_exchange(addr, form.as_bytes()).await);
    assert!(
        text(&answer).contains(r#""content":{"h":40,"s":"a b!"}"#),
        "{}",
        text(&answer)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn path_segments_are_percent_decoded() {
    let server = sandbox().await;
    let addr = server.local_addr();
    let (_, answer) = raw_get(addr, "/dweet/for/caf%C3%A9%20one?v=1").await;
    assert!(
        text(&answer).contains(r#""thing":"café one""#),
        "{}",
        text(&answer)
    );
    let (_, read) = raw_get(addr, "/get/latest/dweet/for/caf%c3%a9%20one").await;
    assert!(
        text(&read).contains(r#""thing":"café one""#),
        "{}",
        text(&read)
    );
    let (_, slash) = raw_get(addr, "/dweet/for/a%2Fb?v=1").await;
    assert!(
        text(&slash).contains(r#""thing":"a/b""#),
        "{}",
        text(&slash)
    );
    let (_, bad) = raw_get(addr, "/dweet/for/%FF%FE").await;
    assert!(text(&bad).contains("not valid UTF-8"), "{}", text(&bad));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quietly_answers_204_with_no_body() {
    let server = sandbox().await;
    let request = "POST /dweet/quietly/for/hush?v=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(server.local_addr(), request.as_bytes()).await;
    let (head, body) = split_head(answer);
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert!(body.is_empty());
    let (_, read) = raw_get(server.local_addr(), "/get/latest/dweet/for/hush").await;
    assert!(text(&read).contains(r#""content":{"v":1}"#));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_sends_headers_at_once_and_one_chunk_per_dweet() {
    let server = sandbox().await;
    let addr = server.local_addr();
    let thing = thing("chunks");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /listen/for/dweets/from/{thing} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("headers are sent before any dweet")
            .unwrap();
        received.extend_from_slice(&buf[..n]);
    }
    let (head, mut body) = split_head(received);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");

    let client = common::client_for(&server);
    let mut sent = Vec::new();
    for i in 0..2 {
        sent.push(
            client
                .dweet_for(&thing, &serde_json::json!({ "i": i }), None)
                .await
                .unwrap(),
        );
    }
    // Each dweet: an outer HTTP chunk whose payload is exactly the inner frame.
    for dweet in &sent {
        let inner_json = format!(
            r#"{{"thing":"{thing}","created":"{}","content":{{"i":{}}}}}"#,
            dweet.created, dweet.content["i"]
        );
        let inner = dweetpipe::protocol::encode_stream_frame(&inner_json);
        let mut expected = format!("{:x}\r\n", inner.len()).into_bytes();
        expected.extend_from_slice(&inner);
        expected.extend_from_slice(b"\r\n");
        while body.len() < expected.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "stream closed early");
            body.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            String::from_utf8_lossy(&body[..expected.len()]),
            String::from_utf8_lossy(&expected)
        );
        body.drain(..expected.len());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_clear_failures_and_the_server_keeps_serving() {
    let server = sandbox_with(|c| c.max_body_bytes = 1024).await;
    let addr = server.local_addr();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"POST /dweet/for/bad HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{bad}".to_vec(), "the request body is not valid JSON"),
        (b"POST /dweet/for/bad HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\n[1,2]".to_vec(), "must be a JSON object, not an array"),
        (format!("POST /dweet/for/bad HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n{}", "x".repeat(4096)).into_bytes(), "larger than 1024 bytes"),
        (b"GET /no/such/path HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(), "not a dweet.io API path"),
        (b"DELETE /dweet/for/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(), "use GET or POST"),
        (b"GET /lock/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(), "a lock is required"),
    ];
    for (request, expected) in cases {
        let (head, body) = split_head(raw_exchange(addr, &request).await);
        let body = text(&body);
        assert!(
            body.starts_with(r#"{"this":"failed""#) && body.contains(expected),
            "{head}\n{body}"
        );
    }
    // Not HTTP at all: hyper answers 400 and closes; the server lives on.
    let garbage = raw_exchange(addr, b"\x00\x01\x02 hello\r\n\r\n").await;
    assert!(
        garbage.is_empty() || garbage.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&garbage)
    );
    let (head, _) = raw_get(addr, "/dweet/for/still-alive?ok=1").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_concurrent_listeners_all_receive() {
    let server = sandbox().await;
    let client = common::client_for(&server);
    let thing = thing("crowd");
    let mut listeners = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let client = client.clone();
        let thing = thing.clone();
        listeners.spawn(async move {
            let mut stream = client
                .listen_for_dweets_from(&thing, None, Default::default())
                .await
                .unwrap();
            futures_util::StreamExt::next(&mut stream)
                .await
                .map(|r| r.is_ok())
        });
    }
    let sender = common::dweet_repeatedly(
        &client,
        &thing,
        200,
        Duration::from_millis(100),
        |_| serde_json::json!({"all": true}),
    );
    let mut delivered = 0;
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(30), listeners.join_next())
        .await
        .expect("all listeners served in 30 s")
    {
        assert_eq!(joined.unwrap(), Some(true));
        delivered += 1;
    }
    sender.abort();
    assert_eq!(delivered, 500);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cors_preflight_lets_a_browser_post_json() {
    let server = sandbox().await;
    let addr = server.local_addr();
    let thing = thing("cors");
    let preflight = format!(
        "OPTIONS /dweet/for/{thing} HTTP/1.1\r\nHost: t\r\nOrigin: http://board.local\r\n\
         Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\
         Connection: close\r\n\r\n"
    );
    let (head, body) = split_head(raw_exchange(addr, preflight.as_bytes()).await);
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert!(body.is_empty());
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    let methods = head
        .lines()
        .find_map(|l| l.strip_prefix("access-control-allow-methods: "))
        .unwrap_or_else(|| panic!("no allowed methods: {head}"));
    // split_head lowercases the head.
    assert!(
        methods.contains("post") && methods.contains("get"),
        "{head}"
    );
    let allowed = head
        .lines()
        .find_map(|l| l.strip_prefix("access-control-allow-headers: "))
        .unwrap_or_else(|| panic!("no allowed headers: {head}"));
    for needed in ["content-type", "x-dweet-auth"] {
        assert!(allowed.to_ascii_lowercase().contains(needed), "{head}");
    }
    // The POST that follows is answered with the origin allowed too.
    let json = r#"{"v":42}"#;
    let post = format!(
        "POST /dweet/for/{thing} HTTP/1.1\r\nHost: t\r\nOrigin: http://board.local\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    let (head, body) = split_head(raw_exchange(addr, post.as_bytes()).await);
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(text(&body).contains("\"succeeded\""), "{}", text(&body));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_ascii_dweet_reaches_a_byte_wise_ascii_stream_reader() {
    let server = sandbox().await;
    let addr = server.local_addr();
    let thing = thing("ascii");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /listen/for/dweets/from/{thing} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    // Read one byte at a time, as dweepy's reader does, until the headers end.
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    while !received.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        received.push(byte[0]);
    }
    let client = common::client_for(&server);
    client
        .dweet_for(
            &thing,
            &serde_json::json!({ "place": "café", "mood": "😀" }),
            None,
        )
        .await
        .unwrap();
    let mut frame = Vec::new();
    while !frame.ends_with(b"}\"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut byte))
            .await
            .expect("the dweet arrives")
            .unwrap();
        assert!(
            byte[0].is_ascii(),
            "a non-ASCII byte on the stream: {frame:?}"
        );
        frame.push(byte[0]);
    }
    let text = String::from_utf8(frame).unwrap();
    let literal = text
        .split("\r\n")
        .find(|line| line.starts_with('"'))
        .expect("the double-encoded literal");
    let inner: String = serde_json::from_str(literal).unwrap();
    let dweet: serde_json::Value = serde_json::from_str(&inner).unwrap();
    assert_eq!(dweet["content"]["place"], "café");
    assert_eq!(dweet["content"]["mood"], "😀");
    server.shutdown().await;
}
