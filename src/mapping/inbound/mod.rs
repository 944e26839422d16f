//! Inbound dialects: other APIs' shapes spoken by clients, on the client side of the mapping seam.
//!
//! A dialect turns its request into an OpenAI chat body, which the engine serves like any chat request (with
//! rotation, cooldowns, the deadline, fallbacks and stream continuation), and turns the chat answer, its stream
//! and its errors back into its own shapes. One module per dialect:
//!
//! - [`messages`]: Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`);
//! - [`completions`]: OpenAI's legacy completions (`POST /v1/completions`).
//!
//! A provider that declares it speaks a dialect natively ([`Dialect`], `dialects:` in its file) gets such
//! requests as the client wrote them instead (`relay::Endpoint::Native`), its answers and events read only for
//! what the engine must know.
//!
//! Each stream translation reads the OpenAI SSE frames the engine writes (chunks, then `[DONE]`, or an in-band
//! error that ends the stream without one) and writes the dialect's events; [`Translated`] drives one over a
//! stream body.

pub mod completions;
pub mod messages;
pub mod native;
pub mod responses;

use super::EventMappings;
pub use super::Refused;
use crate::sse::SseBody;
use crate::sse::SseParser;
use bytes::Bytes;
use futures_util::Stream;
use serde_json::Value;
use std::pin::Pin;
use std::task::{Context, Poll};

/// An inbound dialect a provider may speak natively (`dialects:` in its file, with its path): requests in it then
/// go to that provider as the client wrote them, and its answers and events come back as they came.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// Anthropic's Messages API.
    Messages,
    /// OpenAI's Responses API.
    Responses,
    /// OpenAI's legacy completions (`prompt` in, `text` out).
    Completions,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Responses => "responses",
            Self::Completions => "completions",
        }
    }

    /// What the API is called in messages.
    pub fn title(self) -> &'static str {
        match self {
            Self::Messages => "the Anthropic Messages API",
            Self::Responses => "the OpenAI Responses API",
            Self::Completions => "legacy completions",
        }
    }

    /// Its answers and stream chunks are OpenAI's kind (`choices`, `usage`, `[DONE]`): a native stream passes
    /// through as chat's does, usage asked for the same way.
    pub fn openai_shaped(self) -> bool {
        self == Self::Completions
    }

    /// How a native stream of this dialect is read: its events forwarded as they come, with what the engine
    /// must know of them (content started, usage, the end, errors).
    pub fn events(self) -> std::sync::Arc<dyn EventMappings> {
        match self {
            Self::Messages => std::sync::Arc::new(native::Native(&native::MESSAGES)),
            Self::Responses => std::sync::Arc::new(native::Native(&native::RESPONSES)),
            Self::Completions => std::sync::Arc::new(super::passthrough::Passthrough),
        }
    }
}

/// Where a provider speaks a dialect: its path, and the models it speaks it for (globs; empty: all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialectRoute {
    pub path: String,
    pub models: Vec<String>,
}

/// `dialects.<name>` as written: a path, or a path and the models that speak the dialect.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum RawDialectRoute {
    Path(String),
    Routed {
        path: String,
        #[serde(default)]
        models: Vec<String>,
    },
}

impl From<RawDialectRoute> for DialectRoute {
    fn from(raw: RawDialectRoute) -> Self {
        match raw {
            RawDialectRoute::Path(path) => Self {
                path,
                models: Vec::new(),
            },
            RawDialectRoute::Routed { path, models } => Self { path, models },
        }
    }
}

/// One stream's translation from the engine's frames to a dialect's events. [`Translated`] reads the frames and
/// tells the translation what each is: an event, the engine's in-band error (after which nothing follows), or
/// the end.
pub trait StreamTranslation: Send + Unpin + 'static {
    /// One event of the engine's stream (an OpenAI chunk, or a native stream's own event with its SSE name);
    /// the dialect's events go to `out`.
    fn event(&mut self, name: Option<&str>, data: &str, out: &mut Vec<u8>);
    /// The engine's in-band error (`{"message", "type", "code"}`): the stream ends with the dialect's error.
    fn error(&mut self, error: &Value, out: &mut Vec<u8>);
    /// The engine's stream ended without an error; `clean` when its last frame was `[DONE]`. A stream that
    /// ended otherwise must end with the dialect's error, never look complete.
    fn end(&mut self, clean: bool, out: &mut Vec<u8>);
}

/// The code of an engine error, `stream_failed` when it has none.
pub(crate) fn error_code(error: &Value) -> &str {
    error["code"].as_str().unwrap_or("stream_failed")
}

/// The message of an engine error.
pub(crate) fn error_message(error: &Value) -> &str {
    error["message"].as_str().unwrap_or("the stream failed")
}

/// An OpenAI SSE body, translated frame by frame.
pub struct Translated<T> {
    inner: SseBody,
    parser: SseParser,
    translation: T,
    /// The last frame was `[DONE]`.
    clean: bool,
    /// An in-band error came: nothing follows it.
    failed: bool,
    ended: bool,
}

impl<T: StreamTranslation> Translated<T> {
    pub fn new(inner: SseBody, translation: T) -> Self {
        Self {
            inner,
            parser: SseParser::new(),
            translation,
            clean: false,
            failed: false,
            ended: false,
        }
    }

    /// Translates every complete frame buffered so far.
    fn drain(&mut self, out: &mut Vec<u8>) {
        while let Ok(Some(event)) = self.parser.next_event() {
            self.frame(event.event.as_deref(), &event.data, out);
        }
    }

    /// Reads one frame: `[DONE]`, the engine's in-band error (unnamed, `{"error": …}`), or an event.
    fn frame(&mut self, event: Option<&str>, data: &str, out: &mut Vec<u8>) {
        if self.failed || self.clean {
            return;
        }
        if event.is_none() && data.trim() == "[DONE]" {
            self.clean = true;
        } else if event.is_none() && data.starts_with("{\"error\"") {
            self.failed = true;
            let parsed = serde_json::from_str::<Value>(data).unwrap_or(Value::Null);
            self.translation.error(&parsed["error"], out);
        } else {
            self.translation.event(event, data, out);
        }
    }

    /// The engine's stream is over: the translation ends, unless an error already ended it.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(event) = self.parser.finish() {
            self.frame(event.event.as_deref(), &event.data, out);
        }
        self.ended = true;
        if !self.failed {
            self.translation.end(self.clean, out);
        }
    }

    /// What `translation` makes of frames already at hand, the stream ending after them (tools, tests).
    pub fn translate_all(translation: T, frames: &[(Option<&str>, &str)]) -> Vec<u8> {
        let mut translated = Self::new(Box::pin(futures_util::stream::empty()), translation);
        let mut out = Vec::new();
        for (event, data) in frames {
            translated.frame(*event, data, &mut out);
        }
        translated.finish(&mut out);
        out
    }
}

impl<T: StreamTranslation> Stream for Translated<T> {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let mut out = Vec::new();
            match this.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    // The engine's own frames: never oversized, but a parser refusal ends the stream as broken.
                    if this.parser.push(&bytes).is_err() {
                        this.ended = true;
                        this.translation.end(false, &mut out);
                    } else {
                        this.drain(&mut out);
                    }
                }
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => this.finish(&mut out),
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(out.into())));
            }
        }
    }
}

/// Writes one SSE event: `event: <name>` and its JSON data.
pub fn sse_event(out: &mut Vec<u8>, name: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, data);
    out.extend_from_slice(b"\n\n");
}
