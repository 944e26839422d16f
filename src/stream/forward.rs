//! The client-facing stream: forwards an upstream stream after its first parts were seen, and reports the
//! request when it ends.

use super::{Break, Continuer, Resumed, Started, StreamFault, UpstreamEvents};
use crate::clock::Clock;
use crate::failure::ErrorClass;
use crate::lease::Lease;
use crate::mapping::{Event, EventMapper, Part, Step};
use crate::observe::{Journal, Observer};
use crate::provider::Verdict;
use crate::script::ScriptError;
use crate::sse::{error_frame, frame, named_frame, upstream_error_frame};
use crate::usage::Usage;
use bytes::Bytes;
use futures_util::Stream;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;

/// The most a stream gathers into one write to the client.
const MAX_BATCH: usize = 64 << 10;

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
        self.journal.cached_tokens = usage.cached_tokens;
        self.journal.total_ms = self.journal.elapsed_ms();
        if let Some((chunks, _)) = self.transcript.take() {
            self.journal.response = Some(Value::Array(
                chunks.into_iter().map(Value::String).collect(),
            ));
        }
        self.observer.finished(self.journal);
    }
}

/// Forwards an upstream stream to the client after its first parts were seen. When the upstream breaks
/// mid-answer and the answer can be continued, the stream that takes over (see `relay::continuation`) is
/// forwarded in its place: a new segment with its own key, mapped parts and usage; the client sees one answer.
pub struct Forward {
    upstream: UpstreamEvents,
    mapper: EventMapper,
    pending: VecDeque<Part>,
    lease: Option<Lease>,
    clock: Clock,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    wants_usage: bool,
    saw_finish: bool,
    /// This segment's usage, and the usage of the segments before it.
    usage: Usage,
    usage_before: Usage,
    label: String,
    report: Option<Report>,
    /// Continues the answer if the upstream breaks, while the answer is plain text.
    resume: Option<Continuer>,
    /// The answer's text so far (over every segment), kept only while it may be continued.
    answer: String,
    /// A mapping failure met while gathering frames at hand, reported by the next `next_frame`.
    failed: Option<ScriptError>,
    /// An event met while gathering frames at hand that only a slow layer can map: `next_frame` maps it.
    held: Option<Event>,
    /// What ends every segment: shutdown, and the stream's total bound.
    closing: Option<tokio_util::sync::CancellationToken>,
    until: Option<tokio::time::Instant>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        // Dropped before it ended: the client went away.
        self.end(Some("client_disconnected"));
    }
}

impl Forward {
    fn end(&mut self, error: Option<&str>) {
        if let Some(report) = self.report.take() {
            report.finish(error, self.usage_before.plus(self.usage));
        }
    }

    /// This stream, ended with an in-band error when `closing` is cancelled or at `until`.
    pub fn bounded(
        mut self,
        closing: tokio_util::sync::CancellationToken,
        until: Option<tokio::time::Instant>,
    ) -> Self {
        self.upstream.bound(Some(&closing), until);
        self.closing = Some(closing);
        self.until = until;
        self
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
            usage_before: Usage::default(),
            label,
            report,
            resume,
            answer: String::new(),
            failed: None,
            held: None,
            closing: None,
            until: None,
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
        let mut data = data;
        if let Some(usage) = usage {
            self.usage = Usage::from_value(&usage);
            if usage_only && !self.wants_usage {
                return None;
            }
            // A continued answer's usage is every segment's: the client is told the sum, as the logs are.
            if self.usage_before != Usage::default() {
                data = summed(&data, self.usage_before.plus(self.usage));
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

    /// A native event's frame (its SSE name kept), with what the stream learns from it.
    fn event_frame(
        &mut self,
        name: Option<String>,
        data: String,
        usage: Option<Value>,
        finish: bool,
    ) -> Bytes {
        self.saw_finish |= finish;
        if let Some(usage) = usage {
            self.usage = Usage::from_value(&usage);
        }
        if let Some(report) = &mut self.report {
            report.sent(&data);
        }
        match name {
            Some(name) => named_frame(&name, &data),
            None => frame(&data),
        }
    }

    /// Pulls what the upstream connection already holds (`UpstreamEvents::pull_at_hand`) while the stream is
    /// plainly forwarding and nothing else waits to be decided.
    async fn pull_at_hand(&mut self) -> bool {
        if self.lease.is_none()
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
        if self.lease.is_none() || self.failed.is_some() || self.held.is_some() {
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
                Some(Part::Event {
                    name,
                    data,
                    usage,
                    finish,
                }) => return Some(self.event_frame(name, data, usage, finish)),
                Some(other) => {
                    self.pending.push_front(other);
                    return None;
                }
                None => {
                    let event = self.upstream.buffered()?;
                    match self.mapper.map_cheap(event) {
                        Ok(Step::Mapped(parts)) => self.pending.extend(parts),
                        Ok(Step::Slow(event)) => {
                            self.held = Some(event);
                            return None;
                        }
                        Err(e) => {
                            self.failed = Some(e);
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
            self.lease.as_ref()?;
            if let Some(e) = self.failed.take() {
                return Some(self.script_failed(e));
            }
            if self.pending.is_empty()
                && let Some(event) = self.held.take()
            {
                match self.mapper.map_slow(event).await {
                    Ok(parts) => self.pending.extend(parts),
                    Err(e) => return Some(self.script_failed(e)),
                }
                continue;
            }
            if let Some(part) = self.pending.pop_front() {
                match part {
                    Part::Done => return Some(self.complete()),
                    Part::Error(error) => {
                        let key = self.lease.as_ref().map(|l| l.key().id.clone());
                        let report = self.upstream_error(&error).await;
                        match self.take_over(key, false, report, "upstream_error").await {
                            Some(frame) => return Some(frame),
                            None => continue,
                        }
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
                    Part::Event {
                        name,
                        data,
                        usage,
                        finish,
                    } => return Some(self.event_frame(name, data, usage, finish)),
                }
            }
            let cut = match self.upstream.next().await {
                Ok(Some(event)) => match self.mapper.map(event).await {
                    Ok(parts) => {
                        self.pending.extend(parts);
                        continue;
                    }
                    Err(e) => return Some(self.script_failed(e)),
                },
                // The answer is complete even though the upstream did not say `[DONE]`.
                Ok(None) if self.saw_finish => return Some(self.complete()),
                Ok(None) => "the upstream stream ended before the answer was complete".to_string(),
                // Ends the stream, never continued; not the key's fault.
                Err(fault @ (StreamFault::ShuttingDown | StreamFault::TooLong)) => {
                    self.lease = None;
                    let (code, why) = match fault {
                        StreamFault::ShuttingDown => (
                            "shutting_down",
                            "keyrelay is shutting down; the answer is incomplete",
                        ),
                        _ => (
                            "stream_too_long",
                            "the stream lasted longer than keyrelay allows (timeouts.stream_total); the answer is incomplete",
                        ),
                    };
                    self.end(Some(code));
                    return Some(error_frame(why, "server_error", code));
                }
                Err(fault) => fault.to_string(),
            };
            // The connection broke or stalled: not the key's fault, and the same key may continue.
            tracing::warn!(stream = %self.label, error = %cut, "upstream stream broke after it started");
            let key = self.lease.take().map(|l| l.key().id.clone());
            let message = format!("upstream stream interrupted: {cut}");
            let report = error_frame(&message, "upstream_error", "stream_interrupted");
            if let Some(frame) = self
                .take_over(key, true, report, "stream_interrupted")
                .await
            {
                return Some(frame);
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
            // Tool calls and reasoning are not plain text: a prefill could not carry them.
            let present = |field: &str| delta.get(field).is_some_and(|v| !v.is_null());
            if [
                "tool_calls",
                "function_call",
                "reasoning_content",
                "reasoning",
            ]
            .iter()
            .any(|f| present(f))
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

    /// After the upstream broke (its key already released): `None` when a continuation took over, and the
    /// stream goes on from it; else `error`, the frame reporting the break, which ends the stream (logged as
    /// `code`).
    async fn take_over(
        &mut self,
        broken: Option<crate::secret::KeyId>,
        transport: bool,
        error: Bytes,
        code: &str,
    ) -> Option<Bytes> {
        if let (Some(resume), Some(key)) = (self.resume.as_mut(), broken) {
            tracing::info!(stream = %self.label, sent = self.answer.len(), "continuing the broken stream");
            let broke = Break {
                text: self.answer.clone(),
                key,
                transport,
            };
            let (resumed, attempts) = resume(broke).await;
            if let Some(report) = &mut self.report {
                report.journal.attempts.extend(attempts);
            }
            if let Some(resumed) = resumed {
                self.continue_with(resumed);
                return None;
            }
        }
        self.end(Some(code));
        Some(error)
    }

    /// Forwards `resumed` from now on, in place of the segment that broke.
    fn continue_with(&mut self, resumed: Resumed) {
        let Resumed {
            started,
            lease,
            label,
            fallback,
        } = resumed;
        if let Some(report) = &mut self.report {
            let j = &mut report.journal;
            j.continued += 1;
            j.key = Some(lease.key().masked.to_string());
            if fallback.is_some() {
                j.fallback = fallback;
            }
        }
        self.upstream = started.events;
        self.upstream.bound(self.closing.as_ref(), self.until);
        self.mapper = started.mapper;
        self.pending = started.pending;
        self.lease = Some(lease);
        self.label = label;
        self.usage_before = self.usage_before.plus(std::mem::take(&mut self.usage));
        self.saw_finish = false;
        self.held = None;
        self.failed = None;
    }

    /// The answer is complete: the serving key is credited with its own segment's tokens.
    fn complete(&mut self) -> Bytes {
        if let Some(mut lease) = self.lease.take() {
            let cost = lease.succeed(self.usage);
            if let Some(report) = &mut self.report {
                report.journal.cost = cost;
            }
        }
        self.end(None);
        frame("[DONE]")
    }

    /// An error the upstream sent mid-stream: judged by the provider's rules, forwarded in OpenAI's shape.
    async fn upstream_error(&mut self, error: &Value) -> Bytes {
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
}

/// An OpenAI chunk with `total` as its usage; as it was should it not be JSON.
fn summed(data: &str, total: Usage) -> String {
    let Ok(mut chunk) = serde_json::from_str::<Value>(data) else {
        return data.to_string();
    };
    match chunk.get_mut("usage") {
        Some(usage) => total.write_into(usage),
        None => return data.to_string(),
    }
    chunk.to_string()
}
