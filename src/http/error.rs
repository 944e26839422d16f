//! Every error a client sees, rendered once, in OpenAI's shape: `{"error":{"message","type","code"}}`.

use super::served_headers;
use crate::relay::{RelayError, Served};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

/// Whose error shape the client reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Shape {
    /// `{"error":{"message","type","code"}}`
    #[default]
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`
    Anthropic,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub retry_after: Option<u64>,
    pub served: Option<Served>,
    /// An upstream's own OpenAI-shaped error body, passed through as it came.
    pub upstream_body: Option<Bytes>,
    pub shape: Shape,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            served: None,
            upstream_body: None,
            shape: Shape::OpenAi,
        }
    }

    /// This error in `shape`.
    pub fn shaped(mut self, shape: Shape) -> Self {
        self.shape = shape;
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            code,
            message,
        )
    }

    /// A 400 naming the field at fault (`unsupported_parameter`, or `invalid_type`).
    pub fn refused(refused: crate::failure::Refused) -> Self {
        let mut e = Self::bad_request(refused.code, refused.message);
        e.param = Some(refused.param);
        e
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }
}

impl From<RelayError> for ApiError {
    fn from(e: RelayError) -> Self {
        let (status, kind, code) = e.kind();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut out = Self::new(status, kind, code, e.to_string());
        out.served = e.served();
        match e {
            RelayError::Upstream {
                body, openai_wire, ..
            } => {
                out.message = upstream_message(&body);
                if openai_wire && is_openai_error(&body) {
                    out.upstream_body = Some(body);
                }
            }
            RelayError::Unsupported(refused) => out.param = Some(refused.param),
            RelayError::AllCooling { retry_after, .. } => {
                out.retry_after = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
            }
            RelayError::Busy(busy) => out.retry_after = Some(busy.retry_after.as_secs().max(1)),
            _ => {}
        }
        out
    }
}

/// 503 `server_busy` with `Retry-After`: no room for the request's slow work ([`crate::offload`]).
impl From<crate::offload::Busy> for ApiError {
    fn from(busy: crate::offload::Busy) -> Self {
        RelayError::Busy(busy).into()
    }
}

fn is_openai_error(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        v.get("error")
            .and_then(|e| e.get("message"))
            .is_some_and(Value::is_string)
    })
}

/// The upstream's own message, from its JSON error or its text.
fn upstream_message(body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        let e = v.get("error")?;
        e.get("message")
            .and_then(Value::as_str)
            .or(e.as_str())
            .map(str::to_string)
    });
    message.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            "the upstream rejected the request".to_string()
        } else {
            text.chars().take(2000).collect()
        }
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match (self.upstream_body, self.shape) {
            (_, Shape::Anthropic) => Bytes::from(
                crate::mapping::inbound::messages::error_body(self.status.as_u16(), &self.message)
                    .to_string(),
            ),
            (Some(body), Shape::OpenAi) => body,
            (None, Shape::OpenAi) => {
                let v = match self.param {
                    Some(param) => {
                        json!({"error": {"message": self.message, "type": self.kind, "param": param, "code": self.code}})
                    }
                    None => {
                        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
                    }
                };
                Bytes::from(v.to_string())
            }
        };
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(served) = &self.served {
            served_headers(headers, served);
        }
        response
    }
}
