//! The one seam between wire formats: how a request in OpenAI's chat shape becomes an upstream's call, and how
//! the upstream's answer and stream events become OpenAI's again.
//!
//! One small trait per direction:
//!
//! - [`RequestMapping`]: the client's body → the upstream call, as a [`Draft`] (method, path, query,
//!   headers, JSON body);
//! - [`AnswerMapping`]: an upstream JSON answer → the OpenAI answer;
//! - [`EventMapping`]: one upstream SSE event → chunk parts ([`Part`]); [`EventMappings`] starts one per stream,
//!   since a stream's mapping keeps state.
//!
//! Each has three implementations, one file each: [`passthrough`] (OpenAI-compatible upstreams: the body as
//! it is, events peeked at and forwarded), [`declared`] (the rules of a provider file's `request:`,
//! `response:` and `stream:` sections, done in Rust) and [`scripted`] (the provider's Rhai hooks, through
//! [`crate::script`], the only module that touches Rhai). They compose in layers: a declared layer maps what
//! its rules cover and hands the rest to the layer below, the script. A provider's [`Mapping`] is composed
//! once, when its file loads; the engine only ever calls the top layer.
//!
//! A layer that may be slow (a script) says so with `slow()`, and its callers run it off the async workers
//! ([`crate::offload`]); stream events first try the cheap layers on the async worker ([`EventMapper`]).
//!
//! Inbound dialects (another API's shape spoken by the client) plug in on the client side of the same seam:
//! they turn their body into the chat shape these traits take, and chat answers and parts back into theirs.

pub mod chunk;
pub mod declared;
pub mod fields;
pub mod inbound;
pub mod passthrough;
pub mod scripted;
pub mod shape;
mod stream;

pub use chunk::{ChunkWriter, Part};
pub use stream::EventMapper;

pub use crate::failure::Refused;
pub use crate::script::MapError;
use crate::script::{Hook, ProviderScript, ScriptError};
use crate::sse::SseEvent;
use crate::upstream::UpstreamCall;
use http::header::{HeaderName, HeaderValue};
use serde_json::Value;
use std::fmt;
use std::sync::Arc;

/// What a request is mapped for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// `chat` or `embeddings`.
    pub endpoint: &'a str,
    /// The model, without its provider.
    pub model: &'a str,
    pub stream: bool,
    /// The provider's path for the endpoint, relative to its base URL.
    pub path: &'a str,
}

/// An upstream call as a mapping describes it, before its body is written out and a key is added.
#[derive(Clone, Debug, PartialEq)]
pub struct Draft {
    pub method: http::Method,
    /// Relative to the base URL.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `Null` for a call without a body.
    pub body: Value,
}

impl Draft {
    /// The call, its body written out as JSON.
    pub fn into_call(self) -> Result<UpstreamCall, String> {
        let mut headers = self.headers;
        let body = match self.body {
            Value::Null => bytes::Bytes::new(),
            body => {
                headers.push((
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ));
                serde_json::to_vec(&body).map_err(|e| e.to_string())?.into()
            }
        };
        Ok(UpstreamCall {
            method: self.method,
            path: self.path,
            query: self.query,
            headers,
            body,
        })
    }
}

/// The request direction.
pub trait RequestMapping: Send + Sync + fmt::Debug {
    /// The upstream call for the client's `body`.
    fn map(&self, target: &Target<'_>, body: Value) -> Result<Draft, MapError>;
    /// It may be slow (it runs a script): callers run it off the async workers.
    fn slow(&self) -> bool;
}

/// What an [`AnswerMapping`] made of an answer.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// The upstream's answer is already OpenAI's.
    Unchanged,
    Mapped(Value),
}

/// The answer direction, for JSON answers.
pub trait AnswerMapping: Send + Sync + fmt::Debug {
    /// The OpenAI answer for the upstream's `body`, to a request for `endpoint` and `model`.
    fn map(&self, endpoint: &str, model: &str, body: &[u8]) -> Result<Answer, ScriptError>;
    /// It may be slow (it runs a script): callers run it off the async workers.
    fn slow(&self) -> bool;
}

/// One upstream event on its way through the layers, its data parsed as JSON once, by the first layer that
/// needs it.
#[derive(Debug)]
pub struct Event {
    pub sse: SseEvent,
    json: Option<Option<Value>>,
}

impl Event {
    pub fn new(sse: SseEvent) -> Self {
        Self { sse, json: None }
    }

    /// The event's name, and its data as JSON (`None` when it is not JSON).
    pub fn name_and_json(&mut self) -> (Option<&str>, Option<&Value>) {
        let sse = &self.sse;
        let json = self
            .json
            .get_or_insert_with(|| serde_json::from_str(&sse.data).ok())
            .as_ref();
        (sse.event.as_deref(), json)
    }

    /// The event's name, and its data as JSON if it is, else as text.
    pub fn into_parts(mut self) -> (Option<String>, Result<Value, String>) {
        self.name_and_json();
        let data = match self.json.flatten() {
            Some(value) => Ok(value),
            None => Err(self.sse.data),
        };
        (self.sse.event, data)
    }
}

/// What a layer did with an event on the cheap path.
#[derive(Debug)]
pub enum Step {
    Mapped(Vec<Part>),
    /// Only the slow path can map it.
    Slow(Event),
}

/// The stream direction: one stream's mapping, with whatever state it keeps between events.
pub trait EventMapping: Send {
    /// Maps an event where that is cheap, on the calling thread; else hands it back for [`Self::map_slow`].
    fn map(&mut self, event: Event, chunks: &mut ChunkWriter) -> Result<Step, ScriptError>;
    /// Maps an event that [`Self::map`] handed back; may be slow (callers run it off the async workers).
    fn map_slow(
        &mut self,
        event: Event,
        chunks: &mut ChunkWriter,
    ) -> Result<Vec<Part>, ScriptError>;
}

/// Starts the [`EventMapping`] of each new stream.
pub trait EventMappings: Send + Sync + fmt::Debug {
    /// `label` (`provider/model`) names the stream in logs.
    fn start(&self, label: &str) -> Box<dyn EventMapping>;
}

/// A provider's mappings, composed from its file and script.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub request: Arc<dyn RequestMapping>,
    pub answer: Arc<dyn AnswerMapping>,
    pub events: Arc<dyn EventMappings>,
    /// The declared rules it was composed from, for inspection (the layers hold their own copies).
    pub declared: Arc<declared::Declared>,
}

impl Default for Mapping {
    /// Passthrough in every direction: an OpenAI-compatible upstream.
    fn default() -> Self {
        Self {
            request: Arc::new(passthrough::Passthrough),
            answer: Arc::new(passthrough::Passthrough),
            events: Arc::new(passthrough::Passthrough),
            declared: Arc::default(),
        }
    }
}

impl Mapping {
    /// The layers for a provider with `script`: each direction the script has a hook for is mapped by it, under
    /// the `declared` rules for that direction; the others pass through.
    pub fn compose(script: Option<&Arc<ProviderScript>>, declared: declared::Declared) -> Self {
        let mut mapping = Self::default();
        let Some(script) = script else {
            return mapping;
        };
        let declared::Declared {
            messages,
            copies,
            answer,
            events,
            fields,
        } = declared.clone();
        mapping.declared = Arc::new(declared);
        if script.has(Hook::Request) {
            let below = Arc::new(scripted::Scripted(script.clone()));
            mapping.request = if messages.is_none() && copies.is_empty() {
                below
            } else {
                Arc::new(declared::DeclaredRequest {
                    messages,
                    copies,
                    below,
                })
            };
            if let Some(rules) = fields {
                mapping.request = Arc::new(fields::JudgedRequest {
                    rules,
                    below: mapping.request,
                });
            }
            // The request is translated: what the layers below read must have the shape they expect.
            mapping.request = Arc::new(shape::Checked {
                below: mapping.request,
            });
        }
        if script.has(Hook::Response) {
            let below = Arc::new(scripted::Scripted(script.clone()));
            mapping.answer = match answer {
                None => below,
                Some(rules) => Arc::new(declared::DeclaredAnswer { rules, below }),
            };
        }
        if script.has(Hook::StreamEvent) {
            let below = Arc::new(scripted::Scripted(script.clone()));
            mapping.events = if events.is_empty() {
                below
            } else {
                Arc::new(declared::DeclaredEvents {
                    rules: events.into(),
                    below,
                })
            };
        }
        mapping
    }

    /// The mapping of a new stream of `model`; `label` names it in logs.
    pub fn stream(&self, model: &str, label: &str) -> EventMapper {
        EventMapper::new(self.events.start(label), ChunkWriter::new(model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_provider_without_a_script_passes_through_in_every_direction() {
        let mapping = Mapping::compose(None, declared::Declared::default());
        let target = Target {
            endpoint: "chat",
            model: "m",
            stream: true,
            path: "/chat/completions",
        };
        let body = json!({"model": "m", "messages": []});
        let call = mapping
            .request
            .map(&target, body.clone())
            .unwrap()
            .into_call()
            .unwrap();
        assert_eq!(
            (call.method, call.path.as_str()),
            (http::Method::POST, "/chat/completions")
        );
        assert_eq!(serde_json::from_slice::<Value>(&call.body).unwrap(), body);
        assert_eq!(call.headers[0].1, "application/json");
        assert!(!mapping.request.slow() && !mapping.answer.slow());
        assert_eq!(
            mapping.answer.map("chat", "m", b"{}").unwrap(),
            Answer::Unchanged
        );
        let mut stream = mapping.stream("m", "p/m");
        let chunk = r#"{"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}]}"#;
        let parts = stream
            .map_blocking(SseEvent {
                event: None,
                data: chunk.into(),
            })
            .unwrap();
        assert_eq!(
            parts,
            vec![Part::Chunk {
                data: chunk.into(),
                finish: true,
                usage: None,
                usage_only: false
            }],
            "forwarded as it came"
        );
    }

    #[test]
    fn a_draft_without_a_body_is_a_call_without_one() {
        let call = Draft {
            method: http::Method::GET,
            path: "/models".into(),
            query: vec![("a".into(), "b".into())],
            headers: Vec::new(),
            body: Value::Null,
        }
        .into_call()
        .unwrap();
        assert!(call.body.is_empty() && call.headers.is_empty());
    }

    #[test]
    fn an_event_is_parsed_once_and_keeps_its_text_when_not_json() {
        let mut event = Event::new(SseEvent {
            event: Some("delta".into()),
            data: r#"{"a":1}"#.into(),
        });
        assert_eq!(
            event.name_and_json(),
            (Some("delta"), Some(&json!({"a": 1})))
        );
        assert_eq!(
            event.into_parts(),
            (Some("delta".into()), Ok(json!({"a": 1})))
        );
        let text = Event::new(SseEvent {
            event: None,
            data: "not json".into(),
        });
        assert_eq!(text.into_parts(), (None, Err("not json".into())));
    }
}
