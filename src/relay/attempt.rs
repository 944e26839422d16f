//! One upstream attempt with one key: build the request, send it, and sort the answer into a success to use or a
//! classified failure.

use crate::clock::Clock;
use crate::secret::ApiKey;
use crate::spec::{ErrorClass, Provider, Scope, Verdict};
use crate::stream::sse::SseEvent;
use crate::stream::{UpstreamEvents, Usage, error_of, is_done};
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

/// Error bodies are read up to this size; the rest is not needed to classify them.
const MAX_ERROR_BODY: usize = 64 << 10;

pub struct Attempt<'a> {
    pub http: &'a reqwest::Client,
    pub clock: &'a Clock,
    pub provider: &'a Provider,
    /// The longest silence tolerated while waiting for stream events.
    pub stream_idle: std::time::Duration,
}

pub enum Success {
    Json {
        body: Bytes,
        usage: Usage,
    },
    /// A stream whose first event has been read (and is not an error).
    Stream {
        events: UpstreamEvents,
        first: SseEvent,
    },
}

pub struct Failure {
    pub verdict: Verdict,
    /// The upstream's status, or 502 when it never answered usefully.
    pub status: u16,
    pub body: Bytes,
    /// A 2xx answer that could not be used.
    pub unusable: bool,
}

impl Failure {
    fn transport(class: ErrorClass, why: String) -> Self {
        Self {
            verdict: Verdict {
                class,
                scope: Scope::Model,
                retry_after: None,
            },
            status: 502,
            body: why.into(),
            unusable: false,
        }
    }

    fn unusable(why: &str) -> Self {
        Self {
            unusable: true,
            ..Self::transport(ErrorClass::Server, why.to_string())
        }
    }
}

/// What the proxy reads of a JSON reply; lenient, so an odd field never discards a paid answer.
#[derive(Deserialize)]
struct BodyPeek {
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

impl Attempt<'_> {
    pub async fn send(
        &self,
        path: &str,
        payload: &Bytes,
        key: &ApiKey,
        stream: bool,
    ) -> Result<Success, Failure> {
        let p = self.provider;
        let mut request = p
            .request(self.http, reqwest::Method::POST, path, key)
            .map_err(|why| Failure::transport(ErrorClass::Auth, why))?
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if stream {
            request = request.header(ACCEPT, HeaderValue::from_static("text/event-stream"));
        }
        let response = request.body(payload.clone()).send().await.map_err(|e| {
            let class = if e.is_timeout() {
                ErrorClass::Timeout
            } else {
                ErrorClass::Connection
            };
            Failure::transport(class, super::describe_reqwest(&e))
        })?;

        let status = response.status();
        if !status.is_success() {
            let headers = response.headers().clone();
            let body = read_capped(response).await;
            let text = String::from_utf8_lossy(&body);
            let verdict = p
                .classifier
                .classify(status.as_u16(), &headers, &text, self.clock.now());
            return Err(Failure {
                verdict,
                status: status.as_u16(),
                body,
                unusable: false,
            });
        }

        if stream {
            let mut events = UpstreamEvents::new(response, self.stream_idle);
            return match events.next().await {
                Ok(Some(first)) if is_done(&first) => Err(Failure::unusable(
                    "the upstream stream ended before any content",
                )),
                Ok(Some(first)) => match error_of(&first) {
                    None => Ok(Success::Stream { events, first }),
                    Some(_) => {
                        // An error as the first event: judged by the provider's rules like an error status.
                        let now = self.clock.now();
                        let verdict =
                            p.classifier
                                .classify(500, &Default::default(), &first.data, now);
                        let client = verdict.class.is_client_error();
                        Err(Failure {
                            status: if client { 400 } else { 502 },
                            unusable: verdict.class == ErrorClass::Server,
                            body: first.data.into(),
                            verdict,
                        })
                    }
                },
                Ok(None) => Err(Failure::unusable(
                    "the upstream stream ended before any event",
                )),
                Err(fault) => Err(Failure::transport(fault.class(), fault.to_string())),
            };
        }

        let body = response
            .bytes()
            .await
            .map_err(|e| Failure::transport(ErrorClass::Connection, super::describe_reqwest(&e)))?;
        match serde_json::from_slice::<BodyPeek>(&body) {
            Ok(BodyPeek {
                error: None | Some(Value::Null),
                usage,
            }) => Ok(Success::Json {
                body,
                usage: usage.as_ref().map(Usage::from_value).unwrap_or_default(),
            }),
            Ok(_) => Err(Failure::unusable(
                "the upstream answered 200 with an error object",
            )),
            Err(_) => Err(Failure::unusable(
                "the upstream answered 200 with a body that is not JSON",
            )),
        }
    }
}

/// The start of an error body; a broken body yields what arrived.
async fn read_capped(mut response: reqwest::Response) -> Bytes {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    out.into()
}
