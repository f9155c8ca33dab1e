//! Hostile input against the sandbox and the listen client: huge bodies, endless lines,
//! invalid UTF-8, deep nesting, wide objects, connections that never finish their request.
//! Nothing may panic, the server must keep serving, and memory must stay bounded.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::common::{raw_exchange, raw_get, sandbox, split_head};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");

/// `{"k0":0,"k1":1,...}` with `keys` keys.
fn wide_object(keys: usize) -> String {
    let members: Vec<String> = (0..keys).map(|i| format!("\"k{i}\":{i}")).collect();
    format!("{{{}}}", members.join(","))
}

fn failure(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer).into_owned();
    assert!(
        text.starts_with(r#"{"this":"failed""#),
        "a failure envelope, not a crash: {text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_refuses_hostile_requests_and_keeps_serving() {
    let server = sandbox().await;
    let addr = server.local_addr();

    // A body far beyond the limit: the server stops reading at its limit (the 413 itself is
    // checked in the protocol tests); the sender is left hanging, the server is not.
    let mut huge = format!(
        "POST /dweet/for/huge HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        64 * 1024 * 1024
    )
    .into_bytes();
    huge.extend(std::iter::repeat_n(b'x', 8 * 1024 * 1024));
    let sender = tokio::spawn(async move {
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&huge)).await;
        }
    });
    let (_, body) = raw_get(addr, "/get/dweets/for/huge").await;
    assert!(
        failure(&body).contains("we couldn't find this"),
        "the oversized dweet was not stored"
    );

    // Deep nesting: serde_json's recursion limit answers, the stack does not overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let request = format!(
        "POST /dweet/for/h HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{deep}",
        deep.len()
    );
    // 200 KB is within the default body limit of 256 KiB.
    let (_, body) = split_head(raw_exchange(addr, request.as_bytes()).await);
    failure(&body);

    // Ten thousand keys: over the content limit, refused with the reason.
    let wide: String = wide_object(10_000);
    let request = format!(
        "POST /dweet/for/h HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{wide}",
        wide.len()
    );
    let (_, body) = split_head(raw_exchange(addr, request.as_bytes()).await);
    assert!(failure(&body).contains("the limit is 2000"));

    // Invalid UTF-8 in a JSON body and in a path.
    let invalid: &[u8] = b"{\"a\":\"\xff\xfe\xfd\"}";
    let mut bad = format!(
        "POST /dweet/for/h HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        invalid.len()
    )
    .into_bytes();
    bad.extend(invalid);
    let (_, body) = split_head(raw_exchange(addr, &bad).await);
    failure(&body);
    let (_, body) = raw_get(addr, "/get/dweets/for/%C3%28").await;
    failure(&body);

    // Slow loris: many connections that never finish their request head.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /get/dweets/for/x HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            .await
            .unwrap();
        stalled.push(stream);
    }
    let (head, _) = raw_get(addr, "/dweet/for/still-serving?ok=1").await;
    assert!(
        head.starts_with("http/1.1 200"),
        "served beside 300 stalled connections: {head}"
    );
    drop(stalled);
    sender.abort();
    server.shutdown().await;
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_stream_cannot_grow_the_listeners_memory_or_crash_it() {
    // A "server" that answers a listen with 64 MiB of one endless line, invalid UTF-8, deep
    // nesting, a 10,000-key dweet, and then one good frame.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 2048];
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        let chunk = |payload: &[u8]| {
            let mut out = format!("{:x}\r\n", payload.len()).into_bytes();
            out.extend_from_slice(payload);
            out.extend_from_slice(b"\r\n");
            out
        };
        let endless = vec![b'x'; 1024 * 1024];
        for _ in 0..64 {
            if stream.write_all(&chunk(&endless)).await.is_err() {
                return;
            }
        }
        let wide: String = wide_object(10_000);
        let wide_dweet =
            format!(r#"{{"thing":"h","created":"2026-01-01T00:00:00.000Z","content":{wide}}}"#);
        let good = r#"{"thing":"h","created":"2026-01-01T00:00:01.000Z","content":{"good":true}}"#;
        let mut tail = b"\n\xff\xfe not utf-8\n".to_vec();
        tail.extend(format!("{}{}\n", "[".repeat(50_000), "]".repeat(50_000)).as_bytes());
        tail.extend(dweetpipe::protocol::encode_stream_frame(&wide_dweet));
        tail.extend(dweetpipe::protocol::encode_stream_frame(good));
        let _ = stream.write_all(&chunk(&tail)).await;
        let _ = stream.write_all(b"0\r\n\r\n").await;
    });

    let mut child = Command::new(BIN)
        .args([
            "--server",
            &format!("http://{addr}"),
            "listen",
            "h",
            "--timeout",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await
    {
        let done = line.contains("\"good\":true");
        seen.push(line);
        if done {
            break;
        }
    }
    let peak = peak_rss_kib(pid);
    let _ = child.kill().await;
    assert!(
        seen.last().is_some_and(|l| l.contains("\"good\":true")),
        "the good frame after the garbage arrived: {seen:?}"
    );
    // The 10,000-key dweet double-encodes to ~150 KB, past the 64 KiB line limit: dropped too.
    assert_eq!(seen.len(), 1, "only the good frame got through: {seen:?}");
    assert!(
        peak > 0 && peak < 48 * 1024,
        "64 MiB of endless line did not stay in memory: peak RSS {peak} KiB"
    );
    eprintln!(
        "hostile stream: listener peak RSS {} MiB after 64 MiB of endless line",
        peak / 1024
    );
}
