//! Reading a request body: bounded in size (`max_body_size`) and time (`server.body_timeout`), parsed as a JSON
//! object, off the async workers when large; every failure is an API error.

use super::{ApiError, AppState};
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use serde_json::{Map, Value};

/// Reads the body up to the configured limit and parses it as a JSON object.
pub(super) async fn json_body(
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
    // Parsing takes about a millisecond per megabyte: large bodies are parsed off the async workers, in the
    // client's turn.
    let parsed = if bytes.len() > 1 << 20 {
        crate::offload::admit(crate::offload::Pool::Requests, None, move || {
            serde_json::from_slice::<Value>(&bytes)
        })
        .await?
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
