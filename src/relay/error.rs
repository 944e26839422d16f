//! What can go wrong with a relayed request, and what the engine tried before giving up.

use super::Served;
use crate::failure::ErrorClass;
use crate::keys::Unavailable;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// The record of one request's attempts, for error messages and the `x-keyrelay-*` headers. Never holds a key.
#[derive(Clone, Debug, Default)]
pub struct Tried {
    pub provider: String,
    pub model: String,
    pub attempts: u32,
    /// The distinct keys leased.
    pub key_ids: Vec<crate::secret::KeyId>,
    pub classes: BTreeMap<ErrorClass, u32>,
    /// Why the last lease attempt found no key.
    pub waiting: Unavailable,
    /// The last failure was a 2xx answer that could not be used.
    pub unusable: bool,
}

impl Tried {
    pub fn new(provider: &str, model: &str) -> Self {
        Self {
            provider: provider.into(),
            model: model.into(),
            ..Self::default()
        }
    }

    pub fn note(&mut self, class: ErrorClass) {
        *self.classes.entry(class).or_default() += 1;
    }

    pub fn served(&self, key: Option<String>) -> Served {
        Served {
            provider: self.provider.clone(),
            attempts: self.attempts,
            key,
            fallback: None,
            upstream: Vec::new(),
        }
    }

    /// "3 attempts on 2 keys (rate_limit x1, server x2); 1 key cooling"
    pub fn summary(&self) -> String {
        let plural = |n: u32, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let mut out = format!(
            "{} on {}",
            plural(self.attempts, "attempt"),
            plural(self.key_ids.len() as u32, "key")
        );
        if !self.classes.is_empty() {
            let classes: Vec<String> = self
                .classes
                .iter()
                .map(|(c, n)| format!("{} x{n}", c.as_str()))
                .collect();
            let _ = write!(out, " ({})", classes.join(", "));
        }
        let w = &self.waiting;
        if w.cooling > 0 {
            let _ = write!(out, "; {} cooling down", plural(w.cooling as u32, "key"));
            if w.benched > 0 {
                let _ = write!(out, " ({} after auth refusals)", w.benched);
            }
        }
        if w.busy > 0 {
            let _ = write!(out, "; {} busy", plural(w.busy as u32, "key"));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    BadRequest(String),
    /// A field of the request other than `model` is wrong.
    #[error("{0}")]
    InvalidField(String),
    #[error("unknown provider {0:?}; GET /v1/providers lists the configured ones")]
    UnknownProvider(String),
    #[error("provider {0:?} has no keys; set {upper}_API_KEY or {upper}_API_KEY_1", upper = .0.to_ascii_uppercase())]
    NoKeys(String),
    #[error("model {0:?} is not served by this proxy (excluded by the provider's model filters)")]
    ModelDenied(String),
    #[error("provider {provider:?} does not offer {endpoint}")]
    EndpointMissing {
        provider: String,
        endpoint: &'static str,
    },
    /// The upstream refused the request itself; no other key would do better.
    #[error("the upstream rejected the request ({})", class.as_str())]
    Upstream {
        status: u16,
        body: Bytes,
        class: ErrorClass,
        served: Box<Served>,
        /// The upstream speaks OpenAI's wire format, so its error body can go to the client as it came.
        openai_wire: bool,
    },
    #[error("every key of {}/{} is cooling down for another {}s: {}", .tried.provider, .tried.model, retry_after.as_secs().max(1), .tried.summary())]
    AllCooling {
        retry_after: Duration,
        tried: Box<Tried>,
    },
    #[error("no key of {}/{} could serve the request: {}", .0.provider, .0.model, .0.summary())]
    Exhausted(Box<Tried>),
    #[error("the request to {}/{} did not complete before the deadline: {}", .0.provider, .0.model, .0.summary())]
    Deadline(Box<Tried>),
    /// The model gave no answer at all (no response or first event in time, a connection closed unanswered);
    /// reported only when a fallback is tried next.
    #[error("{}/{} did not answer: {}", .0.provider, .0.model, .0.summary())]
    ModelSilent(Box<Tried>),
    /// The model's breaker is open: it failed on key after key just now (see `breaker`).
    #[error("{}/{} is failing on every key; requests with a fallback skip it for {}s", .tried.provider, .tried.model, wait.as_secs_f64().ceil())]
    ModelDown { wait: Duration, tried: Box<Tried> },
    #[error(
        "the upstream's answer is larger than {limit} bytes (max_response_size in config.yaml)"
    )]
    ResponseTooLarge { limit: usize, served: Box<Served> },
    /// The provider's script failed; the message names the script, function and line.
    #[error("{0}")]
    Script(#[from] crate::script::ScriptError),
    /// The request asks for what the provider cannot do (a field it has no equivalent for).
    #[error(transparent)]
    Unsupported(#[from] crate::failure::Refused),
    /// No room for the request's script work: its client has too much waiting, or it waited too long.
    #[error("{0}")]
    Busy(#[from] crate::offload::Busy),
}

impl From<crate::mapping::MapError> for RelayError {
    fn from(e: crate::mapping::MapError) -> Self {
        match e {
            crate::mapping::MapError::Refused(refused) => Self::Unsupported(refused),
            crate::mapping::MapError::Script(e) => Self::Script(e),
        }
    }
}

impl RelayError {
    /// What was tried, when the error is that no key could serve.
    pub fn tried(&self) -> Option<&Tried> {
        match self {
            Self::AllCooling { tried, .. } | Self::Exhausted(tried) | Self::Deadline(tried) => {
                Some(tried)
            }
            _ => None,
        }
    }

    /// Counts attempts made for earlier candidates (fallbacks) into this error's report.
    pub fn add_attempts(&mut self, earlier: u32) {
        match self {
            Self::Upstream { served, .. } | Self::ResponseTooLarge { served, .. } => {
                served.attempts += earlier
            }
            Self::AllCooling { tried, .. }
            | Self::Exhausted(tried)
            | Self::Deadline(tried)
            | Self::ModelSilent(tried)
            | Self::ModelDown { tried, .. } => tried.attempts += earlier,
            _ => {}
        }
    }

    /// Whether the next fallback candidate should be tried after this error.
    pub fn wants_fallback(&self, fallback_on_content_filter: bool) -> bool {
        match self {
            Self::AllCooling { .. }
            | Self::Exhausted(_)
            | Self::Deadline(_)
            | Self::ModelSilent(_)
            | Self::ModelDown { .. } => true,
            Self::Upstream {
                class: ErrorClass::ContentFilter,
                ..
            } => fallback_on_content_filter,
            _ => false,
        }
    }

    /// The HTTP status, OpenAI error type and code the client gets.
    pub fn kind(&self) -> (u16, &'static str, &'static str) {
        match self {
            Self::BadRequest(_) => (400, "invalid_request_error", "invalid_model"),
            Self::InvalidField(_) => (400, "invalid_request_error", "invalid_request"),
            Self::Unsupported(refused) => (400, "invalid_request_error", refused.code),
            Self::UnknownProvider(_) => (404, "invalid_request_error", "unknown_provider"),
            Self::NoKeys(_) => (404, "invalid_request_error", "provider_without_keys"),
            Self::ModelDenied(_) => (404, "invalid_request_error", "model_not_found"),
            Self::EndpointMissing { .. } => (404, "invalid_request_error", "unsupported_endpoint"),
            Self::Upstream { status, class, .. } => {
                let (kind, code) = match class {
                    ErrorClass::ContextWindow => {
                        ("invalid_request_error", "context_length_exceeded")
                    }
                    ErrorClass::ContentFilter => ("invalid_request_error", "content_filter"),
                    ErrorClass::Auth => ("upstream_error", "upstream_auth_refused"),
                    ErrorClass::Forbidden => ("upstream_error", "upstream_forbidden"),
                    _ => ("invalid_request_error", "upstream_invalid_request"),
                };
                let status = if (400..600).contains(status) {
                    *status
                } else {
                    400
                };
                (status, kind, code)
            }
            Self::AllCooling { .. } => (429, "rate_limit_error", "all_keys_cooling"),
            Self::Exhausted(tried) if tried.unusable => {
                (502, "upstream_error", "bad_upstream_response")
            }
            Self::Exhausted(_) => (503, "upstream_error", "no_key_available"),
            Self::Deadline(_) => (504, "timeout_error", "deadline_exceeded"),
            Self::ModelSilent(_) => (504, "timeout_error", "upstream_unresponsive"),
            Self::ModelDown { .. } => (503, "upstream_error", "model_unavailable"),
            Self::ResponseTooLarge { .. } => (502, "upstream_error", "upstream_response_too_large"),
            Self::Script(_) => (502, "upstream_error", "script_error"),
            Self::Busy(_) => (503, "server_error", "server_busy"),
        }
    }

    /// The `x-keyrelay-*` facts, where there are any.
    pub fn served(&self) -> Option<Served> {
        match self {
            Self::Upstream { served, .. } | Self::ResponseTooLarge { served, .. } => {
                Some((**served).clone())
            }
            Self::AllCooling { tried, .. }
            | Self::Exhausted(tried)
            | Self::Deadline(tried)
            | Self::ModelSilent(tried)
            | Self::ModelDown { tried, .. } => Some(tried.served(None)),
            _ => None,
        }
    }
}
