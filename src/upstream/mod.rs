//! The HTTP client for upstreams: reqwest over rustls (the platform's trust store, see `trust`; HTTP/2 by ALPN,
//! HTTP/1.1 otherwise), with the environment's proxies (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`; `http://`,
//! `https://` and `socks5://` ones), redirects never followed; the upstream URL of a call; bounded reads of
//! bodies; and errors in words that never include the URL (which may carry a key in its query string).
//!
//! Plain `http://` upstreams (local model servers, a pool's own gateways), when no proxy for them is set in the
//! environment, go to hyper's pooled client directly: the client reqwest itself would use for them (HTTP/1.1 over
//! TCP, the same socket settings), without reqwest's per-request layers (its redirect layer and its response
//! each parse the URL again, its retry layer clones the request, its services are cloned per request): about
//! 28,000 instructions of a proxied request, a quarter of it (docs/PERFORMANCE.md).

mod call;
mod trust;
mod url;

pub use url::{path_segment, public_url, upstream_url};

use bytes::Bytes;
pub use call::UpstreamCall;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
pub use trust::{RETRY as TRUST_RETRY, load_trust_anchors};

/// The body of an upstream's response, read as it arrives.
pub type Incoming = reqwest::Body;

/// One client per connect timeout (the client fixes it), built on first use and shared by every provider with
/// that timeout.
#[derive(Default)]
pub struct Clients {
    by_connect_timeout: Mutex<HashMap<Duration, HttpClient>>,
}

impl Clients {
    pub fn get(&self, connect_timeout: Duration) -> HttpClient {
        let mut clients = self
            .by_connect_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        clients
            .entry(connect_timeout)
            .or_insert_with(|| HttpClient::new(connect_timeout))
            .clone()
    }
}

/// A pooled client; cheap to clone. Never follows redirects: a redirect to another host would carry the key (in
/// a header or the query) and the prompt to it.
#[derive(Clone)]
pub struct HttpClient {
    /// An error only when reqwest refuses the settings, which do not change while the process runs.
    inner: Result<reqwest::Client, String>,
    /// For `http://` URLs: hyper's client straight over TCP, when no proxy could apply to them (see `plain`).
    plain: Option<PlainClient>,
    connect_timeout: Duration,
}

type PlainClient = hyper_util::client::legacy::Client<TimedConnector, reqwest::Body>;

impl HttpClient {
    pub fn new(connect_timeout: Duration) -> Self {
        let inner = tls().and_then(|tls| {
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(connect_timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_nodelay(true)
                // An upstream that vanishes without closing is noticed within about a minute even while a body
                // is being read (streams also have their idle timeout).
                .tcp_keepalive(Duration::from_secs(15))
                .tcp_keepalive_interval(Duration::from_secs(15))
                .tcp_keepalive_retries(3)
                .build()
                .map_err(|e| format!("the HTTP client cannot start: {}", e.without_url()))
        });
        Self {
            inner,
            plain: plain(connect_timeout),
            connect_timeout,
        }
    }

    /// Sends `request` and returns the response once its head has arrived.
    pub async fn send(
        &self,
        request: reqwest::Request,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let client = self.inner.as_ref().map_err(|why| UpstreamError {
            message: why.clone(),
            timed_out: false,
            unanswered: false,
            blameless: true,
        })?;
        if let Some(plain) = self
            .plain
            .as_ref()
            .filter(|_| request.url().scheme() == "http")
        {
            return self.send_plain(plain, request).await;
        }
        // Without trust anchors, an HTTPS request fails here, before connecting: nothing about the key.
        if request.url().scheme() == "https" {
            trust::ready().await.map_err(|why| UpstreamError {
                message: why,
                timed_out: false,
                unanswered: false,
                blameless: true,
            })?;
        }
        match client.execute(request).await {
            Ok(response) => Ok(response.into()),
            Err(e) if e.is_connect() && e.is_timeout() => {
                Err(UpstreamError::no_connection(self.connect_timeout))
            }
            Err(e) if e.is_connect() => Err(UpstreamError::from_reqwest("connection failed", e)),
            Err(e) => Err(UpstreamError::from_reqwest("request failed", e)),
        }
    }
}

impl HttpClient {
    /// `send` for a plain-HTTP URL over hyper's client: the same request, response and error words as through
    /// reqwest (whose errors wrap the same hyper errors).
    async fn send_plain(
        &self,
        plain: &PlainClient,
        request: reqwest::Request,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let request = http::Request::<reqwest::Body>::try_from(request)
            .map_err(|e| UpstreamError::from_reqwest("request failed", e))?;
        match plain.request(request).await {
            Ok(response) => Ok(response.map(reqwest::Body::wrap)),
            Err(e) if e.is_connect() && timed_out(&e) => {
                Err(UpstreamError::no_connection(self.connect_timeout))
            }
            Err(e) => {
                let kind = if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                Err(UpstreamError::describe(kind, &e, timed_out(&e)))
            }
        }
    }
}

/// hyper's client for plain-HTTP upstreams, set as reqwest sets its own (TCP_NODELAY, keepalive, connect
/// timeout, idle pool); `None` when the environment names a proxy that could apply to an `http://` URL
/// (`HTTP_PROXY`, `ALL_PROXY`, in either case), whose requests reqwest then carries.
fn plain(connect_timeout: Duration) -> Option<PlainClient> {
    let proxied = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    if proxied {
        return None;
    }
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(15)));
    http.set_keepalive_interval(Some(Duration::from_secs(15)));
    http.set_keepalive_retries(Some(3));
    let connector = TimedConnector {
        http,
        within: connect_timeout,
    };
    Some(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector),
    )
}

/// Whether `e` or a cause of it is a timeout, as reqwest's `is_timeout` judges.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || s.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// The TCP connector with the whole connection (name lookup included) bounded by the connect timeout, as
/// reqwest bounds it.
#[derive(Clone)]
struct TimedConnector {
    http: hyper_util::client::legacy::connect::HttpConnector,
    within: Duration,
}

impl tower_service::Service<http::Uri> for TimedConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let connecting = self.http.call(dst);
        let within = self.within;
        Box::pin(async move {
            match tokio::time::timeout(within, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no connection within the connect timeout",
                )
                .into()),
            }
        })
    }
}

/// TLS settings for upstreams: ring, the trust anchors of `trust` (loaded at start, read again while they fail),
/// HTTP/2 or HTTP/1.1.
fn tls() -> Result<rustls::ClientConfig, String> {
    let mut config = rustls::ClientConfig::builder_with_provider(trust::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS is unavailable: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(trust::verifier())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Why an upstream request or its body failed, in words.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    pub message: String,
    pub timed_out: bool,
    /// The connection closed before any response came.
    pub unanswered: bool,
    /// Nothing was sent, for a reason that is keyrelay's own (no TLS trust anchors): no key is to blame.
    pub blameless: bool,
}

impl UpstreamError {
    /// No connection could be made within `timeouts.connect`.
    fn no_connection(within: Duration) -> Self {
        Self {
            message: format!(
                "timed out: no usable connection within {within:?} (timeouts.connect)"
            ),
            timed_out: true,
            unanswered: false,
            blameless: false,
        }
    }

    /// `kind` with the cause of a reqwest error, its URL left out.
    fn from_reqwest(kind: &str, e: reqwest::Error) -> Self {
        let timed_out = e.is_timeout();
        Self::describe(kind, &e.without_url(), timed_out)
    }

    /// `kind` with the innermost cause of `e` (the most specific), and whether it or anything on the way timed
    /// out.
    fn describe(kind: &str, e: &(dyn std::error::Error + 'static), mut timed_out: bool) -> Self {
        let mut unanswered = false;
        let mut detail = None;
        let mut source = e.source();
        while let Some(s) = source {
            if s.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            {
                timed_out = true;
            }
            if s.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_incomplete_message)
            {
                unanswered = true;
            }
            detail = Some(s);
            source = s.source();
        }
        let kind = if timed_out { "timed out" } else { kind };
        Self {
            message: format!("{kind}: {}", detail.unwrap_or(e)),
            timed_out,
            unanswered,
            blameless: false,
        }
    }

    /// A body that broke off: the upstream had answered.
    fn body(e: reqwest::Error) -> Self {
        Self {
            unanswered: false,
            ..Self::from_reqwest("the response body broke off", e)
        }
    }
}

/// Why a whole body could not be had.
#[derive(Debug)]
pub enum ReadError {
    /// It is longer than the limit; the connection is dropped rather than drained.
    TooLarge {
        limit: usize,
    },
    Broken(UpstreamError),
}

/// The whole body, if it is at most `limit` bytes (judged by its declared length first, then as it arrives).
pub async fn read_limited(
    response: http::Response<Incoming>,
    limit: usize,
) -> Result<Bytes, ReadError> {
    let declared = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge { limit });
    }
    let mut body = response.into_body();
    let mut out = bytes::BytesMut::with_capacity(declared.map_or(8 << 10, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Broken(UpstreamError::body(e)))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if out.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge { limit });
        }
        if out.is_empty() && body.is_end_stream() {
            return Ok(chunk);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// The start of a body, up to `cap` bytes; a broken body yields what arrived.
pub async fn read_capped(mut body: Incoming, cap: usize) -> Bytes {
    let mut out = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let room = cap - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    out.into()
}

/// Polls for the next piece of a body: `None` at its end (trailers are skipped).
pub fn poll_chunk(
    body: &mut Incoming,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Option<Result<Bytes, UpstreamError>>> {
    use hyper::body::Body;
    use std::task::Poll;
    loop {
        return match std::pin::Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(data))),
                Err(_trailers) => continue,
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(UpstreamError::body(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_cause_and_timeouts() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Outer(#[source] std::io::Error);
        let e = UpstreamError::describe("connection failed", &Outer(io), false);
        assert!(e.timed_out);
        assert_eq!(e.message, "timed out: slow");
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = UpstreamError::describe("connection failed", &Outer(refused), false);
        assert!(!e.timed_out);
        assert_eq!(e.message, "connection failed: refused");
    }
}
