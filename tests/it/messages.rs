//! Anthropic's Messages API inbound (`POST /v1/messages`), translated to chat for providers that do not speak it:
//! the translations in both directions (snapshots). The real server answering it is in `messages_served`.

use crate::support::*;
use keyrelay::mapping::inbound::Translated;
use keyrelay::mapping::inbound::messages::{MessagesStream, from_chat, to_chat};
use serde_json::{Value, json};

fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// The Anthropic events of a translated stream (complete when its frames end in `[DONE]`), as (name, data)
/// pairs.
fn translate_stream(frames: &[String]) -> Vec<(String, Value)> {
    let frames: Vec<(Option<&str>, &str)> = frames.iter().map(|f| (None, f.as_str())).collect();
    let out = Translated::translate_all(MessagesStream::new("mock/m"), &frames);
    sse_events(&String::from_utf8(out).unwrap())
}

#[test]
fn requests_become_chat_bodies() {
    let body = object(serde_json::from_str(&fixture("anthropic/request_example.json")).unwrap());
    insta::assert_json_snapshot!("messages_request_to_chat", to_chat(body).unwrap());
    let forced = object(
        serde_json::from_str(&fixture("anthropic/request_example_forced_tool.json")).unwrap(),
    );
    let chat = to_chat(forced).unwrap();
    assert_eq!(chat["stream_options"], json!({"include_usage": true}));
    insta::assert_json_snapshot!("messages_request_forced_tool_to_chat", chat);
    let rich = json!({"model": "p/m", "max_tokens": 100,
    "system": [{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "two"}],
    "thinking": {"type": "enabled", "budget_tokens": 10000},
    "metadata": {"user_id": "u-1"},
    "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
    "messages": [
        {"role": "user", "content": [
            {"type": "document", "title": "a.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            {"type": "text", "text": "read these"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": true, "content": [
                {"type": "text", "text": "failed"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]},
            {"type": "text", "text": "and now?"}]}
    ]});
    insta::assert_json_snapshot!(
        "messages_request_rich_to_chat",
        to_chat(object(rich)).unwrap()
    );
    // As Claude Code (2.1) writes them: a system turn mid-conversation, adaptive thinking with an effort,
    // context editing (Anthropic trims its own copy; nothing the answer depends on).
    let claude_code =
        object(serde_json::from_str(&fixture("anthropic/request_claude_code.json")).unwrap());
    let chat = to_chat(claude_code).unwrap();
    assert_eq!(
        chat["reasoning_effort"], "high",
        "output_config.effort wins"
    );
    assert_eq!(
        chat["messages"][2],
        json!({"role": "system", "content": "Tools are available."})
    );
    insta::assert_json_snapshot!("messages_request_claude_code_to_chat", chat);
    let schema = json!({"model": "p/m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}});
    assert_eq!(
        to_chat(object(schema)).unwrap()["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}})
    );
}

#[test]
fn what_a_chat_body_cannot_carry_is_refused_by_name() {
    let base = || json!({"model": "p/m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let cases = [
        (
            "tools",
            json!([{"type": "web_search_20250305", "name": "web_search"}]),
            "tools[0]",
        ),
        ("container", json!("c-1"), "container"),
        ("mcp_servers", json!([]), "mcp_servers"),
        ("tool_choice", json!({"type": "sometimes"}), "tool_choice"),
        ("system", json!([{"type": "image"}]), "system[0]"),
        (
            "output_config",
            json!({"task_budget": 5}),
            "output_config.task_budget",
        ),
    ];
    for (field, value, param) in cases {
        let mut body = base();
        body[field] = value;
        assert_eq!(to_chat(object(body)).unwrap_err().param, param);
    }
    let mut body = base();
    body["messages"] = json!([{"role": "narrator", "content": "x"}]);
    assert_eq!(to_chat(object(body)).unwrap_err().param, "messages[0].role");
    let mut body = base();
    body["messages"] = json!([{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "https://x"}}]}]);
    assert_eq!(
        to_chat(object(body)).unwrap_err().param,
        "messages[0].content[0]"
    );
}

#[test]
fn chat_answers_become_messages() {
    let mut text = completion("p/m", "Hello there");
    text["usage"]["prompt_tokens_details"] = json!({"cached_tokens": 4});
    insta::assert_json_snapshot!("messages_answer_text", from_chat(&text, "p/m"), {".id" => "[id]"});
    let tools = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "reasoning_content": "The user wants weather.",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Porto\"}"}},
                           {"id": "call_2", "type": "function", "function": {"name": "broken", "arguments": "{not json"}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}});
    insta::assert_json_snapshot!("messages_answer_tools", from_chat(&tools, "p/m"));
}

#[test]
fn chat_streams_become_anthropic_event_sequences() {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    let frames = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"reasoning_content": "Thinking..."}), Value::Null),
        chunk(json!({"content": "Let me "}), Value::Null),
        chunk(json!({"content": "check."}), Value::Null),
        chunk(json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}), Value::Null),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}), Value::Null),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Porto\"}"}}]}), Value::Null),
        chunk(json!({"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_air_quality", "arguments": "{}"}}]}), Value::Null),
        chunk(json!({}), json!("tool_calls")),
        json!({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
               "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70, "prompt_tokens_details": {"cached_tokens": 10}}})
        .to_string(),
        "[DONE]".to_string(),
    ];
    let events = translate_stream(&frames);
    assert_eq!(
        event_names(&events),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    insta::assert_json_snapshot!("messages_stream_events", events, {"[][1].message.id" => "[id]"});

    // An in-band error ends with Anthropic's error event, never with message_stop.
    let error = json!({"error": {"message": "upstream broke", "type": "upstream_error", "code": "stream_broken"}}).to_string();
    let broken = translate_stream(&[frames[2].clone(), error]);
    assert_eq!(
        event_names(&broken),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(broken[4].1["error"]["message"], "upstream broke");
    // So does a stream that just stops.
    let cut = translate_stream(&[frames[2].clone()]);
    assert_eq!(cut.last().unwrap().0, "error");
}
