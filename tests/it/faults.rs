//! Every fault an upstream can throw, injected on command: what the client gets, and what the upstream saw
//! (attempt counts, gaps between attempts), with bounded attempts and no hammering.

use crate::support::*;
use serde_json::json;
use std::time::Duration;

fn gaps(seen: &[Seen]) -> Vec<Duration> {
    seen.windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect()
}

#[tokio::test]
async fn a_reset_before_headers_and_a_refused_connection_are_retried_then_answered_503() {
    for (what, base) in [
        ("reset", resetting_upstream().await),
        ("refused", refusing_upstream()),
    ] {
        let setup = Setup {
            env: mock_keys("MOCK", 2),
            ..Setup::empty()
        }
        .provider("mock", provider_yaml(&base, ""))
        .config("retries: {backoff: 5ms}\n");
        let proxy = Proxy::start(setup).await;
        let started = tokio::time::Instant::now();
        let (status, headers, body) = proxy.chat("mock/m", "hi").await;
        assert_eq!(status, 503, "{what}: {body}");
        assert_eq!(
            header(&headers, "x-keyrelay-attempts"),
            "4",
            "{what}: 2 attempts on each of 2 keys"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("connection x4"),
            "{what}: {body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what} is answered promptly"
        );
    }
}

#[tokio::test]
async fn a_tls_handshake_that_never_ends_costs_one_connect_timeout_not_the_deadline() {
    // Accepts connections and never answers the TLS hello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let setup = Setup {
        env: mock_keys("MOCK", 1),
        ..Setup::empty()
    }
    .provider("mock", provider_yaml(&base, "timeouts: {connect: 300ms}\n"))
    .config("request_timeout: 60s\nretries: {attempts: 1}\n");
    let proxy = Proxy::start(setup).await;
    let started = tokio::time::Instant::now();
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-attempts"), "1");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("(timeout x1)"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered after the connect timeout, not at the 60 s deadline"
    );
}

#[tokio::test]
async fn a_response_that_never_comes_costs_one_attempt_timeout_not_the_deadline() {
    let mock = Mock::start(|seen, _| {
        if seen.key == key(1) {
            Reply::Hang
        } else {
            Reply::ok(completion(seen.model(), "from key 2"))
        }
    })
    .await;
    let config = "selection: sequential\nrequest_timeout: 20s\ntimeouts: {response: 300ms}\nretries: {backoff: 5ms}\n";
    let proxy = Proxy::start(Setup::one(&mock, 2).config(config)).await;
    let started = tokio::time::Instant::now();
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "from key 2");
    assert_eq!(
        header(&headers, "x-keyrelay-attempts"),
        "3",
        "key 1 twice (timeouts are retried), then key 2"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "far less than the 20 s deadline"
    );
    let seen = mock.chats();
    assert_eq!(
        seen.iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
        vec![key(1), key(1), key(2)]
    );
    assert!(
        gaps(&seen)[0] >= Duration::from_millis(300),
        "the first attempt waited its timeout"
    );
}

#[tokio::test]
async fn a_first_token_that_comes_late_moves_on_to_another_key() {
    let mock = Mock::start(|seen, _| {
        let events = chunks(seen.model(), &["prompt ", "answer"], false);
        if seen.key == key(1) {
            // Headers at once, then nothing for a long time.
            Reply::sse(vec![], End::Stall)
        } else {
            Reply::sse(events, End::Done)
        }
    })
    .await;
    let config = "selection: sequential\ntimeouts: {first_event: 300ms}\nretries: {attempts: 1}\n";
    let proxy = Proxy::start(Setup::one(&mock, 2).config(config)).await;
    let body = json!({"model": "mock/m", "stream": true, "messages": []});
    let response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(response.headers(), "x-keyrelay-key"), masked(2));
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(reassemble(&data), "prompt answer");
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert_eq!(
        mock.closed_streams(),
        2,
        "the stalled stream was closed, not left open"
    );
}

#[tokio::test]
async fn a_persistent_429_without_retry_after_backs_off_by_the_schedule_and_stops() {
    let mock = Mock::start(|_, _| {
        Reply::error(429, "Too many requests", "requests", "rate_limit_exceeded")
    })
    .await;
    let config = "request_timeout: 2s\ncooldowns: {rate_limit: [200ms, 400ms, 5s]}\n";
    let proxy = Proxy::start(Setup::one(&mock, 1).config(config)).await;
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 429, "{body}");
    assert!(!header(&headers, "retry-after").is_empty());
    let seen = mock.chats();
    // Attempts at about 0, 0.25 s (200 ms, raised to the 250 ms floor) and 0.65 s; the third failure cools the key
    // for 5 s, past the 2 s deadline: 3 attempts, spaced by the schedule, then 429 at once.
    assert_eq!(seen.len(), 3, "{:?}", gaps(&seen));
    let gaps = gaps(&seen);
    let floors = [250, 400].map(Duration::from_millis);
    assert!(gaps.iter().zip(floors).all(|(g, f)| *g >= f), "{gaps:?}");
    // While the key cools, a new request does not touch the upstream.
    let (status, _, _) = proxy.chat("mock/m", "again").await;
    assert_eq!(status, 429);
    assert_eq!(mock.chats().len(), 3);
}

#[tokio::test]
async fn a_stream_without_done_after_its_finish_ends_properly_with_usage() {
    let mock =
        Mock::start(|seen, _| Reply::sse(chunks(seen.model(), &["all ", "here"], true), End::Cut))
            .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body = json!({"model": "mock/m", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "all here");
    assert_eq!(
        data.last().unwrap(),
        "[DONE]",
        "finished, since the finish reason came"
    );
    assert!(
        data[data.len() - 2].contains("\"usage\""),
        "usage still reported: {text}"
    );
}

#[tokio::test]
async fn after_the_faults_clear_the_pool_is_healthy() {
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = failing.clone();
    let mock = Mock::start(move |seen, _| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::error(503, "overloaded", "server_error", "")
        } else {
            Reply::ok(completion(seen.model(), "healthy"))
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 2).config("retries: {backoff: 5ms}\n")).await;
    assert_eq!(proxy.chat("mock/m", "hi").await.0, 503);
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..4 {
        let (status, _, body) = proxy.chat("mock/m", "hi").await;
        assert_eq!(
            (status, body["choices"][0]["message"]["content"].as_str()),
            (200, Some("healthy"))
        );
    }
}

#[tokio::test]
async fn declared_key_limits_are_kept_so_the_upstream_never_says_429() {
    let mock = Mock::echo("ok").await;
    let proxy =
        Proxy::start(limited(&mock, 2, "{requests_per_minute: 2}").config("request_timeout: 2s\n"))
            .await;
    for _ in 0..4 {
        assert_eq!(proxy.chat("mock/m", "hi").await.0, 200);
    }
    let (status, headers, body) = proxy.chat("mock/m", "one too many").await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!(
        (55..=61).contains(&retry_after),
        "room returns a minute after the key's first request: {retry_after}"
    );
    assert_eq!(
        mock.chats().len(),
        4,
        "the fifth request never reached the upstream"
    );
    let counts = mock
        .chats()
        .iter()
        .fold(std::collections::HashMap::new(), |mut m, s| {
            *m.entry(s.key.clone()).or_insert(0) += 1;
            m
        });
    assert!(counts.values().all(|&n| n == 2), "{counts:?}");

    // Tokens per minute: each answer reports 18 tokens; with a budget of 20 a key serves twice, then rests.
    let mock = Mock::echo("ok").await;
    let proxy =
        Proxy::start(limited(&mock, 1, "{tokens_per_minute: 20}").config("request_timeout: 2s\n"))
            .await;
    assert_eq!(proxy.chat("mock/m", "1").await.0, 200);
    assert_eq!(proxy.chat("mock/m", "2").await.0, 200);
    assert_eq!(proxy.chat("mock/m", "3").await.0, 429);
    assert_eq!(mock.chats().len(), 2);

    // Requests per day: until the daily reset.
    let mock = Mock::echo("ok").await;
    let proxy = Proxy::start(limited(&mock, 1, "{requests_per_day: 1}")).await;
    assert_eq!(proxy.chat("mock/m", "1").await.0, 200);
    let (status, headers, _) = proxy.chat("mock/m", "2").await;
    assert_eq!(status, 429);
    assert!(header(&headers, "retry-after").parse::<u64>().unwrap() > 60);
}

/// `keys` keys on `mock`, with these declared per-key `limits`.
fn limited(mock: &Mock, keys: usize, limits: &str) -> Setup {
    Setup::one(mock, keys).provider(
        "mock",
        provider_yaml(&mock.base_url, &format!("limits: {limits}\n")),
    )
}

/// The first chunks of an answer, cut before its finish.
fn unfinished(model: &str, parts: &[&str]) -> Vec<String> {
    let mut events = chunks(model, parts, false);
    events.pop();
    events
}

fn continuing(mock: &Mock) -> Setup {
    let yaml = provider_yaml(
        &mock.base_url,
        "continuation:\n  assistant: {prefix: true}\n",
    );
    Setup::one(mock, 2)
        .provider("mock", yaml)
        .config("selection: sequential\n")
}

async fn stream_chat(proxy: &Proxy) -> (String, Vec<String>) {
    let body = json!({"model": "mock/m", "stream": true,
        "messages": [{"role": "user", "content": "What is the answer?"}]});
    let response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let key = header(response.headers(), "x-keyrelay-key").to_string();
    (key, sse_data(&response.text().await.unwrap()))
}

#[tokio::test]
async fn a_stream_cut_mid_answer_is_continued_on_another_key_from_the_text_sent() {
    let mock = Mock::start(|seen, _| {
        if seen.key == key(1) {
            Reply::sse(unfinished(seen.model(), &["The answer ", "is "]), End::Cut)
        } else {
            Reply::sse(chunks(seen.model(), &["forty-", "two."], false), End::Done)
        }
    })
    .await;
    let proxy = Proxy::start(continuing(&mock)).await;
    let (served_by, data) = stream_chat(&proxy).await;
    assert_eq!(served_by, masked(1), "headers were sent before the cut");
    assert_eq!(reassemble(&data), "The answer is forty-two.");
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert!(!data.iter().any(|d| d.contains("\"error\"")), "{data:?}");

    let chats = mock.chats();
    assert_eq!(chats.len(), 2);
    assert_eq!(chats[1].key, key(2), "continued on the other key");
    assert_eq!(
        chats[1].body["messages"],
        json!([
            {"role": "user", "content": "What is the answer?"},
            {"role": "assistant", "content": "The answer is ", "prefix": true}
        ]),
        "the continuation carries the text already sent as a prefilled assistant message"
    );
    assert_eq!(chats[1].body["stream"], json!(true));
    let failed = proxy
        .key_status("mock")
        .await
        .into_iter()
        .find(|k| k.key == masked(1))
        .unwrap();
    assert!(
        failed.last_error.is_none() && failed.streak == 0,
        "a cut connection is not the key's fault: {failed:?}"
    );
    let metrics = proxy.get_text("/metrics").await;
    for line in [
        "keyrelay_requests_total{provider=\"mock\",model=\"m\",outcome=\"success\"} 1",
        "keyrelay_stream_continuations_total{provider=\"mock\"} 1",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
}

#[tokio::test]
async fn a_continuation_that_fails_reports_the_original_break() {
    let mock = Mock::start(|seen, _| {
        if seen.key == key(1) {
            Reply::sse(unfinished(seen.model(), &["The answer ", "is "]), End::Cut)
        } else {
            Reply::error(
                400,
                "prefix is not supported here",
                "invalid_request_error",
                "bad_prefix",
            )
        }
    })
    .await;
    let proxy = Proxy::start(continuing(&mock)).await;
    let (_, data) = stream_chat(&proxy).await;
    assert_eq!(reassemble(&data), "The answer is ");
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(error_code(&last), "stream_interrupted", "{last}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    assert_eq!(
        mock.chats().len(),
        2,
        "one continuation asked for, not retried"
    );
}

#[tokio::test]
async fn streams_are_not_continued_without_the_provider_saying_so_or_after_tool_calls() {
    let tool_call = |model: &str| {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [{
            "index": 0, "finish_reason": null,
            "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{\"q\":"}}]}}]})
        .to_string()
    };
    let mock = Mock::start(move |seen, _| {
        let mut events = unfinished(seen.model(), &["Let me look. "]);
        if seen.body["tools"].is_array() {
            events.push(tool_call(seen.model()));
        }
        Reply::sse(events, End::Cut)
    })
    .await;

    // A provider without `continuation`: the break is reported in-band.
    let proxy = Proxy::start(Setup::one(&mock, 2).config("selection: sequential\n")).await;
    let (_, data) = stream_chat(&proxy).await;
    assert_eq!(reassemble(&data), "Let me look. ");
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(error_code(&last), "stream_interrupted");
    assert_eq!(mock.chats().len(), 1);
    drop(proxy);

    // A tool call half sent cannot be prefilled: reported too, nothing asked of another key.
    let proxy = Proxy::start(continuing(&mock)).await;
    let body = json!({"model": "mock/m", "stream": true, "tools": [{"type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "messages": [{"role": "user", "content": "look it up"}]});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(error_code(&last), "stream_interrupted", "{text}");
    assert_eq!(mock.chats().len(), 2, "no continuation was asked for");
    drop(proxy);

    // Turned off in config.yaml.
    let off = continuing(&mock).config("selection: sequential\ncontinue_streams: false\n");
    let proxy = Proxy::start(off).await;
    let (_, data) = stream_chat(&proxy).await;
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(error_code(&last), "stream_interrupted");
    assert_eq!(mock.chats().len(), 3);
}

#[tokio::test]
async fn a_stream_cut_before_any_text_is_asked_again_without_a_prefill() {
    let mock = Mock::start(|seen, _| {
        let events = if seen.key == key(1) {
            unfinished(seen.model(), &[])
        } else {
            chunks(seen.model(), &["Forty-two."], false)
        };
        let end = if seen.key == key(1) {
            End::Cut
        } else {
            End::Done
        };
        Reply::sse(events, end)
    })
    .await;
    let proxy = Proxy::start(continuing(&mock)).await;
    let (_, data) = stream_chat(&proxy).await;
    assert_eq!(reassemble(&data), "Forty-two.");
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chats = mock.chats();
    assert_eq!(chats.len(), 2);
    assert_eq!(
        chats[1].body["messages"], chats[0].body["messages"],
        "the same request, no empty prefill"
    );
}

#[tokio::test]
async fn a_broken_stream_with_no_other_key_is_continued_on_a_fallback_model() {
    // The upstream itself says it cannot go on: its key is not asked to continue.
    let main = Mock::start(|seen, _| {
        let mut events = unfinished(seen.model(), &["Tide pools ", "are "]);
        events
            .push(json!({"error": {"message": "overloaded", "type": "server_error"}}).to_string());
        Reply::sse(events, End::Cut)
    })
    .await;
    let backup = Mock::start(|seen, _| {
        Reply::sse(
            chunks(seen.model(), &["rocky coastal pools."], false),
            End::Done,
        )
    })
    .await;
    // `plain` cannot continue a prefill, so it is passed over; `backup` can.
    let plain = Mock::echo("never asked").await;
    let setup = Setup {
        env: mock_keys("MAIN", 1),
        ..Setup::empty()
    }
    .provider(
        "main",
        provider_yaml(
            &main.base_url,
            "continuation: {assistant: {prefix: true}}\n",
        ),
    )
    .provider("plain", provider_yaml(&plain.base_url, ""))
    .provider(
        "backup",
        provider_yaml(&backup.base_url, "continuation: {}\n"),
    )
    .env("PLAIN_API_KEY", &key(2))
    .env("BACKUP_API_KEY", &key(3))
    .config("fallbacks:\n  main/big: [plain/x, backup/small]\n");
    let proxy = Proxy::start(setup).await;
    let body = json!({"model": "main/big", "stream": true,
        "messages": [{"role": "user", "content": "What are tide pools?"}]});
    let response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(header(response.headers(), "x-keyrelay-provider"), "main");
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(reassemble(&data), "Tide pools are rocky coastal pools.");
    assert_eq!(data.last().unwrap(), "[DONE]");

    assert_eq!(
        main.chats().len(),
        1,
        "main's only key broke; not asked again"
    );
    assert!(
        plain.chats().is_empty(),
        "a provider without continuation is skipped"
    );
    let asked = &backup.chats()[0];
    assert_eq!(asked.model(), "small");
    assert_eq!(
        asked.body["messages"][1],
        json!({"role": "assistant", "content": "Tide pools are "}),
        "backup's own continuation fields (none), not main's"
    );
}

#[tokio::test]
async fn an_answer_that_is_json_but_not_an_object_is_a_502() {
    let mock = Mock::start(|_, _| Reply::Raw {
        status: 200,
        content_type: "application/json",
        body: "[]".into(),
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1).config("retries: {backoff: 5ms}\n")).await;
    let (status, _, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(error_code(&body), "bad_upstream_response");
}

#[tokio::test]
async fn an_event_whose_data_spans_lines_reaches_the_client_as_one_event() {
    // One SSE event in two `data:` lines; joined, it is a chunk with a line break between its fields.
    let sse = concat!(
        "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\n",
        "data: \"choices\":[{\"index\":0,\"delta\":{\"content\":\"two lines\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n"
    );
    let mock = Mock::start(move |_, _| Reply::Raw {
        status: 200,
        content_type: "text/event-stream",
        body: sse.into(),
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let body =
        json!({"model": "mock/m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    for line in text.lines().filter(|l| !l.is_empty()) {
        assert!(line.starts_with("data: "), "{line:?} in {text:?}");
    }
    // Joined as SSE joins data lines, the event is the chunk again.
    let event = text.split("\n\n").next().unwrap();
    let joined: Vec<&str> = event.lines().map(|l| &l["data: ".len()..]).collect();
    let chunk: serde_json::Value = serde_json::from_str(&joined.join("\n")).unwrap();
    assert_eq!(chunk["choices"][0]["delta"]["content"], "two lines");
    assert!(text.ends_with("data: [DONE]\n\n"));
}
