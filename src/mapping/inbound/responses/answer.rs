//! A chat answer as a Responses response object: its output items, status and usage in Responses' names.

use super::Echo;
use crate::usage::Usage;
use serde_json::{Value, json};

/// Letters and digits, as ids spell them.
const ALPHANUMERIC: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A new id with OpenAI's prefix for its kind (`resp`, `msg`, `fc`, `rs`): 32 letters and digits drawn from the
/// operating system's random source (about 190 bits). A response's id names the conversation kept for it, which
/// anyone holding the proxy key can continue: it cannot be guessed from other ids.
pub fn new_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 33);
    id.push_str(prefix);
    id.push('_');
    let mut random = [0u8; 48];
    let mut left = 32;
    while left > 0 {
        // Without the OS's random source nothing else would be safe either: a panic, caught and answered 500.
        getrandom::getrandom(&mut random).expect("the operating system's random source answers");
        // 248 is the largest multiple of 62 in a byte: every letter and digit equally likely.
        for byte in random.iter().filter(|&&b| b < 248).take(left) {
            id.push(ALPHANUMERIC[usize::from(byte % 62)] as char);
            left -= 1;
        }
    }
    id
}

/// Usage in Responses' names.
pub(super) fn usage_json(usage: &Usage, reasoning_tokens: u64) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage.prompt_tokens.saturating_add(usage.completion_tokens),
    })
}

/// `status` and `incomplete_details` for a chat finish reason.
pub(super) fn status(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// The response object around `output`.
pub(super) fn response_object(
    id: &str,
    echo: &Echo,
    created_at: i64,
    status: &str,
    output: Vec<Value>,
    usage: Option<Value>,
    incomplete: Value,
) -> Value {
    let mut out = json!({
        "id": id, "object": "response", "created_at": created_at, "status": status,
        "error": null, "incomplete_details": incomplete, "model": echo.model,
        "output": output, "truncation": "disabled", "usage": usage,
    });
    for (k, v) in &echo.fields {
        out[k.as_str()] = v.clone();
    }
    out
}

/// An answer as a conversation keeps it: chat's assistant message.
pub(super) fn kept_answer(text: &str, calls: Vec<Value>) -> Value {
    let mut kept = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        kept["tool_calls"] = Value::Array(calls);
    }
    kept
}

/// The output items of a chat answer's message, and the message itself as chat keeps it.
pub(super) fn output_items(message: &Value, echo: &Echo) -> (Vec<Value>, Value) {
    let mut items = Vec::new();
    if let Some(reasoning) = message["reasoning_content"]
        .as_str()
        .filter(|r| !r.is_empty())
    {
        items.push(json!({"type": "reasoning", "id": new_id("rs"),
                          "summary": [{"type": "summary_text", "text": reasoning}]}));
    }
    let text = message["content"].as_str().unwrap_or("");
    if !text.is_empty() {
        items.push(json!({"type": "message", "id": new_id("msg"), "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}));
    }
    let calls = message["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for call in &calls {
        let mut item = json!({"type": "function_call", "id": new_id("fc"), "call_id": call["id"],
            "arguments": call["function"]["arguments"], "status": "completed"});
        echo.call_fields(call["function"]["name"].as_str().unwrap_or(""), &mut item);
        items.push(item);
    }
    (items, kept_answer(text, calls))
}

/// A chat completion as a response object with the id `id`; with the assistant message as chat keeps it.
pub fn from_chat(chat: &Value, echo: &Echo, id: &str) -> (Value, Value) {
    let choice = &chat["choices"][0];
    let (items, kept) = output_items(&choice["message"], echo);
    let usage = chat.get("usage").map(Usage::from_value).unwrap_or_default();
    let reasoning = chat["usage"]["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap_or(0);
    let (status, incomplete) = status(choice["finish_reason"].as_str());
    let created = chat["created"]
        .as_i64()
        .unwrap_or_else(crate::mapping::chunk::unix_seconds);
    let object = response_object(
        id,
        echo,
        created,
        status,
        items,
        Some(usage_json(&usage, reasoning)),
        incomplete,
    );
    (object, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_os_not_from_a_seedable_generator() {
        // The same seed given to the process's fast generator twice: ids still differ.
        fastrand::seed(7);
        let first = new_id("resp");
        fastrand::seed(7);
        let second = new_id("resp");
        assert_ne!(first, second);
        assert_eq!(first.len(), "resp_".len() + 32);
        assert!(
            first[5..].bytes().all(|b| b.is_ascii_alphanumeric()),
            "{first}"
        );
    }
}
