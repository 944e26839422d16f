//! The client-facing stream: forwards an upstream stream after its first parts were seen, and reports the
//! request when it ends.

use super::frame::{error_frame, frame, upstream_error_frame};
use super::mapper::Mapper;
use super::peek::Usage;
use super::sse::SseEvent;
use super::{Continuer, Part, SseBody, Started, StreamFault, UpstreamEvents};
use crate::clock::Clock;
use crate::keys::Lease;
use crate::observe::{Journal, Observer};
use crate::script::ScriptError;
use crate::spec::{ErrorClass, Verdict};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
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
