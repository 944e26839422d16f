//! The shipped Gemini provider end to end: a real keyrelay in front of a mock upstream that speaks Gemini's native
//! wire format (fixtures recorded in it): chat, streams, tools, embeddings and models mapped both ways, and
//! Gemini's errors classified.

use crate::support::scripted::*;
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

#[tokio::test]
async fn gemini_chat_is_mapped_both_ways() {
    let mock = gemini(vec![]).await;
    let proxy = Proxy::start(gemini_setup(&mock, 1)).await;
    let (status, headers, body) = ask(&proxy, "gemini/gemini-2.5-flash").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-provider"), "gemini");
    let upstream = json_fixture("gemini/generate_response_text.json");
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
    let upstream = json_fixture("gemini/embed_batch_response.json");
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
    let upstream: Vec<String> = json_fixture("gemini/models_list.json")["models"]
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
    let delay = json_fixture("gemini/error_429_per_minute.json").to_string();
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
