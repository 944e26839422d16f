//! What a client, an upstream or an operator's mistake could do to open keyrelay up: model names that try to
//! reach other upstream paths, keys echoed back by upstreams, details for strangers, and reloads that would
//! weaken it.

mod support;

use serde_json::{Value, json};
use support::*;

fn gemini_allowing(mock: &Mock, allow: &str) -> Setup {
    Setup {
        env: mock_keys("GEMINI", 1),
        ..Setup::empty()
    }
    .provider(
        "gemini",
        shipped_provider("gemini", &format!("{}beta", mock.base_url))
            .replace("models:\n", &format!("models:\n  allow: [\"{allow}\"]\n")),
    )
    .shipped_plugin("gemini.rhai")
}

#[tokio::test]
async fn a_model_name_is_one_path_segment_upstream_and_the_filter_judges_what_is_sent() {
    let mock = Mock::start(|seen, _| {
        Reply::status(
            404,
            json!({"error": {"code": 404, "message": format!("no model at {}", seen.path), "status": "NOT_FOUND"}}),
        )
    })
    .await;
    let proxy = Proxy::start(gemini_allowing(&mock, "gemini-2.5-*")).await;
    for (model, path) in [
        (
            "gemini/gemini-2.5-x/../../../admin/delete",
            "/v1beta/models/gemini-2.5-x%2F..%2F..%2F..%2Fadmin%2Fdelete:generateContent",
        ),
        (
            "gemini/gemini-2.5-m?alt=json&key=x#frag",
            "/v1beta/models/gemini-2.5-m%3Falt=json&key=x%23frag:generateContent",
        ),
        (
            "gemini/gemini-2.5-%2e%2e",
            "/v1beta/models/gemini-2.5-%252e%252e:generateContent",
        ),
    ] {
        let (status, _, body) = proxy.chat(model, "hi").await;
        assert_eq!(status, 404, "{model}: {body}");
        let seen = mock.seen().pop().unwrap();
        assert_eq!(seen.path, path, "{model}");
        assert_eq!(seen.query, "", "{model}: nothing reaches the query");
    }
    // Denied by the allow list: never sent.
    let before = mock.seen().len();
    let (status, _, body) = proxy.chat("gemini/../admin", "hi").await;
    assert_eq!((status, error_code(&body).as_str()), (404, "model_not_found"));
    assert_eq!(mock.seen().len(), before);
}

#[tokio::test]
async fn model_names_are_checked_at_the_edge() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let long = format!("mock/{}", "m".repeat(300));
    for model in [
        json!("mock/m\u{1b}[2J"),
        json!("mock/m\nx"),
        json!(long),
        json!("mock/.."),
    ] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let (status, _, answer) = send(proxy.post("/v1/chat/completions", &body)).await;
        assert_eq!(status, 400, "{model}: {answer}");
        assert_eq!(error_code(&answer), "invalid_model");
    }
    for (body, says) in [
        (json!({"messages": []}), "`model` is required"),
        (json!({"model": 7, "messages": []}), "`model` must be a string"),
        (json!({"model": null, "messages": []}), "`model` must be a string"),
    ] {
        let (status, _, answer) = send(proxy.post("/v1/chat/completions", &body)).await;
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    assert!(mock.chats().is_empty());
}

/// Suppresses an unused warning until more tests land here.
#[allow(dead_code)]
fn unused(_: Value) {}
