//! Turning upstream events into OpenAI chunk parts.

use super::Part;
use super::chunk::ChunkWriter;
use super::frame::is_done;
use super::peek::ChunkPeek;
use super::sse::SseEvent;
use crate::provider::stream_rules::{self, Emitted, StreamRule};
use crate::script::{ScriptError, ScriptStream};
use serde::de::IgnoredAny;
use serde_json::Value;
use std::sync::Arc;

/// Turns upstream events into OpenAI chunk parts: passthrough for OpenAI-compatible upstreams; for others, the
/// provider's declared rules first and its `stream_event` hook for the rest.
pub enum Mapper {
    Passthrough {
        label: String,
    },
    Scripted {
        rules: Arc<[StreamRule]>,
        /// Away while a call runs off the async workers.
        script: Option<ScriptStream>,
        writer: ChunkWriter,
    },
}

impl Mapper {
    /// Maps one event: in Rust where passthrough or a declared rule can, else by the provider's script, which
    /// runs off the async workers.
    pub async fn map(&mut self, event: SseEvent) -> Result<Vec<Part>, ScriptError> {
        match self.map_inline(event) {
            Ok(mapped) => mapped,
            Err((event, data)) => self.map_by_script(event, data).await,
        }
    }

    /// Maps one event without the script, when that is possible; otherwise gives it back (with its data parsed)
    /// for [`Mapper::map_by_script`].
    #[allow(clippy::type_complexity)]
    pub fn map_inline(
        &mut self,
        event: SseEvent,
    ) -> Result<Result<Vec<Part>, ScriptError>, (SseEvent, Option<Value>)> {
        match self {
            Self::Passthrough { label } => Ok(Ok(passthrough(label, event))),
            Self::Scripted { rules, writer, .. } => {
                let parsed = serde_json::from_str::<Value>(&event.data).ok();
                if let Some(data) = &parsed {
                    match stream_rules::first_match(rules, event.event.as_deref(), data) {
                        Some(Emitted::Skip) => return Ok(Ok(Vec::new())),
                        Some(Emitted::Content(text)) => {
                            return Ok(Ok(vec![writer.text("content", text)]));
                        }
                        Some(Emitted::Reasoning(text)) => {
                            return Ok(Ok(vec![writer.text("reasoning_content", text)]));
                        }
                        None => {}
                    }
                }
                Err((event, parsed))
            }
        }
    }

    /// Maps one event by the script's `stream_event` hook.
    pub async fn map_by_script(
        &mut self,
        event: SseEvent,
        data: Option<Value>,
    ) -> Result<Vec<Part>, ScriptError> {
        let Self::Scripted { script, writer, .. } = self else {
            return Ok(passthrough("", event));
        };
        let Some(mut taken) = script.take() else {
            return Ok(Vec::new());
        };
        let (taken, parts) = crate::offload::run(crate::offload::Pool::Scripts, move || {
            let parts = taken.map(event.event.as_deref(), data.ok_or(event.data.as_str()));
            (taken, parts)
        })
        .await;
        *script = Some(taken);
        Ok(parts?.into_iter().flat_map(|p| writer.part(p)).collect())
    }

    /// Maps one event on the calling thread, the script included: for callers that are not async workers
    /// (benchmarks, tools).
    pub fn map_blocking(&mut self, event: SseEvent) -> Result<Vec<Part>, ScriptError> {
        let (event, data) = match self.map_inline(event) {
            Ok(mapped) => return mapped,
            Err(held) => held,
        };
        let Self::Scripted {
            script: Some(script),
            writer,
            ..
        } = self
        else {
            return Ok(Vec::new());
        };
        let parts = script.map(event.event.as_deref(), data.ok_or(event.data.as_str()))?;
        Ok(parts.into_iter().flat_map(|p| writer.part(p)).collect())
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
