//! Connections to upstreams: TCP, TLS for `https://` upstreams, and the environment's proxies (`HTTP_PROXY`,
//! `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`): plain HTTP goes to the proxy in absolute form, HTTPS through a
//! `CONNECT` tunnel with TLS end to end.

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The environment variables that name a proxy; with none of them set, no request looks for one.
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The proxies the environment names, read once per process; `None` when it names none.
pub fn env_proxies() -> Option<Arc<Matcher>> {
    static PROXIES: OnceLock<Option<Arc<Matcher>>> = OnceLock::new();
    PROXIES
        .get_or_init(|| {
            let mut named = false;
            for var in PROXY_VARS {
                let Some(value) = std::env::var(var).ok().filter(|v| !v.is_empty()) else {
                    continue;
                };
                named = true;
                // Only the scheme is named: the value may hold credentials.
                if let Some((scheme, _)) = value.split_once("://")
                    && !scheme.eq_ignore_ascii_case("http")
                {
                    tracing::warn!(
                        variable = var,
                        scheme,
                        "only http:// proxies are supported; upstream requests this proxy covers will fail"
                    );
                }
            }
            named.then(|| Arc::new(Matcher::from_env()))
        })
        .clone()
}

/// TLS settings for upstreams: ring, the platform's trust store, HTTP/1.1. Built once per process; an error
/// (no usable trust store) is reported on each `https://` connection instead of stopping the proxy.
fn tls() -> Result<tokio_rustls::TlsConnector, String> {
    static TLS: OnceLock<Result<tokio_rustls::TlsConnector, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        use rustls_platform_verifier::BuilderVerifierExt;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_platform_verifier())
            .map_err(|e| format!("TLS is unavailable: {e}"))?
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    })
    .clone()
}

/// Opens connections for the pooled HTTP client. The connect timeout covers the whole way to a usable
/// connection: name lookup, TCP, the proxy's tunnel and the TLS handshake.
#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector,
    proxies: Option<Arc<Matcher>>,
    timeout: Duration,
}

impl Connector {
    pub fn new(connect_timeout: Duration, proxies: Option<Arc<Matcher>>) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_nodelay(true);
        // An upstream that vanishes without closing is noticed within about a minute even while a body is
        // being read (streams also have their idle timeout).
        tcp.set_keepalive(Some(Duration::from_secs(15)));
        tcp.set_keepalive_interval(Some(Duration::from_secs(15)));
        tcp.set_keepalive_retries(Some(3));
        // This connector only opens the TCP connection; TLS is added on top for https:// upstreams.
        tcp.enforce_http(false);
        Self {
            tcp,
            proxies,
            timeout: connect_timeout,
        }
    }

    async fn connect(self, dst: http::Uri) -> Result<Conn, BoxError> {
        let limit = self.timeout;
        match tokio::time::timeout(limit, self.open(dst)).await {
            Ok(opened) => opened,
            Err(_) => Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no usable connection within {limit:?} (timeouts.connect)"),
            ))),
        }
    }

    async fn open(mut self, dst: http::Uri) -> Result<Conn, BoxError> {
        use tower_service::Service;
        let https = dst.scheme() == Some(&http::uri::Scheme::HTTPS);
        let proxy = self.proxies.as_ref().and_then(|p| p.intercept(&dst));
        let tcp = match proxy {
            None => self.tcp.call(dst.clone()).await?.into_inner(),
            Some(proxy) => {
                let at = proxy.uri().clone();
                if at.scheme() != Some(&http::uri::Scheme::HTTP) {
                    return Err(format!(
                        "the proxy's scheme {:?} is not supported (use an http:// proxy)",
                        at.scheme_str().unwrap_or("")
                    )
                    .into());
                }
                if !https {
                    // Plain HTTP: requests go to the proxy, which forwards them (absolute-form request line).
                    let tcp = self.tcp.call(at).await?.into_inner();
                    return Ok(Conn::Plain {
                        io: TokioIo::new(tcp),
                        proxied: true,
                    });
                }
                let mut tunnel = Tunnel::new(at, self.tcp.clone());
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                tunnel.call(dst.clone()).await?.into_inner()
            }
        };
        if !https {
            return Ok(Conn::Plain {
                io: TokioIo::new(tcp),
                proxied: false,
            });
        }
        let host = dst.host().ok_or("the upstream URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
        let stream = tls()?.connect(name, tcp).await?;
        Ok(Conn::Tls(Box::new(TokioIo::new(stream))))
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(dst))
    }
}

/// A connection to an upstream or to the proxy in front of it.
pub enum Conn {
    Plain {
        io: TokioIo<TcpStream>,
        /// Talking to an HTTP proxy: requests carry the absolute URL.
        proxied: bool,
    },
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain { proxied, .. } => Connected::new().proxy(*proxied),
            Self::Tls(_) => Connected::new(),
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain { io, .. } => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain { io, .. } => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain { io, .. } => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain { io, .. } => io.is_write_vectored(),
            Self::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain { io, .. } => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain { io, .. } => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}
