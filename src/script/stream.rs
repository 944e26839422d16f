//! Stream mapping through a script: one upstream SSE event in, zero or more OpenAI chunks out, with a state map
//! that lives as long as the stream (bound as `this`).
//!
//! To keep the per-event cost low, a script returns only chunk *parts* — the fields that change — and Rust
//! builds the OpenAI chunk around them. A part is a map with any of: `role`, `content`, `reasoning`,
//! `tool_calls`, `finish_reason`, `usage`, `id`, `model`, or `error` (an in-band error). A map that has
//! `choices` is taken as a complete chunk instead.

use super::{Hook, ProviderScript, ScriptError, from_dynamic};
use rhai::{Dynamic, Map};
use serde_json::{Map as JsonMap, Value, json};
use std::sync::Arc;

/// One mapped output of a stream event.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    /// An OpenAI chunk, serialised.
    Chunk {
        data: String,
        finish: bool,
        usage: Option<Value>,
        usage_only: bool,
    },
    /// An in-band error object.
    Error(Value),
    /// The answer is complete (`[DONE]`, or a script part `#{done: true}`).
    Done,
}

pub struct ScriptStream {
    script: Arc<ProviderScript>,
    state: Dynamic,
    id: String,
    model: String,
    created: i64,
}

impl ScriptStream {
    pub(super) fn new(script: Arc<ProviderScript>, model: &str) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let id = format!(
            "chatcmpl-{}",
            (0..24)
                .map(|_| fastrand::alphanumeric())
                .collect::<String>()
        );
        Self {
            script,
            state: Dynamic::from_map(Map::new()),
            id,
            model: model.to_string(),
            created,
        }
    }

    /// Maps one upstream event. `data` that is not JSON reaches the script as a string.
    pub fn map(&mut self, event: Option<&str>, data: &str) -> Result<Vec<Part>, ScriptError> {
        let data = serde_json::from_str::<Dynamic>(data)
            .unwrap_or_else(|_| Dynamic::from(data.to_string()));
        let mut arg = Map::new();
        arg.insert(
            "event".into(),
            event.map_or(Dynamic::UNIT, |e| Dynamic::from(e.to_string())),
        );
        arg.insert("data".into(), data);
        let out = self.script.call(
            Hook::StreamEvent,
            Some(&mut self.state),
            Dynamic::from_map(arg),
        )?;
        let items: Vec<Dynamic> = if out.is_unit() {
            return Ok(Vec::new());
        } else if out.is_array() {
            out.cast::<rhai::Array>()
        } else {
            vec![out]
        };
        let mut parts = Vec::with_capacity(items.len());
        for item in items {
            if item.is_unit() {
                continue;
            }
            let Some(map) = item.try_cast::<Map>() else {
                return Err(self.script.hook_error(
                    Hook::StreamEvent,
                    "must return (), a map, or an array of maps",
                ));
            };
            let fields: JsonMap<String, Value> = map
                .iter()
                .map(|(k, v)| (k.to_string(), from_dynamic(v)))
                .collect();
            if let Some(id) = fields.get("id").and_then(Value::as_str) {
                self.id = id.to_string();
            }
            if let Some(model) = fields.get("model").and_then(Value::as_str) {
                self.model = model.to_string();
            }
            parts.extend(build_chunk(&self.id, &self.model, self.created, fields));
        }
        Ok(parts)
    }
}

/// Builds the OpenAI chunk(s) for one script part. A part with usage and a delta becomes two chunks, as OpenAI
/// sends them: the delta first, then a usage chunk with empty `choices`.
pub fn build_chunk(
    id: &str,
    model: &str,
    created: i64,
    mut part: JsonMap<String, Value>,
) -> Vec<Part> {
    if let Some(error) = part.remove("error").filter(|e| !e.is_null()) {
        return vec![Part::Error(error)];
    }
    let done = part.remove("done").is_some_and(|d| d == Value::Bool(true));
    if part.contains_key("choices") {
        let finish = part
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null()))
            });
        let usage = part.get("usage").filter(|u| u.is_object()).cloned();
        let usage_only = part
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        return vec![Part::Chunk {
            data: Value::Object(part).to_string(),
            finish,
            usage,
            usage_only,
        }];
    }
    let usage = part.remove("usage").filter(Value::is_object);
    let finish_reason = part.remove("finish_reason").unwrap_or(Value::Null);
    let mut delta = JsonMap::new();
    for (from, to) in [
        ("role", "role"),
        ("content", "content"),
        ("reasoning", "reasoning_content"),
        ("tool_calls", "tool_calls"),
    ] {
        if let Some(v) = part.remove(from).filter(|v| !v.is_null()) {
            delta.insert(to.into(), v);
        }
    }
    let mut out = Vec::new();
    if !delta.is_empty() || !finish_reason.is_null() {
        let chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        out.push(Part::Chunk {
            data: chunk.to_string(),
            finish: !finish_reason.is_null(),
            usage: None,
            usage_only: false,
        });
    }
    if let Some(usage) = usage {
        let chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage,
        });
        out.push(Part::Chunk {
            data: chunk.to_string(),
            finish: false,
            usage: Some(usage),
            usage_only: true,
        });
    }
    if done {
        out.push(Part::Done);
    }
    out
}
