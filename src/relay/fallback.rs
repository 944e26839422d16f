//! The models a request may be answered by after the one it names: from the request body (`fallbacks`,
//! `context_fallbacks`, consumed and never forwarded) or from `config.yaml`, shared rather than copied per
//! candidate, and capped.

use super::RelayError;
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
