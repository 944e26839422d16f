//! Anthropic's Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, every answer and error in
//! Anthropic's shapes. A model whose provider speaks the Messages API natively (`dialects: {messages: …}` in its
//! file) gets the request as the client wrote it, and its answer and events as they came: `cache_control`,
//! thinking blocks and their signatures, documents, citations and `anthropic-beta` all survive. Any other
//! provider gets it translated to chat ([`crate::mapping::inbound::messages`]) and serves it like any chat
//! request.

use super::body::json_body;
use super::{ApiError, AppState, Shape, render_native, render_stream, translated};
use crate::mapping::inbound::messages::{MessagesStream, from_chat, to_chat};
use crate::mapping::inbound::{Dialect, Refused, Translated};
use crate::relay::{Endpoint, Reply};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

fn refused(r: Refused) -> Response {
    ApiError::refused(r)
        .shaped(Shape::Anthropic)
        .into_response()
}

/// `POST /v1/messages`.
pub(super) async fn messages(State(app): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match json_body(&app, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return e.shaped(Shape::Anthropic).into_response(),
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if app.relay.speaks(&body, Dialect::Messages) {
        return native(&app, body, &parts.headers).await;
    }
    let chat = match to_chat(body) {
        Ok(chat) => chat,
        Err(r) => return refused(r),
    };
    // The model that answered is named, a fallback's included, as a native answer names it.
    match app.relay.send(Endpoint::Chat, chat).await {
        Ok(Reply::Json { body, served }) => {
            let model = served.fallback.as_deref().unwrap_or(&model);
            translated(&body, &served, Shape::Anthropic, |answer| {
                from_chat(answer, model)
            })
        }
        Ok(Reply::Stream { body, served }) => {
            let model = served.fallback.as_deref().unwrap_or(&model);
            let events = Translated::new(body, MessagesStream::new(model));
            render_stream(Box::pin(events), &served)
        }
        Err(e) => ApiError::from(e).shaped(Shape::Anthropic).into_response(),
    }
}

/// A Messages request to a provider that speaks the API: sent as written (with `anthropic-beta`), answered as the
/// upstream answered.
async fn native(
    app: &AppState,
    body: serde_json::Map<String, Value>,
    headers: &axum::http::HeaderMap,
) -> Response {
    let beta = headers
        .get_all("anthropic-beta")
        .iter()
        .filter(|v| v.to_str().is_ok())
        .map(|v| {
            (
                axum::http::HeaderName::from_static("anthropic-beta"),
                v.clone(),
            )
        })
        .collect::<Vec<_>>();
    let result = app
        .relay
        .send_with(Endpoint::Native(Dialect::Messages), body, &beta)
        .await;
    render_native(result, Dialect::Messages, Shape::Anthropic)
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, counted as `/v1/token-count` counts.
pub(super) async fn count_tokens(State(app): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match json_body(&app, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return e.shaped(Shape::Anthropic).into_response(),
    };
    let chat = match to_chat(body) {
        Ok(chat) => chat,
        Err(r) => return refused(r),
    };
    match super::count_tokens(chat).await {
        Ok(n) => axum::Json(json!({"input_tokens": n})).into_response(),
        Err(e) => e.shaped(Shape::Anthropic).into_response(),
    }
}
