//! Providers defined only by `<NAME>_API_BASE` follow OpenAI's conventions: quota is not a per-minute limit,
//! context-window errors reach `context_fallbacks`, and streams count tokens even when the client did not ask.

use crate::support::*;
use serde_json::{Value, json};

/// A proxy whose only provider, `local`, is defined by `LOCAL_API_BASE` pointing at `mock`, with two keys.
async fn local(mock: &Mock, config: &str) -> Proxy {
    let mut setup = Setup::one(mock, 0).config(config);
    setup.providers.clear();
    let setup = setup
        .env("LOCAL_API_BASE", &mock.base_url)
        .env("LOCAL_API_KEY_1", &key(1))
        .env("LOCAL_API_KEY_2", &key(2));
    Proxy::start(setup).await
}

#[tokio::test]
async fn insufficient_quota_benches_the_key_until_the_daily_reset() {
    let broke = key(1);
    let broke_in_mock = broke.clone();
    let mock = Mock::start(move |seen, _| {
        if seen.key == broke_in_mock {
            Reply::error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            )
            // Sent by OpenAI-style servers on every answer: the per-minute window, not the quota's end.
            .with_header("x-ratelimit-reset-requests", "20s")
        } else {
            Reply::ok(completion(seen.model(), "paid"))
        }
    })
    .await;
    // The daily reset half a day away, so that "until the reset" cannot be mistaken for a short rest.
    let hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
        + 12)
        % 24;
    let proxy = local(&mock, &format!("daily_reset: {{time: \"{hour:02}:00\"}}\n")).await;
    for _ in 0..3 {
        let (status, _, body) = proxy.chat("local/m", "hi").await;
        assert_eq!(status, 200, "{body}");
    }
    let keys = proxy.key_status("local").await;
    let broke_status = keys.iter().find(|k| k.key == masked(1)).unwrap();
    let reason = broke_status
        .model_cooldowns
        .first()
        .map(|(_, _, reason)| *reason)
        .or(broke_status.cooling_reason)
        .expect("the key rests");
    assert_eq!(
        reason.as_str(),
        "quota",
        "not a per-minute limit: {broke_status:?}"
    );
    let until = broke_status
        .model_cooldowns
        .first()
        .map(|(_, until, _)| *until)
        .or(broke_status.cooling_until)
        .unwrap();
    let left = until - keyrelay::clock::Clock::system().now();
    assert!(
        left > 3_600_000,
        "rests until the daily reset, not the 20 s of the rate-limit headers: {left} ms"
    );
    assert_eq!(
        mock.chats().iter().filter(|s| s.key == broke).count(),
        1,
        "asked once, then left alone"
    );
}

#[tokio::test]
async fn a_context_window_error_reaches_the_context_fallback() {
    let mock = Mock::start(|seen, _| {
        if seen.model() == "small" {
            Reply::error(
                400,
                "This model's maximum context length is 8192 tokens",
                "invalid_request_error",
                "context_length_exceeded",
            )
        } else {
            Reply::ok(completion(seen.model(), "long enough"))
        }
    })
    .await;
    let proxy = local(&mock, "context_fallbacks:\n  local/small: [local/large]\n").await;
    let (status, headers, body) = proxy.chat("local/small", "a long prompt").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-fallback"), "local/large");
    assert_eq!(body["choices"][0]["message"]["content"], "long enough");
}

#[tokio::test]
async fn streams_count_tokens_without_showing_the_usage_chunk_to_clients_that_did_not_ask() {
    let mock = Mock::echo("one two three").await;
    let proxy = local(&mock, "").await;
    let body = json!({"model": "local/m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let events = sse_data(&text);
    assert!(events.iter().any(|e| e.contains("three")), "{text}");
    assert!(
        !events.iter().any(|e| e.contains("\"usage\"")),
        "the client did not ask for usage: {text}"
    );
    assert_eq!(
        mock.chats()[0].body["stream_options"],
        json!({"include_usage": true}),
        "the upstream was asked for it"
    );
    let keys = proxy.key_status("local").await;
    let tokens: u64 = keys
        .iter()
        .map(|k| k.today.prompt_tokens + k.today.completion_tokens)
        .sum();
    assert!(tokens > 0, "the tokens were counted: {keys:?}");
    // A client that asks gets the usage chunk.
    let mut asked = body.clone();
    asked["stream_options"] = json!({"include_usage": true});
    let text = proxy.post_text("/v1/chat/completions", &asked).await;
    let usage: Vec<Value> = sse_data(&text)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|e| e.get("usage").is_some_and(Value::is_object))
        .collect();
    assert_eq!(usage.len(), 1, "{text}");
}
