//! `/v1/token-count`: counting chat tokens offline with an embedded tokenizer.
//!
//! Counting runs off the async workers (`crate::offload`), and so does loading an encoding, which happens at its
//! first use (a fraction of a second). The encodings are not loaded at start: both together hold about 70 MB,
//! which would quadruple the idle proxy's memory for a route many deployments never call.
//!
//! Counts follow OpenAI's published accounting for chat messages: each message costs its text plus a small fixed
//! overhead, and the reply is primed with a few more. For models that are not OpenAI's, the count is an estimate
//! with the closest modern encoding (`o200k_base`).

use serde_json::Value;
use tiktoken_rs::CoreBPE;

const PER_MESSAGE: usize = 3;
const PER_NAME: usize = 1;
const REPLY_PRIMING: usize = 3;

/// The encoding for a model id (with or without its provider prefix).
fn encoding_for(model: &str) -> &'static CoreBPE {
    let name = model.rsplit('/').next().unwrap_or(model);
    let legacy = [
        "gpt-4-",
        "gpt-3.5",
        "text-embedding-3",
        "text-embedding-ada",
    ];
    if name == "gpt-4" || legacy.iter().any(|p| name.starts_with(p)) && !name.starts_with("gpt-4o")
    {
        tiktoken_rs::cl100k_base_singleton()
    } else {
        tiktoken_rs::o200k_base_singleton()
    }
}

/// Tokens in the text of a message field: a string, or the text parts of a content array.
fn text_tokens(bpe: &CoreBPE, value: &Value) -> usize {
    match value {
        Value::String(s) => bpe.encode_ordinary(s).len(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(|t| bpe.encode_ordinary(t).len())
            .sum(),
        _ => 0,
    }
}

/// Each tool definition's fixed share, besides its name, description and parameters (an estimate: OpenAI
/// renders tools into the prompt in a format of its own).
const PER_TOOL: usize = 8;

/// Counts a `/v1/token-count` body: `text` (a string, counted as it is), or `messages` (a chat, with its
/// `tools` if any).
pub fn count(model: &str, body: &serde_json::Map<String, Value>) -> Result<usize, String> {
    match (body.get("text"), body.get("messages")) {
        (Some(Value::String(text)), None) => Ok(encoding_for(model).encode_ordinary(text).len()),
        (Some(_), None) => Err("`text` must be a string".into()),
        (None, Some(messages)) => {
            let tools = match body.get("tools") {
                None | Some(Value::Null) => 0,
                Some(tools) => count_tools(model, tools)?,
            };
            Ok(count_messages(model, messages)? + tools)
        }
        (Some(_), Some(_)) => Err("give either `text` or `messages`, not both".into()),
        (None, None) => Err("`messages` (a chat) or `text` (a string) is required".into()),
    }
}

/// Tokens of a chat's `tools`: each function's name, description and parameter schema, and a fixed share.
fn count_tools(model: &str, tools: &Value) -> Result<usize, String> {
    let Value::Array(tools) = tools else {
        return Err("`tools` must be an array of tool definitions".into());
    };
    let bpe = encoding_for(model);
    let mut total = 0;
    for (i, tool) in tools.iter().enumerate() {
        let Some(function) = tool.get("function").filter(|f| f.is_object()) else {
            return Err(format!(
                "tools[{i}] must be {{\"type\": \"function\", \"function\": {{…}}}}"
            ));
        };
        total += PER_TOOL;
        for field in ["name", "description"] {
            total += function.get(field).map_or(0, |v| text_tokens(bpe, v));
        }
        if let Some(parameters) = function.get("parameters") {
            total += bpe.encode_ordinary(&parameters.to_string()).len();
        }
    }
    Ok(total)
}

/// Counts the tokens of a chat `messages` array, or says what is wrong with it.
pub fn count_messages(model: &str, messages: &Value) -> Result<usize, String> {
    let Value::Array(messages) = messages else {
        return Err("`messages` must be an array of chat messages".into());
    };
    let bpe = encoding_for(model);
    let mut total = REPLY_PRIMING;
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(m) = message else {
            return Err(format!(
                "messages[{i}] must be an object with a role and content"
            ));
        };
        total += PER_MESSAGE;
        for (field, value) in m {
            match field.as_str() {
                "name" => total += PER_NAME + text_tokens(bpe, value),
                "role" | "content" | "tool_call_id" => total += text_tokens(bpe, value),
                "tool_calls" => {
                    for call in value.as_array().into_iter().flatten() {
                        if let Some(f) = call.get("function") {
                            total += f.get("name").map_or(0, |v| text_tokens(bpe, v));
                            total += f.get("arguments").map_or(0, |v| text_tokens(bpe, v));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_like_openai_accounting() {
        // "Hello" is one token in o200k_base; role "user" is one token.
        let n = count_messages(
            "openai/gpt-4o",
            &json!([{"role": "user", "content": "Hello"}]),
        )
        .unwrap();
        assert_eq!(n, 3 + 3 + 1 + 1);
        let parts = json!([{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "image_url"}]}]);
        assert_eq!(count_messages("x/y", &parts).unwrap(), n);
        assert!(count_messages("x", &json!({"role": "user"})).is_err());
        assert!(count_messages("x", &json!(["hi"])).is_err());
    }

    fn body(value: serde_json::Value) -> serde_json::Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn text_and_tools_are_counted() {
        assert_eq!(
            count("openai/gpt-4o", &body(json!({"text": "Hello"}))).unwrap(),
            1
        );
        let chat = json!([{"role": "user", "content": "Hello"}]);
        let plain = count("m", &body(json!({"messages": chat}))).unwrap();
        let tool = json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        let with_tools = count("m", &body(json!({"messages": chat, "tools": [tool]}))).unwrap();
        assert!(
            with_tools > plain + PER_TOOL + 10,
            "{plain} -> {with_tools}"
        );
        for bad in [
            json!({"text": 5}),
            json!({"text": "a", "messages": []}),
            json!({}),
            json!({"messages": [], "tools": {}}),
            json!({"messages": [], "tools": [{"type": "function"}]}),
        ] {
            assert!(count("m", &body(bad.clone())).is_err(), "{bad}");
        }
    }
}
