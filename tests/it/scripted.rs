//! Providers added as files: a YAML file and a script make a provider for a made-up wire format without code
//! changes, and a script that fails or misbehaves fails only its own request. The shipped scripted providers have
//! their own modules (`gemini`, `anthropic`).

use crate::support::*;
use serde_json::{Value, json};

/// A made-up upstream with its own wire format: `{"prompt": …}` in, `{"output": …, "tokens": [in, out]}` out,
/// and an SSE stream of `{"piece": …}` events ending with `{"end": true}`.
async fn made_up_upstream() -> Mock {
    Mock::start(|seen, _| {
        let prompt = seen.body["prompt"].as_str().unwrap_or("").to_string();
        if seen.body["live"] == json!(true) {
            let events = vec![
                json!({"piece": "echo: "}).to_string(),
                json!({"piece": prompt}).to_string(),
                json!({"end": true, "tokens": [3, 2]}).to_string(),
            ];
            return Reply::sse(events, End::Cut);
        }
        Reply::ok(json!({"output": format!("echo: {prompt}"), "tokens": [3, 2]}))
    })
    .await
}

const ECHO_SCRIPT: &str = r#"
fn request(ctx) {
    let last = ctx.body.messages[ctx.body.messages.len() - 1].content;
    if last == "loop" { let n = 0; loop { n += 1; } }
    if last == "huge" { let s = "x"; loop { s += s; } }
    if last == "import" { import "fs" as fs; return fs::read("/etc/passwd"); }
    if last == "crash" { let n = (); n.oops(); }
    #{ path: "/generate", body: #{ prompt: last, live: ctx.stream } }
}

fn response(ctx) {
    #{
        id: "echo-1", object: "chat.completion", created: unix_time(), model: ctx.model,
        choices: [#{ index: 0, message: #{ role: "assistant", content: ctx.body.output }, finish_reason: "stop" }],
        usage: #{ prompt_tokens: ctx.body.tokens[0], completion_tokens: ctx.body.tokens[1], total_tokens: 5 }
    }
}

fn stream_event(event) {
    let d = event.data;
    if d.end == true {
        return [#{ finish_reason: "stop" }, #{ usage: #{ prompt_tokens: d.tokens[0], completion_tokens: d.tokens[1] } }, #{ done: true }];
    }
    if d.piece == "crash-stream" { let n = (); n.oops(); }
    this.count = (this.count ?? 0) + 1;
    #{ content: d.piece }
}
"#;

fn echo_setup(mock: &Mock) -> Setup {
    Setup {
        env: mock_keys("ECHO", 1),
        ..Setup::empty()
    }
    .provider(
        "echo",
        format!(
            "base_url: {}\nscript: echo.rhai\nmodels: {{list: static, static: [one]}}\n",
            mock.base_url
        ),
    )
    .plugin("echo.rhai", ECHO_SCRIPT)
}

#[tokio::test]
async fn a_provider_added_as_yaml_and_script_works_without_code_changes() {
    let mock = made_up_upstream().await;
    let proxy = Proxy::start(echo_setup(&mock)).await;
    let (status, _, body) = proxy.chat("echo/one", "hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hello");
    assert_eq!(mock.seen()[0].path, "/v1/generate");
    assert_eq!(
        mock.seen()[0].body,
        json!({"prompt": "hello", "live": false})
    );

    let stream = json!({"model": "echo/one", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let text = proxy.post_text("/v1/chat/completions", &stream).await;
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "echo: hi");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
}

#[tokio::test]
async fn a_stream_script_failing_mid_stream_ends_it_with_an_in_band_error_after_what_was_mapped() {
    let mock = made_up_upstream().await;
    let proxy = Proxy::start(echo_setup(&mock)).await;
    // The upstream sends its events at once: the first maps, the second makes the script fail.
    let body = json!({"model": "echo/one", "stream": true, "messages": [{"role": "user", "content": "crash-stream"}]});
    let text = proxy.post_text("/v1/chat/completions", &body).await;
    let data = sse_data(&text);
    assert_eq!(reassemble(&data), "echo: ", "{text}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "script_error", "{text}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stream_event"),
        "{last}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    // The key was not blamed, and the next stream works.
    let fine = json!({"model": "echo/one", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let text = proxy.post_text("/v1/chat/completions", &fine).await;
    assert_eq!(reassemble(&sse_data(&text)), "echo: hi", "{text}");
}

#[tokio::test]
async fn misbehaving_scripts_fail_their_request_cleanly_and_the_next_one_works() {
    let mock = made_up_upstream().await;
    let proxy = Proxy::start(echo_setup(&mock)).await;
    let cases = [
        ("loop", "operation limit"),
        ("huge", "it built more than 64 MiB (scripts.memory)"),
        ("import", "cannot import"),
        ("crash", "line"),
    ];
    for (i, (trigger, expected)) in cases.iter().enumerate() {
        let (status, _, body) = proxy.chat("echo/one", trigger).await;
        assert_eq!(status, 502, "{trigger}: {body}");
        assert_eq!(error_code(&body), "script_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("echo.rhai")
                && message.contains("request")
                && message.contains(expected),
            "{trigger}: {message}"
        );
        assert!(message.contains("line"), "{trigger}: {message}");
        let (status, _, body) = proxy.chat("echo/one", "fine").await;
        assert_eq!(status, 200, "after {trigger}: {body}");
        let (_, _, providers) = send(proxy.get("/v1/providers")).await;
        let echo = providers["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "echo")
            .unwrap()
            .clone();
        assert_eq!(echo["script_errors"], i as u64 + 1);
    }
    assert_eq!(
        mock.seen().len(),
        cases.len(),
        "failed scripts never reached the upstream"
    );
}

#[tokio::test]
async fn the_scripts_classifier_is_consulted_before_the_yaml_rules() {
    // The upstream says "slow down" with a 500; the script knows that means a rate limit for 30 s, while the
    // YAML rule (consulted only when the script returns ()) would call every 500 a server error.
    let mock = Mock::start(|seen, _| {
        if seen.key == key(1) {
            Reply::status(500, json!({"failure": "slow down please", "wait": 30}))
        } else {
            Reply::ok(json!({"output": "fine", "tokens": [1, 1]}))
        }
    })
    .await;
    let script = format!(
        "{ECHO_SCRIPT}\nfn classify(ctx) {{\n    if ctx.body.failure == \"slow down please\" {{ return #{{ class: \"rate_limit\", retry_after: ctx.body.wait }}; }}\n    ()\n}}\n"
    );
    let setup = Setup { env: mock_keys("ECHO", 2), ..Setup::empty() }
        .provider("echo", format!("base_url: {}\nscript: echo.rhai\nselection: sequential\nerrors: [{{status: 500, class: server}}]\n", mock.base_url))
        .plugin("echo.rhai", &script);
    let proxy = Proxy::start(setup).await;
    let (status, headers, body) = proxy.chat("echo/one", "hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "x-keyrelay-attempts"),
        "2",
        "rotated at once, not retried as a server error"
    );
    let status = proxy.key_status("echo").await;
    let (_, until, reason) = &status
        .iter()
        .find(|k| k.key == masked(1))
        .unwrap()
        .model_cooldowns[0];
    assert_eq!(reason.as_str(), "rate_limit");
    let left = until - keyrelay::clock::Clock::system().now();
    assert!(
        left > 27_000 && left <= 30_000,
        "cooling for the script's 30 s: {left} ms"
    );
}
