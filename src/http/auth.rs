//! The proxy key: required on `/v1/*` and `/metrics` when one is configured, as `Authorization: Bearer` (the
//! scheme in any case, then spaces or tabs) or `x-api-key`, compared in constant time. A request that passes proves
//! its connection (see `conn`): connections that never showed the key are the first closed to make room.

use super::{ApiError, AppState, Shape};
use axum::extract::Request;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

/// Requires the proxy key (as `Authorization: Bearer` or `x-api-key`) when one is configured: a layer that
/// checks the headers and either calls the route or answers 401 (no boxing or cloning per request, as a
/// `from_fn` middleware would).
#[derive(Clone)]
pub(super) struct RequireKey(pub(super) AppState, pub(super) Shape);

impl<S> tower_layer::Layer<S> for RequireKey {
    type Service = KeyChecked<S>;

    fn layer(&self, inner: S) -> KeyChecked<S> {
        KeyChecked {
            inner,
            app: self.0.clone(),
            shape: self.1,
        }
    }
}

#[derive(Clone)]
pub(super) struct KeyChecked<S> {
    inner: S,
    app: AppState,
    /// The error shape of the routes it guards.
    shape: Shape,
}

impl<S> tower_service::Service<Request> for KeyChecked<S>
where
    S: tower_service::Service<Request, Response = Response, Error = std::convert::Infallible>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<Response, std::convert::Infallible>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match refusal(&self.app, request.headers()) {
            None => {
                if let Some(unproven) = request.extensions().get::<super::service::Unproven>() {
                    unproven.prove();
                }
                futures_util::future::Either::Left(self.inner.call(request))
            }
            Some(refused) => futures_util::future::Either::Right(std::future::ready(Ok(refused
                .shaped(self.shape)
                .into_response()))),
        }
    }
}

/// The 401 for a request without the right proxy key; `None` when it may pass.
pub(super) fn refusal(app: &AppState, headers: &HeaderMap) -> Option<ApiError> {
    let snapshot = app.relay.snapshot();
    let expected = snapshot.proxy_key.as_ref()?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches(WHITESPACE));
    match bearer.or(api_key) {
        None => Some(ApiError::unauthorized(
            "missing proxy key: send it as `Authorization: Bearer <PROXY_API_KEY>` or `x-api-key: <PROXY_API_KEY>`",
        )),
        Some(given) if expected.matches(given) => None,
        Some(_) => Some(ApiError::unauthorized("the proxy key is wrong")),
    }
}

/// Spaces and tabs, which HTTP allows around a header value and between an auth scheme and its token.
const WHITESPACE: [char; 2] = [' ', '\t'];

/// The token of an `Authorization: Bearer <token>` value: the scheme in any case (RFC 9110 §11.1), then one or more
/// spaces or tabs; `None` for another scheme or an empty token.
fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim_matches(WHITESPACE);
    let (scheme, token) = value.split_once(WHITESPACE)?;
    let token = token.trim_matches(WHITESPACE);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_in_any_case_and_any_whitespace() {
        for value in [
            "Bearer k-1",
            "bearer k-1",
            "BEARER k-1",
            "BeArEr k-1",
            "Bearer\tk-1",
            "Bearer  \t k-1 ",
            " Bearer k-1",
        ] {
            assert_eq!(bearer_token(value), Some("k-1"), "{value:?}");
        }
        for value in ["Bearer", "Bearer ", "Basic k-1", "Bearerk-1", "k-1", ""] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
