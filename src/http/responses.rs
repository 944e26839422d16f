//! OpenAI's Responses API: `POST /v1/responses`. A model whose provider speaks it natively (`dialects:
//! {responses: …}`) gets the request as written, its `previous_response_id` kept by that provider; any other is
//! translated to chat ([`crate::mapping::inbound::responses`]), `previous_response_id` continuing a conversation
//! kept in process or, with a shared store, by another instance (also when it names one of those for a native
//! provider). Errors keep OpenAI's shape; a stream
//! that fails after it started ends with `error` (and, translated, `response.failed`).

use super::body::json_body;
use super::{ApiError, AppState, Shape, render_native, render_stream, translated};
use crate::conversations::Conversation;
use crate::mapping::inbound::responses::{ResponsesStream, from_chat, new_id, to_chat};
use crate::mapping::inbound::{Dialect, Translated};
use crate::relay::{Endpoint, Reply};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// `POST /v1/responses`.
pub(super) async fn responses(State(app): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match json_body(&app, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let limits = app.relay.snapshot().settings.responses;
    let prior = match body.get("previous_response_id").and_then(Value::as_str) {
        Some(id) => app.conversations.find(id, &limits).await,
        None => None,
    };
    // A conversation kept here continues here, translated: a provider that speaks the API knows nothing of it.
    if prior.is_none() && app.relay.speaks(&body, Dialect::Responses) {
        let result = app
            .relay
            .send(Endpoint::Native(Dialect::Responses), body)
            .await;
        return render_native(result, Dialect::Responses, Shape::OpenAi);
    }
    // Kept as text, parsed for this use: off the async workers when large, as a large body is. Text that does not
    // parse (written to Redis by something else) is no conversation.
    let mut prior = match prior {
        Some(conversation) if conversation.bytes() > 1 << 20 => {
            let parse = conversation.clone();
            let messages =
                crate::offload::run(crate::offload::Pool::Requests, move || parse.messages()).await;
            messages.map(|m| (conversation, m))
        }
        Some(conversation) => conversation.messages().map(|m| (conversation, m)),
        None => None,
    };
    let translation = match to_chat(body, |_| prior.take()) {
        Ok(t) => t,
        Err(r) => {
            let unknown = r.param == "previous_response_id";
            let mut e = ApiError::refused(r);
            if unknown {
                e.code = "previous_response_not_found";
            }
            return e.into_response();
        }
    };
    let id = new_id("resp");
    let (chat, mut echo, previous, mut input, store) = (
        translation.chat,
        translation.echo,
        translation.previous,
        translation.input,
        translation.store,
    );
    let omitted = translation.omitted.join(",");
    let reply = app.relay.send(Endpoint::Chat, chat).await;
    // The model that answered is named, a fallback's included.
    if let Ok(Reply::Json { served, .. } | Reply::Stream { served, .. }) = &reply
        && let Some(fallback) = &served.fallback
    {
        echo.model = fallback.clone();
    }
    let mut response = match reply {
        Ok(Reply::Json { body, served }) => translated(&body, &served, Shape::OpenAi, |answer| {
            let (object, kept) = from_chat(answer, &echo, &id);
            if store {
                input.push(kept);
                let turn = Conversation::new(previous.as_ref(), &input);
                app.conversations.keep(id.clone(), turn, &limits);
            }
            object
        }),
        Ok(Reply::Stream { body, served }) => {
            let on_complete = store.then(|| {
                let conversations = app.conversations.clone();
                let id = id.clone();
                Box::new(move |kept: Value| {
                    input.push(kept);
                    let turn = Conversation::new(previous.as_ref(), &input);
                    conversations.keep(id, turn, &limits);
                }) as crate::mapping::inbound::responses::OnComplete
            });
            let events = Translated::new(body, ResponsesStream::new(id, echo, on_complete));
            render_stream(Box::pin(events), &served)
        }
        Err(e) => ApiError::from(e).into_response(),
    };
    // Tools only OpenAI runs were left out: said, not silent.
    if !omitted.is_empty()
        && let Ok(value) = axum::http::HeaderValue::from_str(&omitted)
    {
        response.headers_mut().insert(
            axum::http::HeaderName::from_static("x-keyrelay-omitted"),
            value,
        );
    }
    response
}
