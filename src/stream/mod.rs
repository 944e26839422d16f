//! Streaming: reading an upstream's SSE events, and the client-facing stream that forwards them.
//!
//! The client stream owns the upstream response and the key's lease. When the client disconnects, the body is
//! dropped, which drops the upstream connection and releases the key at once; no task is left pumping.

pub mod chunk;
pub mod sse;

use crate::clock::Clock;
use crate::keys::{BoxFuture, Lease};
use crate::observe::{Journal, Observer};
use crate::script::{ScriptError, ScriptStream};
use crate::spec::stream_rules::{self, Emitted, StreamRule};
use crate::spec::{ErrorClass, Verdict};
use crate::upstream::UpstreamError;
use bytes::Bytes;
pub use chunk::{ChunkWriter, Part};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use sse::{SseEvent, SseParser};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The bytes of a client-facing SSE stream.
pub type SseBody = Pin<Box<dyn Stream<Item = Result<Bytes, std::convert::Infallible>> + Send>>;

/// Asks for the rest of an answer whose stream broke, given the text sent so far: the client-facing stream of
/// the continuation, or `None` when it could not be had.
pub type Continuer = Box<dyn FnOnce(String) -> BoxFuture<'static, Option<SseBody>> + Send>;

/// Why an upstream stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum StreamFault {
    #[error("the upstream connection failed: {0}")]
    Connection(String),
    #[error("the upstream sent nothing for {0:?}")]
    Stalled(Duration),
    #[error("the upstream sent an SSE event over 16 MiB")]
    Oversized,
    #[error("keyrelay is shutting down")]
    ShuttingDown,
}

impl StreamFault {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Stalled(_) => ErrorClass::Timeout,
            Self::Connection(_) | Self::Oversized | Self::ShuttingDown => ErrorClass::Connection,
        }
    }
}

/// How many times `pull_at_hand` polls the body, yielding between polls. Under load (64 streams) one yield was
/// rarely enough for the connection's task to run (13 writes per 12-event stream, as without pulling); three
/// brought it to 3 writes and cut keyrelay's CPU per stream by 30%; more changed nothing.
const PULL_TURNS: u32 = 4;

/// The most a stream gathers into one write to the client.
const MAX_BATCH: usize = 64 << 10;

/// SSE events of one upstream response.
pub struct UpstreamEvents {
    body: crate::upstream::Incoming,
    parser: SseParser,
    ended: bool,
    /// The longest silence tolerated between two reads.
    idle: Duration,
    /// Since when the reader has been waiting for the upstream.
    waiting_since: Instant,
    /// Wakes the reader to check for silence. Armed lazily: a read only moves `waiting_since`, and the timer is
    /// pushed on when it fires early, so a busy stream does not touch the timer wheel once per event.
    watchdog: Pin<Box<Sleep>>,
    /// The parser refused an event while `buffered` looked ahead: `next` reports it.
    oversized: bool,
    /// The body's end or failure, met by `pull_at_hand`: the next `read` returns it.
    stashed: Option<Option<Result<Bytes, UpstreamError>>>,
    /// Ends the reading when cancelled (shutdown).
    closing: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

impl UpstreamEvents {
    pub fn new(body: crate::upstream::Incoming, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            body,
            parser: SseParser::new(),
            ended: false,
            idle,
            waiting_since: now,
            watchdog: Box::pin(tokio::time::sleep_until(after(now, idle))),
            oversized: false,
            stashed: None,
            closing: None,
        }
    }

    /// Takes into the parser a piece of the body that the connection has already received, yielding up to
    /// `PULL_TURNS - 1` times for the connection's task to hand it over (hyper passes a body on one piece at a
    /// time, from another task). Never waits for the upstream. False when nothing came: the upstream has sent nothing more yet, or
    /// the body ended or failed (kept for `next` to report).
    pub async fn pull_at_hand(&mut self) -> bool {
        if self.ended || self.oversized || self.stashed.is_some() {
            return false;
        }
        for turn in 0..PULL_TURNS {
            if turn > 0 {
                tokio::task::yield_now().await;
            }
            let polled = std::future::poll_fn(|cx| {
                Poll::Ready(crate::upstream::poll_chunk(&mut self.body, cx))
            })
            .await;
            match polled {
                Poll::Pending => continue,
                Poll::Ready(Some(Ok(chunk))) => {
                    if self.parser.push(&chunk).is_err() {
                        self.oversized = true;
                    }
                    return !self.oversized;
                }
                Poll::Ready(end_or_failure) => {
                    self.stashed = Some(end_or_failure);
                    return false;
                }
            }
        }
        false
    }

    /// The next chunk of the body, `Err` if none came within `idle` of asking or the proxy is closing.
    async fn read(&mut self) -> Result<Option<Result<Bytes, UpstreamError>>, StreamFault> {
        if let Some(stashed) = self.stashed.take() {
            return Ok(stashed);
        }
        self.waiting_since = Instant::now();
        std::future::poll_fn(|cx| {
            if let Poll::Ready(item) = crate::upstream::poll_chunk(&mut self.body, cx) {
                return Poll::Ready(Ok(item));
            }
            if let Some(closing) = &mut self.closing
                && closing.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Err(StreamFault::ShuttingDown));
            }
            while self.watchdog.as_mut().poll(cx).is_ready() {
                let due = after(self.waiting_since, self.idle);
                if Instant::now() >= due {
                    return Poll::Ready(Err(StreamFault::Stalled(self.idle)));
                }
                self.watchdog.as_mut().reset(due);
            }
            Poll::Pending
        })
        .await
    }

    /// The next event if one is complete in what has been read already; never waits. A parser error is kept for
    /// `next` to report.
    fn buffered(&mut self) -> Option<SseEvent> {
        if self.oversized {
            return None;
        }
        self.parser.next_event().unwrap_or_else(|_| {
            self.oversized = true;
            None
        })
    }

    /// The next event, `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, StreamFault> {
        if self.oversized {
            return Err(StreamFault::Oversized);
        }
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
            match self.read().await? {
                Some(Ok(chunk)) => self
                    .parser
                    .push(&chunk)
                    .map_err(|_| StreamFault::Oversized)?,
                Some(Err(e)) => return Err(StreamFault::Connection(e.message)),
                None => {
                    self.ended = true;
                    return Ok(self.parser.finish());
                }
            }
        }
    }
}

/// `at + wait`, or far in the future when that does not fit in an `Instant`.
fn after(at: Instant, wait: Duration) -> Instant {
    at.checked_add(wait)
        .unwrap_or_else(|| at + Duration::from_secs(30 * 365 * 24 * 3600))
}

/// The parts of an OpenAI chunk the proxy looks at; everything else passes through untouched. Lenient on
/// purpose: a field of an unexpected type must not make a valid chunk look malformed.
#[derive(Deserialize)]
struct ChunkPeek {
    #[serde(default)]
    choices: Option<Vec<ChoicePeek>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

/// Of a choice, only whether it finishes; its delta is skipped over, not built (this runs on every event). A
/// choice that is not an object reads as one that does not finish, as the rest of the chunk still counts.
struct ChoicePeek {
    finish_reason: Option<IgnoredAny>,
}

impl<'de> Deserialize<'de> for ChoicePeek {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Field {
            FinishReason,
            #[serde(other)]
            Other,
        }

        struct Choice;

        impl<'de> serde::de::Visitor<'de> for Choice {
            type Value = ChoicePeek;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a choice")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ChoicePeek, A::Error> {
                let mut finish_reason = None;
                while let Some(field) = map.next_key::<Field>()? {
                    match field {
                        Field::FinishReason => finish_reason = map.next_value()?,
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ChoicePeek { finish_reason })
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ChoicePeek, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ChoicePeek {
                    finish_reason: None,
                })
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<ChoicePeek, E> {
                Ok(ChoicePeek {
                    finish_reason: None,
                })
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }

            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }

            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }

            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }
        }

        d.deserialize_any(Choice)
    }
}

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
        let (taken, parts) = crate::offload::run(move || {
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

/// Token counts as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Reads an OpenAI `usage` object; missing or odd counts are zero (the same rules as reading it from JSON).
    pub fn from_value(usage: &Value) -> Self {
        Self::deserialize(usage).unwrap_or_default()
    }
}

/// Reads a `usage` value without building it: counts that are not whole non-negative numbers, and a usage that
/// is not an object, read as zero; never an error.
impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Count(u64);

        impl<'de> Deserialize<'de> for Count {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(Count(
                    Value::deserialize(d)
                        .ok()
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0),
                ))
            }
        }

        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Usage;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a usage object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Usage, A::Error> {
                let mut usage = Usage::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "prompt_tokens" => usage.prompt_tokens = map.next_value::<Count>()?.0,
                        "completion_tokens" => {
                            usage.completion_tokens = map.next_value::<Count>()?.0
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(usage)
            }

            fn visit_unit<E>(self) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_bool<E>(self, _: bool) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_i64<E>(self, _: i64) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_u64<E>(self, _: u64) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_f64<E>(self, _: f64) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_str<E>(self, _: &str) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Usage, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Usage::default())
            }
        }

        d.deserialize_any(Visitor)
    }
}

pub fn is_done(event: &SseEvent) -> bool {
    event.data.trim() == "[DONE]"
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

/// A stream that has started: the rest of its events, how to map them, and the parts already mapped.
pub struct Started {
    pub events: UpstreamEvents,
    pub mapper: Mapper,
    pub pending: VecDeque<Part>,
}

/// A stream's journal, reported when the stream ends however it ends (complete, cut, or the client gone).
pub struct Report {
    journal: Journal,
    observer: Arc<dyn Observer>,
    /// Chunk data sent, kept for request logs (bounded).
    transcript: Option<(Vec<String>, usize)>,
}

/// Transcripts kept for request logs stop growing here.
const MAX_TRANSCRIPT: usize = 1 << 20;

impl Report {
    pub fn new(journal: Journal, observer: Arc<dyn Observer>) -> Self {
        let transcript = observer.wants_bodies().then(|| (Vec::new(), 0));
        Self {
            journal,
            observer,
            transcript,
        }
    }

    fn sent(&mut self, data: &str) {
        if let Some((chunks, size)) = &mut self.transcript
            && *size < MAX_TRANSCRIPT
        {
            *size += data.len();
            chunks.push(data.to_string());
        }
    }

    fn finish(mut self, error: Option<&str>, usage: Usage) {
        self.journal.error = error.map(String::from);
        self.journal.prompt_tokens = usage.prompt_tokens;
        self.journal.completion_tokens = usage.completion_tokens;
        self.journal.total_ms = self.journal.elapsed_ms();
        if let Some((chunks, _)) = self.transcript.take() {
            self.journal.response = Some(Value::Array(
                chunks.into_iter().map(Value::String).collect(),
            ));
        }
        self.observer.finished(self.journal);
    }
}

/// Forwards an upstream stream to the client after its first parts were seen.
pub struct Forward {
    upstream: UpstreamEvents,
    mapper: Mapper,
    pending: VecDeque<Part>,
    lease: Option<Lease>,
    clock: Clock,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    wants_usage: bool,
    saw_finish: bool,
    usage: Usage,
    label: String,
    report: Option<Report>,
    /// Continues the answer if the upstream breaks, while the answer is plain text.
    resume: Option<Continuer>,
    /// The answer's text so far, kept only while it may be continued.
    answer: String,
    /// The continuation being forwarded, once the upstream broke and another key took over.
    tail: Option<SseBody>,
    /// A mapping failure met while gathering frames at hand, reported by the next `next_frame`.
    failed: Option<ScriptError>,
    /// An event met while gathering frames at hand that only the script can map: `next_frame` maps it.
    held: Option<(SseEvent, Option<Value>)>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        // Dropped before it ended: the client went away.
        if let Some(report) = self.report.take() {
            report.finish(Some("client_disconnected"), self.usage);
        }
    }
}

impl Forward {
    fn end(&mut self, error: Option<&str>) {
        if let Some(report) = self.report.take() {
            report.finish(error, self.usage);
        }
    }

    /// Ends the stream with an in-band error once `closing` is cancelled.
    pub fn end_when(&mut self, closing: tokio_util::sync::CancellationToken) {
        self.upstream.closing = Some(Box::pin(closing.cancelled_owned()));
    }

    pub fn new(
        started: Started,
        resume: Option<Continuer>,
        lease: Lease,
        clock: Clock,
        wants_usage: bool,
        label: String,
        report: Option<Report>,
    ) -> Self {
        let Started {
            events: upstream,
            mapper,
            pending,
        } = started;
        Self {
            upstream,
            mapper,
            pending,
            lease: Some(lease),
            clock,
            wants_usage,
            saw_finish: false,
            usage: Usage::default(),
            label,
            report,
            resume,
            answer: String::new(),
            tail: None,
            failed: None,
            held: None,
        }
    }

    /// The client-facing byte stream. Frames already at hand (events that arrived in one read) go out together,
    /// in one write; nothing waits for more.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
        futures_util::stream::unfold(self, |mut me| async move {
            // Frames at hand go out together: one write to the client instead of one per event (up to
            // MAX_BATCH, so that a fast upstream's answer still reaches the client as it comes).
            let first = me.next_frame().await?;
            let mut batch: Option<bytes::BytesMut> = None;
            while batch.as_ref().map_or(first.len(), bytes::BytesMut::len) < MAX_BATCH {
                if let Some(frame) = me.ready_frame() {
                    batch
                        .get_or_insert_with(|| {
                            let mut b = bytes::BytesMut::with_capacity(first.len() * 4);
                            b.extend_from_slice(&first);
                            b
                        })
                        .extend_from_slice(&frame);
                } else if !me.pull_at_hand().await {
                    break;
                }
            }
            Some((Ok(batch.map_or(first, bytes::BytesMut::freeze)), me))
        })
    }

    /// A chunk's frame, with what the stream learns from it; `None` for a usage chunk the client did not ask for.
    fn chunk_frame(
        &mut self,
        data: String,
        finish: bool,
        usage: Option<Value>,
        usage_only: bool,
    ) -> Option<Bytes> {
        self.saw_finish |= finish;
        // Upstreams have echoed keys even in answers.
        let data = match self.lease.as_ref().map(|l| l.key().redact(&data)) {
            Some(std::borrow::Cow::Owned(redacted)) => redacted,
            _ => data,
        };
        if let Some(usage) = usage {
            self.usage = Usage::from_value(&usage);
            if usage_only && !self.wants_usage {
                return None;
            }
        }
        if let Some(report) = &mut self.report {
            report.sent(&data);
        }
        if self.resume.is_some() {
            self.follow(&data);
        }
        Some(frame(&data))
    }

    /// Pulls what the upstream connection already holds (`UpstreamEvents::pull_at_hand`) while the stream is
    /// plainly forwarding and nothing else waits to be decided.
    async fn pull_at_hand(&mut self) -> bool {
        if self.tail.is_some()
            || self.lease.is_none()
            || self.failed.is_some()
            || self.held.is_some()
            || !self.pending.is_empty()
        {
            return false;
        }
        self.upstream.pull_at_hand().await
    }

    /// The next chunk frame if it can be had without waiting or deciding anything: from parts already mapped or
    /// events already read. The end, errors and breaks are left to `next_frame`.
    fn ready_frame(&mut self) -> Option<Bytes> {
        if self.tail.is_some()
            || self.lease.is_none()
            || self.failed.is_some()
            || self.held.is_some()
        {
            return None;
        }
        loop {
            match self.pending.pop_front() {
                Some(Part::Chunk {
                    data,
                    finish,
                    usage,
                    usage_only,
                }) => {
                    if let Some(frame) = self.chunk_frame(data, finish, usage, usage_only) {
                        return Some(frame);
                    }
                }
                Some(other) => {
                    self.pending.push_front(other);
                    return None;
                }
                None => {
                    let event = self.upstream.buffered()?;
                    match self.mapper.map_inline(event) {
                        Ok(Ok(parts)) => self.pending.extend(parts),
                        Ok(Err(e)) => {
                            self.failed = Some(e);
                            return None;
                        }
                        Err(held) => {
                            self.held = Some(held);
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// The next frame to send, `None` once the stream is over.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(tail) = &mut self.tail {
                return tail.next().await.map(|Ok(bytes)| bytes);
            }
            self.lease.as_ref()?;
            if let Some(e) = self.failed.take() {
                return Some(self.script_failed(e));
            }
            if self.pending.is_empty()
                && let Some((event, data)) = self.held.take()
            {
                match self.mapper.map_by_script(event, data).await {
                    Ok(parts) => self.pending.extend(parts),
                    Err(e) => return Some(self.script_failed(e)),
                }
                continue;
            }
            if let Some(part) = self.pending.pop_front() {
                match part {
                    Part::Done => return Some(self.complete()),
                    Part::Error(error) => {
                        let report = self.upstream_error(&error).await;
                        return Some(self.continue_or(report, "upstream_error").await);
                    }
                    Part::Chunk {
                        data,
                        finish,
                        usage,
                        usage_only,
                    } => match self.chunk_frame(data, finish, usage, usage_only) {
                        Some(frame) => return Some(frame),
                        None => continue,
                    },
                }
            }
            let event = match self.upstream.next().await {
                Ok(Some(event)) => event,
                // The answer is complete even though the upstream did not say `[DONE]`.
                Ok(None) if self.saw_finish => return Some(self.complete()),
                Ok(None) => {
                    let why = "the upstream stream ended before the answer was complete";
                    let report = self.cut(ErrorClass::Connection, why, "stream_interrupted");
                    return Some(self.continue_or(report, "stream_interrupted").await);
                }
                Err(StreamFault::ShuttingDown) => {
                    // Not the key's fault: released without a verdict.
                    self.lease = None;
                    self.end(Some("shutting_down"));
                    let why = "keyrelay is shutting down; the answer is incomplete";
                    return Some(error_frame(why, "server_error", "shutting_down"));
                }
                Err(fault) => {
                    let report = self.cut(fault.class(), &fault.to_string(), "stream_interrupted");
                    return Some(self.continue_or(report, "stream_interrupted").await);
                }
            };
            match self.mapper.map(event).await {
                Ok(parts) => self.pending.extend(parts),
                Err(e) => return Some(self.script_failed(e)),
            }
        }
    }

    /// The in-band error frame for a failed mapping script, which ends the stream.
    fn script_failed(&mut self, e: ScriptError) -> Bytes {
        // Not the key's fault: release it without a verdict.
        self.lease = None;
        tracing::warn!(stream = %self.label, error = %e, "the stream mapping script failed");
        self.end(Some("script_error"));
        error_frame(&e.to_string(), "server_error", "script_error")
    }

    /// Keeps the answer's text from a chunk sent; an answer that is not plain text in one choice (tool calls,
    /// several choices, a chunk that cannot be read) cannot be continued.
    fn follow(&mut self, data: &str) {
        let delta = serde_json::from_str::<Value>(data).ok().and_then(|chunk| {
            let choices = chunk.get("choices")?.as_array()?;
            let [choice] = choices.as_slice() else {
                return choices.is_empty().then_some(None);
            };
            let delta = choice.get("delta")?;
            if delta.get("tool_calls").is_some_and(|t| !t.is_null())
                || delta.get("function_call").is_some_and(|t| !t.is_null())
            {
                return None;
            }
            match delta.get("content") {
                Some(Value::String(text)) => Some(Some(text.clone())),
                None | Some(Value::Null) => Some(None),
                Some(_) => None,
            }
        });
        match delta {
            Some(Some(text)) => self.answer.push_str(&text),
            Some(None) => {}
            None => {
                self.resume = None;
                self.answer = String::new();
            }
        }
    }

    /// After the upstream broke: the first frame of a continuation from another key when the answer can be
    /// continued and one is had (the request is then logged as `stream_continued`), else `error`, the frame
    /// reporting the break (logged as `code`).
    async fn continue_or(&mut self, error: Bytes, code: &str) -> Bytes {
        if let Some(resume) = self.resume.take() {
            let answer = std::mem::take(&mut self.answer);
            tracing::info!(stream = %self.label, sent = answer.len(), "continuing the broken stream on another key");
            if let Some(mut tail) = resume(answer).await
                && let Some(Ok(first)) = tail.next().await
            {
                self.tail = Some(tail);
                self.end(Some("stream_continued"));
                return first;
            }
        }
        self.end(Some(code));
        error
    }

    fn complete(&mut self) -> Bytes {
        if let Some(mut lease) = self.lease.take() {
            lease.succeed(self.usage.prompt_tokens, self.usage.completion_tokens);
        }
        self.end(None);
        frame("[DONE]")
    }

    /// An error the upstream sent mid-stream: judged by the provider's rules, forwarded in OpenAI's shape.
    async fn upstream_error(&mut self, error: &Value) -> Bytes {
        let redacted = self
            .lease
            .as_ref()
            .and_then(|l| match l.key().redact(&error.to_string()) {
                std::borrow::Cow::Owned(text) => serde_json::from_str::<Value>(&text).ok(),
                std::borrow::Cow::Borrowed(_) => None,
            });
        let error = redacted.as_ref().unwrap_or(error);
        if let Some(mut lease) = self.lease.take() {
            let provider = lease.provider().clone();
            let verdict = provider
                .judge(
                    500,
                    &Default::default(),
                    &error.to_string(),
                    self.clock.now(),
                )
                .await
                .unwrap_or(Verdict::model(ErrorClass::Server));
            tracing::warn!(stream = %self.label, class = verdict.class.as_str(), "the upstream sent an error mid-stream");
            lease.fail(&verdict);
        }
        upstream_error_frame(error)
    }

    fn cut(&mut self, class: ErrorClass, why: &str, code: &str) -> Bytes {
        tracing::warn!(stream = %self.label, error = why, "upstream stream broke after it started");
        if let Some(mut lease) = self.lease.take() {
            lease.fail(&Verdict::model(class));
        }
        let message = format!("upstream stream interrupted: {why}");
        error_frame(&message, "upstream_error", code)
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
    fn usage_is_read_leniently_from_json_and_from_values() {
        for (text, expected) in [
            (
                r#"{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21,"details":{"a":[1]}}"#,
                (12, 9),
            ),
            (r#"{"prompt_tokens":"12","completion_tokens":-1}"#, (0, 0)),
            (r#"{"prompt_tokens":1.5,"completion_tokens":null}"#, (0, 0)),
            (
                r#"{"prompt_tokens":{"n":1},"completion_tokens":[3]}"#,
                (0, 0),
            ),
            (r#"{"completion_tokens":4}"#, (0, 4)),
            (r#"{}"#, (0, 0)),
            (r#"null"#, (0, 0)),
            (r#""twelve""#, (0, 0)),
            (r#"[1,2]"#, (0, 0)),
            (r#"7"#, (0, 0)),
        ] {
            let read: Usage = serde_json::from_str(text).unwrap();
            assert_eq!(
                (read.prompt_tokens, read.completion_tokens),
                expected,
                "{text}"
            );
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(Usage::from_value(&value), read, "{text}");
        }
        let read: Usage =
            serde_json::from_str(r#"{"completion_tokens":9,"prompt_tokens":12}"#).unwrap();
        assert_eq!((read.prompt_tokens, read.completion_tokens), (12, 9));
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
