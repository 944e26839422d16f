//! Stream mapping through a script: one upstream SSE event in, zero or more chunk *parts* out, with a state map
//! that lives as long as the stream (bound as `this`).
//!
//! A part is a map with any of `role`, `content`, `reasoning`, `tool_calls`, `finish_reason`, `usage`, `id`,
//! `model`, `error` (an in-band error) or `done: true`; the stream module builds OpenAI chunks from parts. A map
//! that has `choices` is a complete chunk already.

use super::{Hook, ProviderScript, ScriptError, from_dynamic, to_dynamic};
use rhai::{Dynamic, Map};
use serde_json::{Map as JsonMap, Value};
use std::sync::Arc;

/// The script side of one stream: the hook and its state.
pub struct ScriptStream {
    script: Arc<ProviderScript>,
    state: Dynamic,
}

impl ScriptStream {
    pub(super) fn new(script: Arc<ProviderScript>) -> Self {
        Self {
            script,
            state: Dynamic::from_map(Map::new()),
        }
    }

    /// Runs `stream_event` on one event (`data` parsed, or the raw text when it is not JSON).
    pub fn map(
        &mut self,
        event: Option<&str>,
        data: Result<Value, &str>,
    ) -> Result<Vec<JsonMap<String, Value>>, ScriptError> {
        let data = match data {
            Ok(value) => to_dynamic(&value),
            Err(text) => Dynamic::from(text.to_string()),
        };
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
        // The state lives as long as the stream: what it keeps across events is held to one call's budget.
        let limit = self.script.budget.memory;
        if super::size_of(&self.state) > limit {
            return Err(self.script.hook_error(
                Hook::StreamEvent,
                &format!(
                    "its stream state grew past {} MiB (scripts.memory)",
                    limit >> 20
                ),
            ));
        }
        let items: Vec<Dynamic> = if out.is_unit() {
            return Ok(Vec::new());
        } else if out.is_array() {
            out.cast::<rhai::Array>()
        } else {
            vec![out]
        };
        let mut parts = Vec::with_capacity(items.len());
        for item in items.iter().filter(|i| !i.is_unit()) {
            match from_dynamic(item) {
                Value::Object(part) => parts.push(part),
                _ => {
                    return Err(self.script.hook_error(
                        Hook::StreamEvent,
                        "must return (), a map, or an array of maps",
                    ));
                }
            }
        }
        Ok(parts)
    }
}
