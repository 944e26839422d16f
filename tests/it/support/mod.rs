//! Test support: a mock upstream that speaks OpenAI's wire format and records what it saw, and a harness that
//! starts a real keyrelay server on a loopback port from files written to a temporary directory.
#![allow(dead_code, unused_imports)]

pub mod binary;
#[allow(dead_code)]
pub mod redis;
pub use binary::*;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// One request the mock received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// The raw query string ("" when none).
    pub query: String,
    /// The key, from `Authorization: Bearer <key>`, `x-api-key` or `x-goog-api-key`.
    pub key: String,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Seen {
    pub fn model(&self) -> &str {
        self.body.get("model").and_then(Value::as_str).unwrap_or("")
    }
}

/// How the mock answers one request.
pub enum Reply {
    Json {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Value,
        delay: Duration,
    },
    /// SSE `data:` payloads, sent `gap` apart, then the end.
    Sse {
        events: Vec<String>,
        gap: Duration,
        end: End,
    },
    /// Accept the request and never answer.
    Hang,
    /// A body sent exactly as given (a native SSE transcript, say).
    Raw {
        status: u16,
        content_type: &'static str,
        body: String,
    },
}

pub enum End {
    /// `data: [DONE]` and close.
    Done,
    /// Close without `[DONE]`.
    Cut,
    /// Keep the connection open, sending nothing more.
    Stall,
}

impl Reply {
    /// SSE `data:` payloads sent back to back, then `end`.
    pub fn sse(events: Vec<String>, end: End) -> Self {
        Self::Sse {
            events,
            gap: Duration::ZERO,
            end,
        }
    }

    pub fn ok(body: Value) -> Self {
        Self::Json {
            status: 200,
            headers: vec![],
            body,
            delay: Duration::ZERO,
        }
    }

    pub fn status(status: u16, body: Value) -> Self {
        Self::Json {
            status,
            headers: vec![],
            body,
            delay: Duration::ZERO,
        }
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        if let Self::Json { headers, .. } = &mut self {
            headers.push((name, value.to_string()));
        }
        self
    }

    pub fn delayed(mut self, by: Duration) -> Self {
        if let Self::Json { delay, .. } = &mut self {
            *delay = by;
        }
        self
    }

    /// An OpenAI error body.
    pub fn error(status: u16, message: &str, kind: &str, code: &str) -> Self {
        Self::status(
            status,
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        )
    }
}

/// A chat completion as OpenAI sends it.
pub fn completion(model: &str, content: &str) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_760_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    })
}

/// OpenAI stream chunks for `parts`, then a finish chunk and (when asked) a usage chunk.
pub fn chunks(model: &str, parts: &[&str], with_usage: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_760_000_000, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        })
        .to_string()
    };
    let mut out = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    out.extend(
        parts
            .iter()
            .map(|p| chunk(json!({"content": p}), Value::Null)),
    );
    out.push(chunk(json!({}), json!("stop")));
    if with_usage {
        out.push(
            json!({
                "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_760_000_000, "model": model,
                "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": parts.len(), "total_tokens": 5 + parts.len()}
            })
            .to_string(),
        );
    }
    out
}

/// A stream of `n` one-word chunks (`w0 w1 ...`), `gap` apart, then its finish and `[DONE]`.
pub fn slow_words(model: &str, n: usize, gap: Duration) -> Reply {
    let words: Vec<String> = (0..n).map(|i| format!("w{i} ")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    Reply::Sse {
        events: chunks(model, &words, false),
        gap,
        end: End::Done,
    }
}

type Handler = Arc<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

#[derive(Default)]
struct Tracking {
    seen: Vec<Seen>,
    in_flight: HashMap<(String, String), usize>,
    max_in_flight: HashMap<(String, String), usize>,
}

/// A mock upstream on a loopback port.
#[derive(Clone)]
pub struct Mock {
    pub base_url: String,
    tracking: Arc<Mutex<Tracking>>,
    closed_streams: Arc<AtomicUsize>,
}

impl Mock {
    /// Starts a mock whose answers come from `handler(request, index of request)`.
    pub async fn start(handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Self {
        let handler: Handler = Arc::new(handler);
        let tracking = Arc::new(Mutex::new(Tracking::default()));
        let closed_streams = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let (t, c) = (tracking.clone(), closed_streams.clone());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (handler, tracking, closed) = (handler.clone(), t.clone(), c.clone());
            async move { answer(req, handler, tracking, closed).await }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base_url,
            tracking,
            closed_streams,
        }
    }

    /// A mock that answers every chat request with `content` and streams it in words.
    pub async fn echo(content: &'static str) -> Self {
        Self::start(move |seen, _| {
            if seen.path.ends_with("/models") {
                return Reply::ok(json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 1, "owned_by": "mock"}]}));
            }
            if seen.path.ends_with("/embeddings") {
                let n = match seen.body.get("input") {
                    Some(Value::Array(items)) => items.len(),
                    _ => 1,
                };
                let data: Vec<Value> = (0..n).map(|i| json!({"object": "embedding", "index": i, "embedding": [0.25, -0.5, i as f64]})).collect();
                return Reply::ok(json!({"object": "list", "data": data, "model": seen.model(), "usage": {"prompt_tokens": 3, "total_tokens": 3}}));
            }
            if seen.body.get("stream") == Some(&Value::Bool(true)) {
                let usage = seen.body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
                let words: Vec<&str> = content.split_inclusive(' ').collect();
                return Reply::Sse { events: chunks(seen.model(), &words, usage), gap: Duration::ZERO, end: End::Done };
            }
            Reply::ok(completion(seen.model(), content))
        })
        .await
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.tracking.lock().unwrap().seen.clone()
    }

    /// Chat requests only.
    pub fn chats(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.ends_with("/chat/completions"))
            .collect()
    }

    /// The most requests ever in flight at once on one key for one model.
    pub fn max_in_flight(&self) -> usize {
        self.tracking
            .lock()
            .unwrap()
            .max_in_flight
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// Streams whose connection was closed (by the proxy or by finishing).
    pub fn closed_streams(&self) -> usize {
        self.closed_streams.load(Ordering::SeqCst)
    }
}

/// Decrements the in-flight count and counts closed streams when a response (or its body) is dropped.
struct Leaving {
    tracking: Arc<Mutex<Tracking>>,
    slot: (String, String),
    closed: Option<Arc<AtomicUsize>>,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        if let Some(n) = self.tracking.lock().unwrap().in_flight.get_mut(&self.slot) {
            *n -= 1;
        }
        if let Some(c) = &self.closed {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn answer(
    req: axum::extract::Request,
    handler: Handler,
    tracking: Arc<Mutex<Tracking>>,
    closed: Arc<AtomicUsize>,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let key = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
        .or_else(|| header("x-api-key"))
        .or_else(|| header("x-goog-api-key"))
        .unwrap_or_default();
    let seen = Seen {
        at: Instant::now(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        key,
        headers: parts.headers.clone(),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    let slot = (seen.key.clone(), seen.model().to_string());
    let index = {
        let mut t = tracking.lock().unwrap();
        t.seen.push(seen.clone());
        let n = t.in_flight.entry(slot.clone()).or_default();
        *n += 1;
        let now = *n;
        let max = t.max_in_flight.entry(slot.clone()).or_default();
        *max = (*max).max(now);
        t.seen.len() - 1
    };
    let mut leaving = Leaving {
        tracking,
        slot,
        closed: None,
    };
    match handler(&seen, index) {
        Reply::Json {
            status,
            headers,
            body,
            delay,
        } => {
            tokio::time::sleep(delay).await;
            let mut response = Response::builder()
                .status(StatusCode::from_u16(status).unwrap())
                .header("content-type", "application/json");
            for (k, v) in headers {
                response = response.header(k, v);
            }
            drop(leaving);
            response.body(Body::from(body.to_string())).unwrap()
        }
        Reply::Raw {
            status,
            content_type,
            body,
        } => {
            drop(leaving);
            Response::builder()
                .status(StatusCode::from_u16(status).unwrap())
                .header("content-type", content_type)
                .body(Body::from(body))
                .unwrap()
        }
        Reply::Hang => {
            let _leaving = leaving;
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Sse { events, gap, end } => {
            leaving.closed = Some(closed);
            let stream = async_stream(events, gap, end, leaving);
            Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

fn async_stream(
    events: Vec<String>,
    gap: Duration,
    end: End,
    leaving: Leaving,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let mut frames: Vec<Option<Bytes>> = events
        .into_iter()
        .map(|e| Some(Bytes::from(format!("data: {e}\n\n"))))
        .collect();
    match end {
        End::Done => frames.push(Some(Bytes::from_static(b"data: [DONE]\n\n"))),
        End::Cut => {}
        End::Stall => frames.push(None),
    }
    futures_util::stream::unfold(
        (frames.into_iter(), leaving, true),
        move |(mut it, leaving, first)| async move {
            if !first && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            match it.next()? {
                Some(frame) => Some((Ok(frame), (it, leaving, false))),
                None => {
                    std::future::pending::<()>().await;
                    None
                }
            }
        },
    )
}

/// An HTTP client for tests (TLS needs a crypto provider even for plain HTTP clients).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub const PROXY_KEY: &str = "test-proxy-key-0123456789";

/// What to write into the proxy's directory.
pub struct Setup {
    pub config: String,
    pub providers: Vec<(String, String)>,
    pub env: Vec<(String, String)>,
    /// Scripts written into `plugins/`.
    pub plugins: Vec<(String, String)>,
}

impl Setup {
    /// One provider `mock` at `mock`'s URL with `keys` keys named `mock-key-<i>-…`.
    pub fn one(mock: &Mock, keys: usize) -> Self {
        Self {
            config: String::new(),
            providers: vec![("mock".into(), provider_yaml(&mock.base_url, ""))],
            env: mock_keys("MOCK", keys),
            plugins: Vec::new(),
        }
    }

    pub fn config(mut self, yaml: &str) -> Self {
        self.config = yaml.to_string();
        self
    }

    pub fn provider(mut self, name: &str, yaml: String) -> Self {
        self.providers.retain(|(n, _)| n != name);
        self.providers.push((name.into(), yaml));
        self
    }

    /// The shipped anthropic provider and script at `mock`'s URL, with `keys` keys.
    pub fn anthropic(mock: &Mock, keys: usize) -> Self {
        Setup {
            env: mock_keys("ANTHROPIC", keys),
            ..Setup::empty()
        }
        .provider("anthropic", shipped_provider("anthropic", &mock.base_url))
        .shipped_plugin("anthropic.rhai")
    }

    /// Nothing configured.
    pub fn empty() -> Self {
        Self {
            config: String::new(),
            providers: vec![],
            env: vec![],
            plugins: vec![],
        }
    }

    pub fn plugin(mut self, name: &str, text: &str) -> Self {
        self.plugins.push((name.into(), text.into()));
        self
    }

    /// A shipped script from `plugins/`.
    pub fn shipped_plugin(self, name: &str) -> Self {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("plugins")
                .join(name),
        )
        .unwrap();
        self.plugin(name, &text)
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }
}

/// The key values `mock_keys` produces, by index from 1.
pub fn key(i: usize) -> String {
    format!("mock-key-abcdefghijkl-{i:04}")
}

/// The masked form of `key(i)`.
pub fn masked(i: usize) -> String {
    format!("...{i:04}")
}

pub fn mock_keys(prefix: &str, n: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| (format!("{prefix}_API_KEY_{i}"), key(i)))
        .collect()
}

/// A wire-format fixture from `tests/fixtures`.
pub fn fixture(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap()
}

/// A shipped provider file with its base URL pointed at `base_url`, and its script copied next to it.
pub fn shipped_provider(name: &str, base_url: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join(format!("providers/{name}.yaml"))).unwrap();
    let mut out = String::new();
    for line in yaml.lines() {
        if line.starts_with("base_url:") {
            out.push_str(&format!("base_url: {base_url}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A provider file for a mock, with extra YAML appended.
pub fn provider_yaml(base_url: &str, extra: &str) -> String {
    format!(
        "base_url: {base_url}\nstream_usage: true\nmodels:\n  list: both\n  static: [static-model]\n{extra}"
    )
}

/// A keyrelay server on a loopback port.
pub struct Proxy {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    running: Option<keyrelay::app::Running>,
}

impl Proxy {
    pub async fn start(setup: Setup) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(setup, dir).await
    }

    /// Starts in an existing directory (to restart over the same files).
    pub async fn start_in(setup: Setup, dir: tempfile::TempDir) -> Self {
        let root = dir.path();
        std::fs::create_dir_all(root.join("providers")).unwrap();
        std::fs::write(root.join("config.yaml"), &setup.config).unwrap();
        for (name, yaml) in &setup.providers {
            std::fs::write(root.join("providers").join(format!("{name}.yaml")), yaml).unwrap();
        }
        std::fs::create_dir_all(root.join("plugins")).unwrap();
        for (name, text) in &setup.plugins {
            std::fs::write(root.join("plugins").join(name), text).unwrap();
        }
        let mut env = format!("PROXY_API_KEY={PROXY_KEY}\n");
        for (k, v) in &setup.env {
            env.push_str(&format!("{k}={v}\n"));
        }
        std::fs::write(root.join(".env"), env).unwrap();
        let opts = keyrelay::snapshot::LoadOptions {
            config: root.join("config.yaml"),
            config_required: true,
            env_file: root.join(".env"),
            host: Some("127.0.0.1".into()),
            port: Some(0),
            request_logging: false,
        };
        let snapshot =
            keyrelay::Snapshot::load(&opts).unwrap_or_else(|e| panic!("config invalid: {e}"));
        let running = keyrelay::app::start(snapshot, Some(opts), keyrelay::clock::Clock::system())
            .await
            .unwrap();
        Self {
            url: format!("http://{}", running.addr),
            dir,
            client: http_client(),
            running: Some(running),
        }
    }

    /// The store's view of `provider`'s keys (cooldowns, usage), from the running server.
    pub async fn key_status(&self, provider: &str) -> Vec<keyrelay::keys::KeyStatus> {
        let relay = &self.running.as_ref().unwrap().relay;
        let snapshot = relay.snapshot();
        let p = snapshot.providers.get(provider).unwrap();
        relay.store().report(provider, &p.keys).await
    }

    pub fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(PROXY_KEY)
            .json_body(body)
    }

    /// POSTs `body` and reads the whole response as text (a stream's SSE transcript, say).
    pub async fn post_text(&self, path: &str, body: &Value) -> String {
        self.post(path, body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// GETs `path` and reads the whole response as text (`/metrics`, say).
    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).send().await.unwrap().text().await.unwrap()
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.url))
            .bearer_auth(PROXY_KEY)
    }

    /// A non-streaming chat request; returns status, headers and JSON body.
    pub async fn chat(&self, model: &str, content: &str) -> (u16, HeaderMap, Value) {
        let body = json!({"model": model, "messages": [{"role": "user", "content": content}]});
        send(self.post("/v1/chat/completions", &body)).await
    }

    /// Stops the server (graceful, flushing the usage file) and returns its directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown()
                .await
                .expect("the usage file is written at shutdown");
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

pub trait JsonBody {
    fn json_body(self, body: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(body.to_string())
    }
}

/// Sends and returns status, headers and the body as JSON (`Value::String` when it is not JSON).
pub async fn send(request: reqwest::RequestBuilder) -> (u16, HeaderMap, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

/// The SSE `data:` payloads of a whole streamed response body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|frame| frame.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The assistant text reassembled from stream chunks.
pub fn reassemble(data: &[String]) -> String {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

/// Asserts an OpenAI-shaped error and returns its code.
pub fn error_code(body: &Value) -> String {
    let e = body
        .get("error")
        .unwrap_or_else(|| panic!("not an OpenAI error: {body}"));
    assert!(
        e.get("message")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e.get("type").and_then(Value::as_str).is_some(), "{body}");
    e.get("code")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// A header as text, or "" when absent.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .unwrap_or("")
}

/// An upstream that accepts connections and resets them before any response (a TCP RST).
pub async fn resetting_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    base
}

/// A loopback address where nothing listens (connection refused).
pub fn refusing_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    drop(listener);
    base
}

/// An upstream whose every answer is a 200 with a body that never ends (`{"data":[` and then spaces, forever).
pub async fn endless_upstream() -> String {
    let app = axum::Router::new().fallback(|| async {
        let start = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(Bytes::from_static(b"{\"data\":["))
        });
        let spaces = Bytes::from(vec![b' '; 64 << 10]);
        let rest = futures_util::stream::repeat_with(move || Ok(spaces.clone()));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(futures_util::StreamExt::chain(
                start, rest,
            )))
            .unwrap()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// The resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// An upstream speaking OpenAI's Responses API at `/responses`: a function call when tools are offered and no
/// output came back yet, else "Sunny in Porto." (11 tokens in, 7 out; streamed as two deltas, 2 out). The first
/// `failing` streams fail right after `response.created`, as an overloaded model's do.
pub async fn responses_upstream(failing: usize) -> Mock {
    Mock::start(move |seen, i| {
        let tools = seen.body.get("tools").is_some();
        let answered = seen.body["input"]
            .as_array()
            .is_some_and(|items| items.iter().any(|it| it["type"] == "function_call_output"));
        let calling = tools && !answered;
        let item = if calling {
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                   "arguments": "{\"city\":\"Porto\"}", "status": "completed"})
        } else {
            json!({"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": "Sunny in Porto.", "annotations": []}]})
        };
        let response = |status: &str, output: Value, usage: Value| {
            json!({"id": "resp_up", "object": "response", "created_at": 1, "status": status, "model": seen.model(),
                   "output": output, "usage": usage, "error": null, "incomplete_details": null})
        };
        let usage = |out: u64| json!({"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0},
                                     "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11 + out});
        if seen.body["stream"] != json!(true) {
            return Reply::ok(response("completed", json!([item]), usage(7)));
        }
        let mut seq = 0;
        let mut event = |data: Value| {
            let mut data = data;
            data["sequence_number"] = json!(seq);
            seq += 1;
            format!("event: {}\ndata: {data}\n\n", data["type"].as_str().unwrap())
        };
        let mut body = event(json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)}));
        if i < failing {
            body += &event(json!({"type": "response.failed", "response": {"id": "resp_up", "status": "failed",
                "error": {"code": "server_error", "message": "The server is overloaded."}}}));
            return Reply::Raw { status: 200, content_type: "text/event-stream", body };
        }
        body += &event(json!({"type": "response.in_progress", "response": response("in_progress", json!([]), Value::Null)}));
        if calling {
            body += &event(json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": "", "status": "in_progress"}}));
            for delta in ["{\"city\":", "\"Porto\"}"] {
                body += &event(json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 0, "delta": delta}));
            }
            body += &event(json!({"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0, "arguments": "{\"city\":\"Porto\"}"}));
        } else {
            body += &event(json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}}));
            body += &event(json!({"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}));
            for delta in ["Sunny ", "in Porto."] {
                body += &event(json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}));
            }
            body += &event(json!({"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0, "text": "Sunny in Porto.", "logprobs": []}));
            body += &event(json!({"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "Sunny in Porto.", "annotations": []}}));
        }
        body += &event(json!({"type": "response.output_item.done", "output_index": 0, "item": item}));
        body += &event(json!({"type": "response.completed", "response": response("completed", json!([item]), usage(2))}));
        Reply::Raw { status: 200, content_type: "text/event-stream", body }
    })
    .await
}
