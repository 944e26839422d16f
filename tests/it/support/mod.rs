//! Test support: a mock upstream that speaks OpenAI's wire format and records what it saw (`mock`), other
//! upstreams (`upstreams`), a harness that starts a real keyrelay server on a loopback port from files written to
//! a temporary directory (`proxy`) or runs the binary (`binary`), a real `redis-server` (`redis`), and what tests
//! share: waiting for a condition, sending requests, reading answers.
#![allow(dead_code, unused_imports)]

pub mod binary;
pub mod mapping;
pub mod mock;
pub mod proxy;
#[allow(dead_code)]
pub mod redis;
pub mod scripted;
pub mod stores;
pub mod upstreams;

// The waiting helpers (`wait.rs`) are declared by `redis.rs`, which the store bench includes on its own.
pub use redis::wait;

pub use binary::*;
pub use mock::*;
pub use proxy::*;
pub use upstreams::*;
pub use wait::*;

use axum::http::HeaderMap;
use serde_json::Value;

/// The request logs in `dir` (each a whole JSON file), oldest first, once there are at least `n` (they are
/// written in the background).
pub async fn request_logs(dir: &std::path::Path, n: usize) -> Vec<Value> {
    eventually_some(
        &format!("{n} request logs in {}", dir.display()),
        || async {
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .ok()?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .ok()?;
            files.sort();
            // A file being written is not yet JSON: looked at again.
            let logs: Vec<Value> = files
                .iter()
                .map(|f| serde_json::from_str(&std::fs::read_to_string(f).ok()?).ok())
                .collect::<Option<_>>()?;
            (logs.len() >= n).then_some(logs)
        },
    )
    .await
}

/// An HTTP client for tests (TLS needs a crypto provider even for plain HTTP clients).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
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

/// A wire-format fixture from `tests/fixtures`, as JSON.
pub fn json_fixture(path: &str) -> Value {
    serde_json::from_str(&fixture(path)).unwrap()
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

/// SSE text as (event name, JSON data) pairs.
pub fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).unwrap())
        })
        .collect()
}

/// The names of `sse_events`.
pub fn event_names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
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
