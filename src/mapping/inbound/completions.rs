//! OpenAI's legacy completions spoken by the client (`POST /v1/completions`): a prompt as a one-turn chat, and
//! the chat answer and stream as `text_completion` objects and chunks (errors keep OpenAI's shape).
//!
//! What a chat cannot do is refused by name: several prompts in one request, token-array prompts, `suffix`
//! (fill-in-the-middle), `echo`, `logprobs` and `best_of` above 1. Fields it does not know pass to the chat body,
//! as on chat. `max_tokens` defaults to 16, as the legacy API's does.

use super::{Refused, StreamTranslation};
use serde_json::{Map, Value, json};

type Body = Map<String, Value>;

/// The legacy API's default answer length.
const DEFAULT_MAX_TOKENS: u64 = 16;

/// A completions request as an OpenAI chat body.
pub fn to_chat(body: Body) -> Result<Body, Refused> {
    let mut chat = Body::new();
    for (field, value) in body {
        let asks_nothing = match field.as_str() {
            "suffix" => value.is_null() || value == json!(""),
            "echo" => value.is_null() || value == json!(false),
            "logprobs" => value.is_null() || value == json!(0),
            "best_of" => value.is_null() || value == json!(1),
            _ => true,
        };
        if !asks_nothing {
            return Err(Refused::new(
                field.as_str(),
                format!(
                    "`{field}` has no equivalent in a chat translation; use a provider that serves completions natively"
                ),
            ));
        }
        match field.as_str() {
            "prompt" => {
                let text = match value {
                    Value::String(text) => text,
                    Value::Array(mut prompts) if prompts.len() == 1 && prompts[0].is_string() => {
                        match prompts.pop() {
                            Some(Value::String(text)) => text,
                            _ => unreachable!("checked to be one string"),
                        }
                    }
                    _ => {
                        return Err(Refused::new(
                            "prompt",
                            "a chat translation takes one prompt, as text; send several as several requests",
                        ));
                    }
                };
                chat.insert(
                    "messages".into(),
                    json!([{"role": "user", "content": text}]),
                );
            }
            "suffix" | "echo" | "logprobs" | "best_of" => {}
            _ => {
                chat.insert(field, value);
            }
        }
    }
    if !chat.contains_key("messages") {
        return Err(Refused::new("prompt", "`prompt` is required"));
    }
    chat.entry("max_tokens")
        .or_insert_with(|| json!(DEFAULT_MAX_TOKENS));
    Ok(chat)
}

/// A completion id: the chat answer's, as a `cmpl-` one.
fn completion_id(id: Option<&str>) -> String {
    let rest = id.unwrap_or("").trim_start_matches("chatcmpl-");
    format!("cmpl-{rest}")
}

/// A chat completion as a `text_completion`.
pub fn from_chat(chat: &Value) -> Value {
    let choices: Vec<Value> = chat["choices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            json!({"text": c["message"]["content"].as_str().unwrap_or(""), "index": c["index"],
                   "logprobs": null, "finish_reason": c["finish_reason"]})
        })
        .collect();
    let mut out = json!({
        "id": completion_id(chat["id"].as_str()),
        "object": "text_completion",
        "created": chat["created"],
        "model": chat["model"],
        "choices": choices,
    });
    if let Some(usage) = chat.get("usage") {
        out["usage"] = usage.clone();
    }
    out
}

/// Chat chunks as `text_completion` chunks; `[DONE]` and in-band errors as they are.
#[derive(Default)]
pub struct CompletionsStream;

impl StreamTranslation for CompletionsStream {
    fn event(&mut self, _: Option<&str>, data: &str, out: &mut Vec<u8>) {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let mut choices = Vec::new();
        for c in chunk["choices"].as_array().into_iter().flatten() {
            let text = c["delta"]["content"].as_str().unwrap_or("");
            if text.is_empty() && c["finish_reason"].is_null() {
                continue;
            }
            choices.push(json!({"text": text, "index": c["index"], "logprobs": null,
                                "finish_reason": c["finish_reason"]}));
        }
        let usage = chunk.get("usage").filter(|u| u.is_object());
        if choices.is_empty() && usage.is_none() {
            return;
        }
        let mut converted = json!({"id": completion_id(chunk["id"].as_str()), "object": "text_completion",
            "created": chunk["created"], "model": chunk["model"], "choices": choices});
        if let Some(usage) = usage {
            converted["usage"] = usage.clone();
        }
        // Written straight into the frame: serialized JSON holds no line break.
        out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(&mut *out, &converted);
        out.extend_from_slice(b"\n\n");
    }

    /// Completions errors are chat's: the engine's error frame as it is.
    fn error(&mut self, error: &Value, out: &mut Vec<u8>) {
        out.extend_from_slice(&crate::sse::frame(&json!({"error": error}).to_string()));
    }

    fn end(&mut self, clean: bool, out: &mut Vec<u8>) {
        if clean {
            out.extend_from_slice(&crate::sse::frame("[DONE]"));
        } else {
            out.extend_from_slice(&crate::sse::error_frame(
                "the stream ended before the answer was complete",
                "upstream_error",
                "stream_interrupted",
            ));
        }
    }
}
