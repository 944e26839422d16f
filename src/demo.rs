//! `keyrelay demo`: keyrelay in front of a built-in fake provider on loopback, with keys that misbehave on
//! purpose, so a newcomer sees rotation, cooldowns and recovery without any real key.
//!
//! The fake provider speaks OpenAI's format. Of its five keys, three are healthy, one is rate-limited on every
//! other request (for 15 s, so it cools and comes back), and one is dead (401, benched).

use crate::app::{Running, StartError};
use crate::clock::Clock;
use crate::config::{Settings, env::Env};
use crate::snapshot::Snapshot;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub const HEALTHY: [&str; 3] = [
    "demo-healthy-key-0001",
    "demo-healthy-key-0002",
    "demo-healthy-key-0003",
];
pub const LIMITED: &str = "demo-limited-key-0004";
pub const DEAD: &str = "demo-dead-key-0005";
pub const MODEL: &str = "demo/fast-model";

#[derive(Clone, Default)]
struct Fake {
    /// Requests seen per key.
    seen: Arc<Mutex<HashMap<String, u64>>>,
}

fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": code}})),
    )
        .into_response()
}

async fn chat(State(fake): State<Fake>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let count = {
        let mut seen = fake.seen.lock().unwrap_or_else(|e| e.into_inner());
        let n = seen.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    if key == DEAD {
        return error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            "invalid_api_key",
        );
    }
    if key == LIMITED && count % 2 == 1 {
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "Rate limit reached; try again in 15s.",
            "requests",
            "rate_limit_exceeded",
        );
        r.headers_mut()
            .insert("retry-after", "15".parse().expect("static header"));
        return r;
    }
    if !HEALTHY.contains(&key.as_str()) && key != LIMITED {
        return error(
            StatusCode::UNAUTHORIZED,
            "Unknown key.",
            "invalid_request_error",
            "invalid_api_key",
        );
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"]
        .as_str()
        .unwrap_or("fast-model")
        .to_string();
    let question = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let answer = format!(
        "This answer came from the fake provider, key ...{}. You said: {question}",
        &key[key.len() - 4..]
    );
    if request["stream"] == json!(true) {
        let mut frames = Vec::new();
        for (i, word) in answer.split_inclusive(' ').enumerate() {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": word})
            } else {
                json!({"content": word})
            };
            let chunk = json!({"id": "demo-1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
            frames.push(format!("data: {chunk}\n\n"));
        }
        let last = json!({"id": "demo-1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        frames.push(format!("data: {last}\n\n"));
        let usage = json!({"id": "demo-1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}});
        frames.push(format!("data: {usage}\n\ndata: [DONE]\n\n"));
        let stream =
            futures_util::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .unwrap_or_default();
    }
    Json(json!({
        "id": "demo-1", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    }))
    .into_response()
}

async fn embeddings(body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = request["input"].as_array().map_or(1, Vec::len);
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
        .collect();
    Json(json!({"object": "list", "data": data, "model": request["model"], "usage": {"prompt_tokens": 2, "total_tokens": 2}})).into_response()
}

async fn models() -> Response {
    Json(json!({"object": "list", "data": [
        {"id": "fast-model", "object": "model", "created": 0, "owned_by": "demo"},
        {"id": "embed-model", "object": "model", "created": 0, "owned_by": "demo"}
    ]}))
    .into_response()
}

/// Starts the fake provider on loopback; returns its base URL.
pub async fn fake_provider() -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/v1", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat))
        .route("/v1/embeddings", axum::routing::post(embeddings))
        .route("/v1/models", axum::routing::get(models))
        .with_state(Fake::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "the demo serves only on a loopback address (it has no proxy key); use --host 127.0.0.1"
    )]
    NotLoopback,
    #[error("cannot start the fake provider: {0}")]
    Fake(std::io::Error),
    #[error("{0}")]
    Config(crate::config::LoadErrors),
    #[error("{0}")]
    Start(#[from] StartError),
}

/// Starts the fake provider and keyrelay in front of it. `state` holds the demo's usage file.
pub async fn start(host: &str, port: u16, state: &std::path::Path) -> Result<Running, DemoError> {
    if !crate::config::is_loopback(host) {
        return Err(DemoError::NotLoopback);
    }
    let base = fake_provider().await.map_err(DemoError::Fake)?;
    let mut settings = Settings::defaults(state);
    settings.host = host.to_string();
    settings.port = port;
    let mut pairs = vec![("DEMO_API_BASE".to_string(), base)];
    for (i, key) in HEALTHY.iter().chain([&LIMITED, &DEAD]).enumerate() {
        pairs.push((format!("DEMO_API_KEY_{}", i + 1), key.to_string()));
    }
    let snapshot = Snapshot::build(settings, &Env::from_pairs(pairs)).map_err(DemoError::Config)?;
    Ok(crate::app::start(snapshot, None, Clock::system()).await?)
}

/// What the demo prints once it listens.
pub fn instructions(addr: &std::net::SocketAddr) -> String {
    format!(
        r#"keyrelay demo listening on http://{addr}

A fake provider "demo" runs on loopback with 5 keys: 3 healthy, 1 rate-limited on every other request
(...0004, cools 15 s), 1 dead (...0005, benched). Send a few requests and watch rotation, cooldowns and recovery:

  dashboard:  http://{addr}/dashboard
  key status: curl -s http://{addr}/v1/keys

  curl -s http://{addr}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hello"}}]}}' -i

  python3 - <<'EOF'
  from openai import OpenAI
  client = OpenAI(base_url="http://{addr}/v1", api_key="no-key-needed-for-the-demo")
  for i in range(6):
      r = client.chat.completions.create(model="{MODEL}", messages=[{{"role": "user", "content": f"hello {{i}}"}}])
      print(r.choices[0].message.content)
  EOF

Each response carries x-keyrelay-key (the masked key that served) and x-keyrelay-attempts. Ctrl-C stops."#
    )
}
