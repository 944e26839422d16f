//! The inbound HTTP API: the connections it accepts (`listener`, `conn`), routes, proxy-key authentication, body
//! limits, and rendering replies and errors.
//!
//! Layers, outermost first: connection bounds and the rewrite of hyper's own parse errors (`conn`), a panic
//! catcher that answers 500 in the API's error shape, the proxy-key check on `/v1/*` and `/metrics` (liveness at
//! `/` stays open), then the handlers, which read the body themselves so that an oversized, slow or malformed one
//! gets an OpenAI-shaped 413, 408 or 400.

mod conn;
mod error;
mod listener;
mod service;

use crate::relay::{Endpoint, Relay, Reply, Served};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
pub use error::ApiError;
pub use listener::{Signals, connection_cap, raise_fd_limit, serve};
use serde_json::{Map, Value, json};
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
        .route("/models", get(models))
        .route("/models/{*id}", get(model))
        .route("/providers", get(providers))
        .route("/token-count", post(token_count))
        .route("/keys", get(keys))
        .route_layer(RequireKey(state.clone()));
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(RequireKey(state.clone()));
    Router::new()
        .route("/", get(liveness))
        .route("/dashboard", get(dashboard))
        .merge(metrics)
        .nest("/v1", api)
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
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
}

/// Requires the proxy key (as `Authorization: Bearer` or `x-api-key`) when one is configured: a layer that
/// checks the headers and either calls the route or answers 401 (no boxing or cloning per request, as a
/// `from_fn` middleware would).
#[derive(Clone)]
struct RequireKey(AppState);

impl<S> tower_layer::Layer<S> for RequireKey {
    type Service = KeyChecked<S>;

    fn layer(&self, inner: S) -> KeyChecked<S> {
        KeyChecked {
            inner,
            app: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct KeyChecked<S> {
    inner: S,
    app: AppState,
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
            None => futures_util::future::Either::Left(self.inner.call(request)),
            Some(refused) => futures_util::future::Either::Right(std::future::ready(Ok(refused))),
        }
    }
}

/// The 401 for a request without the right proxy key; `None` when it may pass.
fn refusal(app: &AppState, headers: &HeaderMap) -> Option<Response> {
    let snapshot = app.relay.snapshot();
    let expected = snapshot.proxy_key.as_ref()?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match bearer.or(api_key) {
        None => Some(ApiError::unauthorized(
            "missing proxy key: send it as `Authorization: Bearer <PROXY_API_KEY>` or `x-api-key: <PROXY_API_KEY>`",
        )
        .into_response()),
        Some(given) if expected.matches(given) => None,
        Some(_) => Some(ApiError::unauthorized("the proxy key is wrong").into_response()),
    }
}

/// Reads the body up to the configured limit and parses it as a JSON object.
async fn json_body(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Map<String, Value>, ApiError> {
    let settings = &app.relay.snapshot().settings;
    let (limit, within) = (settings.max_body_bytes, settings.edge.body_timeout);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!(
                "the request body exceeds the limit of {limit} bytes (max_body_size in config.yaml)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(within, axum::body::to_bytes(body, limit));
    let read = read.await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!("the request body did not arrive within {within:?} (server.body_timeout in config.yaml)"),
        )
    })?;
    let bytes: Bytes = read.map_err(|e| {
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            source = s.source();
        }
        ApiError::bad_request(
            "body_read_failed",
            format!("cannot read the request body: {e}"),
        )
    })?;
    // Parsing takes about a millisecond per megabyte: large bodies are parsed off the async workers.
    let parsed = if bytes.len() > 1 << 20 {
        crate::offload::run(crate::offload::Pool::Requests, move || {
            serde_json::from_slice::<Value>(&bytes)
        })
        .await
    } else {
        serde_json::from_slice::<Value>(&bytes)
    };
    match parsed {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "invalid_json",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

fn render(reply: Reply) -> Response {
    let (mut response, served) = match reply {
        Reply::Json { body, served } => {
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            (r, served)
        }
        Reply::Stream { body, served } => {
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
            (r, served)
        }
    };
    served_headers(response.headers_mut(), &served);
    response
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

/// `GET /`: whether the service is up; with the proxy key (or when none is configured), the configuration's
/// state too.
async fn liveness(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if refusal(&app, &headers).is_some() {
        return axum::Json(json!({"status": "ok"})).into_response();
    }
    let snapshot = app.relay.snapshot();
    let status = match &app.reloader {
        Some(r) => r.status(),
        None => crate::reload::ReloadStatus {
            generation: snapshot.generation,
            loaded_at: snapshot.loaded_at,
            ..Default::default()
        },
    };
    axum::Json(json!({
        "status": "ok",
        "service": "keyrelay",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "providers": snapshot.serving().count(),
        "config": {
            "generation": status.generation,
            "loaded_at": time(status.loaded_at),
            "last_reload_error": status.last_error,
            "last_reload_error_at": status.last_error_at.and_then(time),
        },
    }))
    .into_response()
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

async fn providers(State(app): State<AppState>) -> Response {
    let snapshot = app.relay.snapshot();
    let now = crate::clock::Clock::system().now();
    let data: Vec<Value> = snapshot
        .providers
        .values()
        .map(|p| {
            let report = app.relay.store().report(&p.name, &p.keys);
            let cooling = report
                .iter()
                .filter(|k| {
                    k.cooling_until.is_some_and(|u| u > now) || !k.model_cooldowns.is_empty()
                })
                .count();
            json!({
                "name": p.name,
                "keys": p.keys.len(),
                "keys_in_flight": report.iter().map(|k| k.in_flight).sum::<u32>(),
                "keys_cooling": cooling,
                "base_url": crate::upstream::public_url(&p.base_url),
                "selection": p.tuning.selection,
                "static_models": p.static_models.len(),
                "script": p.script.as_ref().map(|s| s.file.display().to_string()),
                "script_errors": p.script.as_ref().map_or(0, |s| s.error_count()),
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn token_count(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let mut body = match json_body(&app, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(messages) = body.remove("messages") else {
        return ApiError::bad_request("invalid_request", "`messages` is required").into_response();
    };
    // Counting costs about a second per ten megabytes of text: off the async workers.
    let counted = crate::offload::run(crate::offload::Pool::Requests, move || {
        crate::tokens::count_messages(&model, &messages)
    })
    .await;
    match counted {
        Ok(n) => axum::Json(json!({"token_count": n})).into_response(),
        Err(message) => ApiError::bad_request("invalid_request", message).into_response(),
    }
}

/// `GET /v1/keys`: every key of every provider (masked), with its live state.
async fn keys(State(app): State<AppState>) -> Response {
    let snapshot = app.relay.snapshot();
    let now = crate::clock::Clock::system().now();
    let left = |until: i64| ((until - now).max(0) as f64 / 1000.0).ceil() as u64;
    let data: Vec<Value> = snapshot
        .serving()
        .map(|p| {
            let keys: Vec<Value> = app
                .relay
                .store()
                .report(&p.name, &p.keys)
                .into_iter()
                .map(|k| {
                    let cooldown = k.cooling_until.map(|until| {
                        json!({"reason": k.cooling_reason, "until": time(until), "seconds_left": left(until)})
                    });
                    let models: Vec<Value> = k
                        .model_cooldowns
                        .iter()
                        .map(|(model, until, reason)| {
                            json!({"model": model, "reason": reason, "until": time(*until), "seconds_left": left(*until)})
                        })
                        .collect();
                    json!({
                        "key": k.key,
                        "id": k.id,
                        "state": k.state(),
                        "in_flight": k.in_flight,
                        "cooldown": cooldown,
                        "model_cooldowns": models,
                        "streak": k.streak,
                        "today": k.today,
                        "lifetime": k.lifetime,
                        "last_error": k.last_error.map(|(class, at)| json!({"class": class, "at": time(at)})),
                    })
                })
                .collect();
            json!({"provider": p.name, "keys": keys})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(app): State<AppState>) -> Response {
    let snapshot = app.relay.snapshot();
    let mut gauges = crate::observe::metrics::Gauges::default();
    for p in snapshot.serving() {
        for state in ["available", "busy", "cooling", "benched"] {
            gauges.keys.insert((p.name.clone(), state), 0);
        }
        for k in app.relay.store().report(&p.name, &p.keys) {
            *gauges.keys.entry((p.name.clone(), k.state())).or_default() += 1;
        }
        if let Some(script) = &p.script {
            gauges
                .script_errors
                .insert(p.name.clone(), script.error_count());
        }
    }
    match &app.reloader {
        Some(r) => {
            let status = r.status();
            gauges.config_generation = status.generation;
            gauges.reload_failures = status.failures;
        }
        None => gauges.config_generation = snapshot.generation,
    }
    let mut response = app.metrics.render(&gauges).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /dashboard`: one self-contained page; it asks for the proxy key and reads `/v1/keys`.
async fn dashboard() -> Response {
    let mut response = include_str!("dashboard.html").into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"),
    );
    response
}

/// A Unix time in milliseconds as RFC 3339.
fn time(ms: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .ok()
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
