//! Anthropic's Messages API served by the real server (`POST /v1/messages`, `/v1/messages/count_tokens`):
//! translated to chat for an OpenAI-speaking mock upstream (answers, streams, tools, errors in Anthropic's shape),
//! and passed as written to a provider that speaks it (retried, continued and falling back like any request).

use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;

/// An OpenAI-speaking upstream: tool calls when tools are offered, else text; streamed when asked.
async fn upstream() -> Mock {
    Mock::start(|seen, _| {
        let stream = seen.body["stream"] == json!(true);
        let tools = seen.body.get("tools").is_some();
        let has_result = seen.body["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["role"] == "tool"));
        if tools && !has_result {
            let answer = json!({"id": "chatcmpl-t", "object": "chat.completion", "created": 0, "model": seen.model(),
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                    "tool_calls": [{"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Porto\"}"}}]}}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}});
            return Reply::ok(answer);
        }
        if stream {
            return Reply::sse(chunks(seen.model(), &["Sunny ", "in Porto."], true), End::Done);
        }
        Reply::ok(completion(seen.model(), "Sunny in Porto."))
    })
    .await
}

fn anthropic_post(proxy: &Proxy, path: &str, body: &Value) -> reqwest::RequestBuilder {
    http_client()
        .post(format!("{}{path}", proxy.url))
        .header("x-api-key", PROXY_KEY)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(body.to_string())
}

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 200, "stream": stream, "system": "Be brief.",
           "messages": [{"role": "user", "content": "Weather in Porto?"}]})
}

#[tokio::test]
async fn messages_are_served_by_an_openai_provider() {
    let mock = upstream().await;
    let proxy = Proxy::start(Setup::one(&mock, 2)).await;
    let (status, headers, body) = send(anthropic_post(
        &proxy,
        "/v1/messages",
        &ask("mock/m", false),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["type"], "message");
    assert_eq!(
        body["content"],
        json!([{"type": "text", "text": "Sunny in Porto."}])
    );
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["usage"]["input_tokens"], 11);
    assert_eq!(body["usage"]["output_tokens"], 7);
    assert_eq!(header(&headers, "x-keyrelay-provider"), "mock");
    let seen = &mock.chats()[0].body;
    assert_eq!(seen["model"], "m");
    assert_eq!(seen["max_tokens"], 200);
    assert_eq!(
        seen["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );

    // Streamed: Anthropic's event sequence, usage from the upstream's usage chunk.
    let response = anthropic_post(&proxy, "/v1/messages", &ask("mock/m", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(response.headers(), "content-type"),
        "text/event-stream"
    );
    let events = sse_events(&response.text().await.unwrap());
    assert_eq!(
        event_names(&events),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let text: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "Sunny in Porto.");
    assert_eq!(events[6].1["usage"]["output_tokens"], 2);
    assert_eq!(events[6].1["delta"]["stop_reason"], "end_turn");

    // count_tokens counts the translated conversation.
    let mut count = ask("mock/m", false);
    count.as_object_mut().unwrap().remove("max_tokens");
    let (status, _, counted) =
        send(anthropic_post(&proxy, "/v1/messages/count_tokens", &count)).await;
    assert_eq!(status, 200, "{counted}");
    assert!(counted["input_tokens"].as_u64().unwrap() > 5, "{counted}");
}

#[tokio::test]
async fn a_tool_round_trip_goes_through_chat() {
    let mock = upstream().await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let tool = json!([{"name": "get_weather", "description": "Weather.", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let mut first = ask("mock/m", false);
    first["tools"] = tool.clone();
    let (status, _, answer) = send(anthropic_post(&proxy, "/v1/messages", &first)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stop_reason"], "tool_use");
    let call = &answer["content"][0];
    assert_eq!(
        (call["type"].as_str(), call["name"].as_str()),
        (Some("tool_use"), Some("get_weather"))
    );
    assert_eq!(call["input"], json!({"city": "Porto"}));

    let mut second = first.clone();
    second["messages"] = json!([
        first["messages"][0],
        {"role": "assistant", "content": answer["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "19°C"}]}
    ]);
    let (status, _, answer) = send(anthropic_post(&proxy, "/v1/messages", &second)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["content"][0]["text"], "Sunny in Porto.");
    let seen = &mock.chats()[1].body["messages"];
    assert_eq!(seen[2]["tool_calls"][0]["id"], call["id"]);
    assert_eq!(
        seen[3],
        json!({"role": "tool", "tool_call_id": call["id"], "content": "19°C"})
    );
}

#[tokio::test]
async fn errors_come_in_anthropics_shape() {
    let mock = upstream().await;
    let limited = Mock::start(|_, _| {
        Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
            .with_header("retry-after", "120")
    })
    .await;
    let setup = Setup::one(&mock, 1)
        .provider("limited", provider_yaml(&limited.base_url, ""))
        .env("LIMITED_API_KEY", &key(3))
        .config("request_timeout: 2s\n");
    let proxy = Proxy::start(setup).await;
    let expect = |body: &Value, kind: &str| {
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    };
    let no_key = http_client()
        .post(format!("{}/v1/messages", proxy.url))
        .header("content-type", "application/json")
        .body(ask("mock/m", false).to_string());
    let (status, _, body) = send(no_key).await;
    assert_eq!(status, 401);
    expect(&body, "authentication_error");
    let (status, _, body) = send(anthropic_post(
        &proxy,
        "/v1/messages",
        &ask("nowhere/m", false),
    ))
    .await;
    assert_eq!(status, 404);
    expect(&body, "not_found_error");
    let (status, headers, body) = send(anthropic_post(
        &proxy,
        "/v1/messages",
        &ask("limited/m", false),
    ))
    .await;
    assert_eq!(status, 429);
    expect(&body, "rate_limit_error");
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() > 100);
    let broken = http_client()
        .post(format!("{}/v1/messages", proxy.url))
        .header("x-api-key", PROXY_KEY)
        .header("content-type", "application/json")
        .body("{not json");
    let (status, _, body) = send(broken).await;
    assert_eq!(status, 400);
    expect(&body, "invalid_request_error");
    let mut server_tool = ask("mock/m", false);
    server_tool["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
    let (status, _, body) = send(anthropic_post(&proxy, "/v1/messages", &server_tool)).await;
    assert_eq!(status, 400);
    expect(&body, "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server tool")
    );
    assert!(
        mock.chats().is_empty(),
        "nothing refused reached the upstream"
    );
}

#[tokio::test]
async fn a_stream_cut_for_good_ends_with_an_error_event() {
    let mock = Mock::start(|seen, _| Reply::Sse {
        events: chunks(seen.model(), &["partial ", "answer"], false)[..2].to_vec(),
        gap: Duration::from_millis(5),
        end: End::Cut,
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let response = anthropic_post(&proxy, "/v1/messages", &ask("mock/m", true))
        .send()
        .await
        .unwrap();
    let events = sse_events(&response.text().await.unwrap());
    let last = events.last().unwrap();
    assert_eq!(last.0, "error", "{events:?}");
    assert_eq!(last.1["type"], "error");
    assert!(!event_names(&events).contains(&"message_stop"));
}

// ------------------------------------------------------------------------- a provider that speaks Messages

/// An Anthropic upstream answering with the wire-format fixtures; the first `overloaded` streams begin with an
/// `error` event after `message_start` (as an overloaded model's do).
async fn anthropic_upstream(overloaded: usize) -> Mock {
    Mock::start(move |seen, i| {
        let raw = |path: &str, content_type: &'static str| Reply::Raw {
            status: 200,
            content_type,
            body: fixture(path),
        };
        if seen.body["stream"] == json!(true) {
            if i < overloaded {
                let body = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_x\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
                return Reply::Raw { status: 200, content_type: "text/event-stream", body: body.into() };
            }
            return raw("anthropic/stream_text.sse", "text/event-stream");
        }
        raw("anthropic/message_response_text.json", "application/json")
    })
    .await
}

#[tokio::test]
async fn a_provider_that_speaks_messages_gets_them_as_written() {
    let mock = anthropic_upstream(0).await;
    let proxy = Proxy::start(Setup::anthropic(&mock, 1)).await;
    let body = json!({"model": "anthropic/claude-sonnet-4-5", "max_tokens": 300,
        "system": [{"type": "text", "text": "Long, cached context.", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}, "citations": {"enabled": true}},
            {"type": "text", "text": "Summarise."}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "...", "signature": "c2ln"}, {"type": "text", "text": "Sure."}]},
            {"role": "user", "content": "Go on."}],
        "container": "container_1"});
    let request = anthropic_post(&proxy, "/v1/messages", &body)
        .header("anthropic-beta", "files-api-2025-04-14");
    let (status, headers, answer) = send(request).await;
    assert_eq!(status, 200, "{answer}");
    // The answer is the upstream's, byte for byte in content.
    let expected: Value =
        serde_json::from_str(&fixture("anthropic/message_response_text.json")).unwrap();
    assert_eq!(answer, expected);
    assert_eq!(header(&headers, "x-keyrelay-provider"), "anthropic");
    // The request went as written, but for the model's provider prefix.
    let seen = &mock.seen()[0];
    assert_eq!(seen.path, "/v1/messages");
    let mut sent = body.clone();
    sent["model"] = json!("claude-sonnet-4-5");
    assert_eq!(seen.body, sent);
    assert_eq!(
        seen.headers.get("anthropic-beta").unwrap(),
        "files-api-2025-04-14"
    );
    assert_eq!(seen.key, key(1));
    // Usage is Anthropic's, cache reads included in the prompt.
    let keys: Value = serde_json::from_str(&proxy.get_text("/v1/keys").await).unwrap();
    let today = &keys["data"][0]["keys"][0]["today"];
    assert_eq!(
        (
            today["prompt_tokens"].as_u64(),
            today["completion_tokens"].as_u64()
        ),
        (Some(1560), Some(31))
    );

    // Streamed: every event as it came, named; no `[DONE]`.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = anthropic_post(&proxy, "/v1/messages", &streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(
        sse_events(&text),
        sse_events(&fixture("anthropic/stream_text.sse"))
    );
    assert!(!text.contains("[DONE]"));
}

#[tokio::test]
async fn an_overloaded_native_stream_is_retried_unseen() {
    let mock = anthropic_upstream(1).await;
    let proxy = Proxy::start(Setup::anthropic(&mock, 2).config("selection: sequential\n")).await;
    let mut body = ask("anthropic/claude-sonnet-4-5", true);
    body["max_tokens"] = json!(50);
    let response = anthropic_post(&proxy, "/v1/messages", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(response.headers(), "x-keyrelay-attempts"), "2");
    let text = response.text().await.unwrap();
    assert_eq!(
        sse_events(&text),
        sse_events(&fixture("anthropic/stream_text.sse"))
    );
    // Retried (an overload is retried, then rotated, as the provider's rules say) before the client saw a byte.
    assert_eq!(mock.seen().len(), 2);
    assert!(!text.contains("overloaded"));
}

#[tokio::test]
async fn a_native_stream_cut_for_good_ends_with_an_error_event() {
    let cut: String = fixture("anthropic/stream_text.sse")
        .split("\n\n")
        .take(4)
        .map(|e| format!("{e}\n\n"))
        .collect();
    let mock = Mock::start(move |_, _| Reply::Raw {
        status: 200,
        content_type: "text/event-stream",
        body: cut.clone(),
    })
    .await;
    let proxy = Proxy::start(Setup::anthropic(&mock, 1)).await;
    let response = anthropic_post(
        &proxy,
        "/v1/messages",
        &ask("anthropic/claude-sonnet-4-5", true),
    )
    .send()
    .await
    .unwrap();
    let events = sse_events(&response.text().await.unwrap());
    assert_eq!(
        event_names(&events)[..4],
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta"
        ]
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last.0.as_str(), last.1["type"].as_str()),
        ("error", Some("error"))
    );
    assert!(!event_names(&events).contains(&"message_stop"));
}

#[tokio::test]
async fn a_native_request_that_may_fall_back_elsewhere_is_translated() {
    let anthropic = anthropic_upstream(0).await;
    let openai = upstream().await;
    let setup = Setup::anthropic(&anthropic, 1)
        .provider("mock", provider_yaml(&openai.base_url, ""))
        .env("MOCK_API_KEY", &key(2));
    let proxy = Proxy::start(setup).await;
    let mut body = ask("anthropic/claude-sonnet-4-5", false);
    body["system"] =
        json!([{"type": "text", "text": "Cached.", "cache_control": {"type": "ephemeral"}}]);
    // Alone, it goes as written.
    let (status, _, _) = send(anthropic_post(&proxy, "/v1/messages", &body)).await;
    assert_eq!(status, 200);
    assert_eq!(
        anthropic.seen()[0].body["system"][0]["cache_control"]["type"],
        "ephemeral"
    );
    // With a fallback that does not speak Messages, translated, so that the fallback could serve it too.
    body["fallbacks"] = json!(["mock/m"]);
    let (status, _, answer) = send(anthropic_post(&proxy, "/v1/messages", &body)).await;
    assert_eq!(status, 200, "{answer}");
    let seen = &anthropic.seen()[1].body;
    assert_eq!(
        seen["system"], "Cached.",
        "mapped from chat by the provider's script: {seen}"
    );
    assert!(seen.get("fallbacks").is_none());
}
