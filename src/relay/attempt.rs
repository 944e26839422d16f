//! One upstream attempt with one key: send the call, and sort the answer into a success to use or a classified
//! failure. For a stream, the first mapped event is read before anything reaches the client, so that a failure
//! at the start can still be retried or rotated.

use crate::clock::Clock;
use crate::failure::ErrorClass;
use crate::mapping::{EventMapper, Part};
use crate::provider::{Provider, Verdict};
use crate::script::ScriptError;
use crate::secret::ApiKey;
use crate::stream::{Started, StreamFault, UpstreamEvents};
use crate::upstream::UpstreamCall;
use crate::upstream::{HttpClient, UpstreamError};
use crate::usage::Usage;
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
    Json {
        body: Bytes,
        usage: Usage,
        upstream: super::UpstreamHeaders,
    },
    /// A stream whose first mapped parts have been read (and are not an error).
    Stream(Box<Started>, super::UpstreamHeaders),
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
    /// Not the key's fault (the request could not even be built with it, or could not be sent for want of TLS
    /// trust anchors): the key is neither judged nor tried again by this request.
    pub blameless: bool,
    /// No answer at all: no response or first event in time, or a connection closed unanswered. A verdict on
    /// the model more than on the key.
    pub silent: bool,
    /// The upstream's request id and rate-limit headers, when it answered.
    pub upstream: super::UpstreamHeaders,
}

impl Failure {
    fn new(verdict: Verdict, status: u16, body: Bytes) -> Self {
        Self {
            verdict,
            status,
            body,
            unusable: false,
            blameless: false,
            silent: false,
            upstream: Vec::new(),
        }
    }

    /// What went wrong, for the log: the upstream's status, or keyrelay's own words when there was no answer
    /// (never an upstream body, which could echo anything).
    pub fn cause(&self) -> std::borrow::Cow<'_, str> {
        match self.status {
            0 => String::from_utf8_lossy(&self.body),
            status => format!("HTTP {status}").into(),
        }
    }

    fn transport(class: ErrorClass, why: String) -> Self {
        Self::new(Verdict::model(class), 0, why.into())
    }

    /// The request or its body failed on the way.
    fn upstream(e: UpstreamError) -> AttemptError {
        let class = if e.timed_out {
            ErrorClass::Timeout
        } else {
            ErrorClass::Connection
        };
        let (silent, blameless) = (e.unanswered, e.blameless);
        Self::transport(class, e.message).with(|f| {
            f.silent = silent;
            f.blameless = blameless;
        })
    }

    /// Nothing came within a timeout.
    fn silence(why: String) -> AttemptError {
        Self::transport(ErrorClass::Timeout, why).with(|f| f.silent = true)
    }

    fn unusable(why: &str) -> AttemptError {
        Self::transport(ErrorClass::Server, why.to_string()).with(|f| f.unusable = true)
    }

    fn with(mut self, set: impl FnOnce(&mut Self)) -> AttemptError {
        set(&mut self);
        AttemptError::Upstream(self)
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
        stream: Option<EventMapper>,
    ) -> Result<Success, AttemptError> {
        let p = self.provider;
        let accept = HeaderValue::from_static(match stream {
            Some(_) => "text/event-stream",
            None => "*/*",
        });
        let request = p.request(call, key, accept).map_err(|why| {
            let why = format!("the request cannot be built with this key: {why}");
            Failure::new(Verdict::model(ErrorClass::InvalidRequest), 0, why.into())
                .with(|f| f.blameless = true)
        })?;
        let started = tokio::time::Instant::now();
        let tuning = &p.tuning;
        // Both timeouts run from sending: `response` until the head, `first_event` (streams) until content.
        let response_by = tuning.response_timeout.map(|limit| {
            let why = format!("no response within {limit:?} (timeouts.response)");
            (started + limit, why)
        });
        let first_by = tuning
            .first_event_timeout
            .filter(|_| stream.is_some())
            .map(|limit| {
                let why = format!("no content within {limit:?} (timeouts.first_event)");
                (started + limit, why)
            });
        let head_by = match (&response_by, &first_by) {
            (Some(r), Some(f)) => Some(if r.0 <= f.0 { r } else { f }),
            (r, f) => r.as_ref().or(f.as_ref()),
        };
        let sent = self.http.send(request);
        let sent = match head_by {
            Some((at, why)) => tokio::time::timeout_at(*at, sent)
                .await
                .map_err(|_| Failure::silence(why.clone()))?,
            None => sent.await,
        };
        let response = sent.map_err(Failure::upstream)?;

        let status = response.status();
        let upstream = super::upstream_headers(response.headers(), key);
        if !status.is_success() {
            let headers = response.headers().clone();
            let body = crate::upstream::read_capped(response.into_body(), MAX_ERROR_BODY).await;
            let body = key.redact_bytes(body);
            let text = String::from_utf8_lossy(&body);
            let verdict = p
                .judge(status.as_u16(), &headers, &text, self.clock.now())
                .await?;
            return Err(
                Failure::new(verdict, status.as_u16(), body).with(|f| f.upstream = upstream)
            );
        }

        if let Some(mut mapper) = stream {
            // Every key of the pool is masked in the events as they are read, before anything else sees them.
            let mut events = UpstreamEvents::new(
                response.into_body(),
                tuning.stream_idle_timeout,
                key.redactor().clone(),
            );
            loop {
                let next = match &first_by {
                    Some((at, why)) => tokio::time::timeout_at(*at, events.next())
                        .await
                        .map_err(|_| Failure::silence(why.clone()))?,
                    None => events.next().await,
                };
                let event = match next {
                    Ok(Some(event)) => event,
                    Ok(None) => {
                        return Err(Failure::unusable(
                            "the upstream stream ended before any content",
                        ));
                    }
                    // Before any content, a timer that fires (the stream's idle timer included, which may
                    // fire before `first_event` when the two are equal) means no answer, like a silent head.
                    Err(fault @ StreamFault::Stalled(_)) => {
                        return Err(Failure::silence(fault.to_string()));
                    }
                    Err(fault) => {
                        return Err(AttemptError::Upstream(Failure::transport(
                            fault.class(),
                            fault.to_string(),
                        )));
                    }
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
                        let status = if verdict.class.is_client_error() {
                            400
                        } else {
                            502
                        };
                        let unusable = verdict.class == ErrorClass::Server;
                        let body = serde_json::json!({"error": error}).to_string();
                        return Err(Failure::new(verdict, status, body.into())
                            .with(|f| f.unusable = unusable));
                    }
                    Some(Part::Chunk { .. } | Part::Event { .. }) => {
                        return Ok(Success::Stream(
                            Box::new(Started {
                                events,
                                mapper,
                                pending: parts.into(),
                            }),
                            upstream,
                        ));
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
        // An answer is a JSON object; serde would read `[]` as an object with every field missing.
        let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match serde_json::from_slice::<BodyPeek>(&body)
            .ok()
            .filter(|_| object)
        {
            Some(BodyPeek { error: None, usage }) => Ok(Success::Json {
                // Upstreams have echoed keys even in answers.
                body: key.redact_bytes(body),
                usage: usage.unwrap_or_default(),
                upstream,
            }),
            Some(_) => Err(Failure::unusable(
                "the upstream answered 200 with an error object",
            )),
            None => Err(Failure::unusable(
                "the upstream answered 200 with a body that is not a JSON object",
            )),
        }
    }
}
