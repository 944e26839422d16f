//! Reading an upstream's SSE events: the body as it arrives, parsed, with a watchdog for silence and a way to
//! take what the connection already holds without waiting.

use super::StreamFault;
use crate::sse::{SseEvent, SseParser};
use crate::upstream::UpstreamError;
use bytes::Bytes;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How many times `pull_at_hand` polls the body, yielding between polls. Under load (64 streams) one yield was
/// rarely enough for the connection's task to run (13 writes per 12-event stream, as without pulling); three
/// brought it to 3 writes and cut keyrelay's CPU per stream by 30%; more changed nothing.
const PULL_TURNS: u32 = 4;

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
    closing: Option<Closing>,
    /// When the stream must end, whatever comes (`timeouts.stream_total`).
    until: Option<Instant>,
    /// Masks the pool's keys in the events; `None` when there is no key to look for.
    mask: Option<super::mask::StreamMask>,
    /// A fault met while masked events were still held: reported after them.
    fault: Option<StreamFault>,
}

impl UpstreamEvents {
    /// The events of `body`, every key of `pool` masked in them.
    pub fn new(
        body: crate::upstream::Incoming,
        idle: Duration,
        pool: std::sync::Arc<crate::secret::Redactor>,
    ) -> Self {
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
            until: None,
            mask: super::mask::StreamMask::new(pool),
            fault: None,
        }
    }

    /// Ends the reading when `closing` is cancelled, or at `until`.
    pub(super) fn bound(
        &mut self,
        closing: Option<&tokio_util::sync::CancellationToken>,
        until: Option<Instant>,
    ) {
        self.closing = closing.map(Closing::new);
        self.until = until;
        if let Some(until) = until
            && until < self.watchdog.deadline()
        {
            self.watchdog.as_mut().reset(until);
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
        if self.until.is_some_and(|until| self.waiting_since >= until) {
            return Err(StreamFault::TooLong);
        }
        std::future::poll_fn(|cx| {
            if let Poll::Ready(item) = crate::upstream::poll_chunk(&mut self.body, cx) {
                return Poll::Ready(Ok(item));
            }
            if let Some(closing) = &mut self.closing
                && closing.is_due(cx)
            {
                return Poll::Ready(Err(StreamFault::ShuttingDown));
            }
            while self.watchdog.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                if let Some(until) = self.until
                    && now >= until
                {
                    return Poll::Ready(Err(StreamFault::TooLong));
                }
                let due = after(self.waiting_since, self.idle);
                if now >= due {
                    return Poll::Ready(Err(StreamFault::Stalled(self.idle)));
                }
                self.watchdog
                    .as_mut()
                    .reset(self.until.map_or(due, |until| until.min(due)));
            }
            Poll::Pending
        })
        .await
    }

    /// The next event if one is complete in what has been read already; never waits. A parser error is kept for
    /// `next` to report.
    pub(super) fn buffered(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.mask.as_mut().and_then(|m| m.pop()) {
                return Some(event);
            }
            if self.oversized {
                return None;
            }
            let event = self.parser.next_event().unwrap_or_else(|_| {
                self.oversized = true;
                None
            })?;
            match &mut self.mask {
                Some(mask) => mask.push(event),
                None => return Some(event),
            }
        }
    }

    /// The next event, `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, StreamFault> {
        loop {
            if let Some(event) = self.mask.as_mut().and_then(|m| m.pop()) {
                return Ok(Some(event));
            }
            if let Some(fault) = self.fault.take() {
                return Err(fault);
            }
            let read = self.read_event().await;
            match (read, &mut self.mask) {
                (Ok(Some(event)), Some(mask)) => mask.push(event),
                (Ok(None), Some(mask)) => {
                    mask.finish();
                    match mask.pop() {
                        Some(event) => return Ok(Some(event)),
                        None => return Ok(None),
                    }
                }
                // Events held for masking go first, masked as far as they can be.
                (Err(fault), Some(mask)) => {
                    mask.finish();
                    self.fault = Some(fault);
                }
                (read, None) => return read,
            }
        }
    }

    /// The next event as the upstream sent it, `None` at the end of the stream.
    async fn read_event(&mut self) -> Result<Option<SseEvent>, StreamFault> {
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

/// A shutdown signal a stream waits on. Read as a flag at every wait; its future is polled only to register the
/// stream's waker with it (again only if the waker changes), since reads wait once per chunk.
struct Closing {
    token: tokio_util::sync::CancellationToken,
    wait: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    waker: Option<std::task::Waker>,
}

impl Closing {
    fn new(closing: &tokio_util::sync::CancellationToken) -> Self {
        Self {
            token: closing.clone(),
            wait: Box::pin(closing.clone().cancelled_owned()),
            waker: None,
        }
    }

    fn is_due(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if self.token.is_cancelled() {
            return true;
        }
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let _ = self.wait.as_mut().poll(cx);
            self.waker = Some(cx.waker().clone());
        }
        false
    }
}

/// `at + wait`, or far in the future when that does not fit in an `Instant`.
fn after(at: Instant, wait: Duration) -> Instant {
    at.checked_add(wait)
        .unwrap_or_else(|| at + Duration::from_secs(30 * 365 * 24 * 3600))
}
