//! OpenAI's Responses API inbound (`POST /v1/responses`), translated to chat: the translations (snapshots), the
//! conversation kept for `previous_response_id`, and the real server against an OpenAI chat mock.

use crate::support::*;
use keyrelay::mapping::inbound::Translated;
use keyrelay::mapping::inbound::responses::{ResponsesStream, from_chat, to_chat};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn rich_request() -> Value {
    json!({
        "model": "p/m", "instructions": "Be brief.", "max_output_tokens": 300, "temperature": 0.3,
        "reasoning": {"effort": "low", "summary": "auto"}, "store": true, "metadata": {"app": "t"},
        "text": {"format": {"type": "json_schema", "name": "weather", "schema": {"type": "object"}, "strict": true}},
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather.",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Porto?"},
                                         {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Porto\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\":\"Lisbon\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "19 C"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "21 C"}]}
        ]
    })
}

#[test]
fn requests_become_chat_bodies() {
    let t = to_chat(object(rich_request()), |_| None).unwrap();
    assert!(t.store);
    assert_eq!(t.input.len(), 4, "instructions are not kept");
    insta::assert_json_snapshot!("responses_request_to_chat", t.chat);
    let plain = to_chat(
        object(json!({"model": "p/m", "input": "Hi", "stream": true})),
        |_| None,
    )
    .unwrap();
    assert_eq!(
        plain.chat["messages"],
        json!([{"role": "user", "content": "Hi"}])
    );
    assert_eq!(plain.chat["stream_options"], json!({"include_usage": true}));

    for (field, value, param) in [
        (
            "tools",
            json!([{"type": "custom", "name": "grammar"}]),
            "tools[0].type",
        ),
        (
            "input",
            json!([{"type": "item_reference", "id": "x"}]),
            "input[0].type",
        ),
        (
            "input",
            json!([{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]),
            "input[0].content[0]",
        ),
        ("background", json!(true), "background"),
        ("conversation", json!("conv_1"), "conversation"),
        (
            "previous_response_id",
            json!("resp_unknown"),
            "previous_response_id",
        ),
        ("tool_choice", json!({"type": "file_search"}), "tool_choice"),
    ] {
        let mut body = json!({"model": "p/m", "input": "x"});
        body[field] = value;
        assert_eq!(to_chat(object(body), |_| None).unwrap_err().param, param);
    }
}

#[test]
fn chat_answers_become_response_objects() {
    let echo = to_chat(object(rich_request()), |_| None).unwrap().echo;
    let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1_760_000_000, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Let me see.",
            "reasoning_content": "Need the weather.",
            "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Faro\"}"}}]}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52,
                  "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 5}}});
    let (object, kept) = from_chat(&answer, &echo, "resp_test");
    insta::assert_json_snapshot!("responses_answer", object, {".output[].id" => "[id]"});
    assert_eq!(kept["tool_calls"][0]["id"], "call_9");
    let mut cut = completion("m", "Partial");
    cut["choices"][0]["finish_reason"] = json!("length");
    let (object, _) = from_chat(&cut, &echo, "resp_2");
    assert_eq!(
        (
            object["status"].as_str(),
            object["incomplete_details"]["reason"].as_str()
        ),
        (Some("incomplete"), Some("max_output_tokens"))
    );
}

/// The events of a translated stream (complete when its frames end in `[DONE]`), as (name, data) pairs, and
/// the answer kept when it completed.
fn stream_events(frames: &[String]) -> (Vec<(String, Value)>, Option<Value>) {
    let kept = Arc::new(Mutex::new(None));
    let sink = kept.clone();
    let echo = to_chat(object(json!({"model": "p/m", "input": "x"})), |_| None)
        .unwrap()
        .echo;
    let stream = ResponsesStream::new(
        "resp_s".into(),
        echo,
        Some(Box::new(move |m| *sink.lock().unwrap() = Some(m))),
    );
    let frames: Vec<(Option<&str>, &str)> = frames.iter().map(|f| (None, f.as_str())).collect();
    let out = Translated::translate_all(stream, &frames);
    let text = String::from_utf8(out).unwrap();
    let events = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            (
                name.strip_prefix("event: ").unwrap().to_string(),
                serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(),
            )
        })
        .collect();
    let kept = kept.lock().unwrap().clone();
    (events, kept)
}

#[test]
fn chat_streams_become_the_responses_event_sequence() {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    let frames = vec![
        chunk(json!({"role": "assistant", "reasoning_content": "Hmm."}), Value::Null),
        chunk(json!({"content": "Let me "}), Value::Null),
        chunk(json!({"content": "check."}), Value::Null),
        chunk(json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":"}}]}), Value::Null),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Porto\"}"}}]}), Value::Null),
        chunk(json!({}), json!("tool_calls")),
        json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
               "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}}).to_string(),
        "[DONE]".into(),
    ];
    let (events, kept) = stream_events(&frames);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.done",
            "response.reasoning_summary_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let sequence: Vec<u64> = events
        .iter()
        .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(sequence, (0..events.len() as u64).collect::<Vec<_>>());
    insta::assert_json_snapshot!("responses_stream_events", events, {
        "[][1].item.id" => "[id]", "[][1].item_id" => "[id]", "[][1].response.output[].id" => "[id]",
        "[][1].response.created_at" => "[created]"
    });
    let kept = kept.expect("a completed stream is kept");
    assert_eq!(kept["content"], "Let me check.");
    assert_eq!(
        kept["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Porto\"}"
    );

    // A failure after the start: `error`, then `response.failed`; never `response.completed`, never kept.
    let error = json!({"error": {"message": "upstream broke", "type": "upstream_error", "code": "stream_interrupted"}}).to_string();
    let (events, kept) = stream_events(&[frames[1].clone(), error]);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[names.len() - 2..], ["error", "response.failed"]);
    assert_eq!(
        events.last().unwrap().1["response"]["error"]["code"],
        "stream_interrupted"
    );
    assert!(kept.is_none());
    let (events, _) = stream_events(&[frames[1].clone()]);
    assert_eq!(events.last().unwrap().0, "response.failed");
}

// ------------------------------------------------------------------------------------------ the real server

async fn upstream() -> Mock {
    Mock::start(|seen, _| {
        let tools = seen.body.get("tools").is_some();
        let answered = seen.body["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["role"] == "tool"));
        if tools && !answered {
            return Reply::ok(json!({"id": "chatcmpl-t", "object": "chat.completion", "created": 0, "model": seen.model(),
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                    "tool_calls": [{"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Porto\"}"}}]}}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}));
        }
        if seen.body["stream"] == json!(true) {
            return Reply::sse(chunks(seen.model(), &["Sunny ", "in Porto."], true), End::Done);
        }
        Reply::ok(completion(seen.model(), "Sunny in Porto."))
    })
    .await
}

#[tokio::test]
async fn a_conversation_continues_by_previous_response_id() {
    let mock = upstream().await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let tools = json!([{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let first = json!({"model": "mock/m", "instructions": "Be brief.", "input": "Weather in Porto?", "tools": tools});
    let (status, headers, answer) = send(proxy.post("/v1/responses", &first)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-keyrelay-provider"), "mock");
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["status"], "completed");
    let call = &answer["output"][0];
    assert_eq!(
        (call["type"].as_str(), call["name"].as_str()),
        (Some("function_call"), Some("get_weather"))
    );
    assert_eq!(answer["usage"]["input_tokens"], 20);

    let second = json!({"model": "mock/m", "previous_response_id": answer["id"], "tools": tools,
        "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "19 C"}]});
    let (status, _, answer) = send(proxy.post("/v1/responses", &second)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["output"][0]["content"][0]["text"], "Sunny in Porto.");
    assert_eq!(
        answer["previous_response_id"],
        second["previous_response_id"]
    );
    // The upstream saw the whole conversation, but not the first request's instructions.
    let seen = &mock.chats()[1].body["messages"];
    assert_eq!(
        seen,
        &json!([{"role": "user", "content": "Weather in Porto?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_7", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Porto\"}"}}]},
                {"role": "tool", "tool_call_id": "call_7", "content": "19 C"}])
    );

    // Streamed, and continued from a streamed answer.
    let stream = json!({"model": "mock/m", "input": "Again?", "stream": true, "previous_response_id": answer["id"]});
    let text = proxy.post_text("/v1/responses", &stream).await;
    assert!(text.contains("event: response.completed"), "{text}");
    let completed: Value = text
        .split("\n\n")
        .find(|e| e.starts_with("event: response.completed"))
        .and_then(|e| e.split_once("data: "))
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .unwrap();
    let id = completed["response"]["id"].clone();
    assert_eq!(
        completed["response"]["output"][0]["content"][0]["text"],
        "Sunny in Porto."
    );
    let follow = json!({"model": "mock/m", "input": "Thanks", "previous_response_id": id});
    let (status, _, _) = send(proxy.post("/v1/responses", &follow)).await;
    assert_eq!(status, 200);
    assert_eq!(
        mock.chats().last().unwrap().body["messages"]
            .as_array()
            .unwrap()
            .len(),
        7
    );

    // Unknown, or not kept (store: false): a clear 400.
    let unknown = json!({"model": "mock/m", "input": "x", "previous_response_id": "resp_nope"});
    let (status, _, body) = send(proxy.post("/v1/responses", &unknown)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "previous_response_not_found");
    assert_eq!(body["error"]["param"], "previous_response_id");
    let unstored = json!({"model": "mock/m", "input": "x", "store": false});
    let (_, _, body) = send(proxy.post("/v1/responses", &unstored)).await;
    let again = json!({"model": "mock/m", "input": "y", "previous_response_id": body["id"]});
    assert_eq!(send(proxy.post("/v1/responses", &again)).await.0, 400);
}

// ------------------------------------------------------------------- a provider that speaks Responses

fn native_setup(mock: &Mock) -> Setup {
    Setup::one(mock, 2)
        .provider(
            "native",
            provider_yaml(&mock.base_url, "dialects:\n  responses: /responses\n"),
        )
        .env("NATIVE_API_KEY_1", &key(3))
        .env("NATIVE_API_KEY_2", &key(4))
}

#[tokio::test]
async fn a_provider_that_speaks_responses_gets_them_as_written() {
    let mock = responses_upstream(0).await;
    let proxy = Proxy::start(native_setup(&mock)).await;
    let body = json!({"model": "native/gpt-x", "input": "Weather?", "include": ["reasoning.encrypted_content"],
                      "tools": [{"type": "web_search"}], "previous_response_id": "resp_openai_side"});
    let (status, headers, answer) = send(proxy.post("/v1/responses", &body)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-keyrelay-provider"), "native");
    assert_eq!(answer["id"], "resp_up", "the upstream's own answer");
    let seen = mock.seen().pop().unwrap();
    assert_eq!(seen.path, "/v1/responses");
    let mut sent = body.clone();
    sent["model"] = json!("gpt-x");
    assert_eq!(
        seen.body, sent,
        "as written: hosted tools and the upstream's own ids go along"
    );
    let keys: Value = serde_json::from_str(&proxy.get_text("/v1/keys").await).unwrap();
    let native = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "native")
        .unwrap();
    let today: u64 = native["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["today"]["completion_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(today, 7, "usage read from the Responses answer");

    let stream = json!({"model": "native/gpt-x", "input": "Weather?", "stream": true});
    let text = proxy.post_text("/v1/responses", &stream).await;
    assert!(text.starts_with("event: response.created\n"), "{text}");
    assert!(
        text.trim_end().ends_with('}') && text.contains("event: response.completed"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
}

#[tokio::test]
async fn a_native_stream_failing_at_its_start_is_retried_unseen() {
    let mock = responses_upstream(1).await;
    let proxy = Proxy::start(native_setup(&mock)).await;
    let stream = json!({"model": "native/gpt-x", "input": "Weather?", "stream": true});
    let response = proxy.post("/v1/responses", &stream).send().await.unwrap();
    assert_eq!(header(response.headers(), "x-keyrelay-attempts"), "2");
    let text = response.text().await.unwrap();
    assert!(
        !text.contains("response.failed") && text.contains("event: response.completed"),
        "{text}"
    );
    assert_eq!(text.matches("event: response.created").count(), 1);
}

#[tokio::test]
async fn a_conversation_kept_here_continues_here_even_on_a_native_provider() {
    let chat = upstream().await;
    let native = responses_upstream(0).await;
    let setup = Setup::one(&chat, 1)
        .provider(
            "native",
            provider_yaml(&native.base_url, "dialects:\n  responses: /responses\n"),
        )
        .env("NATIVE_API_KEY", &key(3));
    let proxy = Proxy::start(setup).await;
    let (_, _, first) =
        send(proxy.post("/v1/responses", &json!({"model": "mock/m", "input": "Hi"}))).await;
    let follow =
        json!({"model": "native/gpt-x", "input": "More", "previous_response_id": first["id"]});
    let (status, _, answer) = send(proxy.post("/v1/responses", &follow)).await;
    assert_eq!(status, 200, "{answer}");
    // Translated to chat for the native provider, the conversation carried: it knows nothing of our id.
    let seen = native.seen().pop().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.body["messages"].as_array().unwrap().len(), 3);
}

#[test]
fn codex_shaped_requests_translate_with_namespaces_and_hosted_tools_left_out() {
    let body = json!({"model": "p/m", "stream": true, "store": false, "parallel_tool_calls": true,
    "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k",
    "client_metadata": {"turn_id": "t"}, "tool_choice": "auto",
    "tools": [
        {"type": "function", "name": "exec_command", "strict": false, "parameters": {"type": "object"}},
        {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
         "tools": [{"type": "function", "name": "close_agent", "parameters": {"type": "object"}}]},
        {"type": "web_search", "external_web_access": false}
    ],
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox rules."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List files"}]},
        {"type": "function_call", "call_id": "call_1", "namespace": "multi_agent_v1", "name": "close_agent", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "closed"}
    ]});
    let t = to_chat(object(body), |_| None).unwrap();
    assert_eq!(t.omitted, ["tools[2]"]);
    assert!(!t.store);
    insta::assert_json_snapshot!("responses_request_codex_to_chat", t.chat);
    let answer = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "call_2", "type": "function", "function": {"name": "multi_agent_v1__close_agent", "arguments": "{}"}},
                           {"id": "call_3", "type": "function", "function": {"name": "exec_command", "arguments": "{\"cmd\":\"ls\"}"}}]}}]});
    let (object, kept) = from_chat(&answer, &t.echo, "resp_c");
    let calls = object["output"].as_array().unwrap();
    assert_eq!(
        (calls[0]["namespace"].as_str(), calls[0]["name"].as_str()),
        (Some("multi_agent_v1"), Some("close_agent"))
    );
    assert_eq!(
        (calls[1].get("namespace"), calls[1]["name"].as_str()),
        (None, Some("exec_command"))
    );
    assert_eq!(
        kept["tool_calls"][0]["function"]["name"], "multi_agent_v1__close_agent",
        "kept as chat names it"
    );
}

#[tokio::test]
async fn hosted_tools_left_out_are_named_in_a_header() {
    let mock = upstream().await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/m", "input": "News?", "tools": [{"type": "web_search"}, {"type": "file_search"}]});
    let (status, headers, answer) = send(proxy.post("/v1/responses", &body)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-keyrelay-omitted"), "tools[0],tools[1]");
    assert!(mock.chats()[0].body.get("tools").is_none());
    assert_eq!(answer["output"][0]["content"][0]["text"], "Sunny in Porto.");
}
