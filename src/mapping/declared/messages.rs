//! `request.messages`: a conversation of plain text messages mapped to the upstream's turns in Rust. A chat with
//! anything richer (tool calls, images, a role the rules do not name) is left to the script, which keeps the
//! whole mapping; the rules only make the frequent case cheap.
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
//! ```

use super::json_path::JsonPath;
use crate::config::ConfigError;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const ROLE: &str = "$role";
const TEXT: &str = "$text";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMessages {
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
pub struct MessageRules {
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

impl MessageRules {
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

pub(super) fn resolve(raw: RawMessages, file: &Path) -> Result<MessageRules, Vec<ConfigError>> {
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
        Some(into) if errors.is_empty() => Ok(MessageRules {
            roles: raw.roles.into_iter().collect(),
            into,
            turn: raw.turn,
            merge: raw.merge,
            system,
        }),
        _ => Err(errors),
    }
}
