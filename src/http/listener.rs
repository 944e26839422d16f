//! The accept loop: every client connection is counted, bounded in time by its phase (see `conn`), and capped in
//! number. At the cap, the connection most readily closed (see `conn`: one answered without the proxy key first,
//! then one without a request yet, then one waiting on its client, the longest waiting first) is closed to make
//! room, so that connections without the key, silent, dripping or not reading, can never keep a client with the
//! key out; only when every connection has shown the key and is serving a client that reads is a new one refused
//! (logged at most once a minute). Connections answered without the key hold at most half the cap: past it, a
//! new connection replaces one of them even below the cap.
//!
//! Shutdown: stop accepting, close connections without a request at once, let the others finish for the grace
//! period, then tell streams to end (they send an in-band error) and close what is left.

use super::conn::{ConnState, Tracked};
use crate::config::{EdgeLimits, raise_open_file_limit};
use crate::observe::throttle::Throttle;
use axum::Router;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long streams told to end at the end of the grace period get to send their last frame.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// The connection cap: the configured one, or half of what the open-file limit leaves after a reserve (each
/// client connection may need an upstream connection too); a configured one the limit cannot hold is lowered to
/// that (see [`EdgeLimits::connection_cap`]).
pub fn connection_cap(limits: &EdgeLimits) -> usize {
    limits.connection_cap(raise_open_file_limit()).cap
}

struct Entry {
    state: Arc<ConnState>,
    close: Arc<Notify>,
}

impl Entry {
    /// Tells the connection's task to close it.
    fn close(&self) {
        self.state.kill();
        self.close.notify_one();
    }
}

/// The open connections.
struct Registry {
    epoch: Instant,
    cap: usize,
    /// The most connections answered without the proxy key.
    without_key_cap: usize,
    /// How many are (each connection counts itself, see `ConnState`).
    without_key: Arc<AtomicUsize>,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
    /// Notified when the last connection closes.
    empty: Notify,
    refusals: Throttle,
}

impl Registry {
    fn new(cap: usize) -> Self {
        Self {
            epoch: Instant::now(),
            cap,
            without_key_cap: (cap / 2).max(1),
            without_key: Arc::default(),
            next: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            empty: Notify::new(),
            refusals: Throttle::per_minute(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection, closing another to make room when connections without the key hold their
    /// share, or all are taken; `None` when none may be closed.
    fn admit(&self) -> Option<(u64, Arc<ConnState>, Arc<Notify>)> {
        let mut open = self.lock();
        if self.without_key.load(Ordering::Relaxed) >= self.without_key_cap {
            evict(&mut open, true);
        }
        if open.len() >= self.cap && !evict(&mut open, false) {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(self.epoch, self.without_key.clone()));
        let close = Arc::new(Notify::new());
        open.insert(
            id,
            Entry {
                state: state.clone(),
                close: close.clone(),
            },
        );
        Some((id, state, close))
    }

    fn remove(&self, id: u64) {
        let mut open = self.lock();
        if let Some(entry) = open.remove(&id) {
            entry.state.forget();
        }
        if open.is_empty() {
            self.empty.notify_waiters();
        }
    }

    /// Closes one connection to free a file descriptor; false when none may be closed.
    fn evict_one(&self) -> bool {
        evict(&mut self.lock(), false)
    }

    fn close_all(&self) {
        for entry in self.lock().values() {
            entry.close();
        }
    }

    async fn wait_empty(&self) {
        loop {
            let notified = self.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// Removes and closes the connection most readily closed (only among those answered without the key when
/// `without_key`); false when there is none. A connection is claimed before it is closed, so that no request can
/// start on an idle one between the choice and the close.
fn evict(open: &mut HashMap<u64, Entry>, without_key: bool) -> bool {
    // A claim fails only when a request started on the connection since its rank was read, which takes it out
    // of the next choice; the bound is a guard.
    for _ in 0..8 {
        let victim = open
            .iter()
            .filter_map(|(id, e)| Some((e.state.rank()?, *id)))
            .filter(|(rank, _)| !without_key || rank.without_key())
            .min();
        let Some((_, id)) = victim else {
            return false;
        };
        if open[&id].state.claim()
            && let Some(entry) = open.remove(&id)
        {
            entry.state.forget();
            entry.close();
            return true;
        }
    }
    false
}

/// What the server is told from outside.
pub struct Signals {
    /// Stop accepting and wind down.
    pub stop: CancellationToken,
    /// Cancelled when the grace period is over: streams still running end with an in-band error.
    pub closing: CancellationToken,
    pub grace: Duration,
}

/// Serves `app` on `listener` until `signals.stop`, then shuts down as described above.
pub async fn serve(listener: TcpListener, app: Router, limits: EdgeLimits, signals: Signals) {
    let app = super::protect(app);
    let registry = Arc::new(Registry::new(connection_cap(&limits)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    let http = Arc::new(http);
    loop {
        let accepted = tokio::select! {
            _ = signals.stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors: make room by closing a connection, as at the cap.
                let out_of_files = matches!(e.raw_os_error(), Some(23 | 24));
                if out_of_files && registry.evict_one() {
                    // Let the closed connection's task give its descriptor back before accepting again.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else {
                    if registry.refusals.ready().is_some() {
                        tracing::warn!(error = %e, "cannot accept connections");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
        };
        let Some((id, state, close)) = registry.admit() else {
            if let Some(held) = registry.refusals.ready() {
                tracing::warn!(
                    cap = registry.cap,
                    refused_since_last_warning = held,
                    "connection limit reached and every connection is serving a request with the proxy key; refusing new connections (server.max_connections)"
                );
            }
            drop(tcp);
            continue;
        };
        // Stream frames are small and must leave at once: without this, Nagle's algorithm holds each one back
        // until the client acknowledges the previous (40 ms per chunk against a delayed ACK).
        let _ = tcp.set_nodelay(true);
        let task = Connection {
            tcp,
            state,
            close,
            app: app.clone(),
            http: http.clone(),
            limits,
            stop: signals.stop.clone(),
        };
        let registry = registry.clone();
        // Slow work (scripts, token counts, large bodies) takes turns by client: the connection's address.
        let client = crate::offload::Client::of(peer.ip());
        tokio::spawn(crate::offload::serving(client, async move {
            task.run().await;
            registry.remove(id);
        }));
    }
    drop(listener);
    if tokio::time::timeout(signals.grace, registry.wait_empty())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?signals.grace, "in-flight requests did not finish in time; ending them");
        signals.closing.cancel();
        if tokio::time::timeout(LAST_WORDS, registry.wait_empty())
            .await
            .is_err()
        {
            registry.close_all();
        }
    }
}

/// One connection's task.
struct Connection {
    tcp: TcpStream,
    state: Arc<ConnState>,
    close: Arc<Notify>,
    app: Router,
    http: Arc<hyper::server::conn::http1::Builder>,
    limits: EdgeLimits,
    stop: CancellationToken,
}

impl Connection {
    async fn run(self) {
        let io = hyper_util::rt::TokioIo::new(Tracked::new(self.tcp, self.state.clone()));
        let service = super::service::Routed::new(self.app, self.state.clone());
        let conn = self.http.serve_connection(io, service);
        tokio::pin!(conn);
        // This runs at every wake-up of the connection (several per request), so the signals are read as
        // flags; their futures are polled only to register this task's waker with them (again only if it
        // changes), and the watchdog only when it is due.
        let close = self.close.notified();
        let stop = self.stop.cancelled();
        let watchdog = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(close, stop, watchdog);
        let mut registered: Option<std::task::Waker> = None;
        let mut stopping = false;
        std::future::poll_fn(|cx| {
            if registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                let _ = close.as_mut().poll(cx);
                let _ = stop.as_mut().poll(cx);
                let _ = watchdog.as_mut().poll(cx);
                registered = Some(cx.waker().clone());
            }
            if self.state.is_killed() {
                return Poll::Ready(());
            }
            if !stopping && self.stop.is_cancelled() {
                stopping = true;
                if self.state.is_evictable() {
                    return Poll::Ready(());
                }
                conn.as_mut().graceful_shutdown();
            }
            while watchdog.is_elapsed() {
                match self.state.check(&self.limits) {
                    Ok(next) => {
                        watchdog.as_mut().reset(next);
                        let _ = watchdog.as_mut().poll(cx);
                    }
                    Err(why) => {
                        tracing::debug!(?why, "closing a client connection at its time bound");
                        return Poll::Ready(());
                    }
                }
            }
            conn.as_mut().poll(cx).map(|_| ())
        })
        .await
    }
}
