//! The HTTP edge against hostile and broken clients: a connection cap that silent connections cannot fill, a time
//! bound on every phase of a connection, and every answer, even to a malformed request, in the API's error shape.

use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Sends `bytes` on a fresh connection and reads the answer until the server closes it: status and JSON body.
async fn raw(url: &str, bytes: &[u8]) -> (u16, Value) {
    let mut tcp = TcpStream::connect(addr(url)).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    let body = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, body)
}

/// Whether the server closes `tcp` within `within` (reading whatever it sends first).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn silent_connections_beyond_the_cap_never_keep_a_client_out() {
    let mock = Mock::echo("still served").await;
    let dir = mock_dir(&mock, "");
    // A soft open-file limit of 256 under a hard one of 512: keyrelay raises it, and derives its cap (224) from it.
    let server = start(dir.path(), &[], Some((256, 512)));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["512", "512"],
        "soft limit raised to the hard one: {files}"
    );

    // More silent connections than the cap, and more than the limit keyrelay started with.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(addr(&server.url)).await.unwrap());
    }
    let client = http_client();
    let body = json!({"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let response = client
            .post(format!("{}/v1/chat/completions", server.url))
            .timeout(Duration::from_secs(1))
            .bearer_auth(PROXY_KEY)
            .json_body(&body)
            .send()
            .await
            .expect("served within a second despite the silent connections");
        assert_eq!(response.status(), 200);
        let answer: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "still served");
    }
    // The oldest silent connections made the room.
    let mut closed = 0;
    for tcp in silent.iter_mut().take(100) {
        if closed_within(tcp, Duration::from_millis(50)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 70,
        "{closed} of the 100 oldest silent connections were closed"
    );
}

#[tokio::test]
async fn refusals_at_the_cap_are_logged_once_a_minute() {
    let mock = Mock::start(|_, _| Reply::Hang).await;
    let dir = mock_dir(&mock, "server: {max_connections: 2}\n");
    let server = start(dir.path(), &[], None);
    // Two connections serving requests (the upstream never answers) fill the cap.
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(addr(&server.url)).await.unwrap();
        let body =
            json!({"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]}).to_string();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        busy.push(tcp);
    }
    eventually("both requests reach the upstream", || async {
        mock.seen().len() == 2
    })
    .await;
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(addr(&server.url)).await.unwrap();
        assert!(
            closed_within(&mut tcp, Duration::from_secs(2)).await,
            "refused at once"
        );
    }
    for mut tcp in busy {
        assert!(
            !closed_within(&mut tcp, Duration::from_millis(20)).await,
            "the requests in flight keep their connections"
        );
    }
    let log = server
        .log_once("the refusals", |l| l.contains("connection limit reached"))
        .await;
    let warnings = log
        .lines()
        .filter(|l| l.contains("connection limit reached"))
        .count();
    assert_eq!(warnings, 1, "{log}");
}

#[tokio::test]
async fn every_phase_of_a_connection_is_bounded() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(
        Setup::one(&mock, 1)
            .config("server: {header_timeout: 300ms, body_timeout: 300ms, idle_timeout: 500ms}\n"),
    )
    .await;
    let window = Duration::from_secs(3);

    // Connected, never a byte.
    let mut silent = TcpStream::connect(addr(&proxy.url)).await.unwrap();
    assert!(
        closed_within(&mut silent, window).await,
        "a silent connection is closed"
    );

    // A head dripped a byte at a time, never finished.
    let mut drip = TcpStream::connect(addr(&proxy.url)).await.unwrap();
    drip.write_all(b"GET / HTTP/1.1\r\nx-slow: ").await.unwrap();
    let (mut reader, mut writer) = drip.into_split();
    let dripping = tokio::spawn(async move {
        for _ in 0..60 {
            if writer.write_all(b"a").await.is_err() {
                return;
            }
            // The scenario: a client that sends its head a byte at a time.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(window, reader.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "a dripping head is cut off");
    dripping.abort();

    // A body that never ends.
    let (status, body) = raw(
        &proxy.url,
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY_KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":").as_bytes(),
    )
    .await;
    assert_eq!(status, 408);
    assert_eq!(error_code(&body), "request_timeout");

    // An answered request, then an idle keep-alive connection (with the key: an answer without it is the last on
    // its connection).
    let mut kept = TcpStream::connect(addr(&proxy.url)).await.unwrap();
    kept.write_all(
        format!(
            "GET /v1/providers HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY_KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 12];
    kept.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(
        closed_within(&mut kept, window).await,
        "an idle keep-alive connection is closed"
    );
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;

    let (status, body) = raw(&proxy.url, b"\x16\x03\x01\x02\x00 not http\r\n\r\n").await;
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_http"));

    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let (status, body) = raw(&proxy.url, long_uri.as_bytes()).await;
    assert_eq!((status, error_code(&body).as_str()), (414, "uri_too_long"));

    let big_header = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(600_000)
    );
    let (status, body) = raw(&proxy.url, big_header.as_bytes()).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (431, "headers_too_large")
    );

    let bad_path = format!(
        "GET /v1/models/%FF%FE HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY_KEY}\r\nconnection: close\r\n\r\n"
    );
    let (status, body) = raw(&proxy.url, bad_path.as_bytes()).await;
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_path"));

    // The server is none the worse.
    let (status, _, _) = proxy.chat("mock/m", "hello").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_panicking_handler_answers_500_in_the_api_shape_and_serving_goes_on() {
    let app = axum::Router::new()
        .route(
            "/boom",
            axum::routing::get(|| async {
                if true {
                    panic!("a bug");
                }
                "never"
            }),
        )
        .route("/fine", axum::routing::get(|| async { "fine" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let signals = keyrelay::http::Signals {
        stop: stop.clone(),
        closing: tokio_util::sync::CancellationToken::new(),
        grace: Duration::from_secs(1),
    };
    let server = tokio::spawn(keyrelay::http::serve(
        listener,
        app,
        Default::default(),
        signals,
    ));
    let client = http_client();
    for _ in 0..2 {
        let (status, _, body) = send(client.get(format!("{url}/boom"))).await;
        assert_eq!(status, 500);
        assert_eq!(error_code(&body), "internal_error");
        let fine = client.get(format!("{url}/fine")).send().await.unwrap();
        assert_eq!(fine.text().await.unwrap(), "fine");
    }
    stop.cancel();
    server.await.unwrap();
}
