//! The listen stream end to end: fan-out, keys, idle close, reconnects and odd servers.

use std::time::Duration;

use dweetpipe::client::{Client, Dweet, Error, ListenOptions};
use dweetpipe::protocol::encode_stream_frame;
use dweetpipe::sandbox::{self, SandboxConfig};
use futures_util::StreamExt;
use serde_json::json;

use crate::common::{self, LOCK, client_for, key, sandbox, sandbox_with, thing};

async fn next_dweet(
    stream: &mut (impl futures_util::Stream<Item = Result<Dweet, Error>> + Unpin),
) -> Dweet {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a dweet within 10 s")
        .expect("stream still open")
        .expect("no error")
}

#[tokio::test(flavor = "multi_thread")]
async fn several_listeners_each_get_every_new_dweet_in_order() {
    let server = sandbox().await;
    let client = client_for(&server);
    let thing = thing("fanout");
    client
        .dweet_for(&thing, &json!({"old": true}), None)
        .await
        .unwrap();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(
            client
                .listen_for_dweets_from(&thing, None, ListenOptions::default())
                .await
                .unwrap(),
        );
    }
    for i in 0..5 {
        client
            .dweet_for(&thing, &json!({ "i": i, "big": 6816513845u64 }), None)
            .await
            .unwrap();
    }
    for listener in &mut listeners {
        for i in 0..5 {
            let dweet = next_dweet(listener).await;
            assert_eq!(
                dweet.content["i"],
                json!(i),
                "no old dweet replayed, order kept"
            );
            assert_eq!(dweet.content["big"], json!(6816513845u64));
            assert_eq!(dweet.thing, thing);
            assert!(dweet.transaction.is_none());
        }
        assert_eq!(listener.stats().skipped_lines(), 0);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listening_to_a_locked_thing_needs_its_key() {
    let server = sandbox().await;
    let client = client_for(&server);
    let thing = thing("locked-listen");
    client.lock(&thing, LOCK, &key()).await.unwrap();

    let error = client
        .listen_for_dweets_from(&thing, None, ListenOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Locked { .. }), "{error:?}");

    let options = ListenOptions {
        reconnect_for: Some(Duration::from_secs(5)),
        ..ListenOptions::default()
    };
    let wrong = client
        .listen_for_dweets_from(&thing, Some(&dweetpipe::client::Key::new("bad")), options)
        .await;
    assert!(
        matches!(wrong, Err(Error::WrongKey { .. })),
        "a wrong key is refused at once: {wrong:?}"
    );

    let mut allowed = client
        .listen_for_dweets_from(&thing, Some(&key()), ListenOptions::default())
        .await
        .unwrap();
    client
        .dweet_for(&thing, &json!({"secret": 1}), Some(&key()))
        .await
        .unwrap();
    assert_eq!(next_dweet(&mut allowed).await.content, json!({"secret": 1}));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_close_ends_a_single_connection_stream_cleanly() {
    let server = sandbox_with(|c| c.idle_close = Duration::from_millis(300)).await;
    let client = client_for(&server);
    let mut stream = client
        .listen_for_dweets_from(&thing("idle"), None, ListenOptions::default())
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("closed by the server");
    assert!(
        end.is_none(),
        "an idle close is an end, not an error: {end:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_after_idle_close_until_the_deadline() {
    let server = sandbox_with(|c| c.idle_close = Duration::from_millis(300)).await;
    let client = client_for(&server);
    let thing = thing("reconnect");
    let options = ListenOptions {
        reconnect_for: Some(Duration::from_secs(3)),
        reconnect_delay: Duration::from_millis(50),
        ..ListenOptions::default()
    };
    let mut stream = client
        .listen_for_dweets_from(&thing, None, options)
        .await
        .unwrap();
    let stats = stream.stats();
    // Outlive two idle closes, then dweet: the reconnected stream must deliver it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let sender = crate::common::dweet_repeatedly(
        &client,
        &thing,
        20,
        Duration::from_millis(50),
        |i| json!({ "i": i }),
    );
    let dweet = next_dweet(&mut stream).await;
    assert!(dweet.content["i"].is_number());
    assert!(
        stats.connects() >= 2,
        "reconnected: {} connects",
        stats.connects()
    );
    assert_eq!(sender.await.unwrap(), 0, "every dweet was accepted");
    let started = std::time::Instant::now();
    while tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .is_some()
    {}
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the stream ends at its deadline"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_a_sandbox_restart_on_the_same_port() {
    let first = sandbox().await;
    let addr = first.local_addr();
    let client = client_for(&first);
    let thing = thing("restart");
    let options = ListenOptions {
        reconnect_for: Some(Duration::from_secs(15)),
        reconnect_delay: Duration::from_millis(100),
        ..ListenOptions::default()
    };
    let mut stream = client
        .listen_for_dweets_from(&thing, None, options)
        .await
        .unwrap();
    client
        .dweet_for(&thing, &json!({"server": 1}), None)
        .await
        .unwrap();
    assert_eq!(next_dweet(&mut stream).await.content, json!({"server": 1}));

    first.shutdown().await;
    let second = sandbox::start(SandboxConfig {
        listen: addr,
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    // Keep dweeting until the reconnected stream sees one.
    let sender = crate::common::dweet_repeatedly(
        &client,
        &thing,
        100,
        Duration::from_millis(100),
        |_| json!({"server": 2}),
    );
    assert_eq!(next_dweet(&mut stream).await.content, json!({"server": 2}));
    assert!(stream.stats().connects() >= 2);
    sender.abort();
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_streaming_ndjson_and_garbage_is_decoded() {
    let dweet = r#"{"thing":"clone","created":"2024-01-01T00:00:00.000Z","content":{"a":1}}"#;
    let mut inner = Vec::new();
    inner.extend(encode_stream_frame(dweet));
    inner.extend(b"this is not json\r\n");
    inner.extend(format!("{dweet}\n").as_bytes());
    inner.extend(b"{\"json\":\"but not a dweet\"}\n");
    inner.extend(encode_stream_frame(dweet));
    let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    // Deliberately cut the body into chunks that split frames in the middle.
    for piece in inner.chunks(7) {
        answer.extend(format!("{:x}\r\n", piece.len()).as_bytes());
        answer.extend(piece);
        answer.extend(b"\r\n");
    }
    answer.extend(b"0\r\n\r\n");
    let addr = common::canned_server(answer).await;
    let client = Client::new(&format!("http://{addr}")).unwrap();
    let stream = client
        .listen_for_dweets_from("clone", None, ListenOptions::default())
        .await
        .unwrap();
    let stats = stream.stats();
    let dweets: Vec<_> = stream.collect().await;
    assert_eq!(dweets.len(), 3, "{dweets:?}");
    assert!(
        dweets
            .iter()
            .all(|d| d.as_ref().unwrap().content == json!({"a": 1}))
    );
    assert_eq!(stats.skipped_lines(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn listening_through_a_callers_reqwest_client_works_the_same() {
    let server = sandbox_with(|c| c.idle_close = Duration::from_millis(300)).await;
    // A caller's own reqwest client makes listen streams go through reqwest, not plain TCP.
    let client = Client::builder(&server.base_url())
        .http_client(reqwest::Client::new())
        .build()
        .unwrap();
    let thing = thing("via-reqwest");
    let mut stream = client
        .listen_for_dweets_from(&thing, None, ListenOptions::default())
        .await
        .unwrap();
    client
        .dweet_for(&thing, &json!({"via": "reqwest"}), None)
        .await
        .unwrap();
    assert_eq!(
        next_dweet(&mut stream).await.content,
        json!({"via": "reqwest"})
    );
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    assert!(end.is_none(), "idle close ends it: {end:?}");
    client.lock(&thing, LOCK, &key()).await.unwrap();
    let refused = client
        .listen_for_dweets_from(&thing, None, ListenOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Locked { .. }), "{refused:?}");
    server.shutdown().await;
}
