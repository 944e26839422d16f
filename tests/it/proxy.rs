//! Black-box tests of the HTTP API: a real keyrelay on a loopback port in front of a mock OpenAI-compatible
//! upstream.

use crate::support::*;
use serde_json::{Value, json};

#[tokio::test]
async fn chat_non_stream_is_relayed_with_the_key_and_served_headers() {
    let mock = Mock::echo("Hello from upstream").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/gpt-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3, "vendor_field": {"x": 1}});
    let (status, headers, reply) = send(proxy.post("/v1/chat/completions", &body)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "Hello from upstream"
    );
    assert_eq!(reply["usage"]["total_tokens"], 18);
    assert_eq!(header(&headers, "x-keyrelay-provider"), "mock");
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "1");
    assert_eq!(header(&headers, "x-keyrelay-key"), masked(1));

    let seen = mock.chats();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].key, key(1), "the provider key is sent upstream");
    assert_eq!(
        seen[0].model(),
        "gpt-test",
        "the provider prefix is removed"
    );
    assert_eq!(seen[0].body["temperature"], 0.3);
    assert_eq!(
        seen[0].body["vendor_field"],
        json!({"x": 1}),
        "unknown fields pass through"
    );
    assert!(seen[0].headers.get("x-api-key").is_none());
}

#[tokio::test]
async fn chat_stream_reassembles_and_ends_with_done() {
    let mock = Mock::echo("one two three").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/m", "stream": true, "messages": [{"role": "user", "content": "count"}]});
    let response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(response.headers(), "content-type"),
        "text/event-stream"
    );
    assert_eq!(header(response.headers(), "x-keyrelay-attempts"), "1");
    let text = response.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "one two three");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    // The proxy asked the upstream for usage, but the client did not: the usage chunk is not forwarded.
    assert_eq!(
        mock.chats()[0].body["stream_options"]["include_usage"],
        true
    );
    assert!(!text.contains("\"usage\""), "{text}");
    insta::assert_snapshot!("stream_transcript_without_usage", text);
}

#[tokio::test]
async fn chat_stream_forwards_usage_when_the_client_asks() {
    let mock = Mock::echo("a b").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/m", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_stream_cut_after_it_started_ends_with_an_in_band_error_and_no_done() {
    let mock = Mock::start(|seen, _| {
        Reply::sse(
            chunks(seen.model(), &["partial ", "answ"], false)[..3].to_vec(),
            End::Cut,
        )
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/m", "stream": true, "messages": []});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "partial answ");
    assert!(
        !text.contains("[DONE]"),
        "a cut stream must not look complete: {text}"
    );
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(error_code(&last), "stream_interrupted");
}

#[tokio::test]
async fn embeddings_accept_a_string_or_a_list() {
    let mock = Mock::echo("").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    for (input, n) in [(json!("one text"), 1), (json!(["a", "b", "c"]), 3)] {
        let body = json!({"model": "mock/embed-small", "input": input});
        let (status, headers, reply) = send(proxy.post("/v1/embeddings", &body)).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["data"].as_array().unwrap().len(), n);
        assert_eq!(reply["data"][0]["embedding"][0], 0.25);
        assert_eq!(header(&headers, "x-keyrelay-provider"), "mock");
    }
    let seen = mock.seen();
    assert!(
        seen.iter()
            .all(|s| s.path == "/v1/embeddings" && s.model() == "embed-small")
    );
    assert_eq!(seen[1].body["input"], json!(["a", "b", "c"]));
}

#[tokio::test]
async fn models_merge_static_and_upstream_lists_and_resolve_ids_with_slashes() {
    let mock = Mock::echo("").await;
    let setup = Setup::one(&mock, 2)
        .provider(
            "mock",
            provider_yaml(&mock.base_url, "").replace(
                "static: [static-model]",
                "static: [static-model, org/nested-model]",
            ),
        )
        .provider("idle", "base_url: http://127.0.0.1:9/v1\n".into());
    let proxy = Proxy::start(setup).await;
    let (status, _, list) = send(proxy.get("/v1/models")).await;
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![
            "mock/static-model",
            "mock/org/nested-model",
            "mock/mock-model"
        ],
        "providers without keys are not listed"
    );
    assert_eq!(list["data"][2]["owned_by"], "mock");
    assert_eq!(list["data"][0]["object"], "model");

    let (status, _, model) = send(proxy.get("/v1/models/mock/org/nested-model")).await;
    assert_eq!(status, 200, "{model}");
    assert_eq!(model["id"], "mock/org/nested-model");
    let (status, _, missing) = send(proxy.get("/v1/models/mock/nope")).await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&missing), "model_not_found");
    // The upstream list is cached: a second listing does not ask again.
    send(proxy.get("/v1/models")).await;
    assert_eq!(
        mock.seen()
            .iter()
            .filter(|s| s.path == "/v1/models")
            .count(),
        1
    );
}

#[tokio::test]
async fn providers_report_key_counts_and_never_keys() {
    let mock = Mock::echo("").await;
    let setup = Setup::one(&mock, 3).provider("idle", "base_url: http://127.0.0.1:9/v1\n".into());
    let proxy = Proxy::start(setup).await;
    let (status, _, body) = send(proxy.get("/v1/providers")).await;
    assert_eq!(status, 200);
    let text = body.to_string();
    for i in 1..=3 {
        assert!(!text.contains(&key(i)), "a key leaked: {text}");
    }
    let data = body["data"].as_array().unwrap();
    let find = |name: &str| data.iter().find(|p| p["name"] == name).unwrap().clone();
    assert_eq!(find("mock")["keys"], 3);
    assert_eq!(find("idle")["keys"], 0);
    assert_eq!(find("mock")["selection"], "balanced");
}

#[tokio::test]
async fn token_count_is_offline_and_validates_input() {
    let proxy = Proxy::start(Setup::empty()).await;
    let body = json!({"model": "openai/gpt-4o", "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]});
    let (status, _, reply) = send(proxy.post("/v1/token-count", &body)).await;
    assert_eq!(status, 200, "{reply}");
    // 3 priming + 2 × 3 per message + "system" 1 + "You are terse." 4 + "user" 1 + "Hello" 1
    assert_eq!(reply, json!({"token_count": 16}));
    let (status, _, reply) = send(proxy.post(
        "/v1/token-count",
        &json!({"model": "x/y", "messages": "hi"}),
    ))
    .await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&reply), "invalid_request");
    // Plain text, and a chat's tools.
    let text = json!({"model": "openai/gpt-4o", "text": "Hello"});
    let (status, _, reply) = send(proxy.post("/v1/token-count", &text)).await;
    assert_eq!((status, reply), (200, json!({"token_count": 1})));
    let tool = json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let mut with_tools = body.clone();
    with_tools["tools"] = json!([tool]);
    let (status, _, reply) = send(proxy.post("/v1/token-count", &with_tools)).await;
    assert_eq!(status, 200);
    assert!(reply["token_count"].as_u64().unwrap() > 16 + 20, "{reply}");
}

#[tokio::test]
async fn liveness_needs_no_key_and_unknown_routes_are_openai_errors() {
    let proxy = Proxy::start(Setup::empty()).await;
    let (status, _, body) = send(proxy.client.get(format!("{}/", proxy.url))).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    let (status, _, body) = send(proxy.get("/v1/nothing-here")).await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&body), "unknown_route");
    let (status, _, body) = send(proxy.get("/v1/chat/completions")).await;
    assert_eq!(status, 405);
    assert_eq!(error_code(&body), "method_not_allowed");
}

#[tokio::test]
async fn every_api_route_needs_the_proxy_key_and_liveness_does_not() {
    let mock = Mock::echo("ok").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body =
        json!({"model": "mock/m", "input": "hi", "messages": [{"role": "user", "content": "hi"}]});
    let protected = [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/mock/m"),
        ("GET", "/v1/providers"),
        ("POST", "/v1/token-count"),
        ("GET", "/v1/keys"),
        ("GET", "/metrics"),
    ];
    for (method, path) in protected {
        let url = format!("{}{path}", proxy.url);
        let request = |key: Option<&str>| {
            let r = match method {
                "POST" => proxy.client.post(&url).json_body(&body),
                _ => proxy.client.get(&url),
            };
            match key {
                Some(k) => r.bearer_auth(k),
                None => r,
            }
        };
        let (status, _, reply) = send(request(None)).await;
        assert_eq!(status, 401, "{method} {path} without a key");
        assert_eq!(error_code(&reply), "invalid_api_key", "{method} {path}");
        let (status, _, _) = send(request(Some("wrong-key"))).await;
        assert_eq!(status, 401, "{method} {path} with a wrong key");
        let (status, _, reply) = send(request(Some(PROXY_KEY))).await;
        assert_ne!(status, 401, "{method} {path} with the key: {reply}");
    }
    for path in ["/", "/dashboard"] {
        let response = proxy
            .client
            .get(format!("{}{path}", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path} is open");
    }
}

#[tokio::test]
async fn proxy_auth_is_required_and_accepts_both_headers() {
    let mock = Mock::echo("ok").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/m", "messages": []});
    let url = format!("{}/v1/chat/completions", proxy.url);
    let (status, _, reply) = send(proxy.client.post(&url).json_body(&body)).await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&reply), "invalid_api_key");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing")
    );
    let (status, _, reply) = send(
        proxy
            .client
            .post(&url)
            .bearer_auth("wrong-key")
            .json_body(&body),
    )
    .await;
    assert_eq!(status, 401);
    assert!(!reply.to_string().contains(PROXY_KEY));
    let (status, _, _) = send(
        proxy
            .client
            .post(&url)
            .header("x-api-key", PROXY_KEY)
            .json_body(&body),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = send(proxy.client.get(format!("{}/v1/models", proxy.url))).await;
    assert_eq!(status, 401);
    assert_eq!(
        mock.chats().len(),
        1,
        "rejected requests never reach the upstream"
    );
}

#[tokio::test]
async fn client_mistakes_get_their_status_and_an_openai_error() {
    let mock = Mock::echo("ok").await;
    let proxy = Proxy::start(
        Setup::one(&mock, 1)
            .config("max_body_size: 2KB\n")
            .env("IGNORE_MODELS_MOCK", "secret-*"),
    )
    .await;
    let url = format!("{}/v1/chat/completions", proxy.url);
    let raw = |body: &str| {
        proxy
            .client
            .post(&url)
            .bearer_auth(PROXY_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
    };

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (raw("{\"model\": "), 400, "invalid_json"),
        (raw("[1, 2]"), 400, "invalid_json"),
        (raw(r#"{"messages": []}"#), 400, "invalid_model"),
        (
            raw(r#"{"model": "no-provider-prefix", "messages": []}"#),
            400,
            "invalid_model",
        ),
        (
            raw(r#"{"model": 42, "messages": []}"#),
            400,
            "invalid_model",
        ),
        (
            raw(r#"{"model": "nobody/m", "messages": []}"#),
            404,
            "unknown_provider",
        ),
        (
            raw(r#"{"model": "mock/secret-model", "messages": []}"#),
            404,
            "model_not_found",
        ),
        (
            raw(&format!(
                r#"{{"model": "mock/m", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
                "x".repeat(4000)
            )),
            413,
            "request_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let (got, _, body) = send(request).await;
        assert_eq!((got, error_code(&body).as_str()), (status, code), "{body}");
    }
    assert!(
        mock.chats().is_empty(),
        "no client mistake reaches the upstream"
    );
}

#[tokio::test]
async fn a_provider_without_keys_is_404() {
    let mock = Mock::echo("ok").await;
    let proxy = Proxy::start(Setup::one(&mock, 0)).await;
    let (status, _, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&body), "provider_without_keys");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MOCK_API_KEY")
    );
}

#[tokio::test]
async fn an_api_base_alone_defines_an_openai_compatible_provider() {
    let mock = Mock::echo("from env provider").await;
    let setup = Setup {
        env: mock_keys("LOCAL_LLM", 1),
        ..Setup::empty()
    }
    .env("LOCAL_LLM_API_BASE", &mock.base_url);
    let proxy = Proxy::start(setup).await;
    let (status, headers, body) = proxy.chat("local_llm/qwen", "hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "from env provider"
    );
    assert_eq!(header(&headers, "x-keyrelay-provider"), "local_llm");
}

#[tokio::test]
async fn a_stalled_stream_is_cut_after_the_idle_timeout_and_frees_the_key() {
    let mock = Mock::start(|seen, i| {
        if i == 0 {
            Reply::sse(
                chunks(seen.model(), &["half"], false)[..2].to_vec(),
                End::Stall,
            )
        } else {
            Reply::ok(completion(seen.model(), "next"))
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1).config("timeouts: {stream_idle: 300ms}\n")).await;
    let body = json!({"model": "mock/m", "stream": true, "messages": []});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "half");
    assert!(!text.contains("[DONE]"));
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(error_code(&last), "stream_interrupted");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sent nothing for"),
        "{last}"
    );
    let (status, _, _) = proxy.chat("mock/m", "again").await;
    assert_eq!(status, 200, "the key was released");
}

#[tokio::test]
async fn odd_but_valid_chunks_pass_through_and_mid_stream_errors_are_openai_shaped() {
    let mock = Mock::start(|seen, _| {
        let mut events = chunks(seen.model(), &["fine"], false)[..2].to_vec();
        events.push(
            json!({"id": "x", "choices": null, "usage": {"prompt_tokens": null}}).to_string(),
        );
        events.push("not json at all".into());
        events.push(json!({"error": "upstream exploded"}).to_string());
        Reply::sse(events, End::Cut)
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/m", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "fine");
    assert!(
        data.iter().any(|d| d.contains("\"choices\":null")),
        "an odd chunk is forwarded: {text}"
    );
    assert!(
        !text.contains("not json at all"),
        "malformed events are skipped"
    );
    assert!(!text.contains("[DONE]"));
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(
        last["error"]["message"],
        "upstream error: upstream exploded"
    );
    assert_eq!(error_code(&last), "upstream_error");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let target = Mock::echo("elsewhere").await;
    let location = format!("{}/chat/completions", target.base_url);
    let mock =
        Mock::start(move |_, _| Reply::status(307, json!({})).with_header("location", &location))
            .await;
    let proxy = Proxy::start(Setup::one(&mock, 1).config("retries: {attempts: 1}\n")).await;
    let (status, _, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        target.seen().is_empty(),
        "the key and prompt went to the redirect target"
    );
}
