//! A mock upstream that speaks OpenAI's wire format, answers as each test scripts it, and records what it saw.

use super::*;
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
            // The scenario: an upstream that takes `delay` to answer (`Reply::delayed`).
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
                // The scenario: an upstream that streams its events `gap` apart.
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
