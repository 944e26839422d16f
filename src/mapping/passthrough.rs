//! Passthrough: the mapping of OpenAI-compatible upstreams, which already speak the client's shape. The body goes
//! up as the client wrote it (with the model replaced), answers come back untouched, and stream events are only
//! peeked at for what the proxy must know (a finish, usage, an in-band error) and forwarded as they came.

use super::{
    Answer, AnswerMapping, ChunkWriter, Draft, Event, EventMapping, EventMappings, MapError, Part,
    RequestMapping, Step, Target,
};
use crate::script::ScriptError;
use crate::sse::ChunkPeek;
use crate::sse::SseEvent;
use crate::sse::is_done;
use serde::de::IgnoredAny;
use serde_json::Value;

/// The mapping that maps nothing, in every direction.
#[derive(Clone, Copy, Debug, Default)]
pub struct Passthrough;

impl RequestMapping for Passthrough {
    fn map(&self, target: &Target<'_>, body: Value) -> Result<Draft, MapError> {
        Ok(Draft {
            method: http::Method::POST,
            path: target.path.to_string(),
            query: Vec::new(),
            headers: Vec::new(),
            body,
        })
    }

    fn slow(&self) -> bool {
        false
    }
}

impl AnswerMapping for Passthrough {
    fn map(&self, _: &str, _: &str, _: &[u8]) -> Result<Answer, ScriptError> {
        Ok(Answer::Unchanged)
    }

    fn slow(&self) -> bool {
        false
    }
}

impl EventMappings for Passthrough {
    fn start(&self, label: &str) -> Box<dyn EventMapping> {
        Box::new(Stream {
            label: label.to_string(),
        })
    }
}

/// One stream passed through; its label names it in warnings.
struct Stream {
    label: String,
}

impl EventMapping for Stream {
    fn map(&mut self, event: Event, _: &mut ChunkWriter) -> Result<Step, ScriptError> {
        Ok(Step::Mapped(passthrough(&self.label, event.sse)))
    }

    fn map_slow(&mut self, event: Event, _: &mut ChunkWriter) -> Result<Vec<Part>, ScriptError> {
        Ok(passthrough(&self.label, event.sse))
    }
}

/// An OpenAI-compatible event as a part: `[DONE]`, an in-band error, or a chunk with what the proxy needs to
/// know about it. Valid JSON of an unknown shape passes on untouched; events that are not JSON are skipped.
fn passthrough(label: &str, event: SseEvent) -> Vec<Part> {
    if is_done(&event) {
        return vec![Part::Done];
    }
    match serde_json::from_str::<ChunkPeek>(&event.data) {
        Ok(peek) => {
            if let Some(error) = peek.error.filter(|e| !e.is_null()) {
                return vec![Part::Error(error)];
            }
            let choices = peek.choices.unwrap_or_default();
            let finish = choices.iter().any(|c| c.finish_reason.is_some());
            let usage = peek.usage.filter(Value::is_object);
            let usage_only = usage.is_some() && choices.is_empty();
            vec![Part::Chunk {
                data: event.data,
                finish,
                usage,
                usage_only,
            }]
        }
        Err(_) if serde_json::from_str::<IgnoredAny>(&event.data).is_ok() => {
            vec![Part::Chunk {
                data: event.data,
                finish: false,
                usage: None,
                usage_only: false,
            }]
        }
        Err(e) => {
            tracing::warn!(stream = %label, error = %e, "skipping a malformed upstream stream event");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: data.into(),
        }
    }

    #[test]
    fn passthrough_peeks_at_finish_usage_and_errors_leniently() {
        let parts = |data: &str| passthrough("test", event(data));
        let odd = parts(
            r#"{"choices":[null,7,{"index":1,"delta":{"content":"x"},"finish_reason":"stop"}],"usage":{"total_tokens":3}}"#,
        );
        let [Part::Chunk { finish, usage, .. }] = odd.as_slice() else {
            panic!("one chunk")
        };
        assert!(*finish, "a finishing choice counts, odd siblings or not");
        assert_eq!(usage.as_ref().unwrap()["total_tokens"], 3);
        let plain = parts(r#"{"choices":[{"delta":{"content":"x"},"finish_reason":null}]}"#);
        let [Part::Chunk { finish, .. }] = plain.as_slice() else {
            panic!("one chunk")
        };
        assert!(!*finish);
        assert!(matches!(
            parts(r#"{"error":{"message":"overloaded"}}"#).as_slice(),
            [Part::Error(_)]
        ));
        assert!(matches!(parts("[DONE]").as_slice(), [Part::Done]));
        assert!(
            parts("{not json").is_empty(),
            "a malformed event is skipped"
        );
    }
}
