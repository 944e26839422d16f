//! `response.fast`: an upstream answer of one text mapped to an OpenAI chat completion in Rust; any other
//! answer (tool calls, several candidates, thoughts) is left to the script.
//!
//! ```yaml
//! response:
//!   fast:
//!     if: {}                                       # conditions, as in stream.fast
//!     present: [candidates.0.content.parts.0.text]
//!     absent: [candidates.1, candidates.0.content.parts.1]
//!     content: candidates.0.content.parts.0.text
//!     finish_reason: {from: candidates.0.finishReason, map: {STOP: stop, MAX_TOKENS: length}, default: stop}
//!     id: responseId                               # optional; else a generated chatcmpl- id
//!     model: modelVersion                          # optional; else the requested model
//!     usage:                                       # each a list of paths whose numbers are added
//!       prompt_tokens: [usageMetadata.promptTokenCount]
//!       completion_tokens: [usageMetadata.candidatesTokenCount, usageMetadata.thoughtsTokenCount]
//!       total_tokens: [usageMetadata.totalTokenCount]    # optional; else prompt + completion
//!       reasoning_tokens: [usageMetadata.thoughtsTokenCount]  # optional; reported when above zero
//!       cached_tokens: [usageMetadata.cachedContentTokenCount] # optional; reported when above zero
//! ```

use super::json_path::{Conditions, JsonPath};
use crate::config::ConfigError;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResponse {
    fast: Option<RawAnswer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnswer {
    #[serde(default, rename = "if")]
    equals: BTreeMap<String, Value>,
    #[serde(default)]
    present: Vec<String>,
    #[serde(default)]
    absent: Vec<String>,
    content: String,
    finish_reason: RawFinish,
    id: Option<String>,
    model: Option<String>,
    usage: RawUsage,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFinish {
    from: String,
    #[serde(default)]
    map: BTreeMap<String, String>,
    default: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsage {
    prompt_tokens: Vec<String>,
    completion_tokens: Vec<String>,
    total_tokens: Option<Vec<String>>,
    reasoning_tokens: Option<Vec<String>>,
    cached_tokens: Option<Vec<String>>,
}

/// A declared mapping of one-text answers to OpenAI chat completions.
#[derive(Clone, Debug)]
pub struct AnswerRules {
    when: Conditions,
    content: JsonPath,
    finish_from: JsonPath,
    finish_map: BTreeMap<String, String>,
    finish_default: String,
    id: Option<JsonPath>,
    model: Option<JsonPath>,
    prompt: Vec<JsonPath>,
    completion: Vec<JsonPath>,
    total: Option<Vec<JsonPath>>,
    reasoning: Option<Vec<JsonPath>>,
    cached: Option<Vec<JsonPath>>,
}

impl AnswerRules {
    /// The OpenAI response for an upstream answer the conditions hold for; `None` leaves it to the script.
    pub fn map(&self, body: &Value, model: &str) -> Option<Value> {
        if !self.when.hold(body) {
            return None;
        }
        let content = self.content.get(body)?.as_str()?;
        let finish = match self.finish_from.get(body) {
            None => Value::Null,
            Some(reason) => {
                let reason = reason.as_str()?;
                Value::String(
                    self.finish_map
                        .get(reason)
                        .unwrap_or(&self.finish_default)
                        .clone(),
                )
            }
        };
        // A declared id or model that is there but not text is left to the script, which passes it on as it is.
        let text = |path: &Option<JsonPath>| -> Option<Option<&str>> {
            match path.as_ref().and_then(|p| p.get(body)) {
                None => Some(None),
                Some(value) => value.as_str().map(Some),
            }
        };
        let id = text(&self.id)?.map_or_else(crate::mapping::chunk::completion_id, String::from);
        let answered_by = text(&self.model)?.unwrap_or(model);
        Some(json!({
            "id": id,
            "object": "chat.completion",
            "created": crate::mapping::chunk::unix_seconds(),
            "model": answered_by,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
            }],
            "usage": self.usage(body)?,
        }))
    }

    /// The usage; `None` when a count is there but not a whole number (the script decides then).
    fn usage(&self, body: &Value) -> Option<Value> {
        let sum = |paths: &[JsonPath]| -> Option<u64> {
            paths.iter().try_fold(0u64, |total, p| match p.get(body) {
                None => Some(total),
                Some(n) => Some(total.saturating_add(n.as_u64()?)),
            })
        };
        let prompt = sum(&self.prompt)?;
        let completion = sum(&self.completion)?;
        let total = match &self.total {
            Some(paths) if paths.iter().any(|p| p.get(body).is_some()) => sum(paths)?,
            _ => prompt.saturating_add(completion),
        };
        let mut usage = Map::new();
        usage.insert("prompt_tokens".into(), prompt.into());
        usage.insert("completion_tokens".into(), completion.into());
        usage.insert("total_tokens".into(), total.into());
        let detail = |paths: &Option<Vec<JsonPath>>| -> Option<Option<u64>> {
            match paths {
                None => Some(None),
                Some(paths) => Some(Some(sum(paths)?).filter(|n| *n > 0)),
            }
        };
        if let Some(n) = detail(&self.reasoning)? {
            usage.insert(
                "completion_tokens_details".into(),
                json!({"reasoning_tokens": n}),
            );
        }
        if let Some(n) = detail(&self.cached)? {
            usage.insert("prompt_tokens_details".into(), json!({"cached_tokens": n}));
        }
        Some(Value::Object(usage))
    }
}

pub(super) fn resolve(
    raw: RawResponse,
    file: &Path,
) -> Result<Option<AnswerRules>, Vec<ConfigError>> {
    let Some(raw) = raw.fast else {
        return Ok(None);
    };
    let mut errors = Vec::new();
    let mut path = |text: &str| {
        JsonPath::parse(text).or_else(|| {
            errors.push(ConfigError::new(
                Some(file),
                format!("response.fast: {text:?} is not a path like candidates.0.content"),
            ));
            None
        })
    };
    let when = Conditions::resolve(&raw.equals, &raw.present, &raw.absent, &mut path);
    let mut paths = |list: &[String]| list.iter().filter_map(|p| path(p)).collect::<Vec<_>>();
    let prompt = paths(&raw.usage.prompt_tokens);
    let completion = paths(&raw.usage.completion_tokens);
    let total = raw.usage.total_tokens.as_deref().map(&mut paths);
    let reasoning = raw.usage.reasoning_tokens.as_deref().map(&mut paths);
    let cached = raw.usage.cached_tokens.as_deref().map(&mut paths);
    let content = path(&raw.content);
    let finish_from = path(&raw.finish_reason.from);
    let id = raw.id.as_deref().and_then(&mut path);
    let model = raw.model.as_deref().and_then(&mut path);
    match (content, finish_from) {
        (Some(content), Some(finish_from)) if errors.is_empty() => Ok(Some(AnswerRules {
            when,
            content,
            finish_from,
            finish_map: raw.finish_reason.map,
            finish_default: raw.finish_reason.default,
            id,
            model,
            prompt,
            completion,
            total,
            reasoning,
            cached,
        })),
        _ => Err(errors),
    }
}
