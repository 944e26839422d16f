//! OpenAI's legacy completions: `POST /v1/completions`. A model whose provider serves completions natively
//! (`dialects: {completions: …}` in its file) gets the request as the client wrote it; any other gets the prompt
//! as a chat ([`crate::mapping::inbound::completions`]) and answers as `text_completion`.

use super::body::json_body;
use super::{ApiError, AppState, Shape, render, render_stream, translated};
use crate::mapping::inbound::completions::{CompletionsStream, from_chat, to_chat};
use crate::mapping::inbound::{Dialect, Translated};
use crate::relay::{Endpoint, Reply};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

/// `POST /v1/completions`.
pub(super) async fn completions(State(app): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match json_body(&app, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if app.relay.speaks(&body, Dialect::Completions) {
        return match app
            .relay
            .send(Endpoint::Native(Dialect::Completions), body)
            .await
        {
            Ok(reply) => render(reply),
            Err(e) => ApiError::from(e).into_response(),
        };
    }
    let chat = match to_chat(body) {
        Ok(chat) => chat,
        Err(r) => return ApiError::refused(r).into_response(),
    };
    match app.relay.send(Endpoint::Chat, chat).await {
        Ok(Reply::Json { body, served }) => translated(&body, &served, Shape::OpenAi, from_chat),
        Ok(Reply::Stream { body, served }) => {
            render_stream(Box::pin(Translated::new(body, CompletionsStream)), &served)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}
