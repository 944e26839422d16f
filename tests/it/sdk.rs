//! Official clients against a real keyrelay: the OpenAI Python SDK (chat, streaming, embeddings, models, and the
//! exception types for 401, 404 and 429), the OpenAI Node SDK (which asks for base64 embeddings and reads every
//! header strictly), LiteLLM's async client (`acompletion`, as its Router and proxy call it) and the Anthropic
//! Python SDK (`/v1/messages` create, stream, tools, count_tokens and its exception types, over a provider that
//! speaks OpenAI's API and one that speaks Anthropic's), and the OpenAI Python SDK's Responses API (plain,
//! streamed, function tools continued by `previous_response_id`) and legacy completions. Each fails,
//! saying what to install, where its runtime or package is missing; `.ci/run` installs them.

use crate::support::*;
use std::process::Command;

fn python_with(module: &str) -> Option<&'static str> {
    ["python3", "python"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A proxy with provider `mock` (answering every chat with one text) and provider `limited` (every key rate
/// limited for two minutes).
async fn proxy_for_clients() -> (Proxy, Mock, Mock) {
    let mock = Mock::echo("Hello from the SDK test").await;
    let limited = Mock::start(|_, _| {
        Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
            .with_header("retry-after", "120")
    })
    .await;
    let setup = Setup::one(&mock, 2)
        .provider("limited", provider_yaml(&limited.base_url, ""))
        .env("LIMITED_API_KEY", &key(3))
        .config("request_timeout: 3s\n");
    (Proxy::start(setup).await, mock, limited)
}

/// Runs `program` with `args` against `proxy` and checks that it reports success.
async fn drive(proxy: &Proxy, program: &str, args: Vec<String>) {
    drive_with(proxy, program, args, &[]).await
}

/// [`drive`] with more environment variables.
async fn drive_with(proxy: &Proxy, program: &str, args: Vec<String>, env: &[(&str, &str)]) {
    let url = format!("{}/v1", proxy.url);
    let program = program.to_string();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .args(args)
            .envs(env)
            .env("KEYRELAY_URL", url)
            .env("KEYRELAY_KEY", PROXY_KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

fn sdk_file(name: &str) -> String {
    format!("{}/tests/sdk/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
#[ignore = "needs python3 with the openai package; .ci/run installs it"]
async fn the_openai_python_sdk_works_against_keyrelay() {
    let python = python_with("openai").expect(
        "this test drives the official OpenAI Python SDK and python3 with the openai package was not found: \
         run .ci/run (which installs it), or pip install openai",
    );
    let (proxy, _mock, _limited) = proxy_for_clients().await;
    drive(&proxy, python, vec![sdk_file("openai_sdk.py")]).await;
}

#[tokio::test]
#[ignore = "needs node and the OpenAI Node SDK in tests/sdk/node; .ci/run installs them"]
async fn the_openai_node_sdk_works_against_keyrelay() {
    let installed =
        std::path::Path::new(&sdk_file("node/node_modules/openai/package.json")).exists();
    assert!(
        installed,
        "this test drives the official OpenAI Node SDK, which is not installed: run .ci/run (which installs \
         it), or npm install --prefix tests/sdk/node"
    );
    let (proxy, _mock, _limited) = proxy_for_clients().await;
    drive(&proxy, "node", vec![sdk_file("node/openai_sdk.mjs")]).await;
}

#[tokio::test]
#[ignore = "needs python3 with the litellm package; .ci/run installs it"]
async fn litellms_async_client_works_against_keyrelay() {
    let python = python_with("litellm").expect(
        "this test drives LiteLLM's async client and python3 with the litellm package was not found: run \
         .ci/run (which installs it), or pip install litellm",
    );
    let (proxy, _mock, _limited) = proxy_for_clients().await;
    drive(&proxy, python, vec![sdk_file("litellm_async.py")]).await;
}

/// An Anthropic upstream answering like `proxy_for_dialects`' OpenAI one: the same text, tool call and counts.
async fn anthropic_speaking() -> Mock {
    use serde_json::json;
    Mock::start(|seen, _| {
        let tools = seen.body.get("tools").is_some();
        let answered = seen.body["messages"].as_array().is_some_and(|m| {
            m.iter()
                .any(|m| m["content"][0]["type"] == "tool_result")
        });
        let calling = tools && !answered;
        if seen.body["stream"] != json!(true) {
            let content = if calling {
                json!([{"type": "tool_use", "id": "toolu_7", "name": "get_weather", "input": {"city": "Porto"}}])
            } else {
                json!([{"type": "text", "text": "Sunny in Porto."}])
            };
            return Reply::ok(json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": content, "stop_reason": if calling { "tool_use" } else { "end_turn" }, "stop_sequence": null,
                "usage": {"input_tokens": 11, "output_tokens": 7}}));
        }
        let event = |data: serde_json::Value| {
            format!("event: {}\ndata: {data}\n\n", data["type"].as_str().unwrap())
        };
        let mut body = event(json!({"type": "message_start", "message": {"id": "msg_2", "type": "message",
            "role": "assistant", "model": "claude-sonnet-4-5", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 11, "output_tokens": 1}}}));
        let deltas = if calling {
            body += &event(json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_8", "name": "get_weather", "input": {}}}));
            vec![json!({"type": "input_json_delta", "partial_json": "{\"city\":"}),
                 json!({"type": "input_json_delta", "partial_json": "\"Porto\"}"})]
        } else {
            body += &event(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}));
            vec![json!({"type": "text_delta", "text": "Sunny "}), json!({"type": "text_delta", "text": "in Porto."})]
        };
        body += &event(json!({"type": "ping"}));
        for delta in deltas {
            body += &event(json!({"type": "content_block_delta", "index": 0, "delta": delta}));
        }
        body += &event(json!({"type": "content_block_stop", "index": 0}));
        body += &event(json!({"type": "message_delta", "delta": {"stop_reason": if calling { "tool_use" } else { "end_turn" },
            "stop_sequence": null}, "usage": {"output_tokens": 2}}));
        body += &event(json!({"type": "message_stop"}));
        Reply::Raw { status: 200, content_type: "text/event-stream", body }
    })
    .await
}

/// An OpenAI-speaking provider `mock` (tool calls when tools are offered and no result is back yet, else one
/// text, streamed when asked), `limited` (every key rate limited) and `anthropic` (speaking Anthropic's API,
/// answering alike).
async fn proxy_for_dialects() -> (Proxy, Mock, Mock, Mock) {
    let mock = Mock::start(|seen, _| {
        let tools = seen.body.get("tools").is_some();
        let answered = seen.body["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["role"] == "tool"));
        let stream = seen.body["stream"] == serde_json::json!(true);
        if tools && !answered {
            let call = serde_json::json!({"index": 0, "id": "call_7", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Porto\"}"}});
            if stream {
                let head = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": seen.model(),
                    "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]}, "finish_reason": null}]});
                let tail = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": seen.model(),
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]});
                return Reply::sse(vec![head.to_string(), tail.to_string()], End::Done);
            }
            let mut call = call;
            call.as_object_mut().unwrap().remove("index");
            return Reply::ok(serde_json::json!({"id": "chatcmpl-t", "object": "chat.completion", "created": 0,
                "model": seen.model(), "choices": [{"index": 0, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": null, "tool_calls": [call]}}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}));
        }
        if stream {
            return Reply::sse(chunks(seen.model(), &["Sunny ", "in Porto."], true), End::Done);
        }
        Reply::ok(completion(seen.model(), "Sunny in Porto."))
    })
    .await;
    let limited = Mock::start(|_, _| {
        Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
            .with_header("retry-after", "120")
    })
    .await;
    let native = anthropic_speaking().await;
    let setup = Setup::one(&mock, 2)
        .provider("limited", provider_yaml(&limited.base_url, ""))
        .env("LIMITED_API_KEY", &key(3))
        .provider("anthropic", shipped_provider("anthropic", &native.base_url))
        .shipped_plugin("anthropic.rhai")
        .env("ANTHROPIC_API_KEY", &key(4))
        .config("request_timeout: 3s\n");
    (Proxy::start(setup).await, mock, limited, native)
}

#[tokio::test]
#[ignore = "needs python3 with the anthropic package; .ci/run installs it"]
async fn the_anthropic_python_sdk_works_against_keyrelay() {
    let python = python_with("anthropic").expect(
        "this test drives the official Anthropic Python SDK and python3 with the anthropic package was not \
         found: run .ci/run (which installs it), or pip install anthropic",
    );
    let (proxy, mock, _limited, native) = proxy_for_dialects().await;
    let script = || vec![sdk_file("anthropic_sdk.py")];
    drive_with(
        &proxy,
        python,
        script(),
        &[("KEYRELAY_MODEL", "mock/claude-stand-in")],
    )
    .await;
    drive_with(
        &proxy,
        python,
        script(),
        &[
            ("KEYRELAY_MODEL", "anthropic/claude-sonnet-4-5"),
            ("KEYRELAY_NATIVE", "1"),
        ],
    )
    .await;
    // The provider that speaks the API got what the SDK wrote: the tool result as Anthropic's block.
    assert!(native.seen().iter().any(|s| {
        s.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["content"][0]["type"] == "tool_result")
    }));
    // What the upstream saw was chat, with the system prompt first and the tool result as a tool message.
    let chats = mock.chats();
    assert_eq!(chats[0].body["messages"][0]["role"], "system");
    assert!(chats.iter().any(|c| {
        c.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["role"] == "tool" && m["content"] == "19 C")
    }));
}

#[tokio::test]
#[ignore = "needs python3 with the openai package; .ci/run installs it"]
async fn the_openai_python_sdk_responses_api_works_against_keyrelay() {
    let python = python_with("openai").expect(
        "this test drives the official OpenAI Python SDK and python3 with the openai package was not found: \
         run .ci/run (which installs it), or pip install openai",
    );
    let (proxy, mock, _limited, _native) = proxy_for_dialects().await;
    drive_with(
        &proxy,
        python,
        vec![sdk_file("openai_responses.py")],
        &[("KEYRELAY_MODEL", "mock/gpt-stand-in")],
    )
    .await;
    // And against a provider that speaks the Responses API itself: passed through.
    let native = responses_upstream(0).await;
    let setup = Setup::one(&native, 1).provider(
        "mock",
        provider_yaml(&native.base_url, "dialects:\n  responses: /responses\n"),
    );
    let native_proxy = Proxy::start(setup).await;
    drive_with(
        &native_proxy,
        python,
        vec![sdk_file("openai_responses.py")],
        &[
            ("KEYRELAY_MODEL", "mock/gpt-native"),
            ("KEYRELAY_NATIVE", "1"),
        ],
    )
    .await;
    assert!(native.seen().iter().all(|s| s.path == "/v1/responses"));
    // The follow-up carried the conversation: the call and its output, as chat.
    assert!(mock.chats().iter().any(|c| {
        let m = c.body["messages"].as_array().unwrap();
        m.iter()
            .any(|m| m["role"] == "tool" && m["content"] == "19 C")
            && m.iter()
                .any(|m| m["tool_calls"][0]["function"]["name"] == "get_weather")
    }));
}
