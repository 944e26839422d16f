//! Snapshot tests of the shipped provider scripts: OpenAI requests mapped to each upstream's native request, and
//! the upstream's native responses and stream transcripts (fixtures in its real wire format) mapped back.

use crate::support::mapping::*;
use crate::support::{fixture, json_fixture};
use keyrelay::mapping::Part;
use serde_json::{Value, json};

// ------------------------------------------------------------------------------------------------- Gemini

#[test]
fn gemini_requests() {
    snapshot!(
        "gemini_request_basic",
        mapped_request(
            "gemini",
            "chat",
            "gemini-2.5-flash",
            "openai/chat_basic.json"
        )
    );
    // Gemini cannot be told to call one function at a time: `parallel_tool_calls: false` is refused (see
    // `fields_the_target_cannot_take_are_refused_by_name`).
    snapshot!(
        "gemini_request_tools",
        map_body(
            "gemini",
            "chat",
            "gemini-2.5-flash",
            fixture_without("openai/chat_tools.json", &["parallel_tool_calls"])
        )
    );
    snapshot!(
        "gemini_request_image_json_stream",
        mapped_request(
            "gemini",
            "chat",
            "gemini-2.5-pro",
            "openai/chat_image_json.json"
        )
    );
    snapshot!(
        "gemini_request_embeddings",
        mapped_request(
            "gemini",
            "embeddings",
            "gemini-embedding-001",
            "openai/embeddings.json"
        )
    );
}

#[test]
fn gemini_responses() {
    for name in [
        "text",
        "tool_call",
        "max_tokens",
        "safety",
        "prompt_blocked",
        "max_tokens_no_parts",
    ] {
        let mapped = mapped_response(
            "gemini",
            "chat",
            "gemini-2.5-flash",
            &format!("gemini/generate_response_{name}.json"),
        );
        snapshot!(format!("gemini_response_{name}"), mapped);
    }
    let text = mapped_response(
        "gemini",
        "chat",
        "gemini-2.5-flash",
        "gemini/generate_response_text.json",
    );
    let usage = &json_fixture("gemini/generate_response_text.json")["usageMetadata"];
    assert_eq!(text["usage"]["prompt_tokens"], usage["promptTokenCount"]);
    assert_eq!(text["usage"]["total_tokens"], usage["totalTokenCount"]);
    let tools = mapped_response(
        "gemini",
        "chat",
        "gemini-2.5-flash",
        "gemini/generate_response_tool_call.json",
    );
    assert_eq!(tools["choices"][0]["finish_reason"], "tool_calls");
    let args: Value = serde_json::from_str(
        tools["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(args.is_object());
    snapshot!(
        "gemini_response_embeddings",
        mapped_response(
            "gemini",
            "embeddings",
            "gemini-embedding-001",
            "gemini/embed_batch_response.json"
        )
    );
}

#[test]
fn gemini_streams() {
    let text = mapped_stream("gemini", "gemini-2.5-flash", "gemini/stream_text.sse");
    let content: String = text
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/content")?.as_str())
        .collect();
    assert!(!content.is_empty());
    assert_eq!(
        text.iter()
            .filter(|c| c
                .pointer("/choices/0/finish_reason")
                .is_some_and(|f| !f.is_null()))
            .count(),
        1
    );
    assert!(
        text.last().unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "usage comes last"
    );
    snapshot!("gemini_stream_text", text);
    let tools = mapped_stream("gemini", "gemini-2.5-flash", "gemini/stream_tool_call.sse");
    let indexes: Vec<u64> = tools
        .iter()
        .flat_map(|c| {
            c.pointer("/choices/0/delta/tool_calls")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .map(|t| t["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![0, 1], "two parallel calls, numbered");
    snapshot!("gemini_stream_tool_call", tools);
}

#[test]
fn gemini_models() {
    let models = script("gemini")
        .map_models(fixture("gemini/models_list.json").as_bytes())
        .unwrap();
    let ids: Vec<&str> = models.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|id| !id.starts_with("models/")), "{ids:?}");
    snapshot!("gemini_models", models);
}

// ---------------------------------------------------------------------------------------------- Anthropic

#[test]
fn anthropic_requests() {
    let basic = mapped_request(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "openai/chat_basic.json",
    );
    assert_eq!(basic["body"]["max_tokens"], 64);
    assert!(
        basic["body"].get("top_p").is_none(),
        "temperature wins over top_p"
    );
    snapshot!("anthropic_request_basic", basic);
    // reasoning_effort turns extended thinking on, with room for the answer beyond the budget; sampling
    // settings Anthropic refuses while thinking are left out. Without thinking, top_k goes as it is.
    let reasoning = mapped_request(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "openai/chat_reasoning.json",
    );
    let body = &reasoning["body"];
    assert_eq!(
        body["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert!(body["max_tokens"].as_u64().unwrap() > 2048);
    assert!(body.get("temperature").is_none() && body.get("top_k").is_none());
    snapshot!("anthropic_request_reasoning", reasoning);
    let mut plain = json_fixture("openai/chat_reasoning.json");
    plain.as_object_mut().unwrap().remove("reasoning_effort");
    let p = provider("anthropic");
    let mapped = p
        .mapping
        .request
        .map(&target("chat", "claude-sonnet-4-5", false), plain)
        .unwrap();
    assert_eq!(
        (
            mapped.body["top_k"].clone(),
            mapped.body["temperature"].clone()
        ),
        (json!(40), json!(0.2))
    );
    assert!(mapped.body.get("thinking").is_none());
    // Answering tool calls, or with a forced tool, thinking stays off or the choice becomes auto: Anthropic
    // refuses both otherwise.
    let mut tools = json_fixture("openai/chat_tools.json");
    tools["reasoning_effort"] = json!("high");
    tools["tool_choice"] = json!("required");
    let answering = p
        .mapping
        .request
        .map(&target("chat", "claude-sonnet-4-5", false), tools.clone())
        .unwrap();
    assert!(
        answering.body.get("thinking").is_none(),
        "{}",
        answering.body
    );
    let messages = tools["messages"].as_array_mut().unwrap();
    messages.retain(|m| m["role"] == "user" || m["role"] == "system");
    let forced = p
        .mapping
        .request
        .map(&target("chat", "claude-sonnet-4-5", false), tools)
        .unwrap();
    assert_eq!(forced.body["thinking"]["type"], "enabled");
    assert_eq!(forced.body["tool_choice"]["type"], "auto");
    let tools = mapped_request(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "openai/chat_tools.json",
    );
    let messages = tools["body"]["messages"].as_array().unwrap();
    assert_eq!(
        messages.last().unwrap()["content"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "tool results travel together"
    );
    snapshot!("anthropic_request_tools", tools);
    let image = map_body(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        fixture_without("openai/chat_image_json.json", &["response_format"]),
    );
    assert_eq!(image["body"]["max_tokens"], 4096, "the configured default");
    snapshot!("anthropic_request_image_stream", image);
}

#[test]
fn anthropic_responses() {
    let text = mapped_response(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "anthropic/message_response_text.json",
    );
    let usage = &json_fixture("anthropic/message_response_text.json")["usage"];
    let expected_prompt = [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .map(|k| usage[k].as_u64().unwrap_or(0))
    .sum::<u64>();
    assert_eq!(text["usage"]["prompt_tokens"], expected_prompt);
    assert_eq!(
        text["usage"]["prompt_tokens_details"]["cached_tokens"],
        usage["cache_read_input_tokens"]
    );
    snapshot!("anthropic_response_text", text);
    let tools = mapped_response(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "anthropic/message_response_tool_use.json",
    );
    assert_eq!(tools["choices"][0]["finish_reason"], "tool_calls");
    snapshot!("anthropic_response_tool_use", tools);
}

#[test]
fn anthropic_streams() {
    let text = mapped_stream(
        "anthropic",
        "claude-sonnet-4-5",
        "anthropic/stream_text.sse",
    );
    assert_eq!(text.last().unwrap(), "[DONE]");
    snapshot!("anthropic_stream_text", text);
    let tools = mapped_stream(
        "anthropic",
        "claude-sonnet-4-5",
        "anthropic/stream_tool_use.sse",
    );
    let arguments: String = tools
        .iter()
        .flat_map(|c| {
            c.pointer("/choices/0/delta/tool_calls")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|t| {
            t.pointer("/function/arguments")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    let parsed: Value =
        serde_json::from_str(&arguments).unwrap_or_else(|e| panic!("{arguments:?}: {e}"));
    assert!(parsed.is_object());
    snapshot!("anthropic_stream_tool_use", tools);
    let error = mapped_stream(
        "anthropic",
        "claude-sonnet-4-5",
        "anthropic/stream_error.sse",
    );
    assert!(error.last().unwrap().get("in_band_error").is_some());
    snapshot!("anthropic_stream_error", error);
}

#[test]
fn anthropic_models() {
    let models = script("anthropic")
        .map_models(fixture("anthropic/models_list.json").as_bytes())
        .unwrap();
    snapshot!("anthropic_models", models);
}

#[test]
fn a_blocked_prompt_in_a_gemini_stream_ends_with_content_filter() {
    let mut mapper = provider("gemini").mapping.stream("m", "gemini/m");
    let blocked = json_fixture("gemini/generate_response_prompt_blocked.json").to_string();
    let parts = mapper
        .map_blocking(keyrelay::sse::SseEvent {
            event: None,
            data: blocked,
        })
        .unwrap();
    let Part::Chunk { data, finish, .. } = &parts[0] else {
        panic!("{parts:?}")
    };
    assert!(*finish);
    assert_eq!(
        serde_json::from_str::<Value>(data).unwrap()["choices"][0]["finish_reason"],
        "content_filter"
    );
    assert_eq!(parts.last(), Some(&Part::Done));
}

#[test]
fn error_events_inside_streams_are_classified_by_their_type() {
    let anthropic = provider("anthropic");
    let event =
        r#"{"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}}"#;
    let verdict = block_on(anthropic.judge(500, &Default::default(), event, 0)).unwrap();
    assert_eq!(verdict.class.as_str(), "rate_limit");
    let overloaded =
        r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#;
    assert_eq!(
        block_on(anthropic.judge(500, &Default::default(), overloaded, 0))
            .unwrap()
            .class
            .as_str(),
        "server"
    );
}

#[test]
fn audio_files_and_tool_images_are_mapped_not_dropped() {
    let parts = json!({"model": "m", "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}},
            {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}}
        ]}
    ]});
    snapshot!(
        "gemini_request_audio_file",
        map_body("gemini", "chat", "gemini-2.5-flash", parts)
    );
    let tool_image = json!({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0x"}}]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "screenshot", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [
            {"type": "text", "text": "the screen"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}
    ]});
    snapshot!(
        "anthropic_request_file_tool_image",
        map_body("anthropic", "chat", "claude-sonnet-4-5", tool_image)
    );
    // A tool parameter named like a schema keyword is the tool's own and stays.
    let strict = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",
        "function": {"name": "f", "strict": true, "parameters": {"type": "object", "additionalProperties": false,
            "properties": {"strict": {"type": "boolean"}, "additionalProperties": {"type": "string"}}}}}]});
    let gemini = map_body("gemini", "chat", "gemini-2.5-flash", strict);
    let schema = &gemini["body"]["tools"][0]["functionDeclarations"][0]["parameters"];
    assert_eq!(
        schema,
        &json!({"type": "object", "properties": {"strict": {"type": "boolean"}, "additionalProperties": {"type": "string"}}})
    );
}
