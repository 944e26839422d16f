//! One upstream attempt with one key: send the call, and sort the answer into a success to use or a classified
//! failure. For a stream, the first mapped event is read before anything reaches the client, so that a failure
//! at the start can still be retried or rotated.

use crate::clock::Clock;
use crate::script::ScriptError;
use crate::secret::ApiKey;
use crate::spec::{ErrorClass, Provider, UpstreamCall, Verdict};
use crate::stream::{Mapper, Part, Started, UpstreamEvents, Usage};
use crate::upstream::{HttpClient, UpstreamError};
use bytes::Bytes;
use http::header::HeaderValue;
use serde::Deserialize;

/// Error bodies are read up to this size; the rest is not needed to classify them.
const MAX_ERROR_BODY: usize = 64 << 10;

pub struct Attempt<'a> {
    pub http: &'a HttpClient,
    pub clock: &'a Clock,
    pub provider: &'a Provider,
    /// The most of a non-streamed answer that is read.
    pub max_response: usize,
}

pub enum Success {
    /// The upstream's JSON body, not yet mapped.
    Json { body: Bytes, usage: Usage },
    /// A stream whose first mapped parts have been read (and are not an error).
    Stream(Box<Started>),
}

/// Why an attempt did not succeed.
pub enum AttemptError {
    /// The upstream (or the way to it) failed: judged, then retried, rotated or answered.
    Upstream(Failure),
    /// The provider's script failed: no key would do better.
    Script(ScriptError),
    /// The answer is larger than `max_response_size`: no key would do better.
    TooLarge { limit: usize },
}

pub struct Failure {
    pub verdict: Verdict,
    /// The upstream's status; 0 when it never answered (no connection, a broken or unusable body).
    pub status: u16,
    pub body: Bytes,
    /// A 2xx answer that could not be used.
    pub unusable: bool,
    /// Not the key's fault (the request could not even be built with it): the key is neither judged nor tried
    /// again by this request.
    pub blameless: bool,
}

impl Failure {
    fn transport(class: ErrorClass, why: String) -> AttemptError {
        AttemptError::Upstream(Self {
            verdict: Verdict::model(class),
            status: 0,
            body: why.into(),
            unusable: false,
            blameless: false,
        })
    }

    /// The request or its body failed on the way.
    fn upstream(e: UpstreamError) -> AttemptError {
        let class = if e.timed_out {
            ErrorClass::Timeout
        } else {
            ErrorClass::Connection
        };
        Self::transport(class, e.message)
    }

    fn unusable(why: &str) -> AttemptError {
        match Self::transport(ErrorClass::Server, why.to_string()) {
            AttemptError::Upstream(f) => AttemptError::Upstream(Self {
                unusable: true,
                ..f
            }),
            other => other,
        }
    }
}

impl From<ScriptError> for AttemptError {
    fn from(e: ScriptError) -> Self {
        Self::Script(e)
    }
}

/// What the proxy reads of a JSON reply; lenient, so an odd field never discards a paid answer.
#[derive(Deserialize)]
struct BodyPeek {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

impl Attempt<'_> {
    pub async fn send(
        &self,
        call: &UpstreamCall,
        key: &ApiKey,
        stream: Option<Mapper>,
    ) -> Result<Success, AttemptError> {
        let p = self.provider;
        let accept = HeaderValue::from_static(match stream {
            Some(_) => "text/event-stream",
            None => "*/*",
        });
        let request = p.request(call, key, accept).map_err(|why| {
            AttemptError::Upstream(Failure {
                verdict: Verdict::model(ErrorClass::InvalidRequest),
                status: 0,
                body: format!("the request cannot be built with this key: {why}").into(),
                unusable: false,
                blameless: true,
            })
        })?;
        let started = tokio::time::Instant::now();
        let tuning = &p.tuning;
        let sent = self.http.send(request);
        let sent = match tuning.response_timeout {
            Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| {
                Failure::transport(
                    ErrorClass::Timeout,
                    format!("no response within {limit:?} (timeouts.response)"),
                )
            })?,
            None => sent.await,
        };
        let response = sent.map_err(Failure::upstream)?;

        let status = response.status();
        if !status.is_success() {
            let headers = response.headers().clone();
            let body = crate::upstream::read_capped(response.into_body(), MAX_ERROR_BODY).await;
            let body = key.redact_bytes(body);
            let text = String::from_utf8_lossy(&body);
            let verdict = p
                .judge(status.as_u16(), &headers, &text, self.clock.now())
                .await?;
            return Err(AttemptError::Upstream(Failure {
                verdict,
                status: status.as_u16(),
                body,
                unusable: false,
                blameless: false,
            }));
        }

        if let Some(mut mapper) = stream {
            let mut events = UpstreamEvents::new(response.into_body(), tuning.stream_idle_timeout);
            let first_by = tuning
                .first_event_timeout
                .map(|limit| (started + limit, limit));
            loop {
                let next =
                    match first_by {
                        Some((at, limit)) => tokio::time::timeout_at(at, events.next())
                            .await
                            .map_err(|_| {
                                let why =
                                    format!("no content within {limit:?} (timeouts.first_event)");
                                Failure::transport(ErrorClass::Timeout, why)
                            })?,
                        None => events.next().await,
                    };
                let event = match next {
                    Ok(Some(event)) => event,
                    Ok(None) => {
                        return Err(Failure::unusable(
                            "the upstream stream ended before any content",
                        ));
                    }
                    Err(fault) => return Err(Failure::transport(fault.class(), fault.to_string())),
                };
                let parts = mapper.map(event).await?;
                match parts.first() {
                    None => continue,
                    Some(Part::Done) => {
                        return Err(Failure::unusable(
                            "the upstream stream ended before any content",
                        ));
                    }
                    Some(Part::Error(error)) => {
                        // An error as the first event: judged like an error status, so it can rotate.
                        let body = error.to_string();
                        let verdict = p
                            .judge(500, &Default::default(), &body, self.clock.now())
                            .await?;
                        let client = verdict.class.is_client_error();
                        return Err(AttemptError::Upstream(Failure {
                            status: if client { 400 } else { 502 },
                            unusable: verdict.class == ErrorClass::Server,
                            blameless: false,
                            body: key
                                .redact(&serde_json::json!({"error": error}).to_string())
                                .into_owned()
                                .into(),
                            verdict,
                        }));
                    }
                    Some(Part::Chunk { .. }) => {
                        return Ok(Success::Stream(Box::new(Started {
                            events,
                            mapper,
                            pending: parts.into(),
                        })));
                    }
                }
            }
        }

        let body = crate::upstream::read_limited(response, self.max_response)
            .await
            .map_err(|e| match e {
                crate::upstream::ReadError::TooLarge { limit } => AttemptError::TooLarge { limit },
                crate::upstream::ReadError::Broken(e) => Failure::upstream(e),
            })?;
        match serde_json::from_slice::<BodyPeek>(&body) {
            Ok(BodyPeek { error: None, usage }) => Ok(Success::Json {
                // Upstreams have echoed keys even in answers.
                body: key.redact_bytes(body),
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
