//! What the tests of the shipped scripted providers (`gemini`, `anthropic`) send: a short chat, asked without
//! streaming, and a weather tool.

use super::*;
use serde_json::{Value, json};

/// A chat with a system message and a question, for `model`.
pub fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about tide pools."}]})
}

/// A non-streaming `chat_body` request for `model`.
pub async fn ask(proxy: &Proxy, model: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    send(proxy.post("/v1/chat/completions", &chat_body(model, false))).await
}

/// One function tool, `get_weather(city)`.
pub fn weather_tool() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
}
