//! The models a request may be answered by after the one it names: from the request body (`fallbacks`,
//! `context_fallbacks`, consumed and never forwarded) or from `config.yaml`, shared rather than copied per
//! candidate, and capped.

use super::RelayError;
use crate::failure::ErrorClass;
use serde_json::{Map, Value};
use std::sync::Arc;

/// The most models a request may list in `fallbacks` or `context_fallbacks`.
pub const MAX_FALLBACKS: usize = 16;

/// A fallback list and how far into it a request has come.
#[derive(Clone, Debug, Default)]
pub struct Fallbacks {
    list: Arc<[String]>,
    next: usize,
}

impl Fallbacks {
    pub fn new(list: Arc<[String]>) -> Self {
        Self { list, next: 0 }
    }

    /// The models not tried yet.
    pub fn left(&self) -> &[String] {
        &self.list[self.next..]
    }

    pub fn is_empty(&self) -> bool {
        self.left().is_empty()
    }

    /// The next model to try.
    pub fn pop(&mut self) -> Option<String> {
        let next = self.list.get(self.next)?.clone();
        self.next += 1;
        Some(next)
    }
}

/// The models one request may still be answered by, and the answer to give if none serves.
pub struct Candidates {
    pub fallbacks: Fallbacks,
    /// Tried instead of `fallbacks` once a prompt is too long for a model.
    context_fallbacks: Option<Fallbacks>,
    on_context_list: bool,
    /// The error to answer with if no candidate serves.
    answer: Option<RelayError>,
    /// Upstream attempts made by the candidates tried so far.
    pub earlier_attempts: u32,
}

impl Candidates {
    pub fn new(fallbacks: Fallbacks, context_fallbacks: Option<Fallbacks>) -> Self {
        Self {
            fallbacks,
            context_fallbacks,
            on_context_list: false,
            answer: None,
            earlier_attempts: 0,
        }
    }

    /// No candidate is left after the current one.
    pub fn last(&self) -> bool {
        self.fallbacks.is_empty() && self.context_fallbacks.is_none()
    }

    /// After `model` (a fallback when `is_fallback`) failed with `e`: the next model to try, or, when none is
    /// left or `e` is not a reason to move on, the error to answer with.
    pub fn after_failure(
        &mut self,
        model: &str,
        is_fallback: bool,
        e: RelayError,
        fallback_on_content_filter: bool,
        time_left: bool,
    ) -> Result<String, RelayError> {
        // A prompt too long for this model moves to the context-window list only: the general fallbacks are for
        // a model that cannot serve, not one that is too small.
        let context = matches!(
            e,
            RelayError::Upstream {
                class: ErrorClass::ContextWindow,
                ..
            }
        );
        if context && let Some(list) = self.context_fallbacks.take() {
            self.fallbacks = list;
            self.on_context_list = true;
        }
        // A fallback that cannot be served at all (no keys, unknown, filtered) is skipped.
        let unservable = is_fallback
            && matches!(
                e,
                RelayError::UnknownProvider(_)
                    | RelayError::NoKeys(_)
                    | RelayError::ModelDenied(_)
                    | RelayError::EndpointMissing { .. }
            );
        let move_on = if context {
            self.on_context_list
        } else {
            unservable || e.wants_fallback(fallback_on_content_filter)
        };
        let next = if move_on && time_left {
            self.fallbacks.pop()
        } else {
            None
        };
        self.earlier_attempts += e.served().map_or(0, |s| s.attempts);
        if let Some(next) = &next {
            tracing::info!(from = %model, to = %next, error = %e, "trying a fallback model");
        }
        // A fallback skipped as unservable never stands in for the answer a model that was tried gave (a 429
        // keeps its Retry-After).
        if !unservable || self.answer.is_none() {
            self.answer = Some(e);
        }
        match next {
            Some(next) => Ok(next),
            None => {
                let mut e = self.answer.take().expect("set above");
                let own = e.served().map_or(0, |s| s.attempts);
                e.add_attempts(self.earlier_attempts - own);
                Err(e)
            }
        }
    }
}

/// Removes the list `field` from a request body: `None` when absent, an error when it is not a list of at most
/// [`MAX_FALLBACKS`] model names.
pub fn take(
    body: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<Arc<[String]>>, RelayError> {
    let Some(value) = body.remove(field) else {
        return Ok(None);
    };
    let invalid = || {
        RelayError::InvalidField(format!(
            "`{field}` must be a list of at most {MAX_FALLBACKS} model names such as \"openai/gpt-4o-mini\""
        ))
    };
    let Value::Array(items) = value else {
        return Err(invalid());
    };
    if items.len() > MAX_FALLBACKS {
        return Err(invalid());
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::String(model) => Ok(model),
            _ => Err(invalid()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|list| Some(list.into()))
}
