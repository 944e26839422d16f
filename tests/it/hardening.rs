//! The second hardening pass, each finding through the real server: a refusal about one model never benches keys
//! whole, the dialects name the model that answered, and a long chain of failing fallbacks still writes a
//! request log within its size.

use crate::support::*;
use serde_json::{Value, json};

/// A mock that refuses model `gated` with a bare 401 (its text does not say it is about the model) and answers
/// every other model.
async fn gating() -> Mock {
    Mock::start(|seen, _| {
        if seen.model() == "gated" {
            return Reply::error(401, "Unauthorized", "invalid_request_error", "unauthorized");
        }
        Reply::ok(completion(seen.model(), "open"))
    })
    .await
}

#[tokio::test]
async fn a_refusal_about_one_model_never_benches_the_pool() {
    let mock = gating().await;
    let proxy = Proxy::start(Setup::one(&mock, 5)).await;
    // Two keys per request at most, then one (the others already rest for the model): each time the refusal.
    for _ in 0..3 {
        let (status, headers, body) = proxy.chat("mock/gated", "hi").await;
        assert_eq!(status, 401, "{body}");
        assert!(header(&headers, "x-keyrelay-attempts") <= "2");
    }
    // Every key rests for that model now; asking again costs no upstream call.
    let before = mock.chats().len();
    let (status, _, body) = proxy.chat("mock/gated", "hi").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(mock.chats().len(), before);
    let keys = proxy.key_status("mock").await;
    assert!(
        keys.iter().all(|k| k.cooling_until.is_none()),
        "no key rests whole: {keys:?}"
    );
    // Every key still serves every other model.
    let before = mock.chats().len();
    for _ in 0..10 {
        let (status, _, body) = proxy.chat("mock/open", "hi").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(mock.chats().len(), before + 10, "one attempt each");
    let served: std::collections::HashSet<_> = mock.chats()[before..]
        .iter()
        .map(|c| c.key.clone())
        .collect();
    assert_eq!(served.len(), 5, "the whole pool serves");
}

#[tokio::test]
async fn a_key_refused_for_two_models_is_benched_while_good_keys_serve() {
    // Key 1 is dead; the others serve.
    let mock = Mock::start(|seen, _| {
        if seen.key == key(1) {
            return Reply::error(401, "Unauthorized", "invalid_request_error", "unauthorized");
        }
        Reply::ok(completion(seen.model(), "open"))
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 3).config("selection: sequential\n")).await;
    for model in ["mock/a", "mock/b", "mock/c"] {
        let (status, _, body) = proxy.chat(model, "hi").await;
        assert_eq!(status, 200, "{body}");
    }
    let keys = proxy.key_status("mock").await;
    let dead = keys.iter().find(|k| k.key == masked(1)).unwrap();
    assert!(dead.cooling_until.is_some(), "{dead:?}");
    assert!(
        keys.iter()
            .filter(|k| k.key != masked(1))
            .all(|k| k.cooling_until.is_none())
    );
}

/// A primary `main` that always fails and a `backup` that answers, with config.yaml's fallback between them.
async fn main_and_backup() -> (Proxy, Mock) {
    let main =
        Mock::start(|_, _| Reply::error(503, "overloaded", "server_error", "overloaded")).await;
    let backup = Mock::echo("from the backup").await;
    let setup = Setup {
        env: mock_keys("MAIN", 1),
        ..Setup::empty()
    }
    .provider("main", provider_yaml(&main.base_url, ""))
    .provider("backup", provider_yaml(&backup.base_url, ""))
    .env("BACKUP_API_KEY", &key(3))
    .config("retries: {attempts: 1}\nfallbacks:\n  main/big: [backup/small]\n");
    (Proxy::start(setup).await, backup)
}

#[tokio::test]
async fn the_dialects_name_the_fallback_that_answered() {
    let (proxy, _backup) = main_and_backup().await;
    let messages = json!({"model": "main/big", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let answer: Value =
        serde_json::from_str(&proxy.post_text("/v1/messages", &messages).await).unwrap();
    assert_eq!(answer["model"], "backup/small", "{answer}");
    let mut streamed = messages.clone();
    streamed["stream"] = json!(true);
    let text = proxy.post_text("/v1/messages", &streamed).await;
    let (_, start) = sse_events(&text)
        .into_iter()
        .find(|(name, _)| name == "message_start")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(start["message"]["model"], "backup/small", "{text}");

    let responses = json!({"model": "main/big", "input": "hi"});
    let answer: Value =
        serde_json::from_str(&proxy.post_text("/v1/responses", &responses).await).unwrap();
    assert_eq!(answer["model"], "backup/small", "{answer}");
    let mut streamed = responses.clone();
    streamed["stream"] = json!(true);
    let text = proxy.post_text("/v1/responses", &streamed).await;
    let (_, completed) = sse_events(&text)
        .into_iter()
        .find(|(name, _)| name == "response.completed")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(completed["response"]["model"], "backup/small", "{text}");
}

#[tokio::test]
async fn sixteen_failing_fallbacks_write_a_request_log_within_its_size() {
    // Many short attempt records: 17 models of 3 keys each, every one failing.
    let failing = Mock::start(|_, _| Reply::error(503, "overloaded", "server_error", "x")).await;
    let fallbacks: Vec<String> = (0..16).map(|i| format!("mock/fallback-{i}")).collect();
    let setup = Setup::one(&failing, 3).config(
        "retries: {attempts: 1}\nrequest_timeout: 20s\nrequest_logging: {enabled: true, max_file_size: 4KB}\n",
    );
    let proxy = Proxy::start(setup).await;
    let body = json!({"model": "mock/m", "fallbacks": fallbacks, "messages": [{"role": "user", "content": "hi"}]});
    let response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(failing.chats().len(), 51);
    let dir = proxy.dir.path().join("logs");
    let logs = request_logs(&dir, 1).await;
    let log = &logs[0];
    for file in std::fs::read_dir(&dir).unwrap() {
        let size = file.unwrap().metadata().unwrap().len();
        assert!(size <= 4 * 1024, "a request log of {size} bytes");
    }
    assert_eq!(log["status"], 503, "{log}");
    let attempts = log["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["model"], "mock/m", "the first attempt is kept");
    assert_eq!(
        attempts.len() as u64 + log["attempts_omitted"].as_u64().unwrap(),
        51,
        "the others are counted"
    );
}

/// An agent conversation of `turns` tool calls, each answered.
fn agent_conversation(turns: usize) -> Value {
    let mut messages = vec![json!({"role": "user", "content": "Look around the repository."})];
    for i in 0..turns {
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": format!("call_{i}"), "type": "function", "function": {"name": "read_file", "arguments": format!("{{\"path\": \"src/file{i}.rs\"}}")}}]}));
        messages.push(json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": format!("{{\"text\": \"contents of file {i}\"}}")}));
    }
    json!({"model": "m", "messages": messages, "tools": [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]})
}

/// Once failed past about 900 tool turns ("Size of object map exceeds the size limit"): a script's data is
/// bounded by its memory budget, not by a count of nested entries.
#[test]
fn long_agent_conversations_map_for_the_scripted_providers() {
    use crate::support::mapping::{draft, target};
    use keyrelay::config::{Tuning, TuningPatch};
    // What is tested is the size of the data, not speed: a time budget no loaded machine can miss.
    let patient: TuningPatch = serde_yaml::from_str("scripts: {time: 60s, memory: 1GiB}").unwrap();
    let map = |name: &str, model: &str, body: Value| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let p = keyrelay::provider::load_file(
            &root.join(format!("providers/{name}.yaml")),
            &root.join("plugins"),
            &Tuning::default(),
            Some(&patient),
        )
        .unwrap();
        draft(
            p.mapping
                .request
                .map(&target("chat", model, false), body)
                .unwrap(),
        )
    };
    for turns in [1_000, 5_000] {
        let gemini = map("gemini", "gemini-2.5-pro", agent_conversation(turns));
        let contents = gemini["body"]["contents"].as_array().unwrap();
        assert_eq!(contents.len(), 2 * turns + 1, "{turns}");
        assert_eq!(
            contents[2 * turns]["parts"][0]["functionResponse"]["name"],
            "read_file"
        );
        let anthropic = map("anthropic", "claude-sonnet-4-5", agent_conversation(turns));
        let messages = anthropic["body"]["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2 * turns + 1, "{turns}");
    }
}

fn weird(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(0..9) {
        0 => Value::Null,
        1 => json!(rng.i64(-5..5)),
        2 => json!("text"),
        3 => json!([]),
        4 => json!({}),
        5 => json!(true),
        6 => json!([1, "a", null]),
        7 => json!({"type": "text"}),
        _ => json!(1.5),
    }
}

fn mutate(v: &mut Value, rng: &mut fastrand::Rng, depth: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.usize(0..keys.len())];
            if depth > 0 && rng.bool() {
                mutate(m.get_mut(k).unwrap(), rng, depth - 1);
            } else {
                m.insert(k.clone(), weird(rng));
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.usize(0..a.len());
            if depth > 0 && rng.bool() {
                mutate(&mut a[i], rng, depth - 1);
            } else {
                a[i] = weird(rng);
            }
        }
        _ => *v = weird(rng),
    }
}

/// Malformed client input to a translating provider is the client's to fix: a 400 naming the field, never a
/// script's failure (a fuzzing pass found 133 such 502s in 3,548 requests). Random type mutations of the request
/// fixtures, through the shipped Gemini and Anthropic mappings.
#[test]
fn malformed_requests_are_refused_before_the_scripts_read_them() {
    use crate::support::mapping::{provider, target};
    use keyrelay::mapping::MapError;
    let mut rng = fastrand::Rng::with_seed(20);
    let mut refused = 0;
    for name in ["gemini", "anthropic"] {
        let p = provider(name);
        for fixture in [
            "openai/chat_basic.json",
            "openai/chat_tools.json",
            "openai/chat_image_json.json",
            "openai/chat_reasoning.json",
        ] {
            for _ in 0..500 {
                let mut body = crate::support::json_fixture(fixture);
                for _ in 0..rng.usize(1..3) {
                    mutate(&mut body, &mut rng, 5);
                }
                match p
                    .mapping
                    .request
                    .map(&target("chat", "m", false), body.clone())
                {
                    Err(MapError::Script(e)) => panic!("{name}: {e}\n{body}"),
                    Err(MapError::Refused(_)) => refused += 1,
                    Ok(_) => {}
                }
            }
        }
    }
    assert!(refused > 1_000, "most mutations are refused: {refused}");
}

#[tokio::test]
async fn malformed_requests_to_a_scripted_provider_get_400_naming_the_field() {
    let mock = Mock::echo("unused").await;
    let setup = Setup {
        env: mock_keys("GEMINI", 1),
        ..Setup::empty()
    }
    .provider("gemini", shipped_provider("gemini", &mock.base_url))
    .shipped_plugin("gemini.rhai");
    let proxy = Proxy::start(setup).await;
    for (body, field) in [
        (
            json!({"model": "gemini/m", "messages": [null]}),
            "messages[0]",
        ),
        (
            json!({"model": "gemini/m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            "messages[0].content[0].image_url.url",
        ),
        (
            json!({"model": "gemini/m", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
    ] {
        let (status, _, answer) = send(proxy.post("/v1/chat/completions", &body)).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["param"], field, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_type", "{answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{answer}"
        );
    }
    assert!(mock.chats().is_empty(), "nothing reached the upstream");
}

/// What a reload would lose by accident (every provider file moved away, `PROXY_API_KEY` gone from `.env`, a
/// provider file replaced by a generic provider of the same name) is refused on any host until the operator
/// confirms it with SIGHUP.
#[tokio::test]
async fn a_reload_that_empties_an_input_waits_for_the_operator() {
    let mock = Mock::echo("from the file").await;
    let dir = mock_dir(&mock, "");
    // MOCK_API_BASE is there too: without the file, `mock` would be a generic provider at that URL.
    let env = format!(
        "PROXY_API_KEY={PROXY_KEY}\nMOCK_API_KEY_1={}\nMOCK_API_BASE={}\n",
        key(1),
        mock.base_url
    );
    write(dir.path(), ".env", &env);
    let served = start(dir.path(), &[], None);
    let client = http_client();
    let chat = |auth: bool| {
        let request = client
            .post(format!("{}/v1/chat/completions", served.url))
            .header("content-type", "application/json")
            .body(r#"{"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]}"#);
        let request = if auth {
            request.bearer_auth(PROXY_KEY)
        } else {
            request
        };
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let last_error = || async {
        let (_, _, status) = send(
            client
                .get(format!("{}/", served.url))
                .bearer_auth(PROXY_KEY),
        )
        .await;
        status["config"]["last_reload_error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(chat(true).await, 200);

    // The provider file moved away: refused, the file's provider keeps serving.
    let moved = dir.path().join("mock.yaml.bak");
    std::fs::rename(dir.path().join("providers/mock.yaml"), &moved).unwrap();
    let error = eventually_some("the reload refused", || async {
        Some(last_error().await).filter(|e| e.contains("no provider file left"))
    })
    .await;
    assert!(
        error.contains("generic OpenAI-compatible") && error.contains("SIGHUP"),
        "{error}"
    );
    assert_eq!(chat(true).await, 200);
    std::fs::rename(&moved, dir.path().join("providers/mock.yaml")).unwrap();

    // The proxy key gone from .env on a loopback host: refused too, the key still required.
    write(
        dir.path(),
        ".env",
        &env.replace(&format!("PROXY_API_KEY={PROXY_KEY}\n"), ""),
    );
    eventually("the reload without the key refused", || async {
        last_error().await.contains("no PROXY_API_KEY")
    })
    .await;
    assert_eq!(chat(false).await, 401);

    // The operator confirms.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &served.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the confirmed reload serves without a key", || async {
        chat(false).await == 200
    })
    .await;
}

/// A provider file cannot make keyrelay read a file outside `plugins/` as a script, and a secret written where a
/// setting belongs is never repeated by the error about it (the log and `GET /` show these errors).
#[test]
fn configuration_errors_neither_read_outside_plugins_nor_quote_secrets() {
    let secret = "sk-proj-aSecretPastedInTheWrongPlace0123456789abcdef";
    for (file, text) in [
        (
            "providers/sneaky.yaml",
            "base_url: https://example.com/v1\nscript: ../.env\n".to_string(),
        ),
        (
            "providers/sneaky.yaml",
            "base_url: https://example.com/v1\nscript: /etc/hostname\n".to_string(),
        ),
        ("config.yaml", format!("selection: {secret}\n")),
        ("config.yaml", format!("aliases: {{fast: [{secret}]}}\n")),
        (
            "providers/typo.yaml",
            format!("base_url: https://example.com/v1\n{secret}: 1\n"),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            ".env",
            &format!("PROXY_API_KEY={PROXY_KEY}\nSNEAKY_API_KEY={secret}\n"),
        );
        write(dir.path(), "plugins/.keep", "");
        write(dir.path(), file, &text);
        let (ok, output) = check(dir.path());
        assert!(!ok, "{file}: {text}\n{output}");
        assert!(!output.contains("aSecret"), "{output}");
        assert!(!output.contains("PROXY_API_KEY="), "{output}");
        if text.contains("script:") {
            assert!(
                output.contains("must name a file in the plugins directory"),
                "{output}"
            );
        }
    }
}
