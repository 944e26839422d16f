//! The shipped Anthropic provider end to end: a real keyrelay in front of a mock upstream that speaks Anthropic's
//! native wire format (fixtures recorded in it): chat, streams and tools mapped both ways, overloads retried,
//! errors classified, a broken stream continued, and the fields Anthropic cannot take refused by name.

use crate::support::scripted::*;
use crate::support::*;
use serde_json::{Value, json};

async fn anthropic(overloaded_first: bool) -> Mock {
    Mock::start(move |seen, i| {
        let raw = |status: u16, path: &str, ct: &'static str| Reply::Raw {
            status,
            content_type: ct,
            body: fixture(path),
        };
        if overloaded_first && i == 0 {
            return raw(
                529,
                "anthropic/error_529_overloaded.json",
                "application/json",
            );
        }
        if seen.path.ends_with("/models") {
            return raw(200, "anthropic/models_list.json", "application/json");
        }
        let tools = seen.body.get("tools").is_some();
        match (seen.body["stream"] == json!(true), tools) {
            (true, true) => raw(200, "anthropic/stream_tool_use.sse", "text/event-stream"),
            (true, false) => raw(200, "anthropic/stream_text.sse", "text/event-stream"),
            (false, true) => raw(
                200,
                "anthropic/message_response_tool_use.json",
                "application/json",
            ),
            (false, false) => raw(
                200,
                "anthropic/message_response_text.json",
                "application/json",
            ),
        }
    })
    .await
}

#[tokio::test]
async fn anthropic_chat_streams_and_tools() {
    let mock = anthropic(false).await;
    let proxy = Proxy::start(Setup::anthropic(&mock, 1)).await;
    let (status, _, body) = ask(&proxy, "anthropic/claude-sonnet-4-5").await;
    assert_eq!(status, 200, "{body}");
    let upstream = json_fixture("anthropic/message_response_text.json");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        upstream["content"][0]["text"]
    );
    let seen = &mock.seen()[0];
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.key, key(1), "the key travels in x-api-key");
    assert_eq!(seen.headers.get("anthropic-version").unwrap(), "2023-06-01");
    assert_eq!(seen.body["system"], "Be brief.");
    assert_eq!(seen.body["max_tokens"], 4096);

    let text = proxy
        .post_text(
            "/v1/chat/completions",
            &chat_body("anthropic/claude-sonnet-4-5", true),
        )
        .await;
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let expected: String = fixture("anthropic/stream_text.sse")
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/delta/text")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    assert_eq!(reassemble(&data), expected);
    assert!(
        !text.contains("\"usage\""),
        "usage is not forwarded unless asked"
    );

    let mut tools = chat_body("anthropic/claude-sonnet-4-5", true);
    tools["tools"] = weather_tool();
    let text = proxy.post_text("/v1/chat/completions", &tools).await;
    let arguments: String = sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/tool_calls/0/function/arguments")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    assert!(
        serde_json::from_str::<Value>(&arguments)
            .unwrap()
            .is_object(),
        "{arguments}"
    );
    assert!(text.contains("\"finish_reason\":\"tool_calls\""));

    let (_, _, list) = send(proxy.get("/v1/models")).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let first = json_fixture("anthropic/models_list.json")["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        ids.contains(&format!("anthropic/{first}").as_str()),
        "{ids:?}"
    );
}

#[tokio::test]
async fn anthropic_overload_is_retried_and_errors_classified() {
    let mock = anthropic(true).await;
    let proxy = Proxy::start(Setup::anthropic(&mock, 1).config("retries: {backoff: 5ms}\n")).await;
    let (status, headers, body) = ask(&proxy, "anthropic/claude-sonnet-4-5").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "x-keyrelay-attempts"),
        "2",
        "529 overloaded is retried on the same key"
    );

    let limited = Mock::start(|_, _| Reply::Raw {
        status: 429,
        content_type: "application/json",
        body: fixture("anthropic/error_429_rate_limit.json"),
    })
    .await;
    let proxy = Proxy::start(Setup::anthropic(&limited, 1).config("request_timeout: 2s\n")).await;
    let (status, headers, body) = ask(&proxy, "anthropic/claude-sonnet-4-5").await;
    assert_eq!(status, 429, "{body}");
    assert!(!header(&headers, "retry-after").is_empty());

    let context = Mock::start(|_, _| Reply::Raw {
        status: 400,
        content_type: "application/json",
        body: fixture("anthropic/error_400_context.json"),
    })
    .await;
    let proxy = Proxy::start(Setup::anthropic(&context, 2)).await;
    let (status, _, body) = ask(&proxy, "anthropic/claude-sonnet-4-5").await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&body), "context_length_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prompt is too long")
    );
    assert_eq!(context.seen().len(), 1);
}

#[tokio::test]
async fn an_anthropic_stream_broken_by_an_error_event_is_continued_by_prefill() {
    let mock = Mock::start(|seen, _| {
        let fixture_name = if seen.key == key(1) {
            "anthropic/stream_error.sse"
        } else {
            "anthropic/stream_text.sse"
        };
        Reply::Raw {
            status: 200,
            content_type: "text/event-stream",
            body: fixture(fixture_name),
        }
    })
    .await;
    let proxy = Proxy::start(Setup::anthropic(&mock, 2).config("selection: sequential\n")).await;
    let text = proxy
        .post_text(
            "/v1/chat/completions",
            &chat_body("anthropic/claude-sonnet-4-5", true),
        )
        .await;
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let rest: String = fixture("anthropic/stream_text.sse")
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/delta/text")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    assert_eq!(reassemble(&data), format!("Here is a short{rest}"));

    let chats: Vec<Seen> = mock.seen();
    assert_eq!(chats.len(), 2);
    assert_eq!(chats[1].key, key(2));
    assert_eq!(
        chats[1].body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Tell me about tide pools."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Here is a short"}]}
        ]),
        "the answer so far is the prefill, in Anthropic's shape"
    );
}

#[tokio::test]
async fn a_field_anthropic_cannot_take_is_refused_by_name_and_its_own_fields_pass() {
    let mock = anthropic(false).await;
    let proxy = Proxy::start(Setup::anthropic(&mock, 1)).await;
    let mut body = chat_body("anthropic/claude-sonnet-4-5", false);
    body["logit_bias"] = json!({"50256": -100});
    let (status, _, answer) = send(proxy.post("/v1/chat/completions", &body)).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "logit_bias");
    assert_eq!(answer["error"]["code"], "unsupported_parameter");
    assert_eq!(answer["error"]["type"], "invalid_request_error");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`logit_bias` is not supported by anthropic"),
        "{answer}"
    );
    // Found inside a message by the script: the same answer, naming where.
    let mut audio = chat_body("anthropic/claude-sonnet-4-5", true);
    audio["messages"][1]["content"] =
        json!([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]);
    let (status, _, answer) = send(proxy.post("/v1/chat/completions", &audio)).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "messages[1].content[0]");
    assert!(mock.seen().is_empty(), "refused before any upstream call");
    // Not a script failure: nothing counted against the script.
    let providers: Value = serde_json::from_str(&proxy.get_text("/v1/providers").await).unwrap();
    assert_eq!(providers["data"][0]["script_errors"], 0, "{providers}");

    // Defaults pass; Anthropic's own fields go upstream as written.
    let mut body = chat_body("anthropic/claude-sonnet-4-5", false);
    body["n"] = json!(1);
    body["logprobs"] = json!(false);
    body["service_tier"] = json!("auto");
    body["container"] = json!("container_1");
    let (status, _, answer) = send(proxy.post("/v1/chat/completions", &body)).await;
    assert_eq!(status, 200, "{answer}");
    let seen = &mock.seen()[0].body;
    assert_eq!(seen["container"], "container_1");
    assert!(
        seen.get("n").is_none() && seen.get("service_tier").is_none(),
        "{seen}"
    );
}
