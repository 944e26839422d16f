//! Declared mappings (`request.messages`, `response.fast` in a provider file): they map as the shipped scripts
//! do, leave what they cannot map to the script, and a broken one is a load error.

use crate::support::mapping::*;
use crate::support::{fixture, json_fixture};
use keyrelay::config::Tuning;
use keyrelay::mapping::Mapping;
use keyrelay::mapping::declared::Declared;
use serde_json::{Value, json};
use std::path::Path;

/// A chat of plain text with what the declarations must get right: system and developer messages, a `name`,
/// consecutive turns of one role.
fn plain_chat() -> Value {
    json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi.", "name": "ana"},
            {"role": "user", "content": "Still there?"},
            {"role": "developer", "content": "Answer in French."},
            {"role": "assistant", "content": "Oui."},
            {"role": "user", "content": "Merci."}
        ],
        "temperature": 0.2,
        "max_tokens": 50,
        "stop": "END"
    })
}

/// The same request through the declaration and through the script alone (the declaration switched off).
fn both_ways(name: &str, body: &Value) -> (Value, Value) {
    let p = provider(name);
    let without_messages = Declared {
        messages: None,
        ..(*p.mapping.declared).clone()
    };
    let scripted = Mapping::compose(p.script.as_ref(), without_messages);
    let to = target("chat", "m", false);
    (
        draft(p.mapping.request.map(&to, body.clone()).unwrap()),
        draft(scripted.request.map(&to, body.clone()).unwrap()),
    )
}

#[test]
fn declared_message_mappings_agree_with_the_scripts() {
    for name in ["gemini", "anthropic"] {
        let p = provider(name);
        let map = p
            .mapping
            .declared
            .messages
            .as_ref()
            .expect("the provider declares request.messages");
        for body in [plain_chat(), json_fixture("openai/chat_basic.json")] {
            assert!(
                map.map(&body["messages"]).is_some(),
                "{name}: declared mapping applies"
            );
            let (declared, scripted) = both_ways(name, &body);
            assert_eq!(declared, scripted, "{name}");
        }
        snapshot!(
            format!("{name}_request_plain_declared"),
            both_ways(name, &plain_chat()).0
        );
    }
}

#[test]
fn declared_message_mappings_leave_richer_conversations_to_the_scripts() {
    let p = provider("gemini");
    let map = p.mapping.declared.messages.as_ref().unwrap();
    let richer = [
        json!([{"role": "user", "content": [{"type": "text", "text": "parts"}]}]),
        json!([{"role": "user", "content": ""}]),
        json!([{"role": "tool", "content": "42", "tool_call_id": "c1"}]),
        json!([{"role": "assistant", "content": "x", "tool_calls": []}]),
        json!([{"role": "user", "content": "hi"}, {"role": "narrator", "content": "?"}]),
        json!("not a list"),
    ];
    for messages in richer {
        assert!(map.map(&messages).is_none(), "{messages}");
    }
    // Through the provider they still map, by the script.
    for fixture in ["openai/chat_tools.json", "openai/chat_image_json.json"] {
        let (declared, scripted) = both_ways(
            "gemini",
            &fixture_without(fixture, &["parallel_tool_calls"]),
        );
        assert_eq!(declared, scripted, "{fixture}");
    }
}

#[test]
fn declared_answers_agree_with_the_scripts() {
    let cases = [
        ("gemini", "gemini/generate_response_text.json", true),
        ("gemini", "gemini/generate_response_max_tokens.json", true),
        ("gemini", "gemini/generate_response_tool_call.json", false),
        (
            "gemini",
            "gemini/generate_response_prompt_blocked.json",
            false,
        ),
        ("anthropic", "anthropic/message_response_text.json", true),
        (
            "anthropic",
            "anthropic/message_response_tool_use.json",
            false,
        ),
    ];
    let without_created = |mut v: Value| {
        v.as_object_mut().unwrap().remove("created");
        v
    };
    // Fields of an unexpected type are left to the script, which passes them on as they are.
    let gemini = provider("gemini");
    let map = gemini.mapping.declared.answer.as_ref().unwrap();
    let text = json_fixture("gemini/generate_response_text.json");
    for (pointer, odd) in [
        ("/responseId", json!(42)),
        ("/modelVersion", json!({"v": 2})),
        ("/usageMetadata/promptTokenCount", json!(1.5)),
        ("/usageMetadata/thoughtsTokenCount", json!(-3)),
    ] {
        let mut body = text.clone();
        *body.pointer_mut(pointer).unwrap() = odd;
        assert!(map.map(&body, "m").is_none(), "{pointer}");
    }
    for (name, path, fast) in cases {
        let p = provider(name);
        let body: Value = json_fixture(path);
        assert_eq!(
            p.mapping
                .declared
                .answer
                .as_ref()
                .unwrap()
                .map(&body, "m")
                .is_some(),
            fast,
            "{path}: mapped by the declaration"
        );
        if fast {
            let declared = mapped_response(name, "chat", "m", path);
            let scripted = script(name)
                .map_response("chat", "m", fixture(path).as_bytes())
                .unwrap();
            assert_eq!(
                without_created(declared),
                without_created(scripted),
                "{path}"
            );
        }
    }
}

/// Loads a provider written into `dir`: `script` as plugins/<name>.rhai, and a provider file naming it, with
/// `yaml` added.
fn load_in(
    dir: &Path,
    name: &str,
    script: &str,
    yaml: &str,
) -> Result<keyrelay::provider::Provider, Vec<keyrelay::config::ConfigError>> {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(plugins.join(format!("{name}.rhai")), script).unwrap();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!("base_url: http://127.0.0.1:9\nscript: {name}.rhai\n{yaml}\n"),
    )
    .unwrap();
    keyrelay::provider::load_file(&file, &plugins, &Tuning::default(), None)
}

#[test]
fn broken_declarations_are_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    let script =
        "fn request(ctx) { #{ path: \"/x\", body: #{} } }\nfn response(ctx) { ctx.body }\n";
    let cases = [
        (
            "request: {messages: {roles: {user: user}, into: contents, turn: {parts: [{text: $text}]}, merge: nope}}",
            "`merge: nope` needs `turn` to hold an array `nope`",
        ),
        (
            "request: {messages: {roles: {user: user}, into: a.0, turn: {text: $text}}}",
            "is not a path of object keys",
        ),
        (
            "request: {messages: {roles: {user: user}, into: c, turn: {text: $text}, system: {into: s}}}",
            "`system` takes `into` and either `value`",
        ),
        (
            "response: {fast: {content: 'a..b', finish_reason: {from: f, default: stop}, usage: {prompt_tokens: [], completion_tokens: []}}}",
            "is not a path like",
        ),
        (
            "request: {messages: {roles: {system: user}, into: c, turn: {text: $text}}}",
            "`roles` cannot map",
        ),
        (
            "request: {messages: {roles: {user: user}, into: c, turn: {text: hello}}}",
            "`turn` must hold the string $text",
        ),
        (
            "request: {messages: {roles: {user: user}, into: c, turn: {text: $text}, system: {into: c, join: ' '}}}",
            "`system.into` must differ from `into`",
        ),
    ];
    // A request hook that needs `messages` fails when the declaration takes plain chats away from it.
    let errors = load_in(
        dir.path(),
        "needs",
        "fn request(ctx) { let n = ctx.body.messages.len(); #{ path: \"/x\", body: #{ n: n } } }\n",
        "request: {messages: {roles: {user: user}, into: c, turn: {text: $text}}}",
    )
    .unwrap_err();
    assert!(
        format!("{errors:?}").contains("fails on a sample chat request"),
        "{errors:?}"
    );
    for (yaml, expected) in cases {
        let errors = load_in(dir.path(), "p", script, yaml).expect_err(yaml);
        let text = format!("{errors:?}");
        assert!(text.contains(expected), "{yaml}: {text}");
    }
}

#[test]
fn a_declaration_with_no_room_in_the_scripts_body_leaves_the_request_to_the_script() {
    let dir = tempfile::tempdir().unwrap();
    // The script's body holds a number where the declaration would write its turns.
    let p = load_in(
        dir.path(),
        "p",
        "fn request(ctx) { #{ path: \"/x\", body: #{ c: 5, n: (ctx.body.messages ?? []).len() } } }\n",
        "request: {messages: {roles: {user: user}, into: c.turns, turn: {text: $text}}}",
    )
    .unwrap();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mapped = p
        .mapping
        .request
        .map(&target("chat", "m", false), body)
        .unwrap();
    assert_eq!(
        mapped.body,
        json!({"c": 5, "n": 1}),
        "the script saw the messages"
    );
}
