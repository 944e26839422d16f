//! Native streams: a dialect spoken by the provider itself, its events forwarded to the client as they came.
//! The engine still reads each event for what it must know (content has started, usage, the end, an error), by
//! the dialect's [`NativeRules`]; and on the way out, its own in-band error (a stream broken for good, a
//! shutdown) is written as the dialect's error event.
//!
//! The preamble (Anthropic's `message_start` and `ping`, Responses' `response.created` and
//! `response.in_progress`) is held until the first other event, so that an error in its place (an overloaded
//! model) is judged like an error status and the request moves on, the client having seen nothing.

use super::{Dialect, StreamTranslation, error_code, error_message, sse_event};
use crate::mapping::{ChunkWriter, Event, EventMapping, EventMappings, Part, Step};
use crate::script::ScriptError;
use crate::usage::Usage;
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

/// Preamble events held before the first other one, at most.
const MAX_HELD: usize = 4;

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
        // Held, but never more than a few: an upstream repeating its preamble starts the stream instead.
        if rules.preamble.contains(&kind.as_str()) && !self.started && self.held.len() < MAX_HELD {
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
/// dialect's (its in-band error an `error` event; its `[DONE]` dropped, since the dialect's last event said it,
/// or, where the upstream closed after its finish without saying so, that last event written in its place).
pub struct NativeOut {
    dialect: Dialect,
    /// The last event was the dialect's end.
    ended: bool,
    /// The last `sequence_number` forwarded (Responses numbers its events).
    sequence: Option<u64>,
}

impl NativeOut {
    pub fn new(dialect: Dialect) -> Self {
        Self {
            dialect,
            ended: false,
            sequence: None,
        }
    }

    fn fail(&mut self, code: &str, message: &str, out: &mut Vec<u8>) {
        let error = match self.dialect {
            Dialect::Messages => super::messages::error_body(500, message),
            _ => {
                let next = self.sequence.map_or(0, |n| n + 1);
                json!({"type": "error", "code": code, "message": message, "param": null, "sequence_number": next})
            }
        };
        sse_event(out, "error", &error);
    }
}

/// The number after `"sequence_number":` in an event's data, read without parsing it.
fn sequence_number(data: &str) -> Option<u64> {
    let at = data.find("\"sequence_number\":")? + "\"sequence_number\":".len();
    let digits: &str = data[at..].trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

impl StreamTranslation for NativeOut {
    fn event(&mut self, event: Option<&str>, data: &str, out: &mut Vec<u8>) {
        if let Some(name) = event {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(name.as_bytes());
            out.push(b'\n');
        }
        out.extend_from_slice(&crate::sse::frame(data));
        self.ended = matches!(
            event,
            Some("message_stop" | "response.completed" | "response.incomplete")
        );
        if self.dialect == Dialect::Responses {
            self.sequence = sequence_number(data).or(self.sequence);
        }
    }

    fn error(&mut self, error: &Value, out: &mut Vec<u8>) {
        self.fail(error_code(error), error_message(error), out);
    }

    /// `[DONE]` said the answer was complete: where the upstream closed after its finish without its last
    /// event, that event is written in its place.
    fn end(&mut self, clean: bool, out: &mut Vec<u8>) {
        if !clean {
            self.fail(
                "stream_interrupted",
                "the stream ended before the answer was complete",
                out,
            );
        } else if !self.ended && self.dialect == Dialect::Messages {
            sse_event(out, "message_stop", &json!({"type": "message_stop"}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::inbound::Translated;
    use crate::sse::SseEvent;

    fn out(dialect: Dialect, frames: &[(Option<&str>, &str)]) -> String {
        String::from_utf8(Translated::translate_all(NativeOut::new(dialect), frames)).unwrap()
    }

    #[test]
    fn native_events_pass_as_they_came_and_the_engines_frames_become_the_dialects() {
        // Named and unnamed events pass; `[DONE]` is dropped after the dialect's own end.
        let text = out(
            Dialect::Responses,
            &[
                (
                    Some("response.created"),
                    r#"{"type":"response.created","sequence_number":0}"#,
                ),
                (
                    None,
                    r#"{"type":"response.output_text.delta","sequence_number":1}"#,
                ),
                (
                    Some("response.completed"),
                    r#"{"type":"response.completed","sequence_number":2}"#,
                ),
                (None, "[DONE]"),
            ],
        );
        assert_eq!(
            text,
            "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0}\n\n\
             data: {\"type\":\"response.output_text.delta\",\"sequence_number\":1}\n\n\
             event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2}\n\n"
        );
        // The engine's in-band error: the dialect's error event, numbered after the last event.
        let text = out(
            Dialect::Responses,
            &[
                (
                    Some("response.created"),
                    r#"{"type":"response.created","sequence_number": 7}"#,
                ),
                (
                    None,
                    r#"{"error":{"message":"cut","code":"stream_interrupted"}}"#,
                ),
            ],
        );
        assert!(text.ends_with("event: error\ndata: {\"code\":\"stream_interrupted\",\"message\":\"cut\",\"param\":null,\"sequence_number\":8,\"type\":\"error\"}\n\n"), "{text}");
        // An upstream that closed after its finish without message_stop: message_stop is written.
        let text = out(
            Dialect::Messages,
            &[
                (Some("message_delta"), r#"{"type":"message_delta"}"#),
                (None, "[DONE]"),
            ],
        );
        assert!(
            text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
            "{text}"
        );
        let text = out(Dialect::Messages, &[(Some("ping"), "{}")]);
        assert!(
            text.ends_with("\"type\":\"error\"}\n\n") && text.contains("api_error"),
            "{text}"
        );
    }

    #[test]
    fn the_preamble_is_held_but_never_more_than_a_few_events() {
        let mut stream = Native(&MESSAGES).start("t");
        let mut chunks = ChunkWriter::new("m");
        let ping = || {
            Event::new(SseEvent {
                event: Some("ping".into()),
                data: r#"{"type":"ping"}"#.into(),
            })
        };
        let mut released = 0;
        for _ in 0..MAX_HELD + 3 {
            if let Ok(Step::Mapped(parts)) = stream.map(ping(), &mut chunks) {
                released += parts.len();
            }
        }
        assert_eq!(released, MAX_HELD + 3, "past the cap, the stream starts");
    }
}
