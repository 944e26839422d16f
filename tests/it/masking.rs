//! Masking that is exact, through the real server: every key of the pool is recognised by its distinctive part
//! wherever an upstream writes it (answers, errors, streams, split over events however finely) and masked for
//! the client and the request log alike; ordinary text, placeholders that share a key's public prefix included,
//! comes back exactly as written.

use crate::support::*;
use serde_json::{Value, json};

/// Two keys of one pool with OpenAI's public prefix, as real keys have it.
const FIRST: &str = "sk-proj-B6cDqW3xZ9mK2pL7vT4nRs8a";
const SECOND: &str = "sk-proj-Hy5uJk1oPz0xCv3bNm6aWe9d";

fn setup(mock: &Mock) -> Setup {
    Setup::empty()
        .provider("mock", provider_yaml(&mock.base_url, ""))
        .env("MOCK_API_KEY_1", FIRST)
        .env("MOCK_API_KEY_2", SECOND)
        .config("selection: sequential\nrequest_logging: {enabled: true}\n")
}

/// `text` in pieces of `n` characters, as a model streams it token by token.
fn pieces(text: &str, n: usize) -> Vec<String> {
    text.chars()
        .collect::<Vec<_>>()
        .chunks(n)
        .map(|c| c.iter().collect())
        .collect()
}

fn stream_request(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

/// Text that looks like keys and is not: it must come back unchanged.
const ORDINARY: &str = "Set api_key=\"sk-proj-YOUR_KEY_HERE\" (keys start sk-proj-B6cD or sk-proj-Hy5u; \
                        see sk-proj-... in the docs). B6cDqW3xZ9m is eleven characters of one.";

#[tokio::test]
async fn ordinary_text_is_never_altered() {
    let mock = Mock::start(|seen, _| {
        if seen.body["stream"] == json!(true) {
            let parts = pieces(ORDINARY, 3);
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            return Reply::sse(chunks(seen.model(), &parts, true), End::Done);
        }
        Reply::ok(completion(seen.model(), ORDINARY))
    })
    .await;
    let proxy = Proxy::start(setup(&mock)).await;
    let (status, _, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], ORDINARY);
    let text = proxy
        .post_text("/v1/chat/completions", &stream_request("mock/m"))
        .await;
    assert_eq!(reassemble(&sse_data(&text)), ORDINARY);
}

/// Each key written in every way an upstream has been seen to: whole, without its prefix, shortened, JSON-escaped.
fn echoes() -> String {
    format!(
        "whole {FIRST}; other {SECOND}; bare {}; shortened {}***; escaped {}",
        &SECOND[8..],
        &FIRST[..22],
        FIRST.replace('B', "\\u0042"),
    )
}

/// What the client must see instead.
const MASKED: &str =
    "whole ...Rs8a; other ...We9d; bare ...We9d; shortened ...***; escaped ...Rs8a";

#[tokio::test]
async fn every_key_of_the_pool_is_masked_in_answers_errors_and_logs() {
    let echoed = echoes();
    let mock = Mock::start(move |seen, _| {
        if seen.body["messages"][0]["content"] == json!("fail") {
            return Reply::Raw {
                status: 400,
                content_type: "application/json",
                body: format!(
                    r#"{{"error":{{"message":"{echoed}","type":"invalid_request_error"}}}}"#
                ),
            };
        }
        Reply::Raw {
            status: 200,
            content_type: "application/json",
            body: completion(seen.model(), "")
                .to_string()
                .replace(r#""content":"""#, &format!(r#""content":"{echoed}""#)),
        }
    })
    .await;
    let proxy = Proxy::start(setup(&mock)).await;
    let (status, headers, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200, "{body}");
    // The first key served; the second, which it echoed, is masked all the same.
    assert_eq!(header(&headers, "x-keyrelay-key"), "...Rs8a");
    assert_eq!(body["choices"][0]["message"]["content"], MASKED);
    let (status, _, error) = proxy.chat("mock/m", "fail").await;
    assert_eq!(status, 400, "{error}");
    let message = error["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains(MASKED), "{message}");
    no_key_in(&[body.to_string(), message].concat());
    // A key a client pastes into a prompt goes upstream as written (it is the client's text), but never into
    // the request log.
    let (status, _, _) = proxy.chat("mock/m", &format!("is {SECOND} valid?")).await;
    assert_eq!(status, 200);
    assert!(
        mock.chats()
            .last()
            .unwrap()
            .body
            .to_string()
            .contains(SECOND)
    );
    let logs = request_logs(&proxy.dir.path().join("logs"), 3).await;
    let logs = serde_json::to_string(&logs).unwrap();
    no_key_in(&logs);
    assert!(logs.contains("is ...We9d valid?"), "{logs}");
}

#[tokio::test]
async fn a_key_streamed_token_by_token_is_masked() {
    // As a model would write them (JSON-escaped forms are the writer's, not the model's).
    let echoed = echoes().split("; escaped").next().unwrap().to_string();
    let mock = Mock::start(move |seen, _| {
        let parts = pieces(&echoed, 3);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        Reply::sse(chunks(seen.model(), &parts, true), End::Done)
    })
    .await;
    let proxy = Proxy::start(setup(&mock)).await;
    let text = proxy
        .post_text("/v1/chat/completions", &stream_request("mock/m"))
        .await;
    let content = reassemble(&sse_data(&text));
    no_key_in(&text);
    // Each key is recognised once twelve of its distinctive characters have come, and is held back from its
    // third: what ended an event before that passed ("sk", and "Hy" of the bare one). The rest says `...`: when
    // the key was recognised, its end had not been seen.
    assert_eq!(
        content,
        "whole ...; other sk...; bare Hy...; shortened sk...***"
    );
    let logs = request_logs(&proxy.dir.path().join("logs"), 1).await;
    no_key_in(&serde_json::to_string(&logs).unwrap());
}

#[tokio::test]
async fn a_native_stream_split_anywhere_is_masked() {
    // An Anthropic stream passed as written: a key split across two text deltas, a ping between them, at every
    // position.
    let mock = Mock::start(|seen, _| {
        let cut: usize = seen.body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let delta = |text: &str| {
            let data = json!({"type": "content_block_delta", "index": 0,
                              "delta": {"type": "text_delta", "text": text}});
            format!("event: content_block_delta\ndata: {data}\n\n")
        };
        let body = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n".to_string(),
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_string(),
            delta("key: "),
            delta(&SECOND[..cut]),
            // Anthropic sends pings at any moment, between two deltas too.
            "event: ping\ndata: {\"type\": \"ping\"}\n\n".to_string(),
            delta(&SECOND[cut..]),
            delta(" end"),
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".to_string(),
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n".to_string(),
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string(),
        ]
        .concat();
        Reply::Raw {
            status: 200,
            content_type: "text/event-stream",
            body,
        }
    })
    .await;
    let setup = Setup::anthropic(&mock, 0)
        .env("ANTHROPIC_API_KEY_1", FIRST)
        .env("ANTHROPIC_API_KEY_2", SECOND);
    let proxy = Proxy::start(setup).await;
    for cut in 1..SECOND.len() {
        let body = json!({"model": "anthropic/claude-sonnet-4-5", "max_tokens": 50, "stream": true,
                          "messages": [{"role": "user", "content": cut.to_string()}]});
        let response = http_client()
            .post(format!("{}/v1/messages", proxy.url))
            .header("x-api-key", PROXY_KEY)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        no_key_in(&text);
        let events = sse_events(&text);
        let said: String = events
            .iter()
            .filter_map(|(_, data)| data["delta"]["text"].as_str().map(str::to_string))
            .collect();
        // At most two characters pass before the key is recognised, and only when they ended an event.
        let passed = if cut < 3 { &SECOND[..cut] } else { "" };
        // A part long enough to be recognised alone is masked before the end is seen: it says only `...`.
        let masked = if cut < 8 + 12 { "...We9d" } else { "..." };
        assert_eq!(said, format!("key: {passed}{masked} end"), "cut at {cut}");
        let names: Vec<&str> = event_names(&events);
        assert_eq!(names.first(), Some(&"message_start"), "{text}");
        assert_eq!(names.last(), Some(&"message_stop"), "{text}");
    }
}

/// No distinctive part of either key, nor the escaped form of one, is in `text`.
fn no_key_in(text: &str) {
    for key in [FIRST, SECOND] {
        for fragment in key.as_bytes()[8..].windows(12) {
            let fragment = std::str::from_utf8(fragment).unwrap();
            assert!(!text.contains(fragment), "{fragment} of a key in: {text}");
        }
    }
    assert!(!text.contains("\\u0042"), "{text}");
}
