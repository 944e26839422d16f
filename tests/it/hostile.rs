//! What a client, an upstream or an operator's mistake could do to open keyrelay up: model names that try to
//! reach other upstream paths, keys echoed back by upstreams, details for strangers, and reloads that would
//! weaken it.

use crate::support::*;
use serde_json::json;

fn gemini_allowing(mock: &Mock, allow: &str) -> Setup {
    Setup {
        env: mock_keys("GEMINI", 1),
        ..Setup::empty()
    }
    .provider(
        "gemini",
        shipped_provider("gemini", &format!("{}beta", mock.base_url)).replace(
            "\nmodels:\n",
            &format!("\nmodels:\n  allow: [\"{allow}\"]\n"),
        ),
    )
    .shipped_plugin("gemini.rhai")
}

#[tokio::test]
async fn a_model_name_is_one_path_segment_upstream_and_the_filter_judges_what_is_sent() {
    let mock = Mock::start(|seen, _| {
        Reply::status(
            404,
            json!({"error": {"code": 404, "message": format!("no model at {}", seen.path), "status": "NOT_FOUND"}}),
        )
    })
    .await;
    let proxy = Proxy::start(gemini_allowing(&mock, "gemini-2.5-*")).await;
    for (model, path) in [
        (
            "gemini/gemini-2.5-x/../../../admin/delete",
            "/v1beta/models/gemini-2.5-x%2F..%2F..%2F..%2Fadmin%2Fdelete:generateContent",
        ),
        (
            "gemini/gemini-2.5-m?alt=json&key=x#frag",
            "/v1beta/models/gemini-2.5-m%3Falt=json&key=x%23frag:generateContent",
        ),
        (
            "gemini/gemini-2.5-%2e%2e",
            "/v1beta/models/gemini-2.5-%252e%252e:generateContent",
        ),
    ] {
        let (status, _, body) = proxy.chat(model, "hi").await;
        assert_eq!(status, 404, "{model}: {body}");
        let seen = mock.seen().pop().unwrap();
        assert_eq!(seen.path, path, "{model}");
        assert_eq!(seen.query, "", "{model}: nothing reaches the query");
    }
    // Denied by the allow list: never sent.
    let before = mock.seen().len();
    let (status, _, body) = proxy.chat("gemini/../admin", "hi").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (404, "model_not_found")
    );
    assert_eq!(mock.seen().len(), before);
}

#[tokio::test]
async fn model_names_are_checked_at_the_edge() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let long = format!("mock/{}", "m".repeat(300));
    for model in [
        json!("mock/m\u{1b}[2J"),
        json!("mock/m\nx"),
        json!(long),
        json!("mock/.."),
    ] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let (status, _, answer) = send(proxy.post("/v1/chat/completions", &body)).await;
        assert_eq!(status, 400, "{model}: {answer}");
        assert_eq!(error_code(&answer), "invalid_model");
    }
    for (body, says) in [
        (json!({"messages": []}), "`model` is required"),
        (
            json!({"model": 7, "messages": []}),
            "`model` must be a string",
        ),
        (
            json!({"model": null, "messages": []}),
            "`model` must be a string",
        ),
    ] {
        let (status, _, answer) = send(proxy.post("/v1/chat/completions", &body)).await;
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    assert!(mock.chats().is_empty());
}

/// Every file under `dir`, with its text.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((
                path.clone(),
                std::fs::read_to_string(&path).unwrap_or_default(),
            ));
        }
    }
    out
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn keys_an_upstream_echoes_never_reach_clients_or_logs() {
    // The key three ways: plainly, with its first letters JSON-escaped, and shortened; and its public prefix
    // alone, which is ordinary text.
    let echoed = r#"plain mock-key-abcdefghijkl-0001, escaped \u006d\u006fck-key-abcdefghijkl-0001, short mock-key-abcdefghijkl***, prefix mock-key-***"#;
    let answer = format!(
        r#"{{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"{echoed}"}},"finish_reason":"stop"}}]}}"#
    );
    let chunk = format!(
        r#"{{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":"{echoed}"}},"finish_reason":null}}]}}"#
    );
    let (answer, chunk) = (answer.clone(), chunk.clone());
    let mock = Mock::start(move |seen, _| {
        if seen.body["stream"] == json!(true) {
            return Reply::Raw {
                status: 200,
                content_type: "text/event-stream",
                body: format!(
                    "data: {chunk}\n\ndata: {}\n\ndata: [DONE]\n\n",
                    r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#
                ),
            };
        }
        if seen.body["messages"][0]["content"] == json!("fail") {
            return Reply::Raw {
                status: 400,
                content_type: "application/json",
                body: format!(r#"{{"error":{{"message":"{echoed}","type":"invalid_request_error"}}}}"#),
            };
        }
        Reply::Raw {
            status: 200,
            content_type: "application/json",
            body: answer.clone(),
        }
    })
    .await;
    let proxy =
        Proxy::start(Setup::one(&mock, 1).config("request_logging: {enabled: true}\n")).await;
    let secret = key(1);
    let (status, _, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200);
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        content,
        format!(
            "plain {m}, escaped {m}, short ...***, prefix mock-key-***",
            m = masked(1)
        )
    );
    let stream =
        json!({"model": "mock/m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let text = proxy.post_text("/v1/chat/completions", &stream).await;
    assert!(
        reassemble(&sse_data(&text)).contains(&format!("escaped {}", masked(1))),
        "{text}"
    );
    let (status, _, body) = proxy.chat("mock/m", "fail").await;
    assert_eq!(status, 400);
    let everything = [text, body.to_string(), content.to_string()].concat();
    for leak in [secret.as_str(), "abcdefghijkl", "\\u006d\\u006fck"] {
        assert!(
            !everything.contains(leak),
            "{leak} reached the client: {everything}"
        );
    }
    // The request logs hold the same, masked.
    request_logs(&proxy.dir.path().join("logs"), 3).await;
    let logs = files_under(&proxy.dir.path().join("logs"));
    assert_eq!(logs.len(), 3);
    for (path, text) in &logs {
        assert!(!text.contains("abcdefghijkl"), "{}: {text}", path.display());
        assert!(text.contains(&masked(1)), "{}", path.display());
        #[cfg(unix)]
        assert_eq!(mode(path), 0o600, "{}", path.display());
    }
    #[cfg(unix)]
    assert_eq!(mode(&proxy.dir.path().join("logs")), 0o700);
    let dir = proxy.stop().await;
    #[cfg(unix)]
    assert_eq!(mode(&dir.path().join("key_usage.json")), 0o600);
}

#[tokio::test]
async fn strangers_learn_only_that_the_service_is_up_and_errors_never_quote_credentials() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    // A broken edit whose error would quote a URL with credentials.
    std::fs::write(
        proxy.dir.path().join(".env"),
        format!(
            "PROXY_API_KEY={PROXY_KEY}\nMOCK_API_KEY_1={}\nACME_API_BASE=ftp://admin:hunter2@acme.test/v1?key=sekrit\n",
            key(1)
        ),
    )
    .unwrap();
    let error = eventually_some("the broken edit is rejected", || async {
        let detailed = send(proxy.get("/")).await.2;
        detailed["config"]["last_reload_error"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(
        error.contains("ACME_API_BASE") && error.contains("ftp://acme.test/v1"),
        "{error}"
    );
    assert!(
        !error.contains("hunter2") && !error.contains("sekrit") && !error.contains("admin"),
        "{error}"
    );
    let (status, _, anonymous) = send(proxy.client.get(format!("{}/", proxy.url))).await;
    assert_eq!(status, 200);
    assert_eq!(anonymous, json!({"status": "ok"}));
    let (_, _, wrong) = send(
        proxy
            .client
            .get(format!("{}/", proxy.url))
            .bearer_auth("nope"),
    )
    .await;
    assert_eq!(wrong, json!({"status": "ok"}));
}

#[tokio::test]
async fn a_provider_named_proxy_never_gets_the_proxy_key() {
    let mock = Mock::echo("hi").await;
    let setup = Setup {
        env: vec![("PROXY_API_KEY_1".into(), key(1))],
        ..Setup::empty()
    }
    .provider("proxy", provider_yaml(&mock.base_url, ""));
    let proxy = Proxy::start(setup).await;
    for _ in 0..4 {
        let (status, _, _) = proxy.chat("proxy/m", "hi").await;
        assert_eq!(status, 200);
    }
    let keys: Vec<String> = mock.chats().iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys, vec![key(1); 4]);
    let (_, _, providers) = send(proxy.get("/v1/providers")).await;
    assert_eq!(providers["data"][0]["keys"], 1, "{providers}");
}

/// The head of the answer to `request` (sent as it is on a fresh connection), as raw bytes.
async fn raw_head(url: &str, request: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "{head:?}");
        head.push(byte[0]);
    }
    head
}

#[tokio::test]
async fn every_header_value_keyrelay_sends_is_ascii() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 2)).await;
    let chat = |stream: bool| {
        let body = json!({"model": "mock/m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let get = |path: &str, key: bool| {
        let auth = if key {
            format!("authorization: Bearer {PROXY_KEY}\r\n")
        } else {
            String::new()
        };
        format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n")
    };
    let requests = [
        chat(false),
        chat(true),
        get("/", false),
        get("/", true),
        get("/dashboard", false),
        get("/metrics", true),
        get("/v1/models", true),
        get("/v1/keys", true),
        get("/v1/keys", false),
        get("/v1/nowhere", true),
    ];
    let mut saw_key = false;
    for request in requests {
        let head = raw_head(&proxy.url, &request).await;
        // Every byte of a head: visible ASCII, spaces and tabs, and the line ends.
        let odd: Vec<u8> = head
            .iter()
            .copied()
            .filter(|b| !(b.is_ascii_graphic() || matches!(b, b' ' | b'\t' | b'\r' | b'\n')))
            .collect();
        let text = String::from_utf8_lossy(&head).to_string();
        assert!(
            odd.is_empty(),
            "non-ASCII in the head of {request:?}:\n{text}"
        );
        saw_key |= text.contains("x-keyrelay-key: ...");
    }
    assert!(saw_key, "the masked key was among the headers checked");
}
