//! Declared mappings for the plain-text case, done in Rust: a conversation of text messages becomes the
//! upstream's turns (`request.messages`), and an answer of one text becomes an OpenAI response
//! (`response.fast`). Anything richer (tool calls, images, several candidates, thoughts) is left to the
//! provider's script, which keeps the whole mapping; the declarations only make the frequent case cheap.
//!
//! ```yaml
//! request:
//!   messages:
//!     roles: {user: user, assistant: model}        # OpenAI role -> upstream role; other roles go to the script
//!     into: contents                               # where the turns go in the upstream body
//!     turn: {role: $role, parts: [{text: $text}]}  # one turn; the strings $role and $text are filled in
//!     merge: parts                                 # consecutive turns of one role become one, this array joined
//!     system: {into: systemInstruction, value: {parts: [{text: $text}]}, merge: parts}
//!     # or: system: {into: system, join: "\n\n"}   # the system texts as one string
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

const ROLE: &str = "$role";
const TEXT: &str = "$text";

// ------------------------------------------------------------------------------------------------ requests

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMessages {
    roles: BTreeMap<String, String>,
    into: String,
    turn: Value,
    merge: Option<String>,
    system: Option<RawSystem>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSystem {
    into: String,
    value: Option<Value>,
    merge: Option<String>,
    join: Option<String>,
}

/// A declared mapping of plain-text conversations.
#[derive(Clone, Debug)]
pub struct MessageMap {
    roles: Vec<(String, String)>,
    into: JsonPath,
    turn: Value,
    merge: Option<String>,
    system: Option<SystemMap>,
}

#[derive(Clone, Debug)]
enum SystemMap {
    /// Each system text filled into `value`, joined into one by its `merge` array.
    Value {
        into: JsonPath,
        value: Value,
        merge: Option<String>,
    },
    /// The system texts as one string.
    Join { into: JsonPath, separator: String },
}

impl MessageMap {
    /// What to write into the upstream body for these messages (path, value), or `None` when any message is
    /// more than plain text: a role the map does not know, content that is not a non-empty string, or any
    /// field beyond role, content and name.
    pub fn map(&self, messages: &Value) -> Option<Vec<(&JsonPath, Value)>> {
        let list = messages.as_array()?;
        let mut turns: Vec<Value> = Vec::with_capacity(list.len());
        let mut system: Vec<&str> = Vec::new();
        let mut last_role: Option<&str> = None;
        for m in list {
            let m = m.as_object()?;
            if m.keys()
                .any(|k| !matches!(k.as_str(), "role" | "content" | "name"))
            {
                return None;
            }
            let role = m.get("role")?.as_str()?;
            let text = m.get("content")?.as_str().filter(|t| !t.is_empty())?;
            if matches!(role, "system" | "developer") {
                self.system.as_ref()?;
                system.push(text);
                continue;
            }
            let role = self.roles.iter().find(|(from, _)| from == role)?.1.as_str();
            let turn = fill(&self.turn, role, text);
            match (&self.merge, turns.last_mut()) {
                (Some(field), Some(last)) if last_role == Some(role) => append(last, field, turn),
                _ => turns.push(turn),
            }
            last_role = Some(role);
        }
        let mut out = vec![(&self.into, Value::Array(turns))];
        match (&self.system, system.is_empty()) {
            (_, true) | (None, _) => {}
            (Some(SystemMap::Join { into, separator }), false) => {
                out.push((into, Value::String(system.join(separator))));
            }
            (Some(SystemMap::Value { into, value, merge }), false) => {
                let mut texts = system.into_iter();
                let mut joined = fill(value, "system", texts.next()?);
                for text in texts {
                    match merge {
                        Some(field) => append(&mut joined, field, fill(value, "system", text)),
                        None => return None,
                    }
                }
                out.push((into, joined));
            }
        }
        Some(out)
    }
}

/// The template with `$role` and `$text` filled in.
fn fill(template: &Value, role: &str, text: &str) -> Value {
    match template {
        Value::String(s) if s == ROLE => Value::String(role.to_string()),
        Value::String(s) if s == TEXT => Value::String(text.to_string()),
        Value::Array(items) => Value::Array(items.iter().map(|v| fill(v, role, text)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill(v, role, text)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Whether a template holds `$text` as one of its strings.
fn mentions_text(template: &Value) -> bool {
    match template {
        Value::String(s) => s == TEXT,
        Value::Array(items) => items.iter().any(mentions_text),
        Value::Object(map) => map.values().any(mentions_text),
        _ => false,
    }
}

/// Appends the items of `extra[field]` to `into[field]` (both arrays, as load-time checks ensure).
fn append(into: &mut Value, field: &str, mut extra: Value) {
    if let (Some(Value::Array(to)), Some(Value::Array(from))) =
        (into.get_mut(field), extra.get_mut(field))
    {
        to.append(from);
    }
}

pub(super) fn resolve_messages(
    raw: RawMessages,
    file: &Path,
) -> Result<MessageMap, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut error = |what: String| {
        errors.push(ConfigError::new(
            Some(file),
            format!("request.messages: {what}"),
        ));
    };
    let path = |text: &str, error: &mut dyn FnMut(String)| {
        let parsed = JsonPath::parse(text).filter(JsonPath::is_keys_only);
        if parsed.is_none() {
            error(format!(
                "{text:?} is not a path of object keys like systemInstruction"
            ));
        }
        parsed
    };
    let mergeable = |template: &Value, merge: &Option<String>, what: &str| -> Option<String> {
        if !template.is_object() {
            return Some(format!("`{what}` must be a map"));
        }
        match merge {
            Some(field) if !template.get(field).is_some_and(Value::is_array) => Some(format!(
                "`merge: {field}` needs `{what}` to hold an array `{field}`"
            )),
            _ => None,
        }
    };
    if raw.roles.is_empty() {
        error("`roles` must map at least one OpenAI role, e.g. {user: user}".into());
    }
    if let Some(role) = raw
        .roles
        .keys()
        .find(|r| matches!(r.as_str(), "system" | "developer"))
    {
        error(format!(
            "`roles` cannot map {role:?}: system and developer messages go to `system`"
        ));
    }
    if !mentions_text(&raw.turn) {
        error("`turn` must hold the string $text where the message's text goes".into());
    }
    if raw.system.as_ref().is_some_and(|s| s.into == raw.into) {
        error(
            "`system.into` must differ from `into`: the system text would replace the turns".into(),
        );
    }
    if let Some(e) = mergeable(&raw.turn, &raw.merge, "turn") {
        error(e);
    }
    let into = path(&raw.into, &mut error);
    let system = match raw.system {
        None => None,
        Some(RawSystem {
            into,
            value: Some(value),
            merge,
            join: None,
        }) => {
            if let Some(e) = mergeable(&value, &merge, "system.value") {
                error(e);
            }
            if !mentions_text(&value) {
                error("`system.value` must hold the string $text".into());
            }
            path(&into, &mut error).map(|into| SystemMap::Value { into, value, merge })
        }
        Some(RawSystem {
            into,
            value: None,
            merge: None,
            join: Some(separator),
        }) => path(&into, &mut error).map(|into| SystemMap::Join { into, separator }),
        Some(_) => {
            error("`system` takes `into` and either `value` (and `merge`) or `join`".into());
            None
        }
    };
    match into {
        Some(into) if errors.is_empty() => Ok(MessageMap {
            roles: raw.roles.into_iter().collect(),
            into,
            turn: raw.turn,
            merge: raw.merge,
            system,
        }),
        _ => Err(errors),
    }
}

// ----------------------------------------------------------------------------------------------- responses

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponse {
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
pub struct AnswerMap {
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

impl AnswerMap {
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
        let id = text(&self.id)?.map_or_else(crate::stream::chunk::completion_id, String::from);
        let answered_by = text(&self.model)?.unwrap_or(model);
        Some(json!({
            "id": id,
            "object": "chat.completion",
            "created": crate::stream::chunk::unix_seconds(),
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

pub(super) fn resolve_response(
    raw: RawResponse,
    file: &Path,
) -> Result<Option<AnswerMap>, Vec<ConfigError>> {
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
        (Some(content), Some(finish_from)) if errors.is_empty() => Ok(Some(AnswerMap {
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
