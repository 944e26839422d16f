//! Legacy completions inbound (`POST /v1/completions`): a prompt translated to a one-turn chat for providers
//! that only chat, passed through as written where a provider declares it serves completions natively.

use crate::support::*;
use keyrelay::mapping::inbound::Translated;
use keyrelay::mapping::inbound::completions::{CompletionsStream, from_chat, to_chat};
use serde_json::{Value, json};

fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn prompts_become_chats_and_answers_text_completions() {
    let body = json!({"model": "p/m", "prompt": ["Once upon a time"], "temperature": 0.2, "stop": ["\n"],
                      "stream": true, "stream_options": {"include_usage": true}, "echo": false, "logprobs": null});
    insta::assert_json_snapshot!(
        "completions_request_to_chat",
        to_chat(object(body)).unwrap()
    );
    let default = to_chat(object(json!({"model": "p/m", "prompt": "Hi"}))).unwrap();
    assert_eq!(default["max_tokens"], 16, "the legacy API's default");
    insta::assert_json_snapshot!(
        "completions_answer",
        from_chat(&completion("m", "there was a proxy."))
    );
    for (field, value, param) in [
        ("prompt", json!(["a", "b"]), "prompt"),
        ("prompt", json!([1, 2, 3]), "prompt"),
        ("echo", json!(true), "echo"),
        ("suffix", json!("}"), "suffix"),
        ("logprobs", json!(5), "logprobs"),
        ("best_of", json!(3), "best_of"),
    ] {
        let mut body = json!({"model": "p/m", "prompt": "x"});
        body[field] = value;
        assert_eq!(to_chat(object(body)).unwrap_err().param, param);
    }
    assert_eq!(
        to_chat(object(json!({"model": "p/m"}))).unwrap_err().param,
        "prompt"
    );

    let mut chunks = chunks("m", &["there ", "was"], true);
    chunks.push("[DONE]".into());
    let frames: Vec<(Option<&str>, &str)> = chunks.iter().map(|f| (None, f.as_str())).collect();
    let text = String::from_utf8(Translated::translate_all(CompletionsStream, &frames)).unwrap();
    let frames: Vec<Value> = sse_data(&text)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or(json!(d)))
        .collect();
    insta::assert_json_snapshot!("completions_stream", frames);
}

/// Text for chat requests (streamed when asked); the legacy answer for `/completions` requests.
async fn upstream() -> Mock {
    Mock::start(|seen, _| {
        if seen.path.ends_with("/completions") && !seen.path.ends_with("/chat/completions") {
            return Reply::ok(json!({"id": "cmpl-native", "object": "text_completion", "created": 1, "model": seen.model(),
                "choices": [{"text": " native answer", "index": 0, "logprobs": null, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}));
        }
        if seen.body["stream"] == json!(true) {
            return Reply::sse(chunks(seen.model(), &["there ", "was"], true), End::Done);
        }
        Reply::ok(completion(seen.model(), "there was"))
    })
    .await
}

#[tokio::test]
async fn completions_are_served_by_chat_or_natively_as_declared() {
    let mock = upstream().await;
    let provider = provider_yaml(
        &mock.base_url,
        "dialects:\n  completions: {path: /completions, models: [\"instruct-*\"]}\n",
    );
    let proxy = Proxy::start(Setup::one(&mock, 1).provider("mock", provider)).await;

    let (status, headers, body) = send(proxy.post(
        "/v1/completions",
        &json!({"model": "mock/chat-1", "prompt": "Once"}),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "there was");
    assert_eq!(body["usage"]["total_tokens"], 18);
    assert_eq!(header(&headers, "x-keyrelay-provider"), "mock");
    let seen = &mock.seen()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.body["messages"],
        json!([{"role": "user", "content": "Once"}])
    );
    assert_eq!(seen.body["max_tokens"], 16);

    let stream = json!({"model": "mock/chat-1", "prompt": "Once", "stream": true});
    let text = proxy.post_text("/v1/completions", &stream).await;
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let texts: String = data[..data.len() - 1]
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["object"], "text_completion", "{v}");
            v["choices"][0]["text"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(texts, "there was");
    assert!(
        !text.contains("\"usage\""),
        "the usage chunk only when asked"
    );

    // A model the provider serves completions for natively: as written, fill-in-the-middle included.
    let native =
        json!({"model": "mock/instruct-1", "prompt": "def f(", "suffix": "):", "max_tokens": 7});
    let (status, _, body) = send(proxy.post("/v1/completions", &native)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], " native answer");
    let seen = mock.seen().pop().unwrap();
    assert_eq!(seen.path, "/v1/completions");
    assert_eq!(
        seen.body,
        json!({"model": "instruct-1", "prompt": "def f(", "suffix": "):", "max_tokens": 7})
    );

    // Translated, what chat cannot do is refused by name, in OpenAI's shape.
    let (status, _, body) = send(proxy.post(
        "/v1/completions",
        &json!({"model": "mock/chat-1", "prompt": "x", "echo": true}),
    ))
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "echo");
    assert_eq!(body["error"]["code"], "unsupported_parameter");
}

#[tokio::test]
async fn a_provider_renames_chat_fields_it_knows_by_another_name() {
    let mock = upstream().await;
    let provider = provider_yaml(
        &mock.base_url,
        "renames:\n  max_tokens: max_completion_tokens\n",
    );
    let proxy = Proxy::start(Setup::one(&mock, 1).provider("mock", provider)).await;
    let (status, _, _) = send(proxy.post(
        "/v1/completions",
        &json!({"model": "mock/m", "prompt": "x"}),
    ))
    .await;
    assert_eq!(status, 200);
    let chat =
        json!({"model": "mock/m", "max_tokens": 9, "messages": [{"role": "user", "content": "y"}]});
    let (status, _, _) = send(proxy.post("/v1/chat/completions", &chat)).await;
    assert_eq!(status, 200);
    let seen = mock.chats();
    for (s, expected) in seen.iter().zip([16, 9]) {
        assert_eq!(s.body["max_completion_tokens"], expected, "{}", s.body);
        assert!(s.body.get("max_tokens").is_none());
    }
}
