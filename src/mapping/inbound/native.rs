//! Native streams: a dialect spoken by the provider itself, its events forwarded to the client as they came.
//! The engine still reads each event for what it must know (content has started, usage, the end, an error), by
//! the dialect's [`NativeRules`]; and on the way out, its own in-band error (a stream broken for good, a
//! shutdown) is written as the dialect's error event.
//!
//! The preamble (Anthropic's `message_start` and `ping`, Responses' `response.created` and
//! `response.in_progress`) is held until the first other event, so that an error in its place (an overloaded
//! model) is judged like an error status and the request moves on, the client having seen nothing.

use super::{Dialect, StreamTranslation, error_message, sse_event};
use crate::mapping::{ChunkWriter, Event, EventMapping, EventMappings, Part, Step};
use crate::script::ScriptError;
use crate::stream::Usage;
use serde_json::{Map, Value, json};

/// What a dialect's events mean to the engine, by their `type`.
#[derive(Debug)]
pub struct NativeRules {
    pub preamble: &'static [&'static str],
    pub errors: &'static [&'static str],
    /// The answer is complete after this event.
    pub done: &'static [&'static str],
    /// Where events carry usage (JSON pointers); what they carry is merged, later values winning.
    pub usage: &'static [&'static str],
    /// The event says how the answer finished.
    pub finishes: fn(&Value) -> bool,
    /// Where an error event holds its error (JSON pointers), else the event itself.
    pub error: &'static [&'static str],
}

pub static MESSAGES: NativeRules = NativeRules {
    preamble: &["message_start", "ping"],
    errors: &["error"],
    done: &["message_stop"],
    usage: &["/message/usage", "/usage"],
    finishes: |v| !v["delta"]["stop_reason"].is_null(),
    error: &["/error"],
};

pub static RESPONSES: NativeRules = NativeRules {
    preamble: &["response.created", "response.in_progress"],
    errors: &["error", "response.failed"],
    done: &["response.completed", "response.incomplete"],
    usage: &["/response/usage"],
    finishes: |v| {
        matches!(
            v["type"].as_str(),
            Some("response.completed" | "response.incomplete")
        )
    },
    error: &["/response/error", "/error"],
};

/// Native streams read by a dialect's rules.
#[derive(Debug)]
pub struct Native(pub &'static NativeRules);

impl EventMappings for Native {
    fn start(&self, _: &str) -> Box<dyn EventMapping> {
        Box::new(NativeStream {
            rules: self.0,
            held: Vec::new(),
            started: false,
            usage: Map::new(),
        })
    }
}

struct NativeStream {
    rules: &'static NativeRules,
    held: Vec<Part>,
    started: bool,
    /// The usage so far, in the dialect's names.
    usage: Map<String, Value>,
}

impl NativeStream {
    fn parts(&mut self, event: Event) -> Vec<Part> {
        let (name, data) = (event.sse.event, event.sse.data);
        let parsed = serde_json::from_str::<Value>(&data).unwrap_or(Value::Null);
        let kind = parsed["type"]
            .as_str()
            .or(name.as_deref())
            .unwrap_or("")
            .to_string();
        let rules = self.rules;
        if rules.errors.contains(&kind.as_str()) {
            self.held.clear();
            let error = rules
                .error
                .iter()
                .find_map(|p| parsed.pointer(p).filter(|e| !e.is_null()))
                .cloned()
                .unwrap_or_else(|| {
                    if parsed.is_null() {
                        json!({"message": data})
                    } else {
                        parsed.clone()
                    }
                });
            return vec![Part::Error(error)];
        }
        let mut usage = None;
        let found: Vec<&Value> = rules
            .usage
            .iter()
            .filter_map(|p| parsed.pointer(p))
            .collect();
        for found in found {
            if let Value::Object(found) = found {
                for (k, v) in found {
                    if !v.is_null() {
                        self.usage.insert(k.clone(), v.clone());
                    }
                }
                let u = Usage::from_value(&Value::Object(self.usage.clone()));
                usage = Some(json!({"prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}));
            }
        }
        let part = Part::Event {
            name,
            data,
            // Reported once the answer's usage is whole: at the finish.
            usage: usage.filter(|_| (rules.finishes)(&parsed)),
            finish: (rules.finishes)(&parsed),
        };
        if rules.preamble.contains(&kind.as_str()) && !self.started {
            self.held.push(part);
            return Vec::new();
        }
        self.started = true;
        let mut parts = std::mem::take(&mut self.held);
        parts.push(part);
        if rules.done.contains(&kind.as_str()) {
            parts.push(Part::Done);
        }
        parts
    }
}

impl EventMapping for NativeStream {
    fn map(&mut self, event: Event, _: &mut ChunkWriter) -> Result<Step, ScriptError> {
        Ok(Step::Mapped(self.parts(event)))
    }

    fn map_slow(&mut self, event: Event, _: &mut ChunkWriter) -> Result<Vec<Part>, ScriptError> {
        Ok(self.parts(event))
    }
}

/// A native stream on its way to the client: its events as they came; the engine's own frames made the
/// dialect's (its in-band error an `error` event; its `[DONE]` dropped, since the dialect's last event said it).
pub struct NativeOut {
    dialect: Dialect,
    failed: bool,
}

impl NativeOut {
    pub fn new(dialect: Dialect) -> Self {
        Self {
            dialect,
            failed: false,
        }
    }

    fn error(&mut self, code: &str, message: &str, out: &mut Vec<u8>) {
        self.failed = true;
        let error = match self.dialect {
            Dialect::Messages => {
                json!({"type": "error", "error": {"type": "api_error", "message": message}})
            }
            _ => {
                json!({"type": "error", "code": code, "message": message, "param": null, "sequence_number": 0})
            }
        };
        sse_event(out, "error", &error);
    }
}

impl StreamTranslation for NativeOut {
    fn frame(&mut self, event: Option<&str>, data: &str, out: &mut Vec<u8>) {
        if self.failed {
            return;
        }
        match event {
            Some(name) => {
                out.extend_from_slice(b"event: ");
                out.extend_from_slice(name.as_bytes());
                out.push(b'\n');
                out.extend_from_slice(&crate::stream::frame(data));
            }
            None if data.trim() == "[DONE]" => {}
            None => {
                let parsed = serde_json::from_str::<Value>(data).unwrap_or(Value::Null);
                let code = parsed["error"]["code"]
                    .as_str()
                    .unwrap_or("stream_failed")
                    .to_string();
                self.error(&code, &error_message(&parsed), out);
            }
        }
    }

    fn end(&mut self, clean: bool, out: &mut Vec<u8>) {
        if !clean && !self.failed {
            self.error(
                "stream_interrupted",
                "the stream ended before the answer was complete",
                out,
            );
        }
    }
}
