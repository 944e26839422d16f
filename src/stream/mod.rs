//! Streaming: reading an upstream's SSE events, and the client-facing stream that forwards them.
//!
//! The client stream owns the upstream response and the key's lease. When the client disconnects, the body is
//! dropped, which drops the upstream connection and releases the key at once; no task is left pumping.

pub mod sse;

use crate::keys::Lease;
use crate::spec::{ErrorClass, Scope, Verdict};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::IgnoredAny;
use sse::{SseEvent, SseParser};
use std::pin::Pin;

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// Why an upstream stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum StreamFault {
    #[error("the upstream connection failed: {0}")]
    Connection(String),
    #[error("the upstream sent an SSE line over 16 MiB")]
    Oversized,
}

/// SSE events of one upstream response.
pub struct UpstreamEvents {
    body: ByteStream,
    parser: SseParser,
    ended: bool,
}

impl UpstreamEvents {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: Box::pin(response.bytes_stream()),
            parser: SseParser::new(),
            ended: false,
        }
    }

    /// The next event, `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, StreamFault> {
        loop {
            if let Some(event) = self.parser.next_event() {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self
                    .parser
                    .push(&chunk)
                    .map_err(|_| StreamFault::Oversized)?,
                Some(Err(e)) => {
                    return Err(StreamFault::Connection(crate::relay::describe_reqwest(&e)));
                }
                None => {
                    self.ended = true;
                    return Ok(self.parser.finish());
                }
            }
        }
    }
}

/// The parts of an OpenAI chunk the proxy looks at; everything else passes through untouched.
#[derive(Deserialize)]
struct ChunkPeek {
    #[serde(default)]
    choices: Vec<ChoicePeek>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ChoicePeek {
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

/// Token counts as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

pub fn is_done(event: &SseEvent) -> bool {
    event.data.trim() == "[DONE]"
}

/// Whether an event is an in-band error object (`{"error": …}`).
pub fn is_error_event(event: &SseEvent) -> bool {
    serde_json::from_str::<ChunkPeek>(&event.data).is_ok_and(|c| c.error.is_some())
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
pub fn error_frame(message: &str, code: &str) -> Bytes {
    let body =
        serde_json::json!({"error": {"message": message, "type": "upstream_error", "code": code}});
    frame(&body.to_string())
}

/// Forwards an upstream stream to the client after its first event was seen.
pub struct Forward {
    upstream: UpstreamEvents,
    pending: Option<SseEvent>,
    lease: Option<Lease>,
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
        wants_usage: bool,
        label: String,
    ) -> Self {
        Self {
            upstream,
            pending: Some(first),
            lease: Some(lease),
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
                    lease.succeed(self.usage.prompt_tokens, self.usage.completion_tokens);
                    self.lease = None;
                    return Some(frame("[DONE]"));
                }
                Ok(None) => {
                    return Some(self.cut(
                        ErrorClass::Connection,
                        "the upstream stream ended before the answer was complete",
                    ));
                }
                Err(fault) => return Some(self.cut(ErrorClass::Connection, &fault.to_string())),
            };
            if is_done(&event) {
                lease.succeed(self.usage.prompt_tokens, self.usage.completion_tokens);
                self.lease = None;
                return Some(frame("[DONE]"));
            }
            let peek = match serde_json::from_str::<ChunkPeek>(&event.data) {
                Ok(peek) => peek,
                Err(e) => {
                    tracing::warn!(stream = %self.label, error = %e, "skipping a malformed upstream stream event");
                    continue;
                }
            };
            if peek.error.is_some() {
                lease.fail(&Verdict {
                    class: ErrorClass::Server,
                    scope: Scope::Model,
                    retry_after: None,
                });
                self.lease = None;
                return Some(frame(&event.data));
            }
            if peek.choices.iter().any(|c| c.finish_reason.is_some()) {
                self.saw_finish = true;
            }
            if let Some(usage) = peek.usage {
                self.usage = usage;
                if peek.choices.is_empty() && !self.wants_usage {
                    continue;
                }
            }
            return Some(frame(&event.data));
        }
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
        error_frame(
            &format!("upstream stream interrupted: {why}"),
            "stream_interrupted",
        )
    }
}
