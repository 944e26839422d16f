//! The fields of a chat request a target API cannot take are refused by name, before any key is used; the
//! target's own fields pass into its body.

use crate::support::json_fixture;
use crate::support::mapping::*;
use keyrelay::mapping::MapError;
use serde_json::{Value, json};

/// The field a provider refuses `body` for, by the relay's own mapping.
fn refused(provider: &str, endpoint: &str, body: Value) -> String {
    let stream = body["stream"] == json!(true);
    match self::provider(provider)
        .mapping
        .request
        .map(&target(endpoint, "m", stream), body)
    {
        Err(MapError::Refused(keyrelay::failure::Refused { param, message, .. })) => {
            assert!(message.contains(provider), "{message}");
            param
        }
        other => panic!("{provider} did not refuse: {other:?}"),
    }
}

#[test]
fn fields_the_target_cannot_take_are_refused_by_name() {
    let user =
        |content: Value| json!({"model": "m", "messages": [{"role": "user", "content": content}]});
    let with = |field: &str, value: Value| {
        let mut body = user(json!("hi"));
        body[field] = value;
        body
    };
    // Fields of OpenAI's API with no equivalent: refused when they ask for something, before any key is used.
    let anthropic_refuses = [
        ("response_format", json!({"type": "json_object"})),
        ("logit_bias", json!({"50256": -100})),
        ("logprobs", json!(true)),
        ("n", json!(2)),
        ("presence_penalty", json!(0.5)),
        ("seed", json!(7)),
    ];
    for (field, value) in anthropic_refuses {
        assert_eq!(refused("anthropic", "chat", with(field, value)), field);
    }
    for (field, value) in [
        ("parallel_tool_calls", json!(false)),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(3)),
    ] {
        assert_eq!(refused("gemini", "chat", with(field, value)), field);
    }
    // Anthropic's `thinking` has Gemini's equivalent (-1: a budget of the model's choosing).
    for (thinking, budget) in [
        (
            json!({"type": "enabled", "budget_tokens": 1024}),
            json!(1024),
        ),
        (json!({"type": "disabled"}), json!(0)),
        (json!({"type": "enabled"}), json!(-1)),
    ] {
        let mapped = map_body("gemini", "chat", "m", with("thinking", thinking));
        assert_eq!(
            mapped["body"]["generationConfig"]["thinkingConfig"]["thinkingBudget"],
            budget
        );
        assert!(mapped["body"].get("thinking").is_none());
    }
    assert_eq!(
        refused(
            "gemini",
            "chat",
            fixture_without("openai/chat_tools.json", &[])
        ),
        "parallel_tool_calls"
    );
    assert_eq!(
        refused(
            "anthropic",
            "chat",
            json_fixture("openai/chat_image_json.json")
        ),
        "response_format"
    );
    // Their defaults, and hints that change nothing in the answer, pass.
    let mut defaults = user(json!("hi"));
    for (field, value) in [
        ("n", json!(1)),
        ("logprobs", json!(false)),
        ("logit_bias", json!({})),
        ("presence_penalty", json!(0)),
        ("response_format", json!({"type": "text"})),
        ("service_tier", json!("auto")),
        ("seed", Value::Null),
        ("user", json!("u-1")),
        ("metadata", json!({"team": "a"})),
        ("prompt_cache_key", json!("k")),
    ] {
        defaults[field] = value;
    }
    for provider in ["anthropic", "gemini"] {
        let mapped = map_body(provider, "chat", "m", defaults.clone());
        assert!(mapped["body"].get("logit_bias").is_none(), "{mapped}");
    }
    // What the scripts find inside values: parts, tools and roles they have no place for.
    let audio = json!([{"type": "text", "text": "listen"},
                       {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]);
    assert_eq!(
        refused("anthropic", "chat", user(audio)),
        "messages[0].content[1]"
    );
    let by_id = json!([{"type": "file", "file": {"file_id": "file-abc"}}]);
    assert_eq!(
        refused("anthropic", "chat", user(by_id.clone())),
        "messages[0].content[0]"
    );
    assert_eq!(
        refused("gemini", "chat", user(by_id)),
        "messages[0].content[0]"
    );
    let search = with("tools", json!([{"type": "web_search"}]));
    assert_eq!(
        refused("anthropic", "chat", search.clone()),
        "tools[0].type"
    );
    assert_eq!(refused("gemini", "chat", search), "tools[0].type");
    let narrator = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                                                     {"role": "narrator", "content": "b"}]});
    assert_eq!(
        refused("anthropic", "chat", narrator.clone()),
        "messages[1].role"
    );
    assert_eq!(refused("gemini", "chat", narrator), "messages[1].role");
    let mut streamed = with("n", json!(2));
    streamed["stream"] = json!(true);
    assert_eq!(refused("gemini", "chat", streamed), "n");
    let tokens = json!({"model": "m", "input": [[1, 2, 3]]});
    assert_eq!(refused("gemini", "embeddings", tokens), "input");
    assert_eq!(
        refused(
            "gemini",
            "embeddings",
            json!({"model": "m", "input": "a", "temperature": 1})
        ),
        "temperature"
    );
}

#[test]
fn fields_of_the_targets_own_api_pass_into_its_body() {
    let mut body = json_fixture("openai/chat_basic.json");
    body["safetySettings"] =
        json!([{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]);
    // An extra never replaces what the mapping wrote.
    body["contents"] = json!("not this");
    body["top_k"] = json!(20);
    let gemini = map_body("gemini", "chat", "gemini-2.5-flash", body);
    assert_eq!(
        gemini["body"]["safetySettings"][0]["threshold"],
        "BLOCK_NONE"
    );
    assert!(gemini["body"]["contents"].is_array(), "{gemini}");
    assert_eq!(gemini["body"]["generationConfig"]["topK"], 20);
    let mut body = json_fixture("openai/chat_basic.json");
    body["container"] = json!("container_1");
    let anthropic = map_body("anthropic", "chat", "claude-sonnet-4-5", body);
    assert_eq!(anthropic["body"]["container"], "container_1");
    // Thinking is the mapping's own field: kept out when the mapping leaves it out (answering tool calls).
    let mut tools = json_fixture("openai/chat_tools.json");
    tools["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    let answering = map_body("anthropic", "chat", "claude-sonnet-4-5", tools);
    assert!(answering["body"].get("thinking").is_none(), "{answering}");
}
