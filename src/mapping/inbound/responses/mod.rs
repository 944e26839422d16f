//! OpenAI's Responses API spoken by the client (`POST /v1/responses`): `input` (a string or items: messages,
//! `function_call`, `function_call_output`) and `instructions` as a chat, and the chat answer as a response
//! object (output items: reasoning, message, function calls; usage in Responses' names) or, streamed, as its
//! event sequence (`response.created`, `response.output_item.added`, `response.output_text.delta`,
//! `response.function_call_arguments.delta`, the `…done` events, `response.completed`; `error` and
//! `response.failed` on a failure).
//!
//! `previous_response_id` continues a conversation kept by [`crate::conversations`]. What a chat cannot carry
//! is refused by name: hosted tools (web search, file search, ...), files and images by id, `background`,
//! server-side `conversation`s and prompt templates.

mod answer;
mod stream;

use super::Refused;
use crate::conversations::Conversation;
pub use answer::{from_chat, new_id};
use serde_json::{Map, Value, json};
pub use stream::{OnComplete, ResponsesStream};

type Body = Map<String, Value>;

/// A Responses request as a chat, with what its answer must echo and what the conversation keeps.
#[derive(Debug)]
pub struct Translation {
    pub chat: Body,
    /// Tools the model may use at its discretion that only OpenAI runs (web search, file search, ...): left
    /// out, and named to the client (`x-keyrelay-omitted`).
    pub omitted: Vec<String>,
    /// The request's settings, as the response object repeats them.
    pub echo: Echo,
    /// The conversation `previous_response_id` named, if any.
    pub previous: Option<Conversation>,
    /// This request's messages, without the instructions (OpenAI does not carry them over): kept after
    /// `previous`, with the answer, under the response's id when `store` is not false.
    pub input: Vec<Value>,
    pub store: bool,
}

/// What a response object repeats of its request.
#[derive(Clone, Debug, Default)]
pub struct Echo {
    pub model: String,
    fields: Body,
    /// The tool namespaces of the request: a chat function `<namespace>__<name>` is that namespace's tool.
    namespaces: Vec<String>,
}

/// A field a response repeats, and its default.
type Echoed = (&'static str, fn() -> Value);

/// The fields a response repeats, with OpenAI's defaults.
const ECHOED: [Echoed; 13] = [
    ("instructions", || Value::Null),
    ("max_output_tokens", || Value::Null),
    ("metadata", || json!({})),
    ("parallel_tool_calls", || json!(true)),
    ("previous_response_id", || Value::Null),
    ("reasoning", || json!({"effort": null, "summary": null})),
    ("store", || json!(true)),
    ("temperature", || json!(1.0)),
    ("text", || json!({"format": {"type": "text"}})),
    ("tool_choice", || json!("auto")),
    ("tools", || json!([])),
    ("top_p", || json!(1.0)),
    ("user", || Value::Null),
];

impl Echo {
    fn of(body: &Body) -> Self {
        let fields = ECHOED
            .iter()
            .map(|(name, default)| {
                let value = body
                    .get(*name)
                    .filter(|v| !v.is_null())
                    .cloned()
                    .unwrap_or_else(default);
                (name.to_string(), value)
            })
            .collect();
        let namespaces = body
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|t| t["type"] == "namespace")
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect();
        Self {
            model: body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            fields,
            namespaces,
        }
    }

    /// A chat function's name as the client's tool: its namespace, if it has one, and its own name.
    fn tool_name<'a>(&self, chat_name: &'a str) -> (Option<&'a str>, &'a str) {
        match chat_name.split_once(NAMESPACE_SEPARATOR) {
            Some((ns, name)) if self.namespaces.iter().any(|n| n == ns) => (Some(ns), name),
            _ => (None, chat_name),
        }
    }

    /// A function call item's `name`, and `namespace` when it has one.
    fn call_fields(&self, chat_name: &str, item: &mut Value) {
        let (namespace, name) = self.tool_name(chat_name);
        item["name"] = json!(name);
        if let Some(ns) = namespace {
            item["namespace"] = json!(ns);
        }
    }
}

/// Joins a namespace and a tool's name into one chat function name.
const NAMESPACE_SEPARATOR: &str = "__";

/// A namespaced tool's chat function name.
fn chat_name(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}{NAMESPACE_SEPARATOR}{name}"),
        None => name.to_string(),
    }
}

/// A Responses request as a chat body. `previous` finds a kept conversation by response id, with its
/// messages parsed.
pub fn to_chat(
    body: Body,
    mut previous: impl FnMut(&str) -> Option<(Conversation, Vec<Value>)>,
) -> Result<Translation, Refused> {
    let echo = Echo::of(&body);
    let mut chat = Body::new();
    let mut omitted = Vec::new();
    let mut input = Vec::new();
    let mut before = None;
    let mut earlier = Vec::new();
    let mut instructions = None;
    let mut stream = false;
    let mut store = true;
    for (field, value) in body {
        if value.is_null() {
            continue;
        }
        match field.as_str() {
            "model"
            | "temperature"
            | "top_p"
            | "parallel_tool_calls"
            | "user"
            | "fallbacks"
            | "context_fallbacks" => {
                chat.insert(field, value);
            }
            "top_logprobs" if value != json!(0) => {
                return Err(Refused::new(
                    "top_logprobs",
                    "a chat translation carries no log probabilities",
                ));
            }
            "instructions" => match value {
                Value::String(text) => instructions = Some(text),
                _ => {
                    return Err(Refused::new(
                        "instructions",
                        "`instructions` must be a string",
                    ));
                }
            },
            "previous_response_id" => {
                let id = value.as_str().unwrap_or("");
                match previous(id) {
                    Some((conversation, messages)) => {
                        before = Some(conversation);
                        earlier = messages;
                    }
                    None => {
                        return Err(Refused::new(
                            "previous_response_id",
                            format!(
                                "no response {id:?} is kept: it is unknown, expired (responses.max_age), or was \
                                 made with store: false"
                            ),
                        ));
                    }
                };
            }
            "input" => input_to_chat(value, &mut input)?,
            "tools" => {
                let tools = tools(value, &mut omitted)?;
                if tools.as_array().is_some_and(|t| !t.is_empty()) {
                    chat.insert("tools".into(), tools);
                }
            }
            "tool_choice" => {
                chat.insert("tool_choice".into(), tool_choice(&value)?);
            }
            "text" => {
                if let Some(format) = value.get("format") {
                    match format.get("type").and_then(Value::as_str) {
                        Some("text") | None => {}
                        Some("json_object") => {
                            chat.insert("response_format".into(), json!({"type": "json_object"}));
                        }
                        Some("json_schema") => {
                            let mut schema = json!({"name": format.get("name").cloned().unwrap_or(json!("output")),
                                                    "schema": format["schema"]});
                            for key in ["strict", "description"] {
                                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                                    schema[key] = v.clone();
                                }
                            }
                            chat.insert(
                                "response_format".into(),
                                json!({"type": "json_schema", "json_schema": schema}),
                            );
                        }
                        Some(other) => {
                            return Err(Refused::new(
                                "text.format.type",
                                format!("unknown format {other:?}"),
                            ));
                        }
                    }
                }
                if let Some(verbosity) = value.get("verbosity").filter(|v| !v.is_null()) {
                    chat.insert("verbosity".into(), verbosity.clone());
                }
            }
            "reasoning" => {
                if let Some(effort) = value.get("effort").filter(|v| !v.is_null()) {
                    chat.insert("reasoning_effort".into(), effort.clone());
                }
            }
            "max_output_tokens" => {
                chat.insert("max_tokens".into(), value);
            }
            "stream" => {
                stream = value.as_bool().unwrap_or(false);
                chat.insert(field, value);
            }
            "store" => store = value.as_bool().unwrap_or(true),
            // What the answer does not depend on: extra output OpenAI would include, its own context
            // trimming, labels, and stream obfuscation.
            "include" | "truncation" | "metadata" | "stream_options" | "client_metadata"
            | "service_tier" | "prompt_cache_key" | "safety_identifier" | "top_logprobs" => {}
            "background" | "conversation" | "prompt" => {
                return Err(Refused::new(
                    field.as_str(),
                    format!(
                        "`{field}` needs OpenAI's own servers; only a provider that speaks the Responses API natively takes it"
                    ),
                ));
            }
            _ => {
                chat.insert(field, value);
            }
        }
    }
    let mut messages = Vec::new();
    if let Some(text) = instructions {
        messages.push(json!({"role": "system", "content": text}));
    }
    messages.append(&mut earlier);
    messages.extend(input.iter().cloned());
    chat.insert("messages".into(), Value::Array(messages));
    if stream {
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Translation {
        chat,
        omitted,
        echo,
        previous: before,
        input,
        store,
    })
}

/// `input` as chat messages appended to `out`.
fn input_to_chat(input: Value, out: &mut Vec<Value>) -> Result<(), Refused> {
    let items = match input {
        Value::String(text) => {
            out.push(json!({"role": "user", "content": text}));
            return Ok(());
        }
        Value::Array(items) => items,
        _ => {
            return Err(Refused::new(
                "input",
                "`input` must be a string or a list of items",
            ));
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item.get("type").and_then(Value::as_str);
        match (kind, item.get("role").and_then(Value::as_str)) {
            (None | Some("message"), Some(role)) => {
                let role = match role {
                    "user" | "system" | "developer" | "assistant" => role,
                    _ => {
                        return Err(Refused::new(
                            format!("{at}.role"),
                            "a message's role is user, system, developer or assistant",
                        ));
                    }
                };
                let content = content_to_chat(&item["content"], role, &at)?;
                // Developer messages are system messages to every chat upstream, older ones included.
                let role = if role == "developer" { "system" } else { role };
                out.push(json!({"role": role, "content": content}));
            }
            (Some("function_call"), _) => {
                let name = chat_name(
                    item["namespace"].as_str(),
                    item["name"].as_str().unwrap_or(""),
                );
                let call = json!({"id": item["call_id"], "type": "function",
                                  "function": {"name": name, "arguments": item["arguments"]}});
                // Calls made together travel in one assistant message, after its text if it had one.
                match out.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                            Some(calls) => calls.push(call),
                            None => last["tool_calls"] = json!([call]),
                        }
                    }
                    _ => out
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            (Some("function_call_output"), _) => {
                let output = match &item["output"] {
                    Value::String(text) => text.clone(),
                    Value::Array(parts) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect(),
                    other => other.to_string(),
                };
                out.push(
                    json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}),
                );
            }
            // Earlier reasoning: only OpenAI can read its encrypted form.
            (Some("reasoning"), _) => {}
            (kind, _) => {
                return Err(Refused::new(
                    format!("{at}.type"),
                    format!(
                        "a chat translation takes messages, function_call and function_call_output items, not {}",
                        kind.unwrap_or("this item")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A message's content in chat's terms: text for the assistant, parts for the others.
fn content_to_chat(content: &Value, role: &str, at: &str) -> Result<Value, Refused> {
    let parts = match content {
        Value::String(text) => return Ok(json!(text)),
        Value::Array(parts) => parts,
        _ => {
            return Err(Refused::new(
                format!("{at}.content"),
                "`content` must be a string or a list of parts",
            ));
        }
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let here = || format!("{at}.content[{j}]");
        match part.get("type").and_then(Value::as_str).unwrap_or("") {
            "input_text" | "output_text" | "text" => {
                out.push(json!({"type": "text", "text": part["text"]}))
            }
            "refusal" => out.push(json!({"type": "text", "text": part["refusal"]})),
            "input_image" if part["image_url"].is_string() => {
                let mut image = json!({"url": part["image_url"]});
                if let Some(detail) = part.get("detail").filter(|d| d.is_string()) {
                    image["detail"] = detail.clone();
                }
                out.push(json!({"type": "image_url", "image_url": image}));
            }
            "input_file" if part["file_data"].is_string() => {
                let mut file = json!({"file_data": part["file_data"]});
                if let Some(name) = part.get("filename").filter(|n| n.is_string()) {
                    file["filename"] = name.clone();
                }
                out.push(json!({"type": "file", "file": file}));
            }
            other => {
                return Err(Refused::new(
                    here(),
                    format!(
                        "a chat translation takes text, images by URL and files as data, not {other:?} parts or files by id"
                    ),
                ));
            }
        }
    }
    if role == "assistant" {
        let text: String = out.iter().filter_map(|p| p["text"].as_str()).collect();
        return Ok(json!(text));
    }
    Ok(Value::Array(out))
}

/// Function tools as chat functions, a namespace's flattened (`<namespace>__<name>`). Tools OpenAI hosts are
/// offers the model may take up or not: they are left out, their places listed in `omitted`.
fn tools(value: Value, omitted: &mut Vec<String>) -> Result<Value, Refused> {
    let Value::Array(tools) = value else {
        return Err(Refused::new("tools", "`tools` must be a list"));
    };
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.into_iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => out.push(function(&tool, None)),
            Some("namespace") => {
                let ns = tool["name"].as_str().unwrap_or("");
                for (j, inner) in tool["tools"].as_array().into_iter().flatten().enumerate() {
                    if inner["type"] != "function" {
                        return Err(Refused::new(
                            format!("tools[{i}].tools[{j}].type"),
                            "a chat translation takes function tools",
                        ));
                    }
                    out.push(function(inner, Some(ns)));
                }
            }
            Some("custom") | None => {
                return Err(Refused::new(
                    format!("tools[{i}].type"),
                    "a chat translation takes function tools, not free-form custom tools",
                ));
            }
            Some(_) => omitted.push(format!("tools[{i}]")),
        }
    }
    Ok(Value::Array(out))
}

fn function(tool: &Value, namespace: Option<&str>) -> Value {
    let name = chat_name(namespace, tool["name"].as_str().unwrap_or(""));
    let mut function = json!({"name": name});
    for key in ["description", "parameters", "strict"] {
        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
            function[key] = v.clone();
        }
    }
    json!({"type": "function", "function": function})
}

fn tool_choice(choice: &Value) -> Result<Value, Refused> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(c) if c.get("type").and_then(Value::as_str) == Some("function") => {
            let name = chat_name(
                c.get("namespace").and_then(Value::as_str),
                c.get("name").and_then(Value::as_str).unwrap_or(""),
            );
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(Refused::new(
            "tool_choice",
            "a chat translation takes auto, none, required or a function",
        )),
    }
}
