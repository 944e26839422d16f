//! Anthropic's Messages API spoken by the client: a Messages request as an OpenAI chat body, and the chat
//! answer, stream and errors as Anthropic's (message, content blocks, `stop_reason`, usage with cache reads; the
//! event sequence `message_start`, `ping`, `content_block_start` / `_delta` / `_stop` with indexes,
//! `message_delta` with usage, `message_stop`, or `error`).
//!
//! What a chat body cannot carry is refused by name rather than dropped: server tools, documents by URL, and
//! Anthropic-only request fields (`container`, `mcp_servers`, ...). Kept out on purpose, as changing nothing in
//! the answer: `cache_control` marks (upstreams that cache do so on their own), `service_tier`, and thinking
//! blocks of earlier turns (their signatures only mean something to Anthropic).

mod answer;
mod stream;

use super::Refused;
pub use answer::{error_body, error_type, from_chat};
use serde_json::{Map, Value, json};
pub use stream::MessagesStream;

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
