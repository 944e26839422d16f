//! Scripted providers end to end: a real keyrelay in front of mock upstreams that speak Gemini's and Anthropic's
//! native wire formats (fixtures recorded in those formats), and providers added from a YAML file and a script.

use crate::support::*;
use serde_json::{Value, json};

/// A mock Gemini: generateContent, streamGenerateContent (SSE), batchEmbedContents and the model list, each
/// answered from its fixture; keys listed in `failing` get `error` instead.
async fn gemini(failing: Vec<(String, &'static str, u16)>) -> Mock {
    Mock::start(move |seen, _| {
        if let Some((_, fixture_path, status)) = failing.iter().find(|(k, _, _)| *k == seen.key) {
            return Reply::Raw {
                status: *status,
                content_type: "application/json",
                body: fixture(fixture_path),
            };
        }
        let raw = |path: &str, ct: &'static str| Reply::Raw {
            status: 200,
            content_type: ct,
            body: fixture(path),
        };
        if seen.path.ends_with(":streamGenerateContent") {
            if seen.body.get("tools").is_some() {
                return raw("gemini/stream_tool_call.sse", "text/event-stream");
            }
            return raw("gemini/stream_text.sse", "text/event-stream");
        }
        if seen.path.ends_with(":generateContent") {
            if seen.body.get("tools").is_some() {
                return raw(
                    "gemini/generate_response_tool_call.json",
                    "application/json",
                );
            }
            return raw("gemini/generate_response_text.json", "application/json");
        }
        if seen.path.ends_with(":batchEmbedContents") {
            return raw("gemini/embed_batch_response.json", "application/json");
        }
        if seen.path.ends_with("/models") {
            return raw("gemini/models_list.json", "application/json");
        }
        Reply::status(
            404,
            json!({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}),
        )
    })
    .await
}

fn gemini_setup(mock: &Mock, keys: usize) -> Setup {
    Setup {
        env: mock_keys("GEMINI", keys),
        ..Setup::empty()
    }
    .provider(
        "gemini",
        shipped_provider("gemini", &format!("{}beta", mock.base_url)),
    )
    .shipped_plugin("gemini.rhai")
}

fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about tide pools."}]})
}

/// A non-streaming `chat_body` request for `model`.
async fn ask(proxy: &Proxy, model: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    send(proxy.post("/v1/chat/completions", &chat_body(model, false))).await
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
}

#[tokio::test]
async fn gemini_chat_is_mapped_both_ways() {
    let mock = gemini(vec![]).await;
    let proxy = Proxy::start(gemini_setup(&mock, 1)).await;
    let (status, headers, body) = ask(&proxy, "gemini/gemini-2.5-flash").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-provider"), "gemini");
    let upstream = fixture_json("gemini/generate_response_text.json");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        upstream["candidates"][0]["content"]["parts"][0]["text"]
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"]["prompt_tokens"],
        upstream["usageMetadata"]["promptTokenCount"]
    );

    let seen = &mock.seen()[0];
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(seen.key, key(1), "the key travels in x-goog-api-key");
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(
        seen.body["systemInstruction"]["parts"][0]["text"],
        "Be brief."
    );
    assert_eq!(seen.body["contents"][0]["role"], "user");
}

fn fixture_json(path: &str) -> Value {
    serde_json::from_str(&fixture(path)).unwrap()
}

#[tokio::test]
async fn gemini_streaming_becomes_openai_chunks() {
    let mock = gemini(vec![]).await;
    let proxy = Proxy::start(gemini_setup(&mock, 1)).await;
    let mut body = chat_body("gemini/gemini-2.5-flash", true);
    body["stream_options"] = json!({"include_usage": true});
    let response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "Gemini sends no [DONE]; keyrelay ends the stream properly"
    );
    let expected: String = fixture("gemini/stream_text.sse")
        .split("\r\n\r\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/candidates/0/content/parts/0/text")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    assert_eq!(reassemble(&data), expected);
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let seen = &mock.seen()[0];
    assert_eq!(
        seen.path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    );
    assert_eq!(seen.query, "alt=sse");
}

#[tokio::test]
async fn gemini_tool_calls_both_ways() {
    let mock = gemini(vec![]).await;
    let proxy = Proxy::start(gemini_setup(&mock, 1)).await;
    let mut body = chat_body("gemini/gemini-2.5-flash", false);
    body["tools"] = weather_tool();
    body["tool_choice"] = json!("required");
    let (status, _, reply) = send(proxy.post("/v1/chat/completions", &body)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");
    let call = &reply["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object());
    let seen = &mock.seen()[0];
    assert_eq!(
        seen.body["tools"][0]["functionDeclarations"][0]["name"],
        "get_weather"
    );
    assert_eq!(
        seen.body["toolConfig"]["functionCallingConfig"]["mode"],
        "ANY"
    );

    body["stream"] = json!(true);
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    let calls: Vec<Value> = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v.pointer("/choices/0/delta/tool_calls").cloned())
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(calls.len(), 2, "{text}");
    assert!(
        data.iter()
            .any(|d| d.contains("\"finish_reason\":\"tool_calls\""))
    );
}

#[tokio::test]
async fn gemini_embeddings_and_models() {
    let mock = gemini(vec![]).await;
    // No static list: every model listed must come from the upstream's list, through the models hook.
    let setup = gemini_setup(&mock, 1);
    let yaml = setup
        .providers
        .iter()
        .find(|(n, _)| n == "gemini")
        .unwrap()
        .1
        .clone();
    let yaml: String = yaml
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("static:") {
                "  static: []\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let proxy = Proxy::start(setup.provider("gemini", yaml)).await;
    let body = json!({"model": "gemini/gemini-embedding-001", "input": ["first", "second"]});
    let (status, _, reply) = send(proxy.post("/v1/embeddings", &body)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "list");
    let upstream = fixture_json("gemini/embed_batch_response.json");
    assert_eq!(
        reply["data"][1]["embedding"],
        upstream["embeddings"][1]["values"]
    );
    assert_eq!(reply["data"][1]["index"], 1);
    assert_eq!(
        mock.seen()[0].path,
        "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    );
    assert_eq!(
        mock.seen()[0].body["requests"][1]["content"]["parts"][0]["text"],
        "second"
    );
    // `encoding_format: base64` (the OpenAI Node SDK's default): little-endian f32s, as OpenAI sends them.
    let body = json!({"model": "gemini/gemini-embedding-001", "input": ["first", "second"], "encoding_format": "base64"});
    let (status, _, reply) = send(proxy.post("/v1/embeddings", &body)).await;
    assert_eq!(status, 200, "{reply}");
    let encoded = reply["data"][1]["embedding"]
        .as_str()
        .expect("a base64 string");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let expected: Vec<f32> = upstream["embeddings"][1]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(floats, expected);

    let (status, _, list) = send(proxy.get("/v1/models")).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let upstream: Vec<String> = fixture_json("gemini/models_list.json")["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "gemini/{}",
                m["name"].as_str().unwrap().trim_start_matches("models/")
            )
        })
        .collect();
    assert_eq!(ids, upstream, "the upstream list, mapped by the script");
    assert!(ids.iter().all(|id| !id.contains("models/")), "{ids:?}");
    let listing = mock
        .seen()
        .into_iter()
        .find(|s| s.path == "/v1beta/models")
        .unwrap();
    assert_eq!(listing.query, "pageSize=1000");
    send(proxy.get("/v1/models")).await;
    assert_eq!(
        mock.seen()
            .iter()
            .filter(|s| s.path == "/v1beta/models")
            .count(),
        1,
        "cached"
    );
}

#[tokio::test]
async fn a_gemini_per_minute_429_rotates_and_cools_for_its_retry_delay() {
    let mock = gemini(vec![(key(1), "gemini/error_429_per_minute.json", 429)]).await;
    let proxy = Proxy::start(gemini_setup(&mock, 2).config("selection: sequential\n")).await;
    let (status, headers, body) = ask(&proxy, "gemini/gemini-2.5-flash").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-key"), masked(2));
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "2");
    let delay = fixture_json("gemini/error_429_per_minute.json").to_string();
    let seconds: i64 = delay
        .split("\"retryDelay\":\"")
        .nth(1)
        .unwrap()
        .split('s')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let status = proxy.key_status("gemini").await;
    let cooling = status.iter().find(|k| k.key == masked(1)).unwrap();
    let (model, until, reason) = &cooling.model_cooldowns[0];
    assert_eq!(
        (model.as_str(), reason.as_str()),
        ("gemini-2.5-flash", "rate_limit")
    );
    let left = until - keyrelay::clock::Clock::system().now();
    assert!(
        left > (seconds - 3) * 1000 && left <= seconds * 1000,
        "cools for retryDelay ({seconds}s), not {left} ms"
    );
}

#[tokio::test]
async fn a_gemini_per_day_429_cools_until_the_quota_resets() {
    let mock = gemini(vec![(key(1), "gemini/error_429_per_day.json", 429)]).await;
    let proxy = Proxy::start(gemini_setup(&mock, 2).config("selection: sequential\n")).await;
    let (status, _, body) = ask(&proxy, "gemini/gemini-2.5-flash").await;
    assert_eq!(status, 200, "{body}");
    let status = proxy.key_status("gemini").await;
    let cooling = status.iter().find(|k| k.key == masked(1)).unwrap();
    let (_, until, reason) = &cooling.model_cooldowns[0];
    assert_eq!(reason.as_str(), "quota");
    let now = keyrelay::clock::Clock::system().now();
    let midnight_pacific = keyrelay::config::DailyReset::parse("00:00", "America/Los_Angeles")
        .unwrap()
        .next_after(now);
    assert!(
        (until - midnight_pacific).abs() < 2000,
        "cools until midnight Pacific, not for the short retryDelay"
    );
}

#[tokio::test]
async fn a_gemini_invalid_key_is_benched_as_auth() {
    let mock = gemini(vec![(key(1), "gemini/error_400_api_key_invalid.json", 400)]).await;
    let proxy = Proxy::start(gemini_setup(&mock, 2).config("selection: sequential\n")).await;
    let (status, _, body) = ask(&proxy, "gemini/gemini-2.5-flash").await;
    assert_eq!(status, 200, "{body}");
    let status = proxy.key_status("gemini").await;
    assert_eq!(
        status
            .iter()
            .find(|k| k.key == masked(1))
            .unwrap()
            .cooling_reason
            .map(|c| c.as_str()),
        Some("auth")
    );
}

// ---------------------------------------------------------------------------------------------- Anthropic

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
    let upstream = fixture_json("anthropic/message_response_text.json");
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
    let first = fixture_json("anthropic/models_list.json")["data"][0]["id"]
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

// ------------------------------------------------------------------------------- providers added as files

/// A made-up upstream with its own wire format: `{"prompt": …}` in, `{"output": …, "tokens": [in, out]}` out,
/// and an SSE stream of `{"piece": …}` events ending with `{"end": true}`.
async fn made_up_upstream() -> Mock {
    Mock::start(|seen, _| {
        let prompt = seen.body["prompt"].as_str().unwrap_or("").to_string();
        if seen.body["live"] == json!(true) {
            let events = vec![
                json!({"piece": "echo: "}).to_string(),
                json!({"piece": prompt}).to_string(),
                json!({"end": true, "tokens": [3, 2]}).to_string(),
            ];
            return Reply::sse(events, End::Cut);
        }
        Reply::ok(json!({"output": format!("echo: {prompt}"), "tokens": [3, 2]}))
    })
    .await
}

const ECHO_SCRIPT: &str = r#"
fn request(ctx) {
    let last = ctx.body.messages[ctx.body.messages.len() - 1].content;
    if last == "loop" { let n = 0; loop { n += 1; } }
    if last == "huge" { let s = "x"; loop { s += s; } }
    if last == "import" { import "fs" as fs; return fs::read("/etc/passwd"); }
    if last == "crash" { let n = (); n.oops(); }
    #{ path: "/generate", body: #{ prompt: last, live: ctx.stream } }
}

fn response(ctx) {
    #{
        id: "echo-1", object: "chat.completion", created: unix_time(), model: ctx.model,
        choices: [#{ index: 0, message: #{ role: "assistant", content: ctx.body.output }, finish_reason: "stop" }],
        usage: #{ prompt_tokens: ctx.body.tokens[0], completion_tokens: ctx.body.tokens[1], total_tokens: 5 }
    }
}

fn stream_event(event) {
    let d = event.data;
    if d.end == true {
        return [#{ finish_reason: "stop" }, #{ usage: #{ prompt_tokens: d.tokens[0], completion_tokens: d.tokens[1] } }, #{ done: true }];
    }
    if d.piece == "crash-stream" { let n = (); n.oops(); }
    this.count = (this.count ?? 0) + 1;
    #{ content: d.piece }
}
"#;

fn echo_setup(mock: &Mock) -> Setup {
    Setup {
        env: mock_keys("ECHO", 1),
        ..Setup::empty()
    }
    .provider(
        "echo",
        format!(
            "base_url: {}\nscript: echo.rhai\nmodels: {{list: static, static: [one]}}\n",
            mock.base_url
        ),
    )
    .plugin("echo.rhai", ECHO_SCRIPT)
}

#[tokio::test]
async fn a_provider_added_as_yaml_and_script_works_without_code_changes() {
    let mock = made_up_upstream().await;
    let proxy = Proxy::start(echo_setup(&mock)).await;
    let (status, _, body) = proxy.chat("echo/one", "hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hello");
    assert_eq!(mock.seen()[0].path, "/v1/generate");
    assert_eq!(
        mock.seen()[0].body,
        json!({"prompt": "hello", "live": false})
    );

    let stream = json!({"model": "echo/one", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let text = proxy.post_text("/v1/chat/completions", &stream).await;
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "echo: hi");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
}

#[tokio::test]
async fn a_stream_script_failing_mid_stream_ends_it_with_an_in_band_error_after_what_was_mapped() {
    let mock = made_up_upstream().await;
    let proxy = Proxy::start(echo_setup(&mock)).await;
    // The upstream sends its events at once: the first maps, the second makes the script fail.
    let body = json!({"model": "echo/one", "stream": true, "messages": [{"role": "user", "content": "crash-stream"}]});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "echo: ", "{text}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "script_error", "{text}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stream_event"),
        "{last}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    // The key was not blamed, and the next stream works.
    let fine = json!({"model": "echo/one", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let text = proxy.post_text("/v1/chat/completions", &fine).await;
    assert_eq!(reassemble(&sse_data(&text)), "echo: hi", "{text}");
}

#[tokio::test]
async fn misbehaving_scripts_fail_their_request_cleanly_and_the_next_one_works() {
    let mock = made_up_upstream().await;
    let proxy = Proxy::start(echo_setup(&mock)).await;
    let cases = [
        ("loop", "operation limit"),
        ("huge", "it built more than 64 MiB (scripts.memory)"),
        ("import", "cannot import"),
        ("crash", "line"),
    ];
    for (i, (trigger, expected)) in cases.iter().enumerate() {
        let (status, _, body) = proxy.chat("echo/one", trigger).await;
        assert_eq!(status, 502, "{trigger}: {body}");
        assert_eq!(error_code(&body), "script_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("echo.rhai")
                && message.contains("request")
                && message.contains(expected),
            "{trigger}: {message}"
        );
        assert!(message.contains("line"), "{trigger}: {message}");
        let (status, _, body) = proxy.chat("echo/one", "fine").await;
        assert_eq!(status, 200, "after {trigger}: {body}");
        let (_, _, providers) = send(proxy.get("/v1/providers")).await;
        let echo = providers["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "echo")
            .unwrap()
            .clone();
        assert_eq!(echo["script_errors"], i as u64 + 1);
    }
    assert_eq!(
        mock.seen().len(),
        cases.len(),
        "failed scripts never reached the upstream"
    );
}

#[tokio::test]
async fn the_scripts_classifier_is_consulted_before_the_yaml_rules() {
    // The upstream says "slow down" with a 500; the script knows that means a rate limit for 30 s, while the
    // YAML rule (consulted only when the script returns ()) would call every 500 a server error.
    let mock = Mock::start(|seen, _| {
        if seen.key == key(1) {
            Reply::status(500, json!({"failure": "slow down please", "wait": 30}))
        } else {
            Reply::ok(json!({"output": "fine", "tokens": [1, 1]}))
        }
    })
    .await;
    let script = format!(
        "{ECHO_SCRIPT}\nfn classify(ctx) {{\n    if ctx.body.failure == \"slow down please\" {{ return #{{ class: \"rate_limit\", retry_after: ctx.body.wait }}; }}\n    ()\n}}\n"
    );
    let setup = Setup { env: mock_keys("ECHO", 2), ..Setup::empty() }
        .provider("echo", format!("base_url: {}\nscript: echo.rhai\nselection: sequential\nerrors: [{{status: 500, class: server}}]\n", mock.base_url))
        .plugin("echo.rhai", &script);
    let proxy = Proxy::start(setup).await;
    let (status, headers, body) = proxy.chat("echo/one", "hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "x-keyrelay-attempts"),
        "2",
        "rotated at once, not retried as a server error"
    );
    let status = proxy.key_status("echo").await;
    let (_, until, reason) = &status
        .iter()
        .find(|k| k.key == masked(1))
        .unwrap()
        .model_cooldowns[0];
    assert_eq!(reason.as_str(), "rate_limit");
    let left = until - keyrelay::clock::Clock::system().now();
    assert!(
        left > 27_000 && left <= 30_000,
        "cooling for the script's 30 s: {left} ms"
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
