//! Snapshot tests of the shipped provider scripts: OpenAI requests mapped to each upstream's native request, and
//! the upstream's native responses and stream transcripts (fixtures in its real wire format) mapped back.

use keyrelay::config::Tuning;
use keyrelay::mapping::declared::Declared;
use keyrelay::mapping::{Answer, Draft, MapError, Mapping, Part, Target};
use keyrelay::script::ProviderScript;
use keyrelay::sse::SseParser;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;

fn provider(name: &str) -> keyrelay::provider::Provider {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    keyrelay::provider::load_file(
        &root.join(format!("providers/{name}.yaml")),
        &root.join("plugins"),
        &Tuning::default(),
        None,
    )
    .unwrap_or_else(|e| panic!("{e:?}"))
}

fn script(name: &str) -> Arc<ProviderScript> {
    provider(name).script.expect("the provider has a script")
}

/// Runs a mapping future to its end (stream mapping and classification run scripts off the async workers).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

fn fixture(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap()
}

fn json_fixture(path: &str) -> Value {
    serde_json::from_str(&fixture(path)).unwrap()
}

/// A fixture without the fields named (those a provider refuses).
fn fixture_without(path: &str, fields: &[&str]) -> Value {
    let mut body = json_fixture(path);
    for field in fields {
        body.as_object_mut().unwrap().remove(*field);
    }
    body
}

/// A request mapped as the relay maps it: through the provider's declared rules and its script.
fn mapped_request(provider: &str, endpoint: &str, model: &str, body: &str) -> Value {
    map_body(provider, endpoint, model, json_fixture(body))
}

fn map_body(provider: &str, endpoint: &str, model: &str, body: Value) -> Value {
    let stream = body["stream"] == json!(true);
    let p = self::provider(provider);
    draft(
        p.mapping
            .request
            .map(&target(endpoint, model, stream), body)
            .unwrap(),
    )
}

fn target<'a>(endpoint: &'a str, model: &'a str, stream: bool) -> Target<'a> {
    Target {
        endpoint,
        model,
        stream,
        path: "/unused",
    }
}

/// A draft as the snapshots show it.
fn draft(m: Draft) -> Value {
    let headers: Vec<(&str, &str)> = m
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
        .collect();
    json!({"method": m.method.as_str(), "path": m.path, "query": m.query, "headers": headers, "body": m.body})
}

/// A response mapped as the relay maps it: by the provider's `response.fast` declaration when it applies, else
/// by its script.
fn mapped_response(provider: &str, endpoint: &str, model: &str, fixture_path: &str) -> Value {
    let p = self::provider(provider);
    let answer = p
        .mapping
        .answer
        .map(endpoint, model, fixture(fixture_path).as_bytes())
        .unwrap();
    let Answer::Mapped(mapped) = answer else {
        panic!("{provider} maps its answers")
    };
    mapped
}

/// The chunks (and markers) a whole upstream transcript maps to, through the provider's declared rules and
/// its script, as a live stream is.
fn mapped_stream(name: &str, model: &str, fixture_path: &str) -> Vec<Value> {
    let mut mapper = provider(name).mapping.stream(model, name);
    let mut parser = SseParser::new();
    parser.push(fixture(fixture_path).as_bytes()).unwrap();
    let mut events = Vec::new();
    while let Some(e) = parser.next_event().unwrap() {
        events.push(e);
    }
    events.extend(parser.finish());
    let mut out = Vec::new();
    for event in events {
        for part in mapper.map_blocking(event).unwrap() {
            out.push(match part {
                Part::Chunk { data, .. } => serde_json::from_str(&data).unwrap(),
                Part::Event { name, data, .. } => json!({"event": name, "data": data}),
                Part::Error(e) => json!({"in_band_error": e}),
                Part::Done => json!("[DONE]"),
            });
        }
    }
    out
}

macro_rules! snapshot {
    ($name:expr, $value:expr) => {
        insta::assert_json_snapshot!($name, $value, {
            ".created" => "[created]",
            "[].created" => "[created]",
            ".choices[].message.tool_calls[].id" => "[call id]",
            "[].choices[].delta.tool_calls[].id" => "[call id]",
            "[].id" => "[id]",
            ".id" => "[id]",
        })
    };
}

// ------------------------------------------------------------------------------------------------- Gemini

#[test]
fn gemini_requests() {
    snapshot!(
        "gemini_request_basic",
        mapped_request(
            "gemini",
            "chat",
            "gemini-2.5-flash",
            "openai/chat_basic.json"
        )
    );
    // Gemini cannot be told to call one function at a time: `parallel_tool_calls: false` is refused (see
    // `fields_the_target_cannot_take_are_refused_by_name`).
    snapshot!(
        "gemini_request_tools",
        map_body(
            "gemini",
            "chat",
            "gemini-2.5-flash",
            fixture_without("openai/chat_tools.json", &["parallel_tool_calls"])
        )
    );
    snapshot!(
        "gemini_request_image_json_stream",
        mapped_request(
            "gemini",
            "chat",
            "gemini-2.5-pro",
            "openai/chat_image_json.json"
        )
    );
    snapshot!(
        "gemini_request_embeddings",
        mapped_request(
            "gemini",
            "embeddings",
            "gemini-embedding-001",
            "openai/embeddings.json"
        )
    );
}

#[test]
fn gemini_responses() {
    for name in [
        "text",
        "tool_call",
        "max_tokens",
        "safety",
        "prompt_blocked",
        "max_tokens_no_parts",
    ] {
        let mapped = mapped_response(
            "gemini",
            "chat",
            "gemini-2.5-flash",
            &format!("gemini/generate_response_{name}.json"),
        );
        snapshot!(format!("gemini_response_{name}"), mapped);
    }
    let text = mapped_response(
        "gemini",
        "chat",
        "gemini-2.5-flash",
        "gemini/generate_response_text.json",
    );
    let usage = &json_fixture("gemini/generate_response_text.json")["usageMetadata"];
    assert_eq!(text["usage"]["prompt_tokens"], usage["promptTokenCount"]);
    assert_eq!(text["usage"]["total_tokens"], usage["totalTokenCount"]);
    let tools = mapped_response(
        "gemini",
        "chat",
        "gemini-2.5-flash",
        "gemini/generate_response_tool_call.json",
    );
    assert_eq!(tools["choices"][0]["finish_reason"], "tool_calls");
    let args: Value = serde_json::from_str(
        tools["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(args.is_object());
    snapshot!(
        "gemini_response_embeddings",
        mapped_response(
            "gemini",
            "embeddings",
            "gemini-embedding-001",
            "gemini/embed_batch_response.json"
        )
    );
}

#[test]
fn gemini_streams() {
    let text = mapped_stream("gemini", "gemini-2.5-flash", "gemini/stream_text.sse");
    let content: String = text
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/content")?.as_str())
        .collect();
    assert!(!content.is_empty());
    assert_eq!(
        text.iter()
            .filter(|c| c
                .pointer("/choices/0/finish_reason")
                .is_some_and(|f| !f.is_null()))
            .count(),
        1
    );
    assert!(
        text.last().unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "usage comes last"
    );
    snapshot!("gemini_stream_text", text);
    let tools = mapped_stream("gemini", "gemini-2.5-flash", "gemini/stream_tool_call.sse");
    let indexes: Vec<u64> = tools
        .iter()
        .flat_map(|c| {
            c.pointer("/choices/0/delta/tool_calls")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .map(|t| t["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![0, 1], "two parallel calls, numbered");
    snapshot!("gemini_stream_tool_call", tools);
}

#[test]
fn gemini_models() {
    let models = script("gemini")
        .map_models(fixture("gemini/models_list.json").as_bytes())
        .unwrap();
    let ids: Vec<&str> = models.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|id| !id.starts_with("models/")), "{ids:?}");
    snapshot!("gemini_models", models);
}

// ---------------------------------------------------------------------------------------------- Anthropic

#[test]
fn anthropic_requests() {
    let basic = mapped_request(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "openai/chat_basic.json",
    );
    assert_eq!(basic["body"]["max_tokens"], 64);
    assert!(
        basic["body"].get("top_p").is_none(),
        "temperature wins over top_p"
    );
    snapshot!("anthropic_request_basic", basic);
    // reasoning_effort turns extended thinking on, with room for the answer beyond the budget; sampling
    // settings Anthropic refuses while thinking are left out. Without thinking, top_k goes as it is.
    let reasoning = mapped_request(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "openai/chat_reasoning.json",
    );
    let body = &reasoning["body"];
    assert_eq!(
        body["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert!(body["max_tokens"].as_u64().unwrap() > 2048);
    assert!(body.get("temperature").is_none() && body.get("top_k").is_none());
    snapshot!("anthropic_request_reasoning", reasoning);
    let mut plain = json_fixture("openai/chat_reasoning.json");
    plain.as_object_mut().unwrap().remove("reasoning_effort");
    let p = provider("anthropic");
    let mapped = p
        .mapping
        .request
        .map(&target("chat", "claude-sonnet-4-5", false), plain)
        .unwrap();
    assert_eq!(
        (
            mapped.body["top_k"].clone(),
            mapped.body["temperature"].clone()
        ),
        (json!(40), json!(0.2))
    );
    assert!(mapped.body.get("thinking").is_none());
    // Answering tool calls, or with a forced tool, thinking stays off or the choice becomes auto: Anthropic
    // refuses both otherwise.
    let mut tools = json_fixture("openai/chat_tools.json");
    tools["reasoning_effort"] = json!("high");
    tools["tool_choice"] = json!("required");
    let answering = p
        .mapping
        .request
        .map(&target("chat", "claude-sonnet-4-5", false), tools.clone())
        .unwrap();
    assert!(
        answering.body.get("thinking").is_none(),
        "{}",
        answering.body
    );
    let messages = tools["messages"].as_array_mut().unwrap();
    messages.retain(|m| m["role"] == "user" || m["role"] == "system");
    let forced = p
        .mapping
        .request
        .map(&target("chat", "claude-sonnet-4-5", false), tools)
        .unwrap();
    assert_eq!(forced.body["thinking"]["type"], "enabled");
    assert_eq!(forced.body["tool_choice"]["type"], "auto");
    let tools = mapped_request(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "openai/chat_tools.json",
    );
    let messages = tools["body"]["messages"].as_array().unwrap();
    assert_eq!(
        messages.last().unwrap()["content"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "tool results travel together"
    );
    snapshot!("anthropic_request_tools", tools);
    let image = map_body(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        fixture_without("openai/chat_image_json.json", &["response_format"]),
    );
    assert_eq!(image["body"]["max_tokens"], 4096, "the configured default");
    snapshot!("anthropic_request_image_stream", image);
}

#[test]
fn anthropic_responses() {
    let text = mapped_response(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "anthropic/message_response_text.json",
    );
    let usage = &json_fixture("anthropic/message_response_text.json")["usage"];
    let expected_prompt = [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .map(|k| usage[k].as_u64().unwrap_or(0))
    .sum::<u64>();
    assert_eq!(text["usage"]["prompt_tokens"], expected_prompt);
    assert_eq!(
        text["usage"]["prompt_tokens_details"]["cached_tokens"],
        usage["cache_read_input_tokens"]
    );
    snapshot!("anthropic_response_text", text);
    let tools = mapped_response(
        "anthropic",
        "chat",
        "claude-sonnet-4-5",
        "anthropic/message_response_tool_use.json",
    );
    assert_eq!(tools["choices"][0]["finish_reason"], "tool_calls");
    snapshot!("anthropic_response_tool_use", tools);
}

#[test]
fn anthropic_streams() {
    let text = mapped_stream(
        "anthropic",
        "claude-sonnet-4-5",
        "anthropic/stream_text.sse",
    );
    assert_eq!(text.last().unwrap(), "[DONE]");
    snapshot!("anthropic_stream_text", text);
    let tools = mapped_stream(
        "anthropic",
        "claude-sonnet-4-5",
        "anthropic/stream_tool_use.sse",
    );
    let arguments: String = tools
        .iter()
        .flat_map(|c| {
            c.pointer("/choices/0/delta/tool_calls")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|t| {
            t.pointer("/function/arguments")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    let parsed: Value =
        serde_json::from_str(&arguments).unwrap_or_else(|e| panic!("{arguments:?}: {e}"));
    assert!(parsed.is_object());
    snapshot!("anthropic_stream_tool_use", tools);
    let error = mapped_stream(
        "anthropic",
        "claude-sonnet-4-5",
        "anthropic/stream_error.sse",
    );
    assert!(error.last().unwrap().get("in_band_error").is_some());
    snapshot!("anthropic_stream_error", error);
}

#[test]
fn anthropic_models() {
    let models = script("anthropic")
        .map_models(fixture("anthropic/models_list.json").as_bytes())
        .unwrap();
    snapshot!("anthropic_models", models);
}

#[test]
fn a_blocked_prompt_in_a_gemini_stream_ends_with_content_filter() {
    let mut mapper = provider("gemini").mapping.stream("m", "gemini/m");
    let blocked = json_fixture("gemini/generate_response_prompt_blocked.json").to_string();
    let parts = mapper
        .map_blocking(keyrelay::sse::SseEvent {
            event: None,
            data: blocked,
        })
        .unwrap();
    let Part::Chunk { data, finish, .. } = &parts[0] else {
        panic!("{parts:?}")
    };
    assert!(*finish);
    assert_eq!(
        serde_json::from_str::<Value>(data).unwrap()["choices"][0]["finish_reason"],
        "content_filter"
    );
    assert_eq!(parts.last(), Some(&Part::Done));
}

#[test]
fn error_events_inside_streams_are_classified_by_their_type() {
    let anthropic = provider("anthropic");
    let event =
        r#"{"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}}"#;
    let verdict = block_on(anthropic.judge(500, &Default::default(), event, 0)).unwrap();
    assert_eq!(verdict.class.as_str(), "rate_limit");
    let overloaded =
        r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#;
    assert_eq!(
        block_on(anthropic.judge(500, &Default::default(), overloaded, 0))
            .unwrap()
            .class
            .as_str(),
        "server"
    );
}

// ------------------------------------------------------------------- declared mappings (request.messages, response.fast)

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

/// The field a provider refuses `body` for, by the relay's own mapping.
fn refused(provider: &str, endpoint: &str, body: Value) -> String {
    let stream = body["stream"] == json!(true);
    match self::provider(provider)
        .mapping
        .request
        .map(&target(endpoint, "m", stream), body)
    {
        Err(MapError::Refused(keyrelay::failure::Refused { param, message })) => {
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

#[test]
fn audio_files_and_tool_images_are_mapped_not_dropped() {
    let parts = json!({"model": "m", "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}},
            {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}}
        ]}
    ]});
    snapshot!(
        "gemini_request_audio_file",
        map_body("gemini", "chat", "gemini-2.5-flash", parts)
    );
    let tool_image = json!({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0x"}}]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "screenshot", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [
            {"type": "text", "text": "the screen"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}
    ]});
    snapshot!(
        "anthropic_request_file_tool_image",
        map_body("anthropic", "chat", "claude-sonnet-4-5", tool_image)
    );
    // A tool parameter named like a schema keyword is the tool's own and stays.
    let strict = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",
        "function": {"name": "f", "strict": true, "parameters": {"type": "object", "additionalProperties": false,
            "properties": {"strict": {"type": "boolean"}, "additionalProperties": {"type": "string"}}}}}]});
    let gemini = map_body("gemini", "chat", "gemini-2.5-flash", strict);
    let schema = &gemini["body"]["tools"][0]["functionDeclarations"][0]["parameters"];
    assert_eq!(
        schema,
        &json!({"type": "object", "properties": {"strict": {"type": "boolean"}, "additionalProperties": {"type": "string"}}})
    );
}
