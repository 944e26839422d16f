//! What went wrong, in the words every layer shares: the class of an upstream attempt's failure and what the
//! cooldown it causes covers, and a request refused as the client's to fix.

use serde::{Deserialize, Serialize};

/// What went wrong with one upstream attempt; it decides what the engine does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Too many requests for now: cool this key for this model, rotate.
    RateLimit,
    /// A daily quota or credit is exhausted: cool this key for this model until the daily reset.
    Quota,
    /// The key is invalid: cool the whole key, rotate.
    Auth,
    /// The key may not do this: cool the whole key, rotate.
    Forbidden,
    /// The client's request is wrong: answer at once, no other key.
    InvalidRequest,
    /// The prompt does not fit the model: answer at once, no other key.
    ContextWindow,
    /// The upstream's content filter refused the request: answer at once, no other key (a fallback only when
    /// `fallback_on_content_filter`).
    ContentFilter,
    /// The upstream failed: retry the same key with backoff, then rotate.
    Server,
    /// No connection, or it broke: like `Server`.
    Connection,
    /// The upstream did not answer in time: like `Server`.
    Timeout,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::Quota => "quota",
            Self::Auth => "auth",
            Self::Forbidden => "forbidden",
            Self::InvalidRequest => "invalid_request",
            Self::ContextWindow => "context_window",
            Self::ContentFilter => "content_filter",
            Self::Server => "server",
            Self::Connection => "connection",
            Self::Timeout => "timeout",
        }
    }

    /// The client's own mistake: no other key would answer differently.
    pub fn is_client_error(self) -> bool {
        matches!(
            self,
            Self::InvalidRequest | Self::ContextWindow | Self::ContentFilter
        )
    }

    /// A transient fault worth retrying on the same key.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Server | Self::Connection | Self::Timeout)
    }

    /// Where a cooldown applies when no rule says otherwise.
    pub fn default_scope(self) -> Scope {
        match self {
            Self::Auth | Self::Forbidden => Scope::Key,
            _ => Scope::Model,
        }
    }
}

/// What a cooldown covers: this key for this model, or this key for every model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Model,
    Key,
}

/// The client asked for what the target cannot do (a field it has no equivalent for), or sent a field of the wrong
/// type: a 400 naming `param`, the client's to fix. Made by field rules, scripts (`refuse`), the shape check and
/// inbound dialects alike.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub param: String,
    pub message: String,
    /// The error code the client gets: `unsupported_parameter`, or `invalid_type`.
    pub code: &'static str,
}

impl Refused {
    /// A field the target cannot honour.
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
            code: "unsupported_parameter",
        }
    }

    /// A field of the wrong type.
    pub fn invalid_type(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: "invalid_type",
            ..Self::new(param, message)
        }
    }
}
