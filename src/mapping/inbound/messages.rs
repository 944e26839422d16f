//! Anthropic's Messages API spoken by the client: a Messages request as an OpenAI chat body, and the chat
//! answer, stream and errors as Anthropic's (message, content blocks, `stop_reason`, usage with cache reads; the
//! event sequence `message_start`, `ping`, `content_block_start` / `_delta` / `_stop` with indexes,
//! `message_delta` with usage, `message_stop`, or `error`).
//!
//! What a chat body cannot carry is refused by name rather than dropped: server tools, documents by URL, and
//! Anthropic-only request fields (`container`, `mcp_servers`, ...). Kept out on purpose, as changing nothing in
//! the answer: `cache_control` marks (upstreams that cache do so on their own), `service_tier`, and thinking
//! blocks of earlier turns (their signatures only mean something to Anthropic).

use super::{Refused, StreamTranslation, error_message, sse_event};
use crate::usage::Usage;
use serde_json::{Map, Value, json};

type Body = Map<String, Value>;

/// A Messages request as an OpenAI chat body (the model as the client named it). `stream` asks for the usage
/// chunk too, which the answer's usage needs.
pub fn to_chat(body: Body) -> Result<Body, Refused> {
    let mut chat = Body::new();
    let mut messages = Vec::new();
    let mut system = None;
    let mut stream = false;
    // `output_config.effort` wins over the effort a `thinking` budget implies.
    let (mut effort, mut thinking_effort) = (None, None);
    for (field, value) in body {
        if value.is_null() {
            continue;
        }
        match field.as_str() {
            "model" | "temperature" | "top_p" | "top_k" | "max_tokens" => {
                chat.insert(field, value);
            }
            "system" => system = Some(json!({"role": "system", "content": system_text(&value)?})),
            "messages" => {
                let Value::Array(turns) = value else {
                    return Err(Refused::new(
                        "messages",
                        "`messages` must be a list of turns",
                    ));
                };
                for (i, turn) in turns.into_iter().enumerate() {
                    turn_to_chat(turn, i, &mut messages)?;
                }
            }
            "stop_sequences" => {
                chat.insert("stop".into(), value);
            }
            "stream" => {
                stream = value.as_bool().unwrap_or(false);
                chat.insert(field, value);
            }
            "tools" => {
                chat.insert("tools".into(), tools(value)?);
            }
            "tool_choice" => tool_choice(&value, &mut chat)?,
            "thinking" => {
                if value.get("type").and_then(Value::as_str) != Some("disabled") {
                    // Adaptive thinking has no budget: the model decides, as at medium effort.
                    let budget = value
                        .get("budget_tokens")
                        .and_then(Value::as_u64)
                        .unwrap_or(8192);
                    thinking_effort = Some(match budget {
                        0..4096 => "low",
                        4096..16384 => "medium",
                        _ => "high",
                    });
                }
            }
            "output_config" => {
                let Value::Object(config) = value else {
                    return Err(Refused::new(
                        "output_config",
                        "`output_config` must be an object",
                    ));
                };
                for (key, value) in config {
                    match key.as_str() {
                        "effort" => effort = value.as_str().map(str::to_string),
                        "format" if value["type"] == "json_schema" => {
                            let format = json!({"type": "json_schema",
                                "json_schema": {"name": "output", "schema": value["schema"]}});
                            chat.insert("response_format".into(), format);
                        }
                        _ => {
                            return Err(Refused::new(
                                format!("output_config.{key}"),
                                "a chat translation takes `effort` and a JSON schema `format`",
                            ));
                        }
                    }
                }
            }
            "metadata" => {
                if let Some(user) = value.get("user_id").filter(|u| u.is_string()) {
                    chat.insert("user".into(), user.clone());
                }
            }
            // The client's own fallback lists, as on chat.
            "fallbacks" | "context_fallbacks" => {
                chat.insert(field, value);
            }
            // How Anthropic serves or trims the conversation on its side: nothing the answer depends on.
            "service_tier" | "context_management" => {}
            other => {
                return Err(Refused::new(
                    other,
                    format!(
                        "`{other}` is Anthropic's own; only a provider that speaks the Messages API natively \
                         takes it"
                    ),
                ));
            }
        }
    }
    if let Some(effort) = effort.or(thinking_effort.map(str::to_string)) {
        chat.insert("reasoning_effort".into(), json!(effort));
    }
    messages.splice(0..0, system);
    chat.insert("messages".into(), Value::Array(messages));
    if stream {
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(chat)
}

/// `system` as one text: a string, or text blocks joined.
fn system_text(system: &Value) -> Result<String, Refused> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = Vec::new();
            for (i, block) in blocks.iter().enumerate() {
                match block.get("text").and_then(Value::as_str) {
                    Some(t) if block["type"] == "text" => text.push(t),
                    _ => {
                        return Err(Refused::new(
                            format!("system[{i}]"),
                            "`system` takes text blocks",
                        ));
                    }
                }
            }
            Ok(text.join("\n\n"))
        }
        _ => Err(Refused::new(
            "system",
            "`system` must be a string or a list of text blocks",
        )),
    }
}

/// One Messages turn as chat messages: tool results become `tool` messages (before the rest of the turn, as
/// OpenAI wants them right after the calls), tool uses the assistant's `tool_calls`.
fn turn_to_chat(turn: Value, i: usize, out: &mut Vec<Value>) -> Result<(), Refused> {
    let at = format!("messages[{i}]");
    let role = match turn.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant")) => role.to_string(),
        // A system turn in mid-conversation (Claude Code sends them): a chat system message there.
        Some("system") => {
            let text = system_text(turn.get("content").unwrap_or(&Value::Null))
                .map_err(|r| Refused::new(format!("{at}.content"), r.message))?;
            out.push(json!({"role": "system", "content": text}));
            return Ok(());
        }
        _ => {
            return Err(Refused::new(
                format!("{at}.role"),
                "a turn's role is user, assistant or system",
            ));
        }
    };
    let blocks = match turn.get("content") {
        Some(Value::String(text)) => {
            out.push(json!({"role": role, "content": text}));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(Refused::new(
                format!("{at}.content"),
                "`content` must be a string or a list of content blocks",
            ));
        }
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    let mut images_after_results = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let here = || format!("{at}.content[{j}]");
        match block.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => parts.push(json!({"type": "text", "text": block["text"]})),
            "image" => parts.push(image_part(block, &here())?),
            "document" => parts.push(document_part(block, &here())?),
            "tool_use" if role == "assistant" => {
                let arguments = block.get("input").unwrap_or(&json!({})).to_string();
                calls.push(json!({"id": block["id"], "type": "function",
                                  "function": {"name": block["name"], "arguments": arguments}}));
            }
            "tool_result" if role == "user" => {
                let (text, images) = tool_result_content(block, &here())?;
                let text = if block["is_error"] == json!(true) {
                    format!("Error: {text}")
                } else {
                    text
                };
                out.push(
                    json!({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}),
                );
                images_after_results.extend(images);
            }
            // Earlier turns' reasoning: its signature only means something to Anthropic.
            "thinking" | "redacted_thinking" if role == "assistant" => {}
            other => {
                return Err(Refused::new(
                    here(),
                    format!(
                        "a {role} turn cannot carry a {other:?} block through a chat translation"
                    ),
                ));
            }
        }
    }
    // Images a tool returned travel in a user message after the results (chat tool messages carry text).
    if !images_after_results.is_empty() {
        out.push(json!({"role": "user", "content": images_after_results}));
    }
    if role == "assistant" {
        let text: String = parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        let mut message = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        if !text.is_empty() || message.get("tool_calls").is_some() {
            out.push(message);
        }
    } else if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn image_part(block: &Value, at: &str) -> Result<Value, Refused> {
    let source = &block["source"];
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            source["media_type"].as_str().unwrap_or("image/png"),
            source["data"].as_str().unwrap_or("")
        ),
        Some("url") => source["url"].as_str().unwrap_or("").to_string(),
        _ => {
            return Err(Refused::new(
                at,
                "an image source is base64 or url through a chat translation",
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn document_part(block: &Value, at: &str) -> Result<Value, Refused> {
    let source = &block["source"];
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let url = format!(
                "data:{};base64,{}",
                source["media_type"].as_str().unwrap_or("application/pdf"),
                source["data"].as_str().unwrap_or("")
            );
            let mut file = json!({"file_data": url});
            if let Some(title) = block.get("title").filter(|t| t.is_string()) {
                file["filename"] = title.clone();
            }
            Ok(json!({"type": "file", "file": file}))
        }
        Some("text") => Ok(json!({"type": "text", "text": source["data"]})),
        _ => Err(Refused::new(
            at,
            "a document travels as base64 or text through a chat translation",
        )),
    }
}

/// A tool result's text, and the images it returned.
fn tool_result_content(block: &Value, at: &str) -> Result<(String, Vec<Value>), Refused> {
    match block.get("content") {
        None | Some(Value::Null) => Ok((String::new(), Vec::new())),
        Some(Value::String(text)) => Ok((text.clone(), Vec::new())),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            let mut images = Vec::new();
            for (k, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => text.push_str(part["text"].as_str().unwrap_or("")),
                    Some("image") => images.push(image_part(part, &format!("{at}.content[{k}]"))?),
                    _ => {
                        return Err(Refused::new(
                            format!("{at}.content[{k}]"),
                            "a tool result carries text and images through a chat translation",
                        ));
                    }
                }
            }
            Ok((text, images))
        }
        Some(_) => Err(Refused::new(
            format!("{at}.content"),
            "a tool result's content is a string or a list of blocks",
        )),
    }
}

/// Client tools as chat functions; Anthropic's server tools only work against Anthropic itself.
fn tools(value: Value) -> Result<Value, Refused> {
    let Value::Array(tools) = value else {
        return Err(Refused::new("tools", "`tools` must be a list"));
    };
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.into_iter().enumerate() {
        let custom = matches!(
            tool.get("type").and_then(Value::as_str),
            None | Some("custom")
        );
        let Some(schema) = tool.get("input_schema").filter(|_| custom) else {
            return Err(Refused::new(
                format!("tools[{i}]"),
                format!(
                    "{} is a server tool, which only Anthropic runs; give a tool with an input_schema",
                    tool.get("type").unwrap_or(&Value::Null)
                ),
            ));
        };
        let mut function = json!({"name": tool["name"], "parameters": schema});
        if let Some(description) = tool.get("description").filter(|d| d.is_string()) {
            function["description"] = description.clone();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

fn tool_choice(choice: &Value, chat: &mut Body) -> Result<(), Refused> {
    let mapped = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
        _ => {
            return Err(Refused::new(
                "tool_choice",
                "`tool_choice.type` is auto, any, tool or none",
            ));
        }
    };
    chat.insert("tool_choice".into(), mapped);
    if choice["disable_parallel_tool_use"] == json!(true) {
        chat.insert("parallel_tool_calls".into(), json!(false));
    }
    Ok(())
}

/// OpenAI's finish reason as Anthropic's stop reason.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's usage: input without the cache reads, which it counts apart.
fn usage_json(usage: &Usage) -> Value {
    let cached = usage.cached_tokens.min(usage.prompt_tokens);
    json!({
        "input_tokens": usage.prompt_tokens - cached,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    })
}

/// A message id: the chat answer's, prefixed as Anthropic's are.
fn message_id(id: Option<&str>) -> String {
    match id {
        Some(id) if id.starts_with("msg_") => id.to_string(),
        Some(id) if !id.is_empty() => format!("msg_{id}"),
        _ => format!("msg_{}", fastrand_id()),
    }
}

fn fastrand_id() -> String {
    (0..24).map(|_| fastrand::alphanumeric()).collect()
}

/// A chat completion as a Messages answer; `model` is the model the client asked for.
pub fn from_chat(chat: &Value, model: &str) -> Value {
    let choice = &chat["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(reasoning) = message
        .get("reasoning_content")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
    {
        content.push(json!({"type": "thinking", "thinking": reasoning, "signature": ""}));
    }
    if let Some(text) = message
        .get("content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let arguments = call["function"]["arguments"].as_str().unwrap_or("");
        let input = serde_json::from_str::<Value>(arguments)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input}));
    }
    let usage = chat.get("usage").map(Usage::from_value).unwrap_or_default();
    json!({
        "id": message_id(chat["id"].as_str()),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str()),
        "stop_sequence": null,
        "usage": usage_json(&usage),
    })
}

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error in Anthropic's shape.
pub fn error_body(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

/// The open content block of a translated stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    /// A tool call, by its OpenAI index.
    Tool(u64),
}

/// OpenAI chunks as Anthropic's stream events.
pub struct MessagesStream {
    model: String,
    started: bool,
    /// The open block and its index.
    open: Option<(Block, usize)>,
    next_index: usize,
    finish: Option<String>,
    usage: Usage,
}

impl MessagesStream {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            started: false,
            open: None,
            next_index: 0,
            finish: None,
            usage: Usage::default(),
        }
    }

    fn start(&mut self, id: Option<&str>, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "id": message_id(id), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        });
        sse_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
        sse_event(out, "ping", &json!({"type": "ping"}));
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((_, index)) = self.open.take() {
            sse_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// The index of `block`, opening it (and closing the one before) when it is not the open one.
    fn open(&mut self, block: Block, start: Value, out: &mut Vec<u8>) -> usize {
        if let Some((open, index)) = self.open
            && open == block
        {
            return index;
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((block, index));
        sse_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        );
        index
    }

    fn delta(&mut self, index: usize, delta: Value, out: &mut Vec<u8>) {
        sse_event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        self.start(chunk["id"].as_str(), out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Usage::from_value(usage);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["reasoning_content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            let index = self.open(
                Block::Thinking,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                out,
            );
            self.delta(
                index,
                json!({"type": "thinking_delta", "thinking": text}),
                out,
            );
        }
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let index = self.open(Block::Text, json!({"type": "text", "text": ""}), out);
            self.delta(index, json!({"type": "text_delta", "text": text}), out);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let n = call["index"].as_u64().unwrap_or(0);
            let function = &call["function"];
            let index = match self.open {
                Some((Block::Tool(open), index)) if open == n => index,
                _ => {
                    let id = call["id"]
                        .as_str()
                        .map_or_else(|| format!("toolu_{}", fastrand_id()), str::to_string);
                    let start = json!({"type": "tool_use", "id": id, "name": function["name"], "input": {}});
                    self.open(Block::Tool(n), start, out)
                }
            };
            if let Some(arguments) = function["arguments"].as_str().filter(|a| !a.is_empty()) {
                self.delta(
                    index,
                    json!({"type": "input_json_delta", "partial_json": arguments}),
                    out,
                );
            }
        }
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.finish = Some(finish.to_string());
        }
    }
}

impl StreamTranslation for MessagesStream {
    fn event(&mut self, _: Option<&str>, data: &str, out: &mut Vec<u8>) {
        if let Ok(chunk) = serde_json::from_str::<Value>(data) {
            self.chunk(&chunk, out);
        }
    }

    /// Anthropic's error event ends the stream, without message_stop.
    fn error(&mut self, error: &Value, out: &mut Vec<u8>) {
        sse_event(out, "error", &error_body(500, error_message(error)));
    }

    fn end(&mut self, clean: bool, out: &mut Vec<u8>) {
        if !clean {
            sse_event(
                out,
                "error",
                &error_body(500, "the stream ended before the answer was complete"),
            );
            return;
        }
        self.start(None, out);
        self.close(out);
        let delta = json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null},
            "usage": usage_json(&self.usage)});
        sse_event(out, "message_delta", &delta);
        sse_event(out, "message_stop", &json!({"type": "message_stop"}));
    }
}
