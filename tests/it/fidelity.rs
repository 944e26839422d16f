//! Each failure costs a key exactly what it says about the key, and the client gets the answer that explains
//! its request: refusals about a model stop after two keys, a skipped fallback never hides the real answer, a
//! "retry now" is not taken literally, and a request that cannot even be built blames no key.

use crate::support::*;
use serde_json::json;

#[tokio::test]
async fn a_model_refused_on_two_keys_is_answered_without_benching_the_rest() {
    let mock = Mock::start(|seen, _| {
        if seen.model() == "locked" {
            return Reply::error(
                401,
                "This key may not use model locked",
                "invalid_request_error",
                "invalid_api_key",
            );
        }
        Reply::ok(completion(seen.model(), "open"))
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 5)).await;
    let (status, headers, body) = proxy.chat("mock/locked", "hi").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "2");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("may not use model locked"),
        "{body}"
    );
    let keys = proxy.key_status("mock").await;
    assert!(
        keys.iter().all(|k| k.cooling_until.is_none()),
        "a refusal about a model benches no key for every model"
    );
    let cooling: Vec<_> = keys
        .iter()
        .filter(|k| !k.model_cooldowns.is_empty())
        .collect();
    assert_eq!(
        cooling.len(),
        2,
        "only the two keys that refused, for that model"
    );
    assert!(cooling.iter().all(|k| k.model_cooldowns[0].0 == "locked"));
    // The other three serve other models at once.
    for _ in 0..3 {
        let (status, _, _) = proxy.chat("mock/free", "hi").await;
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn a_permission_error_about_a_model_cools_that_model_only() {
    let mock = Mock::start(|seen, _| {
        if seen.model() == "gated" {
            return Reply::error(
                403,
                "You are not allowed to sample from this model",
                "invalid_request_error",
                "model_not_allowed",
            );
        }
        Reply::ok(completion(seen.model(), "open"))
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let (status, _, _) = proxy.chat("mock/gated", "hi").await;
    assert_ne!(status, 200);
    let key = &proxy.key_status("mock").await[0];
    assert!(key.cooling_until.is_none(), "the key itself is not benched");
    assert_eq!(key.model_cooldowns.len(), 1);
    assert_eq!(key.model_cooldowns[0].0, "gated");
    let (status, _, body) = proxy.chat("mock/other", "hi").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_skipped_last_fallback_never_replaces_the_real_answer() {
    let mock = Mock::start(|_, _| {
        Reply::error(429, "Rate limit reached", "requests", "rate_limit_exceeded")
            .with_header("retry-after", "30")
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/m", "fallbacks": ["nowhere/x"], "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, answer) = send(proxy.post("/v1/chat/completions", &body)).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(error_code(&answer), "all_keys_cooling");
    let wait: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((25..=30).contains(&wait), "{wait}");
}

#[tokio::test]
async fn a_retry_after_of_zero_or_in_the_past_counts_as_no_stated_wait() {
    for stated in ["0", "Thu, 01 Jan 2015 00:00:00 GMT"] {
        let stated = stated.to_string();
        let mock = Mock::start(move |_, _| {
            Reply::error(429, "Rate limit reached", "requests", "rate_limit_exceeded")
                .with_header("retry-after", &stated)
        })
        .await;
        let proxy = Proxy::start(Setup::one(&mock, 1).config("request_timeout: 1s\n")).await;
        let (status, _, _) = proxy.chat("mock/m", "hi").await;
        assert_eq!(status, 429);
        let key = &proxy.key_status("mock").await[0];
        let until = key.model_cooldowns[0].1;
        let left = until - keyrelay::clock::Clock::system().now();
        assert!(
            left > 8_000,
            "the schedule's 10 s, not a busy loop: {left} ms"
        );
        assert!(mock.chats().len() <= 2, "{} calls", mock.chats().len());
    }
}

#[tokio::test]
async fn a_backoff_that_would_overrun_the_deadline_rotates_instead() {
    let mock = Mock::start(|seen, _| {
        if seen.key == key(1) {
            return Reply::error(500, "boom", "server_error", "internal");
        }
        Reply::ok(completion(seen.model(), "from the second key"))
    })
    .await;
    let config = "request_timeout: 2s\nselection: sequential\nretries: {attempts: 3, backoff: 5s, backoff_max: 5s}\n";
    let proxy = Proxy::start(Setup::one(&mock, 2).config(config)).await;
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "from the second key"
    );
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "2");
}

#[tokio::test]
async fn a_key_a_request_cannot_be_built_with_is_skipped_without_blame() {
    let mock = Mock::echo("fine").await;
    let setup = Setup {
        env: vec![
            ("MOCK_API_KEY_1".into(), "bad\u{1}key-abcdefghijkl".into()),
            ("MOCK_API_KEY_2".into(), key(2)),
        ],
        ..Setup::one(&mock, 0)
    }
    .config("selection: sequential\n");
    let proxy = Proxy::start(setup).await;
    for _ in 0..3 {
        let (status, _, body) = proxy.chat("mock/m", "hi").await;
        assert_eq!(status, 200, "{body}");
    }
    for key in proxy.key_status("mock").await {
        assert!(
            key.cooling_until.is_none() && key.model_cooldowns.is_empty() && key.streak == 0,
            "{key:?}"
        );
    }
    assert!(mock.chats().iter().all(|s| s.key == key(2)));
}

#[tokio::test]
async fn the_upstreams_request_id_and_rate_limits_reach_the_client_under_a_prefix() {
    let mock = Mock::start(|seen, _| {
        if seen.model() == "bad" {
            return Reply::error(
                400,
                "no such parameter",
                "invalid_request_error",
                "invalid_request",
            )
            .with_header("x-request-id", "req_refused");
        }
        Reply::ok(completion(seen.model(), "hi"))
            .with_header("x-request-id", "req_abc123")
            .with_header("x-ratelimit-remaining-requests", "99")
            .with_header("anthropic-ratelimit-tokens-remaining", "4000")
            .with_header("x-internal-thing", "not for clients")
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let (status, headers, _) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-upstream-request-id"), "req_abc123");
    assert_eq!(
        header(&headers, "x-upstream-ratelimit-remaining-requests"),
        "99"
    );
    assert_eq!(
        header(&headers, "x-upstream-anthropic-ratelimit-tokens-remaining"),
        "4000"
    );
    assert!(headers.get("x-upstream-internal-thing").is_none());
    assert!(
        headers.get("x-ratelimit-remaining-requests").is_none(),
        "one key's limits are never shown as the pool's"
    );
    // The upstream's own refusal, passed to the client, carries its request id too.
    let (status, headers, _) = proxy.chat("mock/bad", "hi").await;
    assert_eq!(status, 400);
    assert_eq!(header(&headers, "x-upstream-request-id"), "req_refused");
}
