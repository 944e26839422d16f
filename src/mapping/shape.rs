//! The shape of an OpenAI request, checked before a mapping that reads it: where the request is translated (a
//! provider's declared rules or its script), every field the mappings read must be of the type OpenAI's API
//! gives it, or the client gets a 400 naming the field, never a script's failure. Passthrough providers get the
//! body as written (their upstream judges it).
//!
//! Only types are checked: values (a role keyrelay does not know, a part type a provider cannot take) are the
//! mapping's to judge, with its own message.

use super::{Draft, MapError, RequestMapping, Target};
use crate::failure::Refused;
use serde_json::Value;
use std::sync::Arc;

/// A request mapping under a check of its input's shape.
#[derive(Debug)]
pub struct Checked {
    pub below: Arc<dyn RequestMapping>,
}

impl RequestMapping for Checked {
    fn map(&self, target: &Target<'_>, body: Value) -> Result<Draft, MapError> {
        check(target.endpoint, &body)?;
        self.below.map(target, body)
    }

    fn slow(&self) -> bool {
        self.below.slow()
    }
}

/// The JSON types a field may have.
#[derive(Clone, Copy)]
enum Is {
    Text,
    Integer,
    Number,
    Boolean,
    Object,
    List,
}

impl Is {
    fn holds(self, value: &Value) -> bool {
        match self {
            Is::Text => value.is_string(),
            Is::Integer => value.is_i64() || value.is_u64(),
            Is::Number => value.is_number(),
            Is::Boolean => value.is_boolean(),
            Is::Object => value.is_object(),
            Is::List => value.is_array(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Is::Text => "a string",
            Is::Integer => "an integer",
            Is::Number => "a number",
            Is::Boolean => "true or false",
            Is::Object => "an object",
            Is::List => "a list",
        }
    }
}

fn refuse(at: &str, what: &str) -> Refused {
    Refused::invalid_type(at, format!("`{at}` must be {what}"))
}

/// `value[field]`, when present and not null, must be one of `kinds`.
fn field<'a>(
    value: &'a Value,
    at: &str,
    field: &str,
    kinds: &[Is],
) -> Result<Option<&'a Value>, Refused> {
    let Some(v) = value.get(field).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    if kinds.iter().any(|k| k.holds(v)) {
        return Ok(Some(v));
    }
    let path = if at.is_empty() {
        field.to_string()
    } else {
        format!("{at}.{field}")
    };
    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    Err(refuse(&path, &names.join(" or ")))
}

/// Every item of `value[name]`, when it is a list, checked by `each` with its path.
fn each(
    value: &Value,
    at: &str,
    name: &str,
    mut each: impl FnMut(&Value, &str) -> Result<(), Refused>,
) -> Result<(), Refused> {
    let Some(Value::Array(items)) = value.get(name) else {
        return Ok(());
    };
    let base = if at.is_empty() {
        name.to_string()
    } else {
        format!("{at}.{name}")
    };
    for (i, item) in items.iter().enumerate() {
        each(item, &format!("{base}[{i}]"))?;
    }
    Ok(())
}

fn object(value: &Value, at: &str) -> Result<(), Refused> {
    match value.is_object() {
        true => Ok(()),
        false => Err(refuse(at, "an object")),
    }
}

/// The request for `endpoint` has the shape OpenAI's API gives it, as far as the mappings read it.
pub fn check(endpoint: &str, body: &Value) -> Result<(), Refused> {
    match endpoint {
        "chat" => chat(body),
        "embeddings" => embeddings(body),
        _ => Ok(()),
    }
}

fn chat(body: &Value) -> Result<(), Refused> {
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err(refuse("messages", "a list of messages"));
    }
    each(body, "", "messages", message)?;
    field(body, "", "tools", &[Is::List])?;
    each(body, "", "tools", |tool, at| {
        object(tool, at)?;
        let kind = field(tool, at, "type", &[Is::Text])?.and_then(Value::as_str);
        let function = field(tool, at, "function", &[Is::Object])?;
        match function {
            Some(function) => {
                let at = format!("{at}.function");
                if !function.get("name").is_some_and(Value::is_string) {
                    return Err(refuse(&format!("{at}.name"), "a string"));
                }
                field(function, &at, "description", &[Is::Text])?;
                field(function, &at, "parameters", &[Is::Object])?;
            }
            // A function tool is its function.
            None if kind.is_none_or(|k| k == "function") => {
                return Err(refuse(&format!("{at}.function"), "an object"));
            }
            None => {}
        }
        Ok(())
    })?;
    if let Some(choice) = field(body, "", "tool_choice", &[Is::Text, Is::Object])?
        && choice.is_object()
    {
        let kind = field(choice, "tool_choice", "type", &[Is::Text])?.and_then(Value::as_str);
        match field(choice, "tool_choice", "function", &[Is::Object])? {
            Some(function) if function.get("name").is_some_and(Value::is_string) => {}
            Some(_) => return Err(refuse("tool_choice.function.name", "a string")),
            // OpenAI's other object forms name their tools otherwise.
            None if kind.is_none_or(|k| !matches!(k, "allowed_tools" | "custom")) => {
                return Err(refuse(
                    "tool_choice.function",
                    "an object naming the function",
                ));
            }
            None => {}
        }
    }
    if let Some(format) = field(body, "", "response_format", &[Is::Object])? {
        let kind = field(format, "response_format", "type", &[Is::Text])?.and_then(Value::as_str);
        match field(format, "response_format", "json_schema", &[Is::Object])? {
            Some(schema) => {
                field(schema, "response_format.json_schema", "name", &[Is::Text])?;
                field(
                    schema,
                    "response_format.json_schema",
                    "schema",
                    &[Is::Object],
                )?;
            }
            None if kind == Some("json_schema") => {
                return Err(refuse(
                    "response_format.json_schema",
                    "an object with the schema",
                ));
            }
            None => {}
        }
    }
    if let Some(Value::Array(stops)) = field(body, "", "stop", &[Is::Text, Is::List])?
        && !stops.iter().all(Value::is_string)
    {
        return Err(refuse("stop", "a string or a list of strings"));
    }
    for name in [
        "max_tokens",
        "max_completion_tokens",
        "n",
        "seed",
        "top_logprobs",
    ] {
        field(body, "", name, &[Is::Integer])?;
    }
    for name in [
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
    ] {
        field(body, "", name, &[Is::Number])?;
    }
    for name in ["stream", "logprobs", "parallel_tool_calls"] {
        field(body, "", name, &[Is::Boolean])?;
    }
    for name in ["stream_options", "metadata", "logit_bias"] {
        field(body, "", name, &[Is::Object])?;
    }
    for name in ["user", "reasoning_effort"] {
        field(body, "", name, &[Is::Text])?;
    }
    Ok(())
}

fn message(m: &Value, at: &str) -> Result<(), Refused> {
    object(m, at)?;
    if !m.get("role").is_some_and(Value::is_string) {
        return Err(refuse(&format!("{at}.role"), "a string"));
    }
    field(m, at, "content", &[Is::Text, Is::List])?;
    each(m, at, "content", part)?;
    for name in ["name", "tool_call_id", "refusal", "reasoning_content"] {
        field(m, at, name, &[Is::Text])?;
    }
    field(m, at, "tool_calls", &[Is::List])?;
    each(m, at, "tool_calls", |call, at| {
        object(call, at)?;
        field(call, at, "id", &[Is::Text])?;
        field(call, at, "type", &[Is::Text])?;
        let Some(function) = field(call, at, "function", &[Is::Object])? else {
            return Err(refuse(&format!("{at}.function"), "an object"));
        };
        let at = format!("{at}.function");
        if !function.get("name").is_some_and(Value::is_string) {
            return Err(refuse(&format!("{at}.name"), "a string"));
        }
        field(function, &at, "arguments", &[Is::Text, Is::Object])?;
        Ok(())
    })
}

/// One content part: a `type`, and the fields of the common types of the type their type needs.
fn part(p: &Value, at: &str) -> Result<(), Refused> {
    object(p, at)?;
    let Some(kind) = p.get("type").and_then(Value::as_str) else {
        return Err(refuse(&format!("{at}.type"), "a string"));
    };
    let needs = |name: &str, is: Is| -> Result<(), Refused> {
        match p.get(name) {
            Some(v) if is.holds(v) => Ok(()),
            _ => Err(refuse(&format!("{at}.{name}"), is.name())),
        }
    };
    match kind {
        "text" => needs("text", Is::Text),
        "image_url" => {
            // `{"url": …}`, or the URL itself as some clients send it.
            match p.get("image_url") {
                Some(Value::String(_)) => Ok(()),
                Some(image) if image.is_object() => {
                    let at = format!("{at}.image_url");
                    if !image.get("url").is_some_and(Value::is_string) {
                        return Err(refuse(&format!("{at}.url"), "a string"));
                    }
                    field(image, &at, "detail", &[Is::Text]).map(drop)
                }
                _ => Err(refuse(&format!("{at}.image_url"), "an object with a url")),
            }
        }
        "input_audio" => {
            needs("input_audio", Is::Object)?;
            let at = format!("{at}.input_audio");
            for name in ["data", "format"] {
                field(&p["input_audio"], &at, name, &[Is::Text])?;
            }
            Ok(())
        }
        "file" => {
            needs("file", Is::Object)?;
            let at = format!("{at}.file");
            for name in ["file_data", "file_id", "filename"] {
                field(&p["file"], &at, name, &[Is::Text])?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn embeddings(body: &Value) -> Result<(), Refused> {
    let input = body.get("input");
    let fine = match input {
        Some(Value::String(_)) => true,
        Some(Value::Array(items)) => {
            items.iter().all(Value::is_string)
                || items.iter().all(|i| i.is_u64())
                || items
                    .iter()
                    .all(|i| i.as_array().is_some_and(|t| t.iter().all(Value::is_u64)))
        }
        _ => false,
    };
    if !fine {
        return Err(refuse(
            "input",
            "a string, a list of strings, or tokens (a list of integers, or of lists of integers)",
        ));
    }
    field(body, "", "dimensions", &[Is::Integer])?;
    field(body, "", "encoding_format", &[Is::Text])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(endpoint: &str, body: Value) -> String {
        check(endpoint, &body).unwrap_err().param
    }

    #[test]
    fn fields_the_mappings_read_must_have_their_types_and_are_named_when_not() {
        let fine = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:x"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "42"}
        ], "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "stop": ["x"], "temperature": 1, "max_tokens": 5});
        assert!(check("chat", &fine).is_ok());
        assert_eq!(refused("chat", json!({"messages": "hi"})), "messages");
        assert_eq!(refused("chat", json!({"messages": [null]})), "messages[0]");
        assert_eq!(
            refused("chat", json!({"messages": [{"role": 1, "content": "x"}]})),
            "messages[0].role"
        );
        assert_eq!(
            refused(
                "chat",
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
            ),
            "messages[0].content[0].image_url.url"
        );
        assert_eq!(
            refused(
                "chat",
                json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}]})
            ),
            "messages[0].tool_calls[0].function.name"
        );
        assert_eq!(
            refused(
                "chat",
                json!({"messages": [], "response_format": {"type": "json_schema", "json_schema": []}})
            ),
            "response_format.json_schema"
        );
        assert_eq!(
            refused("chat", json!({"messages": [], "stop": [1]})),
            "stop"
        );
        assert_eq!(
            refused("chat", json!({"messages": [], "temperature": "hot"})),
            "temperature"
        );
        assert_eq!(refused("embeddings", json!({"input": {}})), "input");
        assert!(check("embeddings", &json!({"input": ["a", "b"]})).is_ok());
        // Values are the mapping's to judge.
        assert!(
            check(
                "chat",
                &json!({"messages": [{"role": "narrator", "content": [{"type": "video"}]}]})
            )
            .is_ok()
        );
    }
}
