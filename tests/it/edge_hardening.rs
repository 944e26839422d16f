//! The edge against clients without the key and against an unlucky host (issue 20): connections that pipeline
//! requests without the key and never read cannot keep a client with the key out; a client that stops reading its
//! answer is closed after `server.write_timeout`; `max_connections` is held to the open-file limit; a trust store
//! that cannot be read stops only HTTPS upstreams, blames no key, and is read again; the bearer scheme in any
//! case and whitespace; a dashboard no page can frame.

use crate::support::*;
use crate::upstream::{localhost_cert, tls_mock};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn socket_addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// A connection whose receive buffer is as small as the system allows: a client that does not read fills it at
/// once.
async fn tight_connection(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.connect(addr).await
}

const DASHBOARD: &str = "GET /dashboard HTTP/1.1\r\nhost: localhost\r\n\r\n";

/// A client without the key: pipelines requests for the dashboard, never reads an answer, and opens a new
/// connection whenever the server closes its own. Counts the connections it opened.
async fn hold_the_door(addr: SocketAddr, opened: Arc<AtomicUsize>) {
    // About 9 MB of answers: more than the socket buffers between keyrelay and the client hold (up to 4 MB).
    let pipelined = DASHBOARD.repeat(1024);
    loop {
        let Ok(mut tcp) = tight_connection(addr).await else {
            continue;
        };
        opened.fetch_add(1, Ordering::SeqCst);
        if tcp.write_all(pipelined.as_bytes()).await.is_err() {
            continue;
        }
        // The scenario: a client that never reads notices that its connection was closed only when a write
        // fails, which it tries four times a second.
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if tcp.write_all(DASHBOARD.as_bytes()).await.is_err() {
                break;
            }
        }
    }
}

#[tokio::test]
async fn clients_without_the_key_that_never_read_cannot_keep_a_client_with_it_out() {
    let mock = Mock::echo("served with the key").await;
    let dir = mock_dir(&mock, "server: {max_connections: 24}\n");
    let server = start(dir.path(), &[], None);
    let addr = socket_addr(&server.url);

    // Twice as many such clients as places, reconnecting as they are closed.
    let opened = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..48)
        .map(|_| tokio::spawn(hold_the_door(addr, opened.clone())))
        .collect();
    eventually(
        "the clients without the key fill every place and reconnect",
        || {
            let opened = opened.clone();
            async move { opened.load(Ordering::SeqCst) >= 96 }
        },
    )
    .await;

    // Every request with the key, each on a new connection, is served.
    let _ = http_client();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let body = json!({"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]});
    for i in 0..12 {
        let response = client
            .post(format!("{}/v1/chat/completions", server.url))
            .timeout(Duration::from_secs(5))
            .bearer_auth(PROXY_KEY)
            .json_body(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i} with the key was not served: {e}"));
        assert_eq!(response.status(), 200);
        let answer: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            "served with the key"
        );
    }
    for attacker in attackers {
        attacker.abort();
    }
    assert!(
        !server
            .log()
            .iter()
            .any(|l| l.contains("connection limit reached")),
        "no connection was refused: there was always one without the key to close"
    );
}

/// Sends `requests` on one connection and reads until the server closes it: how many responses came, and the
/// text.
async fn pipelined(url: &str, requests: &str) -> (usize, String) {
    let mut tcp = TcpStream::connect(socket_addr(url)).await.unwrap();
    tcp.write_all(requests.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the server closes the connection");
    let text = String::from_utf8_lossy(&received).to_string();
    (text.matches("HTTP/1.1 ").count(), text)
}

#[tokio::test]
async fn an_answer_without_the_key_is_the_last_on_its_connection() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let keyless = format!("{DASHBOARD}GET / HTTP/1.1\r\nhost: localhost\r\n\r\n").repeat(3);
    let (answers, text) = pipelined(&proxy.url, &keyless).await;
    assert_eq!(answers, 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n")
    );
    let (answers, _) = pipelined(
        &proxy.url,
        "GET /v1/models HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer wrong\r\n\r\n"
            .repeat(3)
            .as_str(),
    )
    .await;
    assert_eq!(answers, 1, "a refusal too");

    // With the key, a connection is kept: every pipelined request is answered, until the client asks to close.
    let with_key = |last: &str| {
        format!(
            "GET /v1/providers HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {PROXY_KEY}\r\n{last}\r\n"
        )
    };
    let keyed = format!(
        "{}{}",
        format!("{}{DASHBOARD}", with_key("")).repeat(3),
        with_key("connection: close\r\n")
    );
    let (answers, text) = pipelined(&proxy.url, &keyed).await;
    assert_eq!(answers, 7, "{text}");
}

#[tokio::test]
async fn a_client_with_the_key_that_stops_reading_is_closed_after_the_write_timeout() {
    // A long stream: far more than the socket buffers between keyrelay and the client hold.
    let words: Vec<String> = (0..4000)
        .map(|i| format!("{i:04}{}", "x".repeat(4000)))
        .collect();
    let mock = Mock::start(move |_, _| {
        let parts: Vec<&str> = words.iter().map(String::as_str).collect();
        Reply::sse(chunks("m", &parts, false), End::Done)
    })
    .await;
    let dir = mock_dir(
        &mock,
        "server: {write_timeout: 1s, idle_timeout: 5m}\nrequest_timeout: 5m\n",
    );
    let server = start(dir.path(), &[], None);

    let chat = |stream: bool| {
        let body = json!({"model": "mock/m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {PROXY_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut tcp = tight_connection(socket_addr(&server.url)).await.unwrap();
    // The stream, and another request pipelined behind it; then not a byte read.
    tcp.write_all(format!("{}{}", chat(true), chat(false)).as_bytes())
        .await
        .unwrap();
    eventually("the stream reaches the upstream", || async {
        !mock.seen().is_empty()
    })
    .await;
    eventually(
        "keyrelay gives up on the client and ends the upstream stream",
        || async { mock.closed_streams() == 1 },
    )
    .await;
    assert_eq!(
        mock.seen().len(),
        1,
        "the request pipelined behind the blocked answer was never read"
    );

    // What the client finds when it reads at last: part of the stream, then the end of the connection.
    let mut received = Vec::new();
    let ended = tokio::time::timeout(PATIENCE, async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection is closed");
    let text = String::from_utf8_lossy(&received);
    assert!(
        received.len() < 4000 * 4000,
        "cut short: {} bytes",
        received.len()
    );
    assert!(!text.contains("[DONE]"));
}

#[tokio::test]
async fn max_connections_is_held_to_the_open_file_limit_at_start_and_on_reload() {
    let mock = Mock::echo("hi").await;
    let dir = mock_dir(&mock, "server: {max_connections: 5000}\n");
    // 256 files: (256 - 64) / 2 = 96 connections at most.
    let server = start(dir.path(), &[], Some((256, 256)));
    let log = server
        .log_once("the lowered cap", |l| {
            l.contains("server.max_connections is 5000")
        })
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("server.max_connections is 5000"))
        .unwrap();
    assert!(
        line.contains("open-file limit of 256") && line.contains("at most 96 connections"),
        "{line}"
    );

    // The effective cap holds: silent connections beyond it are closed to make room, and a client is served.
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(TcpStream::connect(socket_addr(&server.url)).await.unwrap());
    }
    let (status, _, body) = send(
        http_client()
            .post(format!("{}/v1/chat/completions", server.url))
            .bearer_auth(PROXY_KEY)
            .json_body(
                &json!({"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]}),
            ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !server.log().iter().any(|l| l.contains("cannot accept")),
        "never out of files"
    );

    // A reload asking for more than the limit allows says what the next start will do.
    write(
        dir.path(),
        "config.yaml",
        "server: {max_connections: 6000}\n",
    );
    server
        .log_once("the reload's warning", |l| {
            l.contains("at the next start: server.max_connections is 6000")
        })
        .await;
}

#[tokio::test]
async fn a_trust_store_that_cannot_be_read_stops_only_https_upstreams_blames_no_key_and_is_read_again()
 {
    let (pem, cert, private_key) = localhost_cert();
    let (tls_port, _) = tls_mock(&cert, &private_key, &[b"h2", b"http/1.1"]).await;
    let plain = Mock::echo("over plain HTTP").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "providers/secure.yaml",
        &provider_yaml(&format!("https://localhost:{tls_port}/v1"), ""),
    );
    write(
        dir.path(),
        "providers/plain.yaml",
        &provider_yaml(&plain.base_url, ""),
    );
    write(
        dir.path(),
        ".env",
        &format!(
            "PROXY_API_KEY={PROXY_KEY}\nSECURE_API_KEY={}\nPLAIN_API_KEY={}\n",
            key(1),
            key(2)
        ),
    );
    write(dir.path(), "config.yaml", "retries: {attempts: 1}\n");
    // The trust store named by SSL_CERT_FILE does not exist yet (a volume not mounted, say).
    let trust = dir.path().join("trust.pem");
    let served = start(
        dir.path(),
        &[("SSL_CERT_FILE", trust.to_str().unwrap())],
        None,
    );
    let warning = served
        .log_once("the missing trust store", |l| {
            l.contains("no trust anchors could be loaded")
        })
        .await;
    let warning = warning
        .lines()
        .find(|l| l.contains("no trust anchors could be loaded"))
        .unwrap()
        .to_string();
    assert!(
        warning.contains(&format!("secure (https://localhost:{tls_port}/v1)")),
        "{warning}"
    );
    assert!(warning.contains("trust.pem"), "names the file: {warning}");
    assert!(!warning.contains("plain ("), "{warning}");

    let chat = |model: &str| served.chat(model);
    // Plain HTTP is served; HTTPS fails, again and again, without a cost to its key.
    let (status, _, body) = send(chat("plain/m")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "over plain HTTP");
    for _ in 0..3 {
        let (status, _, body) = send(chat("secure/m")).await;
        assert_eq!(status, 503, "{body}");
        let (status, _, body) = send(chat("plain/m")).await;
        assert_eq!(status, 200, "{body}");
    }
    let log = served
        .log_once("the cause", |l| {
            l.contains("secure/m") && l.contains("status=503")
        })
        .await;
    assert!(log.contains("TLS is unavailable"), "{log}");
    let keys = served.get_json("/v1/keys").await;
    let secure = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "secure")
        .unwrap();
    let state = &secure["keys"][0];
    assert_eq!(state["state"], "available", "{state}");
    assert_eq!(state["streak"], 0, "{state}");
    assert_eq!(state["cooldown"], Value::Null, "{state}");
    assert_eq!(state["lifetime"]["failures"], 0, "{state}");

    // Once the file is there, HTTPS upstreams are served, and plain ones still are.
    write(dir.path(), "trust.pem", &pem);
    let body = eventually_some(
        "the HTTPS upstream served once the store is readable",
        || async {
            let (status, _, body) = send(chat("secure/m")).await;
            (status == 200).then_some(body)
        },
    )
    .await;
    assert_eq!(body["choices"][0]["message"]["content"], "over TLS");
    let (status, _, _) = send(chat("plain/m")).await;
    assert_eq!(status, 200);
    served
        .log_once("the recovery", |l| {
            l.contains("HTTPS upstreams are reachable again")
        })
        .await;
}

#[tokio::test]
async fn the_bearer_scheme_is_read_in_any_case_with_any_whitespace() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let client = http_client();
    let models = |authorization: String| {
        client
            .get(format!("{}/v1/models", proxy.url))
            .header("authorization", authorization)
    };
    for form in [
        format!("BEARER {PROXY_KEY}"),
        format!("bearer {PROXY_KEY}"),
        format!("Bearer\t{PROXY_KEY}"),
        format!("Bearer \t  {PROXY_KEY}"),
        format!("bEaReR {PROXY_KEY} "),
    ] {
        let (status, _, body) = send(models(form.clone())).await;
        assert_eq!(status, 200, "{form:?}: {body}");
        assert_eq!(body["object"], "list");
    }
    let (status, _, body) = send(models("BEARER not-the-key".into())).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is wrong"),
        "{body}"
    );
    let (status, _, body) = send(models(format!("Basic {PROXY_KEY}"))).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("missing proxy key"),
        "{body}"
    );
}

#[tokio::test]
async fn no_page_can_frame_the_dashboard() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let response = http_client()
        .get(format!("{}/dashboard", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert!(header("content-type").starts_with("text/html"));
    assert_eq!(header("x-frame-options"), "DENY");
    assert!(
        header("content-security-policy").contains("frame-ancestors 'none'"),
        "{}",
        header("content-security-policy")
    );
    assert_eq!(header("x-content-type-options"), "nosniff");
}
