//! One upstream attempt with one key: build the request, send it, and sort the answer into a success to use or a
//! classified failure.

use crate::clock::Clock;
use crate::secret::ApiKey;
use crate::spec::{ErrorClass, Provider, Scope, Verdict};
use crate::stream::sse::SseEvent;
use crate::stream::{UpstreamEvents, Usage, is_done, is_error_event};
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// Error bodies are read up to this size; the rest is not needed to classify them.
const MAX_ERROR_BODY: usize = 64 << 10;

pub struct Attempt<'a> {
    pub http: &'a reqwest::Client,
    pub clock: &'a Clock,
    pub provider: &'a Provider,
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

#[derive(Deserialize)]
struct BodyPeek {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
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
            let mut events = UpstreamEvents::new(response);
            return match events.next().await {
                Ok(Some(first)) if is_done(&first) => Err(Failure::unusable(
                    "the upstream stream ended before any content",
                )),
                Ok(Some(first)) if is_error_event(&first) => {
                    let verdict = p.classifier.classify(
                        500,
                        &Default::default(),
                        &first.data,
                        self.clock.now(),
                    );
                    let class = if verdict.class.is_client_error() {
                        verdict.class
                    } else {
                        ErrorClass::Server
                    };
                    Err(Failure {
                        verdict: Verdict { class, ..verdict },
                        status: if class.is_client_error() { 400 } else { 502 },
                        body: first.data.into(),
                        unusable: !class.is_client_error(),
                    })
                }
                Ok(Some(first)) => Ok(Success::Stream { events, first }),
                Ok(None) => Err(Failure::unusable(
                    "the upstream stream ended before any event",
                )),
                Err(fault) => Err(Failure::transport(
                    ErrorClass::Connection,
                    fault.to_string(),
                )),
            };
        }

        let body = response
            .bytes()
            .await
            .map_err(|e| Failure::transport(ErrorClass::Connection, super::describe_reqwest(&e)))?;
        match serde_json::from_slice::<BodyPeek>(&body) {
            Ok(BodyPeek { error: None, usage }) => Ok(Success::Json {
                body,
                usage: usage.unwrap_or_default(),
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
