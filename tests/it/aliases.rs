//! Other names for models and providers: config.yaml's `aliases:` (`fast: openai/gpt-4o-mini`) and a provider
//! file's `aliases:` (LiteLLM's `together_ai/` for `together/`).

use crate::support::*;
use serde_json::{Value, json};

#[tokio::test]
async fn model_and_provider_aliases_reach_the_model_they_stand_for() {
    let mock = Mock::echo("aliased").await;
    let yaml = provider_yaml(&mock.base_url, "aliases: [mock_ai]\n");
    let config = "aliases:\n  fast: mock/m-1\nfallbacks:\n  mock/m-1: [mock/m-2]\n";
    let proxy = Proxy::start(Setup::one(&mock, 1).provider("mock", yaml).config(config)).await;

    let (status, headers, body) = proxy.chat("mock_ai/m-1", "hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-provider"), "mock");
    assert_eq!(body["choices"][0]["message"]["content"], "aliased");
    let (status, _, body) = proxy.chat("fast", "hi").await;
    assert_eq!(status, 200, "{body}");
    let models: Vec<String> = mock.chats().iter().map(|s| s.model().to_string()).collect();
    assert_eq!(models, ["m-1", "m-1"]);

    let (status, _, list) = send(proxy.get("/v1/models")).await;
    assert_eq!(status, 200);
    let alias = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "fast")
        .cloned();
    assert_eq!(
        alias.map(|m| (m["alias_of"].clone(), m["object"].clone())),
        Some((json!("mock/m-1"), json!("model")))
    );
    let (status, _, body) = proxy.chat("nobody_ai/m-1", "hi").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], Value::from("unknown_provider"));
}

#[test]
fn an_alias_that_names_no_provider_model_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", "aliases:\n  fast: gpt-4o-mini\n");
    let (passed, text) = check(dir.path());
    assert!(!passed, "{text}");
    assert!(text.contains("aliases"), "{text}");
}
