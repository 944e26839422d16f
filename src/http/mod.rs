//! The inbound HTTP API: the connections it accepts (`listener`, `conn`), routes, proxy-key authentication, body
//! limits, and rendering replies and errors.
//!
//! Layers, outermost first: connection bounds and the rewrite of hyper's own parse errors (`conn`), a panic
//! catcher that answers 500 in the API's error shape, the guards of a proxy without a key and CORS (`browser`),
//! the proxy-key check on `/v1/*` and `/metrics` (liveness at `/` stays open), then the handlers, which read the body themselves so that an oversized, slow or malformed one
//! gets an OpenAI-shaped 413, 408 or 400.

mod auth;
mod body;
mod browser;
mod completions;
mod conn;
mod error;
mod listener;
mod messages;
mod responses;
mod service;
mod status;

use crate::relay::{Endpoint, Relay, Reply, Served};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use auth::RequireKey;
use body::json_body;
pub use error::{ApiError, Shape};
pub use listener::{Signals, connection_cap, serve};
use serde_json::{Value, json};
use status::{dashboard, key_action, keys, liveness, metrics, providers};
use std::time::Instant;

/// What the handlers share. One `Arc`: axum clones the state for every request, and each reference count
/// touched is a cache line the two cores pass back and forth.
#[derive(Clone)]
pub struct AppState(std::sync::Arc<App>);

pub struct App {
    pub relay: Relay,
    pub started: Instant,
    /// Present when the configuration is live-reloaded; `GET /` reports its status.
    pub reloader: Option<std::sync::Arc<crate::reload::Reloader>>,
    pub metrics: std::sync::Arc<crate::observe::metrics::Metrics>,
    /// What `previous_response_id` continues (OpenAI Responses translated to chat).
    pub conversations: std::sync::Arc<crate::conversations::Conversations>,
}

impl AppState {
    pub fn new(app: App) -> Self {
        Self(std::sync::Arc::new(app))
    }
}

impl std::ops::Deref for AppState {
    type Target = App;

    fn deref(&self) -> &App {
        &self.0
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/chat/completions", post(chat))
        .route("/embeddings", post(embeddings))
        .route("/completions", post(completions::completions))
        .route("/responses", post(responses::responses))
        .route("/models", get(models))
        .route("/models/{*id}", get(model))
        .route("/providers", get(providers))
        .route("/token-count", post(token_count))
        .route("/keys", get(keys))
        .route("/keys/{id}/{action}", post(key_action))
        .route_layer(RequireKey(state.clone(), Shape::OpenAi));
    let anthropic = Router::new()
        .route("/messages", post(messages::messages))
        .route("/messages/count_tokens", post(messages::count_tokens))
        .route_layer(RequireKey(state.clone(), Shape::Anthropic));
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(RequireKey(state.clone(), Shape::OpenAi));
    Router::new()
        .route("/", get(liveness))
        .route("/dashboard", get(dashboard))
        .merge(metrics)
        .nest("/v1", api.merge(anthropic))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(browser::Browser(state.clone()))
        .with_state(state)
}

/// `app` with a panic in any handler answered as a 500 in the API's error shape (the server keeps serving).
pub fn protect(app: Router) -> Router {
    app.layer(tower_http::catch_panic::CatchPanicLayer::custom(
        |_: Box<dyn std::any::Any + Send>| {
            tracing::error!("a request handler panicked; answered 500");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "keyrelay failed while handling this request; the error is logged",
            )
            .into_response()
        },
    ))
}

pub(crate) fn served_headers(headers: &mut HeaderMap, served: &Served) {
    const PROVIDER: HeaderName = HeaderName::from_static("x-keyrelay-provider");
    const ATTEMPTS: HeaderName = HeaderName::from_static("x-keyrelay-attempts");
    const KEY: HeaderName = HeaderName::from_static("x-keyrelay-key");
    const FALLBACK: HeaderName = HeaderName::from_static("x-keyrelay-fallback");
    let set = |headers: &mut HeaderMap, name: HeaderName, value: &str| {
        // Every value is ASCII (masked keys are `...a1b2`); anything else is left out rather than sent.
        if value.is_ascii()
            && let Ok(v) = HeaderValue::from_str(value)
        {
            headers.insert(name, v);
        }
    };
    set(headers, PROVIDER, &served.provider);
    headers.insert(ATTEMPTS, HeaderValue::from(served.attempts));
    if let Some(key) = &served.key {
        set(headers, KEY, key);
    }
    if let Some(model) = &served.fallback {
        set(headers, FALLBACK, model);
    }
    for (name, value) in &served.upstream {
        headers.insert(name, value.clone());
    }
}

/// A JSON answer in a dialect's shape (`translate` of the chat answer), with the `x-keyrelay-*` headers; a 502 in
/// `shape` when the answer is not JSON.
pub(crate) fn translated(
    body: &[u8],
    served: &Served,
    shape: Shape,
    translate: impl FnOnce(&Value) -> Value,
) -> Response {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "bad_upstream_response",
            "the upstream's answer is not JSON",
        )
        .shaped(shape)
        .into_response();
    };
    let mut response = (StatusCode::OK, translate(&answer).to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    served_headers(response.headers_mut(), served);
    response
}

pub(crate) fn render(reply: Reply) -> Response {
    let (mut response, served) = match reply {
        Reply::Json { body, served } => {
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            (r, served)
        }
        Reply::Stream { body, served } => return render_stream(body, &served),
    };
    served_headers(response.headers_mut(), &served);
    response
}

/// A reply in a dialect the provider spoke natively: a JSON answer as it came, a stream as it came but for the
/// engine's own frames, made the dialect's ([`crate::mapping::inbound::native::NativeOut`]); errors in `shape`.
pub(crate) fn render_native(
    result: Result<Reply, crate::relay::RelayError>,
    dialect: crate::mapping::inbound::Dialect,
    shape: Shape,
) -> Response {
    match result {
        Ok(Reply::Stream { body, served }) => {
            let events = crate::mapping::inbound::Translated::new(
                body,
                crate::mapping::inbound::native::NativeOut::new(dialect),
            );
            render_stream(Box::pin(events), &served)
        }
        Ok(reply) => render(reply),
        Err(e) => ApiError::from(e).shaped(shape).into_response(),
    }
}

/// An SSE stream as the client receives it, with the `x-keyrelay-*` headers.
pub(crate) fn render_stream(body: crate::sse::SseBody, served: &Served) -> Response {
    let mut r = Response::new(Body::from_stream(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    served_headers(h, served);
    r
}

/// The headers are taken from the request rather than extracted (axum's `HeaderMap` extractor copies them).
async fn relay_endpoint(app: AppState, endpoint: Endpoint, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match json_body(&app, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match app.relay.send(endpoint, body).await {
        Ok(reply) => render(reply),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn chat(State(app): State<AppState>, request: Request) -> Response {
    relay_endpoint(app, Endpoint::Chat, request).await
}

async fn embeddings(State(app): State<AppState>, request: Request) -> Response {
    relay_endpoint(app, Endpoint::Embeddings, request).await
}

async fn models(State(app): State<AppState>) -> Response {
    let data = app.relay.models().await;
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(
    State(app): State<AppState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Path(id) = match id {
        Ok(id) => id,
        Err(e) => {
            return ApiError::bad_request(
                "invalid_path",
                format!("the model id in the path cannot be read: {e}"),
            )
            .into_response();
        }
    };
    let id = id.trim_start_matches('/');
    let found = app
        .relay
        .models()
        .await
        .into_iter()
        .find(|m| m.get("id").and_then(Value::as_str) == Some(id));
    match found {
        Some(m) => axum::Json(m).into_response(),
        None => ApiError::not_found(
            "model_not_found",
            format!("model {id:?} is not listed; GET /v1/models lists them"),
        )
        .into_response(),
    }
}

async fn token_count(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let body = match json_body(&app, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match count_tokens(body).await {
        Ok(n) => axum::Json(json!({"token_count": n})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The tokens of a chat body (`model` and `messages` or `text`), counted offline. Counting costs about a second
/// per ten megabytes of text: off the async workers, in the client's turn (503 `server_busy` when it has too
/// much waiting).
pub(crate) async fn count_tokens(body: serde_json::Map<String, Value>) -> Result<usize, ApiError> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    crate::offload::admit(crate::offload::Pool::Requests, None, move || {
        crate::tokens::count(&model, &body)
    })
    .await?
    .map_err(|message| ApiError::bad_request("invalid_request", message))
}

async fn unknown_route(request: Request) -> Response {
    ApiError::not_found(
        "unknown_route",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
    .into_response()
}

async fn wrong_method(request: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
    .into_response()
}
