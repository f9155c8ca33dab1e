//! Every client call against the sandbox, including every failure the protocol names.

use std::time::Duration;

use dweetpipe::client::{Client, Error, Key, Recipient};
use dweetpipe::protocol;
use serde_json::json;

use crate::common::{
    self, KEY, LOCK, OTHER_KEY, OTHER_LOCK, client_for, install_tls_provider, key, sandbox,
    sandbox_with, thing,
};

#[tokio::test(flavor = "multi_thread")]
async fn dweet_for_then_read_back_latest_and_history() {
    let server = sandbox().await;
    let client = client_for(&server);
    let thing = thing("rw");
    let first = client
        .dweet_for(&thing, &json!({"big": 6816513845u64, "t": 21.5}), None)
        .await
        .unwrap();
    let second = client
        .dweet_for(&thing, &json!({"n": 2}), None)
        .await
        .unwrap();
    assert_eq!(first.thing, thing);
    assert!(first.transaction.as_deref().is_some_and(|t| t.len() == 36));
    common::assert_created_format(first.created.as_str());

    let latest = client.get_latest_dweet_for(&thing, None).await.unwrap();
    assert_eq!(
        latest.created, second.created,
        "reads return the write's created string"
    );
    assert_eq!(latest.content, json!({"n": 2}));
    assert_eq!(latest.transaction, None, "transaction only on writes");

    let history = client.get_dweets_for(&thing, None).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].created, second.created, "newest first");
    assert_eq!(history[1].content["big"], json!(6816513845u64));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dweet_without_a_thing_gets_a_generated_name() {
    let server = sandbox().await;
    let client = client_for(&server);
    let sent = client.dweet(&json!({"hello": "world"})).await.unwrap();
    assert!(sent.thing.contains('-'), "adjective-noun: {}", sent.thing);
    let latest = client
        .get_latest_dweet_for(&sent.thing, None)
        .await
        .unwrap();
    assert_eq!(latest.content, json!({"hello": "world"}));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dweet_quietly_for_stores_without_an_answer() {
    let server = sandbox().await;
    let client = client_for(&server);
    let thing = thing("quiet");
    client
        .dweet_quietly_for(&thing, &json!({"q": 1}), None)
        .await
        .unwrap();
    let latest = client.get_latest_dweet_for(&thing, None).await.unwrap();
    assert_eq!(latest.content, json!({"q": 1}));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_thing_is_not_found_with_the_exact_reason() {
    let server = sandbox().await;
    let client = client_for(&server);
    for result in [
        client
            .get_latest_dweet_for("nobody-here", None)
            .await
            .map(drop),
        client.get_dweets_for("nobody-here", None).await.map(drop),
    ] {
        let error = result.unwrap_err();
        assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
        assert_eq!(error.to_string(), protocol::NOT_FOUND);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_flow_enforces_keys_on_every_call() {
    let server = sandbox().await;
    let client = client_for(&server);
    let thing = thing("locked");
    client
        .dweet_for(&thing, &json!({"before": 1}), None)
        .await
        .unwrap();
    let answer = client.lock(&thing, LOCK, &key()).await.unwrap();
    assert_eq!(answer, json!(thing));

    let no_key = client.get_latest_dweet_for(&thing, None).await.unwrap_err();
    assert!(matches!(no_key, Error::Locked { .. }), "{no_key:?}");
    assert_eq!(no_key.to_string(), protocol::LOCKED);
    let wrong = Key::new("not-the-key");
    let wrong_key = client
        .get_dweets_for(&thing, Some(&wrong))
        .await
        .unwrap_err();
    assert!(matches!(wrong_key, Error::WrongKey { .. }), "{wrong_key:?}");
    assert_eq!(wrong_key.to_string(), protocol::WRONG_KEY);
    let write = client
        .dweet_for(&thing, &json!({}), None)
        .await
        .unwrap_err();
    assert!(matches!(write, Error::Locked { .. }), "{write:?}");
    let quiet = client
        .dweet_quietly_for(&thing, &json!({}), Some(&wrong))
        .await
        .unwrap_err();
    assert!(matches!(quiet, Error::WrongKey { .. }), "{quiet:?}");

    client
        .dweet_for(&thing, &json!({"with": "key"}), Some(&key()))
        .await
        .unwrap();
    let history = client.get_dweets_for(&thing, Some(&key())).await.unwrap();
    assert_eq!(history.len(), 2);

    // Locking again with the same lock is idempotent; another lock is refused.
    client.lock(&thing, LOCK, &key()).await.unwrap();
    let other = client
        .lock(&thing, OTHER_LOCK, &Key::new(OTHER_KEY))
        .await
        .unwrap_err();
    assert!(matches!(other, Error::Api { .. }), "{other:?}");
    // A lock's key must be its own.
    let mismatched = client
        .lock(&common::thing("x"), OTHER_LOCK, &key())
        .await
        .unwrap_err();
    assert!(
        matches!(mismatched, Error::WrongKey { .. }),
        "{mismatched:?}"
    );

    assert_eq!(client.unlock(&thing, &key()).await.unwrap(), json!(thing));
    client.get_latest_dweet_for(&thing, None).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_lock_detaches_it_and_then_it_is_not_in_use() {
    let server = sandbox().await;
    let client = client_for(&server);
    let thing = thing("rmlock");
    client
        .dweet_for(&thing, &json!({"a": 1}), None)
        .await
        .unwrap();
    client.lock(&thing, LOCK, &key()).await.unwrap();
    assert_eq!(client.remove_lock(LOCK, &key()).await.unwrap(), json!(LOCK));
    client.get_latest_dweet_for(&thing, None).await.unwrap();

    let again = client.remove_lock(LOCK, &key()).await.unwrap_err();
    assert!(matches!(again, Error::LockNotInUse { .. }), "{again:?}");
    assert_eq!(again.to_string(), protocol::LOCK_NOT_IN_USE);
    let wrong = client
        .remove_lock(LOCK, &Key::new("nope"))
        .await
        .unwrap_err();
    assert!(matches!(wrong, Error::WrongKey { .. }), "{wrong:?}");
    let unknown = client
        .remove_lock("no-such-lock", &key())
        .await
        .unwrap_err();
    assert!(matches!(unknown, Error::NotFound { .. }), "{unknown:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alert_flow_set_get_replace_remove() {
    let server = sandbox().await;
    let client = client_for(&server);
    let thing = thing("alerted");
    let condition = "if(dweet.alertValue > 10) return 'TEST: Greater than 10';";

    let unlocked = client
        .set_alert(&thing, &["ops@example.com"], condition, &key())
        .await
        .unwrap_err();
    assert!(
        matches!(unlocked, Error::Api { .. }),
        "alerts need a lock: {unlocked:?}"
    );

    client.lock(&thing, LOCK, &key()).await.unwrap();
    let set = client
        .set_alert(
            &thing,
            &["ops@example.com", "oncall@example.com"],
            condition,
            &key(),
        )
        .await
        .unwrap();
    assert_eq!(
        set.condition, condition,
        "spaces, quotes and > survive the path"
    );
    assert_eq!(
        set.recipients,
        vec![
            Recipient::email("ops@example.com"),
            Recipient::email("oncall@example.com")
        ]
    );
    assert!(set.status.is_none(), "set_alert answers without status");

    let got = client.get_alert(&thing, &key()).await.unwrap();
    let status = got.status.expect("get_alert has a status");
    assert!(!status.open && status.since.is_none() && status.message.is_empty());
    assert_eq!(
        (status.alerts_sent_today, status.alerts_allowed_today),
        (0, 100)
    );

    let replaced = client
        .set_alert(&thing, &["x@example.org"], "return a/b > 1;", &key())
        .await
        .unwrap();
    assert_eq!(
        replaced.condition, "return a/b > 1;",
        "a slash in the condition is kept"
    );
    assert_eq!(
        client
            .get_alert(&thing, &key())
            .await
            .unwrap()
            .recipients
            .len(),
        1
    );

    let wrong = client
        .get_alert(&thing, &Key::new("bad"))
        .await
        .unwrap_err();
    assert!(matches!(wrong, Error::WrongKey { .. }), "{wrong:?}");

    assert_eq!(
        client.remove_alert(&thing, &key()).await.unwrap(),
        json!({"thing": thing})
    );
    let gone = client.get_alert(&thing, &key()).await.unwrap_err();
    assert!(matches!(gone, Error::NotFound { .. }), "{gone:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_recipients_and_long_conditions_are_refused() {
    let server = sandbox().await;
    let client = client_for(&server);
    let thing = thing("badalert");
    client.lock(&thing, LOCK, &key()).await.unwrap();
    let bad = client
        .set_alert(&thing, &["not an address"], "return 1;", &key())
        .await
        .unwrap_err();
    assert!(
        bad.to_string().contains("is not an e-mail address"),
        "{bad}"
    );
    let long = "x".repeat(2001);
    let too_long = client
        .set_alert(&thing, &["a@b.io"], &long, &key())
        .await
        .unwrap_err();
    assert!(too_long.to_string().contains("limit is 2000"), "{too_long}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_is_reported_as_such() {
    let server = sandbox_with(|c| c.limits.rate_limit = Some(1.0)).await;
    let client = client_for(&server);
    let thing = thing("rate");
    client.dweet_for(&thing, &json!({}), None).await.unwrap();
    let limited = client
        .dweet_for(&thing, &json!({}), None)
        .await
        .unwrap_err();
    assert!(matches!(limited, Error::RateLimited { .. }), "{limited:?}");
    assert!(limited.is_transient());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.dweet_for(&thing, &json!({}), None).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_cap_payload_limit_and_retention() {
    let server = sandbox_with(|c| {
        c.limits.max_history = 3;
        c.limits.retention = Duration::from_millis(400);
    })
    .await;
    let client = client_for(&server);
    let thing = thing("limits");
    for i in 0..5 {
        client
            .dweet_for(&thing, &json!({ "i": i }), None)
            .await
            .unwrap();
    }
    let kept = client.get_dweets_for(&thing, None).await.unwrap();
    assert_eq!(
        kept.iter()
            .map(|d| d.content["i"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [4, 3, 2]
    );

    let big = json!({ "blob": "x".repeat(2000) });
    let too_big = client.dweet_for(&thing, &big, None).await.unwrap_err();
    assert!(
        too_big.to_string().contains("the limit is 2000"),
        "{too_big}"
    );

    tokio::time::sleep(Duration::from_millis(600)).await;
    let expired = client.get_dweets_for(&thing, None).await.unwrap_err();
    assert!(
        matches!(expired, Error::NotFound { .. }),
        "expired: {expired:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn base_url_with_a_prefix() {
    let server = sandbox_with(|c| c.prefix = "/dweet-api".to_owned()).await;
    assert!(server.base_url().ends_with("/dweet-api"));
    let client = client_for(&server);
    let thing = thing("prefixed");
    client
        .dweet_for(&thing, &json!({"p": 1}), None)
        .await
        .unwrap();
    assert_eq!(
        client
            .get_latest_dweet_for(&thing, None)
            .await
            .unwrap()
            .content,
        json!({"p": 1})
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_reqwest_client_can_be_reused() {
    let server = sandbox().await;
    install_tls_provider();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let client = Client::builder(&server.base_url())
        .http_client(http)
        .build()
        .unwrap();
    let thing = thing("session");
    for _ in 0..3 {
        client.dweet_for(&thing, &json!({}), None).await.unwrap();
    }
    assert_eq!(client.get_dweets_for(&thing, None).await.unwrap().len(), 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn transport_errors_are_transient_and_never_show_the_key() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::new(&format!("http://{addr}")).unwrap();
    let error = client.get_dweets_for("t", Some(&key())).await.unwrap_err();
    assert!(matches!(error, Error::Transport(_)), "{error:?}");
    assert!(error.is_transient());
    let full = format!("{:#} {:?}", anyhow::Error::from(error), "");
    assert!(!full.contains(KEY), "the key leaked into: {full}");
}

#[tokio::test(flavor = "multi_thread")]
async fn non_dweet_answers_become_status_and_decode_errors() {
    let gateway = common::canned_server(
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 6\r\n\r\n<html>".to_vec(),
    )
    .await;
    let error = Client::new(&format!("http://{gateway}"))
        .unwrap()
        .get_dweets_for("t", None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Status { status: 502, .. }),
        "{error:?}"
    );
    assert!(error.is_transient());

    let garbage =
        common::canned_server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()).await;
    let error = Client::new(&format!("http://{garbage}"))
        .unwrap()
        .get_dweets_for("t", None)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Decode { .. }), "{error:?}");

    let failed_404 = br#"{"this":"failed","with":404,"because":"we couldn't find this"}"#;
    let mut answer = format!(
        "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n\r\n",
        failed_404.len()
    )
    .into_bytes();
    answer.extend_from_slice(failed_404);
    let not_found = common::canned_server(answer).await;
    let error = Client::new(&format!("http://{not_found}"))
        .unwrap()
        .get_dweets_for("t", None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::NotFound { .. }),
        "a failure envelope wins over the status: {error:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_base_urls_are_config_errors() {
    for bad in ["dweet.io", "ftp://dweet.io", "http://", "http://x/?q=1"] {
        assert!(matches!(Client::new(bad), Err(Error::Config(_))), "{bad}");
    }
    let proxied = Client::builder("http://127.0.0.1:1")
        .proxy("not a url")
        .build();
    assert!(matches!(proxied, Err(Error::Config(_))));
}
