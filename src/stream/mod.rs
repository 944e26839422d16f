//! Streaming: reading an upstream's SSE events, and the client-facing stream that forwards them.
//!
//! The client stream owns the upstream response and the key's lease. When the client disconnects, the body is
//! dropped, which drops the upstream connection and releases the key at once; no task is left pumping.

pub mod sse;

use crate::clock::Clock;
use crate::keys::Lease;
use crate::spec::{ErrorClass, Scope, Verdict};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use sse::{SseEvent, SseParser};
use std::pin::Pin;
use std::time::Duration;

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// Why an upstream stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum StreamFault {
    #[error("the upstream connection failed: {0}")]
    Connection(String),
    #[error("the upstream sent nothing for {0:?}")]
    Stalled(Duration),
    #[error("the upstream sent an SSE event over 16 MiB")]
    Oversized,
}

impl StreamFault {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Stalled(_) => ErrorClass::Timeout,
            Self::Connection(_) | Self::Oversized => ErrorClass::Connection,
        }
    }
}

/// SSE events of one upstream response.
pub struct UpstreamEvents {
    body: ByteStream,
    parser: SseParser,
    ended: bool,
    /// The longest silence tolerated between two reads.
    idle: Duration,
}

impl UpstreamEvents {
    pub fn new(response: reqwest::Response, idle: Duration) -> Self {
        Self {
            body: Box::pin(response.bytes_stream()),
            parser: SseParser::new(),
            ended: false,
            idle,
        }
    }

    /// The next event, `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, StreamFault> {
        loop {
            if let Some(event) = self
                .parser
                .next_event()
                .map_err(|_| StreamFault::Oversized)?
            {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout(self.idle, self.body.next()).await {
                Err(_) => return Err(StreamFault::Stalled(self.idle)),
                Ok(Some(Ok(chunk))) => self
                    .parser
                    .push(&chunk)
                    .map_err(|_| StreamFault::Oversized)?,
                Ok(Some(Err(e))) => {
                    return Err(StreamFault::Connection(crate::relay::describe_reqwest(&e)));
                }
                Ok(None) => {
                    self.ended = true;
                    return Ok(self.parser.finish());
                }
            }
        }
    }
}

/// The parts of an OpenAI chunk the proxy looks at; everything else passes through untouched. Lenient on
/// purpose: a field of an unexpected type must not make a valid chunk look malformed.
#[derive(Deserialize)]
struct ChunkPeek {
    #[serde(default)]
    choices: Option<Vec<Value>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

/// Token counts as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Reads an OpenAI `usage` object; missing or odd counts are zero.
    pub fn from_value(usage: &Value) -> Self {
        let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
        Self {
            prompt_tokens: count("prompt_tokens"),
            completion_tokens: count("completion_tokens"),
        }
    }
}

pub fn is_done(event: &SseEvent) -> bool {
    event.data.trim() == "[DONE]"
}

/// The error object of an in-band error event (`{"error": …}`), if it is one.
pub fn error_of(event: &SseEvent) -> Option<Value> {
    serde_json::from_str::<ChunkPeek>(&event.data)
        .ok()?
        .error
        .filter(|e| !e.is_null())
}

/// An SSE frame carrying `data`.
pub fn frame(data: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
    out.into()
}

/// The in-band error that ends a stream which broke after it started: no `[DONE]` follows.
pub fn error_frame(message: &str, kind: &str, code: &str) -> Bytes {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    frame(&body.to_string())
}

/// An upstream's in-band error in OpenAI's shape, whatever shape it came in.
fn upstream_error_frame(error: &Value) -> Bytes {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let message = text(error.get("message"))
        .or_else(|| text(Some(error)))
        .unwrap_or_else(|| error.to_string());
    let kind = text(error.get("type")).unwrap_or_else(|| "upstream_error".into());
    let code = text(error.get("code")).unwrap_or_else(|| "upstream_error".into());
    error_frame(&format!("upstream error: {message}"), &kind, &code)
}

/// Forwards an upstream stream to the client after its first event was seen.
pub struct Forward {
    upstream: UpstreamEvents,
    pending: Option<SseEvent>,
    lease: Option<Lease>,
    clock: Clock,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    wants_usage: bool,
    saw_finish: bool,
    usage: Usage,
    label: String,
}

impl Forward {
    pub fn new(
        upstream: UpstreamEvents,
        first: SseEvent,
        lease: Lease,
        clock: Clock,
        wants_usage: bool,
        label: String,
    ) -> Self {
        Self {
            upstream,
            pending: Some(first),
            lease: Some(lease),
            clock,
            wants_usage,
            saw_finish: false,
            usage: Usage::default(),
            label,
        }
    }

    /// The client-facing byte stream.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
        futures_util::stream::unfold(self, |mut me| async move {
            let frame = me.next_frame().await?;
            Some((Ok(frame), me))
        })
    }

    /// The next frame to send, `None` once the stream is over.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            let lease = self.lease.as_mut()?;
            let event = match self.pending.take() {
                Some(e) => Ok(Some(e)),
                None => self.upstream.next().await,
            };
            let event = match event {
                Ok(Some(event)) => event,
                Ok(None) if self.saw_finish => {
                    // The answer is complete even though the upstream forgot `[DONE]`.
                    return Some(self.complete());
                }
                Ok(None) => {
                    let why = "the upstream stream ended before the answer was complete";
                    return Some(self.cut(ErrorClass::Connection, why));
                }
                Err(fault) => return Some(self.cut(fault.class(), &fault.to_string())),
            };
            if is_done(&event) {
                return Some(self.complete());
            }
            let peek = match serde_json::from_str::<ChunkPeek>(&event.data) {
                Ok(peek) => peek,
                Err(_) if serde_json::from_str::<IgnoredAny>(&event.data).is_ok() => {
                    // Valid JSON of a shape we do not know: not ours to judge, pass it on.
                    return Some(frame(&event.data));
                }
                Err(e) => {
                    tracing::warn!(stream = %self.label, error = %e, "skipping a malformed upstream stream event");
                    continue;
                }
            };
            if let Some(error) = peek.error.filter(|e| !e.is_null()) {
                let provider = lease.provider().clone();
                let verdict = provider.classifier.classify(
                    500,
                    &Default::default(),
                    &event.data,
                    self.clock.now(),
                );
                tracing::warn!(stream = %self.label, class = verdict.class.as_str(), "the upstream sent an error mid-stream");
                lease.fail(&verdict);
                self.lease = None;
                return Some(upstream_error_frame(&error));
            }
            let choices = peek.choices.unwrap_or_default();
            if choices
                .iter()
                .any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null()))
            {
                self.saw_finish = true;
            }
            if let Some(usage) = peek.usage.filter(Value::is_object) {
                self.usage = Usage::from_value(&usage);
                if choices.is_empty() && !self.wants_usage {
                    continue;
                }
            }
            return Some(frame(&event.data));
        }
    }

    fn complete(&mut self) -> Bytes {
        if let Some(mut lease) = self.lease.take() {
            lease.succeed(self.usage.prompt_tokens, self.usage.completion_tokens);
        }
        frame("[DONE]")
    }

    fn cut(&mut self, class: ErrorClass, why: &str) -> Bytes {
        tracing::warn!(stream = %self.label, error = why, "upstream stream broke after it started");
        if let Some(mut lease) = self.lease.take() {
            lease.fail(&Verdict {
                class,
                scope: Scope::Model,
                retry_after: None,
            });
        }
        let message = format!("upstream stream interrupted: {why}");
        error_frame(&message, "upstream_error", "stream_interrupted")
    }
}
