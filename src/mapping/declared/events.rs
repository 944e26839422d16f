//! Declared stream mappings: the simple, frequent events of a non-OpenAI stream (a text delta, a keep-alive)
//! mapped in Rust from rules in the provider file, so that the provider's script runs only for the events that
//! need it (starts, tool calls, finishes). This is what keeps per-event cost low without naming a provider.
//!
//! ```yaml
//! stream:
//!   fast:
//!     - event: content_block_delta          # SSE event name (optional)
//!       if: {delta.type: text_delta}        # paths into the event's JSON that must equal these values
//!       present: [delta.text]               # paths that must hold a non-null value
//!       absent: [delta.partial_json]        # paths that must be missing or null
//!       content: delta.text                 # emit this string as content (or `reasoning:`, or `skip: true`)
//! ```

use super::json_path::{Conditions, JsonPath};
use crate::config::ConfigError;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStream {
    #[serde(default)]
    fast: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    event: Option<String>,
    #[serde(default, rename = "if")]
    equals: BTreeMap<String, Value>,
    #[serde(default)]
    present: Vec<String>,
    #[serde(default)]
    absent: Vec<String>,
    content: Option<String>,
    reasoning: Option<String>,
    #[serde(default)]
    skip: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Emit {
    Skip,
    Content(JsonPath),
    Reasoning(JsonPath),
}

/// What a matching rule produced.
#[derive(Debug, PartialEq)]
pub enum Emitted<'a> {
    Skip,
    Content(&'a str),
    Reasoning(&'a str),
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventRule {
    event: Option<String>,
    when: Conditions,
    emit: Emit,
}

impl EventRule {
    fn apply<'a>(&self, event: Option<&str>, data: &'a Value) -> Option<Emitted<'a>> {
        if self.event.as_deref().is_some_and(|e| Some(e) != event) {
            return None;
        }
        if !self.when.hold(data) {
            return None;
        }
        match &self.emit {
            Emit::Skip => Some(Emitted::Skip),
            Emit::Content(p) => p.get(data)?.as_str().map(Emitted::Content),
            Emit::Reasoning(p) => p.get(data)?.as_str().map(Emitted::Reasoning),
        }
    }
}

/// The first rule that maps this event, if any.
pub fn first_match<'a>(
    rules: &[EventRule],
    event: Option<&str>,
    data: &'a Value,
) -> Option<Emitted<'a>> {
    rules.iter().find_map(|r| r.apply(event, data))
}

pub(super) fn resolve(
    raw: RawStream,
    file: Option<&Path>,
) -> Result<Vec<EventRule>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    for (i, r) in raw.fast.into_iter().enumerate() {
        let mut path = |text: &str| {
            JsonPath::parse(text).or_else(|| {
                errors.push(ConfigError::new(
                    file,
                    format!("stream.fast[{i}]: {text:?} is not a path like delta.text"),
                ));
                None
            })
        };
        let when = Conditions::resolve(&r.equals, &r.present, &r.absent, &mut path);
        let emit = match (r.content, r.reasoning, r.skip) {
            (Some(p), None, false) => path(&p).map(Emit::Content),
            (None, Some(p), false) => path(&p).map(Emit::Reasoning),
            (None, None, true) => Some(Emit::Skip),
            _ => {
                errors.push(
                    ConfigError::new(
                        file,
                        format!(
                            "stream.fast[{i}] must have exactly one of content, reasoning or skip"
                        ),
                    )
                    .hint("e.g. content: delta.text"),
                );
                None
            }
        };
        if let Some(emit) = emit {
            rules.push(EventRule {
                event: r.event,
                when,
                emit,
            });
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(yaml: &str) -> Vec<EventRule> {
        resolve(serde_yaml::from_str(yaml).unwrap(), None).unwrap()
    }

    #[test]
    fn rules_match_by_event_values_presence_and_absence() {
        let r = rules(
            "fast:\n  - event: content_block_delta\n    if: {delta.type: text_delta}\n    content: delta.text\n  - event: ping\n    skip: true\n  - absent: [c.0.done]\n    present: [c.0.parts.0.text]\n    reasoning: c.0.parts.0.text\n",
        );
        let delta =
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}});
        assert_eq!(
            first_match(&r, Some("content_block_delta"), &delta),
            Some(Emitted::Content("hi"))
        );
        assert_eq!(first_match(&r, Some("other"), &delta), None);
        let tool = json!({"delta": {"type": "input_json_delta", "partial_json": "{"}});
        assert_eq!(first_match(&r, Some("content_block_delta"), &tool), None);
        assert_eq!(
            first_match(&r, Some("ping"), &json!({})),
            Some(Emitted::Skip)
        );
        let gemini_like = json!({"c": [{"parts": [{"text": "t"}], "done": null}]});
        assert_eq!(
            first_match(&r, None, &gemini_like),
            Some(Emitted::Reasoning("t"))
        );
        let finished = json!({"c": [{"parts": [{"text": "t"}], "done": "yes"}]});
        assert_eq!(first_match(&r, None, &finished), None);
    }

    #[test]
    fn bad_rules_are_reported() {
        let raw: RawStream = serde_yaml::from_str(
            "fast:\n  - content: a\n    skip: true\n  - present: ['a..b']\n    skip: true\n",
        )
        .unwrap();
        assert_eq!(resolve(raw, None).unwrap_err().len(), 2);
    }
}
