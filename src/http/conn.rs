//! One client connection: which phase it is in, how long that phase may last, and the socket wrapper that tells
//! the phases apart.
//!
//! | phase | begins when | ends when | bound |
//! |---|---|---|---|
//! | idle | accepted, or a response finished | the first byte of a request arrives | `idle_timeout` |
//! | head | that first byte arrives | the request head is complete and routed | `header_timeout` |
//! | active | the request is routed | its response has been sent | the request's own deadline; a client that stops reading its response is closed after `idle_timeout` |
//!
//! Only idle and head connections may be closed to make room for a new one (see `listener`): neither holds a
//! request. The wrapper also rewrites the bare responses hyper writes for request heads it cannot parse (400,
//! 414, 431: an empty body) into keyrelay's JSON error shape, so that every answer a client gets can be read the
//! same way.

use bytes::Bytes;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// `active` once the connection has been chosen to close: no request may start on it any more.
const CLOSING: u32 = u32::MAX;

/// What a connection is doing, shared by its socket wrapper, its service and the listener.
pub(super) struct ConnState {
    epoch: Instant,
    /// Requests routed whose responses are not finished (more than one when a client pipelines); [`CLOSING`]
    /// once the listener chose to close the connection.
    active: AtomicU32,
    /// A response's body has ended, but hyper may still be writing it: set at its end, cleared by the next
    /// flush that reaches the socket.
    flushing: AtomicBool,
    /// With no request active, the first bytes of the next request head have arrived.
    head: AtomicBool,
    /// Milliseconds after `epoch` when the connection last became idle, or started receiving a head.
    since: AtomicU64,
    /// Milliseconds after `epoch` (plus one) when a write first found the socket full; 0 while writes go through.
    blocked: AtomicU64,
    /// The listener wants the connection closed now.
    killed: AtomicBool,
}

/// Why a connection was closed by its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expired {
    Idle,
    Head,
    NotReading,
}

impl ConnState {
    pub(super) fn new(epoch: Instant) -> Self {
        let state = Self {
            epoch,
            active: AtomicU32::new(0),
            flushing: AtomicBool::new(false),
            head: AtomicBool::new(false),
            since: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
            killed: AtomicBool::new(false),
        };
        state.since.store(state.now(), Ordering::Relaxed);
        state
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Bytes arrived: an idle connection starts receiving a request head.
    fn bytes_in(&self) {
        if self.active.load(Ordering::Relaxed) == 0 && !self.head.swap(true, Ordering::Relaxed) {
            self.since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// A request was routed; false when the connection is closing and must not take it.
    pub(super) fn request_started(&self) -> bool {
        let started = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                (a != CLOSING).then(|| a + 1)
            })
            .is_ok();
        self.head.store(false, Ordering::Relaxed);
        started
    }

    /// Its response's body ended (or was abandoned); the connection is idle once hyper has written it out.
    pub(super) fn request_ended(&self) {
        self.flushing.store(true, Ordering::Relaxed);
        let _ = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                (a != CLOSING && a > 0).then(|| a - 1)
            });
    }

    /// Everything written so far reached the socket.
    fn flushed(&self) {
        if self.flushing.load(Ordering::Relaxed) && self.active.load(Ordering::Relaxed) == 0 {
            self.flushing.store(false, Ordering::Relaxed);
            self.blocked.store(0, Ordering::Relaxed);
            self.since.store(self.now(), Ordering::Relaxed);
        }
    }

    fn write_blocked(&self) {
        if self.blocked.load(Ordering::Relaxed) == 0 {
            self.blocked.store(self.now() + 1, Ordering::Relaxed);
        }
    }

    fn write_went_through(&self) {
        if self.blocked.load(Ordering::Relaxed) != 0 {
            self.blocked.store(0, Ordering::Relaxed);
        }
    }

    /// Holds no request and nothing left to write: may be closed to make room, or at shutdown.
    pub(super) fn is_evictable(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0 && !self.flushing.load(Ordering::Relaxed)
    }

    /// Marks the connection closing if it is still evictable; from then on no request starts on it.
    pub(super) fn close_if_idle(&self) -> bool {
        !self.flushing.load(Ordering::Relaxed)
            && self
                .active
                .compare_exchange(0, CLOSING, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub(super) fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    /// When the connection became idle or started its head, for choosing the one to evict (oldest first).
    pub(super) fn since(&self) -> u64 {
        self.since.load(Ordering::Relaxed)
    }

    /// Whether the phase has outlasted its bound, or else when to look again. Phases change without telling
    /// the watchdog, so it looks again at least every `header_timeout`: a bound is then never missed by more
    /// than the time between two looks at it is late, which is none (each look sets the next at its due time).
    pub(super) fn check(&self, limits: &crate::config::EdgeLimits) -> Result<Instant, Expired> {
        let now = self.now();
        let active = self.active.load(Ordering::Relaxed);
        if active == CLOSING {
            return Err(Expired::Idle);
        }
        let (start, bound, why) = if active > 0 || self.flushing.load(Ordering::Relaxed) {
            match self.blocked.load(Ordering::Relaxed) {
                0 => (now, limits.idle_timeout, Expired::NotReading),
                blocked => (blocked - 1, limits.idle_timeout, Expired::NotReading),
            }
        } else if self.head.load(Ordering::Relaxed) {
            (self.since(), limits.header_timeout, Expired::Head)
        } else {
            (self.since(), limits.idle_timeout, Expired::Idle)
        };
        let due = start.saturating_add(bound.as_millis() as u64);
        if now >= due {
            return Err(why);
        }
        let look = due.min(now.saturating_add(limits.header_timeout.as_millis() as u64));
        Ok(self.epoch + Duration::from_millis(look))
    }
}

/// A client socket that reports its phases to [`ConnState`] and rewrites hyper's automatic error responses.
pub(super) struct Tracked<T> {
    io: T,
    state: Arc<ConnState>,
    /// Our version of hyper's automatic error response, still to be written; hyper's bytes are dropped.
    rewrite: Option<Bytes>,
}

impl<T> Tracked<T> {
    pub(super) fn new(io: T, state: Arc<ConnState>) -> Self {
        Self {
            io,
            state,
            rewrite: None,
        }
    }

    /// hyper answers a request head it cannot parse itself, with no request routed: a 400, 414 or 431 head with
    /// an empty body and no content type, which keyrelay's own responses never are.
    fn intercepts(&mut self, first: &[u8]) -> bool {
        if self.rewrite.is_some() {
            return true;
        }
        if !self.state.is_evictable() {
            return false;
        }
        let status = match first.get(..13) {
            Some(b"HTTP/1.1 400 ") => 400,
            Some(b"HTTP/1.1 414 ") => 414,
            Some(b"HTTP/1.1 431 ") => 431,
            _ => return false,
        };
        let head = first
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(first, |end| &first[..end + 2]);
        let has = |needle: &[u8]| {
            head.windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle))
        };
        if !has(b"\r\ncontent-length: 0\r\n") || has(b"\r\ncontent-type:") {
            return false;
        }
        self.rewrite = Some(http_error_response(status));
        true
    }
}

impl<T: AsyncWrite + Unpin> Tracked<T> {
    /// Writes what is left of a rewritten response.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some(rest) = self.rewrite.as_mut().filter(|r| !r.is_empty()) {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let _ = rest.split_to(n);
        }
        Poll::Ready(Ok(()))
    }

    fn track<R>(&self, polled: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        match &polled {
            Poll::Pending => self.state.write_blocked(),
            Poll::Ready(_) => self.state.write_went_through(),
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_in();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.intercepts(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
        if self.intercepts(first) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_rewrite(cx))?;
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            self.state.flushed();
        }
        self.track(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_rewrite(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The JSON answer to a request head that could not be parsed, as a whole HTTP/1.1 response that closes the
/// connection.
fn http_error_response(status: u16) -> Bytes {
    let (reason, code, message) = match status {
        414 => (
            "URI Too Long",
            "uri_too_long",
            "the request URI is longer than this server accepts",
        ),
        431 => (
            "Request Header Fields Too Large",
            "headers_too_large",
            "the request headers are larger than this server accepts",
        ),
        _ => (
            "Bad Request",
            "invalid_http",
            "the request is not valid HTTP/1.1",
        ),
    };
    let status = if matches!(status, 414 | 431) {
        status
    } else {
        400
    };
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": code}})
        .to_string();
    Bytes::from(format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EdgeLimits;

    #[tokio::test(start_paused = true)]
    async fn phases_have_their_own_bounds() {
        let limits = EdgeLimits {
            max_connections: None,
            header_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
        };
        let state = ConnState::new(Instant::now());
        assert!(state.check(&limits).is_ok());
        tokio::time::advance(Duration::from_secs(9)).await;
        state.bytes_in();
        assert!(state.is_evictable());
        tokio::time::advance(Duration::from_secs(1)).await;
        state.bytes_in();
        assert!(
            state.check(&limits).is_ok(),
            "more bytes of the same head do not restart its clock"
        );
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(state.check(&limits), Err(Expired::Head));
        assert!(state.request_started());
        assert!(!state.is_evictable());
        tokio::time::advance(Duration::from_secs(60)).await;
        let next = state.check(&limits).expect("a request may take its time");
        assert!(
            next <= Instant::now() + limits.header_timeout,
            "looked at again soon"
        );
        state.write_blocked();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(state.check(&limits), Err(Expired::NotReading));
        state.write_went_through();
        state.request_ended();
        assert!(!state.is_evictable(), "not until its answer is written out");
        state.flushed();
        assert!(state.is_evictable());
        assert!(state.check(&limits).is_ok());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(state.check(&limits), Err(Expired::Idle));
        assert!(state.close_if_idle());
        assert!(
            !state.request_started(),
            "a closing connection takes no request"
        );
    }

    #[test]
    fn only_hypers_own_error_heads_are_rewritten() {
        let state = Arc::new(ConnState::new(Instant::now()));
        let mut io = Tracked::new(Vec::<u8>::new(), state.clone());
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert!(!io.intercepts(ours));
        let empty_200 = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(!io.intercepts(empty_200));
        let hypers =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        state.request_started();
        assert!(!io.intercepts(hypers), "never while a request is served");
        state.request_ended();
        assert!(
            !io.intercepts(hypers),
            "nor while its answer is written out"
        );
        state.flushed();
        assert!(io.intercepts(hypers));
        assert!(io.intercepts(b"date: y"), "the rest of it is dropped too");
    }

    #[test]
    fn rewritten_errors_are_whole_json_responses() {
        let text = String::from_utf8(http_error_response(431).to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
    }
}
