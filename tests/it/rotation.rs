//! Black-box tests of key rotation, concurrency, cooldowns, retries and deadlines: a real keyrelay in front of a
//! mock upstream that fails on command and records every attempt.

use crate::support::*;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

fn per_key(seen: &[Seen]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for s in seen {
        *out.entry(s.key.clone()).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn twelve_sequential_requests_over_four_keys_land_three_on_each() {
    let mock = Mock::echo("ok").await;
    let proxy = Proxy::start(Setup::one(&mock, 4)).await;
    for _ in 0..12 {
        let (status, _, body) = proxy.chat("mock/m", "hi").await;
        assert_eq!(status, 200, "{body}");
    }
    let counts = per_key(&mock.chats());
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|&n| n == 3), "{counts:?}");
}

#[tokio::test]
async fn parallel_requests_spread_over_idle_keys_then_stack_without_waiting() {
    let mock = Mock::start(|seen, _| {
        Reply::ok(completion(seen.model(), "slow")).delayed(Duration::from_millis(400))
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 3)).await;
    // Fifteen at once on three keys: five each, all in flight together (no key waits for another's answer).
    let requests = (0..15).map(|_| proxy.chat("mock/m", "hi"));
    let results = futures_util::future::join_all(requests).await;
    for (status, headers, body) in &results {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(header(headers, "x-keyrelay-attempts"), "1");
    }
    let counts = per_key(&mock.chats());
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&n| n == 5),
        "spread evenly: {counts:?}"
    );
    assert_eq!(mock.max_in_flight(), 5, "each key served its five at once");
}

#[tokio::test]
async fn a_cap_of_one_per_key_and_model_is_never_exceeded() {
    let mock = Mock::start(|seen, _| {
        Reply::ok(completion(seen.model(), "slow")).delayed(Duration::from_millis(150))
    })
    .await;
    let capped = "concurrency: {per_key_model: 1}\n";
    let proxy = Proxy::start(Setup::one(&mock, 4).config(capped)).await;
    let requests = (0..8).map(|_| proxy.chat("mock/m", "hi"));
    let results = futures_util::future::join_all(requests).await;
    for (status, _, body) in &results {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(
        mock.max_in_flight(),
        1,
        "two requests ran at once on one key for one model"
    );
    let counts = per_key(&mock.chats());
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|&n| n == 2), "{counts:?}");
}

#[tokio::test]
async fn one_key_serves_different_models_at_once() {
    let mock = Mock::start(|seen, _| {
        Reply::ok(completion(seen.model(), "x")).delayed(Duration::from_millis(300))
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1).config("request_timeout: 20s\n")).await;
    let (a, b) = tokio::join!(
        proxy.chat("mock/model-a", "hi"),
        proxy.chat("mock/model-b", "hi")
    );
    assert_eq!((a.0, b.0), (200, 200));
    let seen = mock.chats();
    // Both arrived before either could have finished: they overlapped.
    assert!(
        seen[1].at.duration_since(seen[0].at) < Duration::from_millis(300),
        "different models were serialised"
    );
}

#[tokio::test]
async fn a_rate_limited_key_rests_for_retry_after_while_others_serve() {
    let limited = key(1);
    let limited_in_mock = limited.clone();
    let mock = Mock::start(move |seen, _| {
        if seen.key == limited_in_mock {
            Reply::error(
                429,
                "Rate limit reached for requests",
                "requests",
                "rate_limit_exceeded",
            )
            .with_header("retry-after", "2")
        } else {
            Reply::ok(completion(seen.model(), "fine"))
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 2)).await;
    // Steady traffic, until the limited key is tried again after its rest.
    let hit_limited_at = eventually_some("the limited key is tried again", || async {
        let (status, headers, body) = proxy.chat("mock/m", "hi").await;
        assert_eq!(status, 200, "the client never sees the 429: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "fine");
        assert_eq!(header(&headers, "x-keyrelay-key"), masked(2));
        let hits: Vec<_> = mock
            .chats()
            .iter()
            .filter(|s| s.key == limited)
            .map(|s| s.at)
            .collect();
        (hits.len() >= 2).then_some(hits)
    })
    .await;
    for pair in hit_limited_at.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= Duration::from_secs(2),
            "used again after {gap:?}, before Retry-After passed"
        );
    }
}

#[tokio::test]
async fn an_invalid_key_is_benched_for_every_model() {
    let dead = key(1);
    let dead_in_mock = dead.clone();
    let mock = Mock::start(move |seen, _| {
        if seen.key == dead_in_mock {
            Reply::error(
                401,
                "Incorrect API key provided",
                "invalid_request_error",
                "invalid_api_key",
            )
        } else {
            Reply::ok(completion(seen.model(), "ok"))
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 2)).await;
    for i in 0..6 {
        let (status, _, body) = proxy.chat(&format!("mock/model-{}", i % 3), "hi").await;
        assert_eq!(status, 200, "{body}");
    }
    let dead_uses = mock.chats().iter().filter(|s| s.key == dead).count();
    assert_eq!(
        dead_uses, 1,
        "after one 401 the key is benched for every model"
    );
}

#[tokio::test]
async fn a_server_error_once_is_retried_on_the_same_key() {
    let mock = Mock::start(|seen, i| {
        if i == 0 {
            Reply::error(500, "internal error", "server_error", "")
        } else {
            Reply::ok(completion(seen.model(), "second time lucky"))
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 3).config("retries: {backoff: 10ms}\n")).await;
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "second time lucky"
    );
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "2");
    let seen = mock.chats();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].key, seen[1].key, "retried on the same key");
}

#[tokio::test]
async fn a_persistent_server_error_rotates_and_then_gives_503() {
    let mock = Mock::start(|_, _| Reply::error(503, "overloaded", "server_error", "")).await;
    let proxy = Proxy::start(Setup::one(&mock, 2).config("retries: {backoff: 5ms}\n")).await;
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 503);
    assert_eq!(error_code(&body), "no_key_available");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("4 attempts on 2 keys (server x4)"),
        "{message}"
    );
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "4");
    let counts = per_key(&mock.chats());
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![2, 2]);
}

#[tokio::test]
async fn a_context_length_error_reaches_the_client_unchanged_after_one_attempt() {
    let upstream_error = json!({"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9001 tokens.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}});
    let sent = upstream_error.clone();
    let mock = Mock::start(move |_, _| Reply::status(400, sent.clone())).await;
    let yaml = provider_yaml(
        &mock.base_url,
        "errors:\n  - status: 400\n    body: context_length_exceeded\n    class: context_window\n",
    );
    let proxy = Proxy::start(Setup::one(&mock, 3).provider("mock", yaml)).await;
    let (status, headers, body) = proxy.chat("mock/m", "long").await;
    assert_eq!(status, 400);
    assert_eq!(
        body, upstream_error,
        "the upstream's error is passed through as it came"
    );
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "1");
    assert_eq!(mock.chats().len(), 1, "no other key is tried");
    // The key was not cooled: the next request may use any key (all three remain usable).
    let (status, _, _) = proxy.chat("mock/m", "short").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn every_key_cooling_past_the_deadline_gives_429_with_retry_after() {
    let mock = Mock::start(|_, _| {
        Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
            .with_header("retry-after", "60")
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 2).config("request_timeout: 3s\n")).await;
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 429);
    assert_eq!(error_code(&body), "all_keys_cooling");
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((55..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(mock.chats().len(), 2, "each key tried once");
    // While they cool, a new request is answered at once without touching the upstream.
    let (status, headers, _) = proxy.chat("mock/m", "again").await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "0");
    assert_eq!(mock.chats().len(), 2);
}

#[tokio::test]
async fn a_short_cooldown_is_waited_out_within_the_deadline() {
    let mock = Mock::start(|seen, i| {
        if i == 0 {
            Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
                .with_header("retry-after", "1")
        } else {
            Reply::ok(completion(seen.model(), "after the wait"))
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "2");
    let seen = mock.chats();
    assert!(seen[1].at.duration_since(seen[0].at) >= Duration::from_secs(1));
}

#[tokio::test]
async fn quota_exhaustion_rotates_to_a_key_with_quota() {
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
        } else {
            Reply::ok(completion(seen.model(), "paid"))
        }
    })
    .await;
    let yaml = provider_yaml(
        &mock.base_url,
        "errors:\n  - status: 429\n    body: insufficient_quota\n    class: quota\n",
    );
    let proxy = Proxy::start(Setup::one(&mock, 2).provider("mock", yaml)).await;
    for _ in 0..4 {
        let (status, _, body) = proxy.chat("mock/m", "hi").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        mock.chats().iter().filter(|s| s.key == broke).count(),
        1,
        "cooled until the daily reset"
    );
}

#[tokio::test]
async fn a_hung_upstream_gives_504_at_the_deadline() {
    let mock = Mock::start(|_, _| Reply::Hang).await;
    let proxy = Proxy::start(Setup::one(&mock, 1).config("request_timeout: 1s\n")).await;
    let started = tokio::time::Instant::now();
    let (status, _, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 504);
    assert_eq!(error_code(&body), "deadline_exceeded");
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn busy_keys_make_requests_wait_until_the_deadline_then_504() {
    let mock = Mock::start(|seen, _| {
        Reply::sse(
            chunks(seen.model(), &["holding"], false)[..2].to_vec(),
            End::Stall,
        )
    })
    .await;
    let capped = "request_timeout: 1s\nconcurrency: {per_key_model: 1}\n";
    let proxy = Proxy::start(Setup::one(&mock, 1).config(capped)).await;
    // A stream that has started holds its key for as long as it runs.
    let body = json!({"model": "mock/m", "stream": true, "messages": []});
    let mut holding = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert!(holding.chunk().await.unwrap().is_some());
    let started = tokio::time::Instant::now();
    let (status, _, body) = proxy.chat("mock/m", "b").await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 key busy"),
        "{body}"
    );
    assert_eq!(
        mock.chats().len(),
        1,
        "the waiting request never reached the upstream"
    );
}

#[tokio::test]
async fn a_client_disconnect_mid_stream_frees_the_key() {
    let mock = Mock::start(|seen, i| {
        if i == 0 {
            Reply::sse(
                chunks(seen.model(), &["never ", "ending"], false)[..2].to_vec(),
                End::Stall,
            )
        } else {
            Reply::ok(completion(seen.model(), "next"))
        }
    })
    .await;
    // One key, concurrency 1: the second request can only start once the first stream has let go of the key.
    let proxy = Proxy::start(Setup::one(&mock, 1).config("request_timeout: 5s\n")).await;
    let body = json!({"model": "mock/m", "stream": true, "messages": []});
    let mut response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(response);
    let (status, _, reply) = proxy.chat("mock/m", "after").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], "next");
    assert_eq!(
        mock.closed_streams(),
        1,
        "the upstream stream was closed when the client left"
    );
}

#[tokio::test]
async fn a_failure_before_the_first_byte_of_a_stream_rotates() {
    let bad = key(1);
    let bad_in_mock = bad.clone();
    let mock = Mock::start(move |seen, _| {
        if seen.key == bad_in_mock {
            Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
        } else {
            Reply::sse(chunks(seen.model(), &["fine"], false), End::Done)
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 2).config("selection: sequential\n")).await;
    let body = json!({"model": "mock/m", "stream": true, "messages": []});
    let response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(response.headers(), "x-keyrelay-attempts"), "2");
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(reassemble(&data), "fine");
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn sequential_selection_stays_on_the_first_key() {
    let mock = Mock::echo("ok").await;
    let yaml = provider_yaml(&mock.base_url, "selection: sequential\n");
    let proxy = Proxy::start(Setup::one(&mock, 3).provider("mock", yaml)).await;
    for _ in 0..5 {
        assert_eq!(proxy.chat("mock/m", "hi").await.0, 200);
    }
    assert!(mock.chats().iter().all(|s| s.key == key(1)));
}

#[tokio::test]
async fn when_every_key_is_benched_for_auth_the_answer_is_503_not_a_wait() {
    let mock = Mock::start(|_, _| {
        Reply::error(
            401,
            "Incorrect API key provided",
            "invalid_request_error",
            "invalid_api_key",
        )
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 2)).await;
    // Two keys refusing one request may be about what it asks: answered with the refusal, each key resting for
    // that model only.
    let (status, _, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        proxy
            .key_status("mock")
            .await
            .iter()
            .all(|k| k.cooling_until.is_none())
    );
    // Refused again for another model: it is the keys, and they rest whole.
    let (status, _, body) = proxy.chat("mock/n", "hi").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        proxy
            .key_status("mock")
            .await
            .iter()
            .all(|k| k.cooling_until.is_some())
    );
    let (status, headers, body) = proxy.chat("mock/o", "hi").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_code(&body), "no_key_available");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("auth"), "{message}");
    assert!(header(&headers, "retry-after").is_empty());
    assert_eq!(mock.chats().len(), 4, "no key was asked a third time");
}

#[tokio::test]
async fn a_pool_that_only_says_retry_after_one_second_is_not_hammered() {
    let mock = Mock::start(|_, _| {
        Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
            .with_header("retry-after", "1")
    })
    .await;
    // The stated second is a floor: the second 429 in a row rests 2 s, the third 30 s (past the deadline).
    let config = "request_timeout: 10s\ncooldowns: {rate_limit: [2s, 30s]}\n";
    let proxy = Proxy::start(Setup::one(&mock, 2).config(config)).await;
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!(
        retry_after >= 25,
        "the escalated rest is stated: {retry_after}"
    );
    let counts = per_key(&mock.chats());
    assert_eq!(counts.len(), 2);
    assert!(
        counts.values().all(|&n| n == 3),
        "three calls per key (1 s, 2 s, then a rest past the deadline), not one a second: {counts:?}"
    );
    // Another request at once does not call the upstream: every key rests past its deadline.
    let (status, _, _) = proxy.chat("mock/m", "again").await;
    assert_eq!(status, 429);
    assert_eq!(mock.chats().len(), 6);
}
