//! One client connection: which phase it is in, how long that phase may last, whether it has shown the proxy key,
//! and the socket wrapper that tells the phases apart.
//!
//! | phase | begins when | ends when | bound |
//! |---|---|---|---|
//! | idle | accepted, or a response finished | the first byte of a request arrives | `idle_timeout` |
//! | head | that first byte arrives | the request head is complete and routed | `header_timeout` |
//! | active | the request is routed | its response has been sent | the request's own deadline |
//! | blocked | a write finds the socket full (the client does not read) | a write goes through | `write_timeout` |
//!
//! Who is on the other end, as far as keyrelay can tell: a connection is *fresh* until a request on it is answered,
//! *proven* once a request on it has passed the proxy-key check (any request on `/v1/*` or `/metrics` does when
//! no key is configured), and *without the key* once a request on it was answered without passing it (liveness,
//! the dashboard, a refusal: all that can be had without the key). A client with the key sends it with its first
//! request, so it is never without the key. The listener closes connections to make room, most readily first, and
//! within each class the one waiting longest first:
//!
//! 1. without the key and blocked;
//! 2. without the key;
//! 3. fresh (silent, or dripping its first head);
//! 4. proven, idle or receiving a head;
//! 5. proven and blocked.
//!
//! A proven connection serving a client that reads is never closed to make room. Connections without the key are
//! counted, for the listener's share. While a connection is blocked, nothing more is read from it: pipelined
//! requests wait in the socket.
//!
//! The wrapper also rewrites the bare responses hyper writes for request heads it cannot parse (400, 414, 431: an
//! empty body) into keyrelay's JSON error shape, so that every answer a client gets can be read the same way.

use bytes::Bytes;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
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
    /// [`FRESH`], [`WITHOUT_KEY`], [`PROVEN`] or [`GONE`].
    trust: AtomicU8,
    /// The listener's count of connections without the key (this one while it is).
    without_key: Arc<AtomicUsize>,
}

/// What is known of the client (see the module's documentation): no request answered yet; one answered without
/// the key, and none passed the key check; one passed it; no longer counted by the listener.
const FRESH: u8 = 0;
const WITHOUT_KEY: u8 = 1;
const PROVEN: u8 = 2;
const GONE: u8 = 3;

/// Eviction classes, most readily closed first (see the module's documentation).
const KEYLESS_BLOCKED: u8 = 0;
const KEYLESS: u8 = 1;
const NEW: u8 = 2;
const PROVEN_WAITING: u8 = 3;
const PROVEN_BLOCKED: u8 = 4;

/// How readily a connection is closed to make room: ordered by class, then by how long it has been waiting
/// (the earliest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Rank {
    class: u8,
    since: u64,
}

impl Rank {
    /// A request on the connection was answered without the proxy key.
    pub(super) fn without_key(&self) -> bool {
        self.class < NEW
    }
}

/// Why a connection was closed by its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expired {
    Idle,
    Head,
    NotReading,
}

impl ConnState {
    /// A new connection; `without_key` counts the listener's connections without the key.
    pub(super) fn new(epoch: Instant, without_key: Arc<AtomicUsize>) -> Self {
        let state = Self {
            epoch,
            active: AtomicU32::new(0),
            flushing: AtomicBool::new(false),
            head: AtomicBool::new(false),
            since: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            trust: AtomicU8::new(FRESH),
            without_key,
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

    /// A write is waiting for the client to read.
    fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed) != 0
    }

    /// A request on the connection passed the proxy-key check.
    pub(super) fn prove(&self) {
        let before = self
            .trust
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t == FRESH || t == WITHOUT_KEY).then_some(PROVEN)
            });
        if before == Ok(WITHOUT_KEY) {
            self.without_key.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn is_proven(&self) -> bool {
        self.trust.load(Ordering::Relaxed) == PROVEN
    }

    /// A request was answered (its response is ready to be written) and the connection is not proven: the
    /// request did not pass the key check.
    pub(super) fn answered_without_key(&self) {
        if self
            .trust
            .compare_exchange(FRESH, WITHOUT_KEY, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.without_key.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The listener no longer counts the connection (it closed, or was chosen to close).
    pub(super) fn forget(&self) {
        if self.trust.swap(GONE, Ordering::Relaxed) == WITHOUT_KEY {
            self.without_key.fetch_sub(1, Ordering::Relaxed);
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

    /// How readily the connection may be closed to make room; `None` when it may not be (proven, and serving a
    /// client that reads, or already closing).
    pub(super) fn rank(&self) -> Option<Rank> {
        let active = self.active.load(Ordering::Relaxed);
        if active == CLOSING {
            return None;
        }
        let blocked = self.blocked.load(Ordering::Relaxed);
        let idle = active == 0 && !self.flushing.load(Ordering::Relaxed);
        let since = self.since();
        let (class, since) = match self.trust.load(Ordering::Relaxed) {
            WITHOUT_KEY if blocked != 0 && !idle => (KEYLESS_BLOCKED, blocked - 1),
            WITHOUT_KEY => (KEYLESS, since),
            PROVEN if idle => (PROVEN_WAITING, since),
            PROVEN if blocked != 0 => (PROVEN_BLOCKED, blocked - 1),
            PROVEN => return None,
            _ => (NEW, since),
        };
        Some(Rank { class, since })
    }

    /// Claims the connection for closing if it may still be closed to make room: an idle one is marked closing
    /// (no request starts on it any more); one holding a request only when it is not proven, or blocked on a
    /// client that does not read.
    pub(super) fn claim(&self) -> bool {
        self.close_if_idle() || !self.is_proven() || self.is_blocked()
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
    /// the watchdog, so it looks again at least every `header_timeout` (or `write_timeout`, when shorter): a bound
    /// is then never missed, since each look sets the next at its due time.
    pub(super) fn check(&self, limits: &crate::config::EdgeLimits) -> Result<Instant, Expired> {
        let now = self.now();
        let active = self.active.load(Ordering::Relaxed);
        if active == CLOSING {
            return Err(Expired::Idle);
        }
        let (start, bound, why) = if active > 0 || self.flushing.load(Ordering::Relaxed) {
            match self.blocked.load(Ordering::Relaxed) {
                // Serving a client that reads: the request's own deadline bounds it.
                0 => (now, limits.write_timeout, Expired::NotReading),
                blocked => (blocked - 1, limits.write_timeout, Expired::NotReading),
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
        let every = limits.header_timeout.min(limits.write_timeout);
        let look = due.min(now.saturating_add(every.as_millis() as u64));
        Ok(self.epoch + Duration::from_millis(look))
    }
}

/// A client socket that reports its phases to [`ConnState`] and rewrites hyper's automatic error responses.
pub(super) struct Tracked<T> {
    io: T,
    state: Arc<ConnState>,
    /// Our version of hyper's automatic error response, still to be written; hyper's bytes are dropped.
    rewrite: Option<Bytes>,
    /// A read put off while a write was blocked: woken when a write goes through.
    read_waiting: Option<Waker>,
}

impl<T> Tracked<T> {
    pub(super) fn new(io: T, state: Arc<ConnState>) -> Self {
        Self {
            io,
            state,
            rewrite: None,
            read_waiting: None,
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

    fn track<R>(&mut self, polled: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        match &polled {
            Poll::Pending => self.state.write_blocked(),
            Poll::Ready(_) => {
                self.state.write_went_through();
                if let Some(reader) = self.read_waiting.take() {
                    reader.wake();
                }
            }
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
        // Nothing more is read from a client that does not read its answer (its pipelined requests stay in the
        // socket): the read is tried again once a write goes through.
        if self.state.is_blocked() {
            self.read_waiting = Some(cx.waker().clone());
            return Poll::Pending;
        }
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
            write_timeout: Duration::from_secs(3),
        };
        let state = ConnState::new(Instant::now(), Default::default());
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
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(state.check(&limits).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
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

    #[tokio::test(start_paused = true)]
    async fn connections_without_the_key_are_closed_first_and_readers_never() {
        let without_key = Arc::new(AtomicUsize::new(0));
        let epoch = Instant::now();
        let fresh = ConnState::new(epoch, without_key.clone());
        let keyless = ConnState::new(epoch, without_key.clone());
        let proven = ConnState::new(epoch, without_key.clone());
        assert!(proven.request_started());
        proven.prove();
        proven.answered_without_key();
        assert_eq!(proven.rank(), None, "serving a client that reads");
        proven.write_blocked();
        assert!(keyless.request_started());
        keyless.answered_without_key();
        keyless.answered_without_key();
        assert_eq!(without_key.load(Ordering::Relaxed), 1, "counted once");
        let [k, f, p] = [&keyless, &fresh, &proven].map(|c| c.rank().unwrap());
        assert!(k.without_key() && !f.without_key() && !p.without_key());
        assert!(k < f && f < p, "{k:?} {f:?} {p:?}");
        keyless.write_blocked();
        assert!(keyless.rank().unwrap() < k, "blocked before waiting");
        assert!(keyless.claim(), "closed while serving: it has no key");
        proven.write_went_through();
        assert!(!proven.claim());
        keyless.prove();
        assert_eq!(without_key.load(Ordering::Relaxed), 0, "a key shown later");
        fresh.answered_without_key();
        fresh.forget();
        fresh.prove();
        assert_eq!(without_key.load(Ordering::Relaxed), 0);
        assert!(!fresh.is_proven(), "forgotten for good");
    }

    #[test]
    fn only_hypers_own_error_heads_are_rewritten() {
        let state = Arc::new(ConnState::new(Instant::now(), Default::default()));
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
