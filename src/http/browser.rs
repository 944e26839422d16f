//! Browsers: CORS for web chat interfaces, and the guards of a proxy without a key.
//!
//! With a proxy key, any origin may call keyrelay from a browser by default (no credentials: the key is a bearer
//! token the page sends itself), or only the `cors.origins` configured. Preflights are answered before the key
//! check, since browsers never send credentials in them.
//!
//! Without a proxy key (allowed on loopback only), every web page the user opens could otherwise spend the pool
//! through `localhost`. So CORS is off unless origins are configured, and three guards refuse what a page can
//! send without CORS: a request whose `Origin` is neither allowed nor keyrelay's own, a `POST` whose body is not
//! declared `application/json` (the only kind a page cannot send without a preflight), and a `Host` that is not
//! a loopback name (DNS rebinding: a page's own domain resolved to 127.0.0.1).

use super::{ApiError, AppState};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Whether pages of `origin` may call keyrelay.
fn allowed(state: &AppState, origin: &[u8]) -> bool {
    let snapshot = state.relay.snapshot();
    match &snapshot.settings.cors_origins {
        Some(origins) => origins
            .iter()
            .any(|o| o == "*" || o.as_bytes().eq_ignore_ascii_case(origin)),
        None => snapshot.proxy_key.is_some(),
    }
}

/// The browser layer: the guards of a proxy without a key, then CORS. A request without `Origin` (every API
/// client) passes through untouched, at the cost of one header lookup; the state it holds is one `Arc`, since
/// axum clones a route's layers for every request.
#[derive(Clone)]
pub(super) struct Browser(pub(super) AppState);

impl<S> tower_layer::Layer<S> for Browser {
    type Service = BrowserService<S>;

    fn layer(&self, inner: S) -> BrowserService<S> {
        BrowserService {
            inner,
            app: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct BrowserService<S> {
    inner: S,
    app: AppState,
}

type Answer = Result<Response, std::convert::Infallible>;

impl<S> tower_service::Service<Request> for BrowserService<S>
where
    S: tower_service::Service<Request, Response = Response, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        S::Future,
        std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use futures_util::future::Either;
        let answer = |response: Response| -> Self::Future {
            Either::Right(Box::pin(std::future::ready(Ok(response))))
        };
        if self.app.relay.snapshot().proxy_key.is_none()
            && let Some(refused) = refusal(&self.app, request.method(), request.headers())
        {
            return answer(refused.into_response());
        }
        let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
            return Either::Left(self.inner.call(request));
        };
        let allow = allowed(&self.app, origin.as_bytes());
        let preflight = request.method() == Method::OPTIONS
            && request
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            // Answered here, before the key check: browsers never send credentials in a preflight.
            let mut response = StatusCode::OK.into_response();
            let h = response.headers_mut();
            h.insert(header::VARY, HeaderValue::from_static(PREFLIGHT_VARY));
            if allow {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("GET,POST"),
                );
                // `Authorization` is never covered by a wildcard: the headers asked for are allowed by name.
                if let Some(asked) = request
                    .headers()
                    .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                {
                    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
                }
                h.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static("600"),
                );
            }
            return answer(response);
        }
        let call = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let mut response = call.await?;
            let h = response.headers_mut();
            h.append(header::VARY, HeaderValue::from_static("origin"));
            if allow {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                // Every response header, `x-keyrelay-*`, `x-upstream-*` and `retry-after` included: without
                // credentials the wildcard is honoured.
                h.insert(
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static("*"),
                );
            }
            Ok(response)
        }))
    }
}

const PREFLIGHT_VARY: &str =
    "origin, access-control-request-method, access-control-request-headers";

/// Why a request to a proxy without a key is refused, if it is.
fn refusal(app: &AppState, method: &Method, headers: &HeaderMap) -> Option<ApiError> {
    let forbidden = |code: &'static str, message: String| {
        Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            code,
            message,
        ))
    };
    let host = headers.get(header::HOST).map(HeaderValue::as_bytes);
    if let Some(host) = host
        && !loopback_name(host)
    {
        return forbidden(
            "host_not_allowed",
            "without PROXY_API_KEY keyrelay answers only requests addressed to a loopback name such as localhost \
             or 127.0.0.1 (this guards against DNS rebinding); set PROXY_API_KEY to serve other names"
                .into(),
        );
    }
    if let Some(origin) = headers.get(header::ORIGIN).map(HeaderValue::as_bytes)
        && !allowed(app, origin)
        && !host.is_some_and(|h| same_origin(origin, h))
    {
        return forbidden(
            "origin_not_allowed",
            format!(
                "without PROXY_API_KEY, web pages may call keyrelay only from the origins in cors.origins; {} is not one",
                String::from_utf8_lossy(origin)
            ),
        );
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if method == Method::POST && !json {
        return Some(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json` (required while PROXY_API_KEY is unset)",
        ));
    }
    None
}

/// `localhost`, a name under `.localhost`, or a loopback address, with or without a port.
fn loopback_name(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A page keyrelay served itself (the dashboard) calling back: `Origin` is `http://` and the request's `Host`.
fn same_origin(origin: &[u8], host: &[u8]) -> bool {
    origin
        .strip_prefix(b"http://")
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_with_and_without_ports() {
        for host in [
            "localhost",
            "localhost:8000",
            "LOCALHOST.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.8.9.10:8000",
            "[::1]:8000",
            "[::1]",
        ] {
            assert!(loopback_name(host.as_bytes()), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8000",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]:80",
            "",
            "0.0.0.0:8000",
        ] {
            assert!(!loopback_name(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn same_origin_is_keyrelays_own_page() {
        assert!(same_origin(b"http://127.0.0.1:8000", b"127.0.0.1:8000"));
        assert!(!same_origin(b"http://127.0.0.1:8001", b"127.0.0.1:8000"));
        assert!(!same_origin(b"https://evil.example", b"127.0.0.1:8000"));
    }
}
