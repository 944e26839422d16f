//! Seeing it work: request logs, the console log, `/v1/keys`, `/metrics` and the dashboard, and that no key or
//! proxy key ever shows in any of them.

use crate::support::*;
use serde_json::{Value, json};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

/// A mock where key 1 is rate-limited for `retry_after` seconds (and echoes the key it refused, as some
/// upstreams do) and other keys answer, streaming when asked.
async fn one_limited_key(retry_after: &'static str) -> Mock {
    Mock::start(move |seen, _| {
        if seen.key == key(1) {
            return Reply::error(
                429,
                &format!("Rate limit reached for key {}", seen.key),
                "requests",
                "rate_limit_exceeded",
            )
            .with_header("retry-after", retry_after);
        }
        if seen.body["stream"] == json!(true) {
            return Reply::sse(
                chunks(seen.model(), &["streamed ", "answer"], true),
                End::Done,
            );
        }
        Reply::ok(completion(seen.model(), "served by the second key"))
    })
    .await
}

fn assert_no_secret(text: &str, what: &str) {
    for i in 1..=3 {
        assert!(
            !text.contains(&key(i)),
            "{what} contains a provider key: {text}"
        );
    }
    assert!(!text.contains(PROXY_KEY), "{what} contains the proxy key");
}

#[tokio::test]
async fn a_request_log_shows_both_attempts_of_a_rotation_and_no_secret() {
    let mock = one_limited_key("30").await;
    let config = "selection: sequential\nrequest_logging: {enabled: true}\n";
    let proxy = Proxy::start(Setup::one(&mock, 2).config(config)).await;
    let (status, _, body) = proxy.chat("mock/m", "hello").await;
    assert_eq!(status, 200, "{body}");
    let stream = json!({"model": "mock/m", "stream": true, "messages": [{"role": "user", "content": "stream please"}]});
    let text = proxy.post_text("/v1/chat/completions", &stream).await;
    assert!(text.ends_with("data: [DONE]\n\n"));

    let dir = proxy.dir.path().join("logs");
    let logs = request_logs(&dir, 2).await;
    let first = logs.iter().find(|l| l["stream"] == false).unwrap();
    assert_eq!(first["request"]["messages"][0]["content"], "hello");
    let attempts = first["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{first}");
    assert_eq!(
        (
            attempts[0]["key"].as_str().unwrap(),
            attempts[0]["status"].as_u64(),
            attempts[0]["class"].as_str()
        ),
        (masked(1).as_str(), Some(429), Some("rate_limit"))
    );
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("Rate limit reached for key ...0001"),
        "the echoed key is masked: {}",
        attempts[0]["error"]
    );
    assert_eq!(
        (
            attempts[1]["key"].as_str().unwrap(),
            attempts[1]["status"].as_u64()
        ),
        (masked(2).as_str(), Some(200))
    );
    assert_eq!(first["status"], 200);
    assert_eq!(
        first["response"]["choices"][0]["message"]["content"],
        "served by the second key"
    );
    assert_eq!(first["prompt_tokens"], 11);

    let streamed = logs.iter().find(|l| l["stream"] == true).unwrap();
    let transcript: String = streamed["response"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        transcript.contains("streamed ") && transcript.contains("answer"),
        "{streamed}"
    );
    assert_eq!(streamed["completion_tokens"], 2);

    for entry in std::fs::read_dir(&dir).unwrap() {
        assert_no_secret(
            &std::fs::read_to_string(entry.unwrap().path()).unwrap(),
            "a request log",
        );
    }
}

#[tokio::test]
async fn keys_and_metrics_show_a_cooldown_and_its_end() {
    let mock = one_limited_key("1").await;
    let proxy = Proxy::start(Setup::one(&mock, 2).config("selection: sequential\n")).await;
    assert_eq!(proxy.chat("mock/m", "hi").await.0, 200);

    let (status, _, keys) = send(proxy.get("/v1/keys")).await;
    assert_eq!(status, 200);
    assert_no_secret(&keys.to_string(), "/v1/keys");
    let mock_keys = &keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "mock")
        .unwrap()["keys"];
    let limited = mock_keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == masked(1))
        .unwrap();
    assert_eq!(limited["state"], "cooling");
    assert_eq!(limited["model_cooldowns"][0]["model"], "m");
    assert_eq!(limited["model_cooldowns"][0]["reason"], "rate_limit");
    assert_eq!(limited["model_cooldowns"][0]["seconds_left"], 1);
    assert_eq!(limited["last_error"]["class"], "rate_limit");
    assert_eq!(limited["streak"], 1);
    assert_eq!(
        (
            limited["today"]["requests"].as_u64(),
            limited["today"]["failures"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let serving = mock_keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == masked(2))
        .unwrap();
    assert_eq!(
        (
            serving["state"].as_str(),
            serving["today"]["successes"].as_u64()
        ),
        (Some("available"), Some(1))
    );

    let metrics = proxy.get_text("/metrics").await;
    assert_no_secret(&metrics, "/metrics");
    for line in [
        "keyrelay_keys{provider=\"mock\",state=\"cooling\"} 1",
        "keyrelay_keys{provider=\"mock\",state=\"available\"} 1",
        "keyrelay_cooldowns_started_total{provider=\"mock\",reason=\"rate_limit\"} 1",
        "keyrelay_requests_total{provider=\"mock\",model=\"m\",outcome=\"success\"} 1",
        "keyrelay_upstream_attempts_total{provider=\"mock\",result=\"rate_limit\"} 1",
        "keyrelay_upstream_attempts_total{provider=\"mock\",result=\"success\"} 1",
        "keyrelay_tokens_total{provider=\"mock\",kind=\"completion\"} 7",
        "keyrelay_config_generation 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    assert!(
        metrics.contains("keyrelay_proxy_overhead_seconds_count 1"),
        "{metrics}"
    );

    // Its second of cooldown over, the key is available again.
    let limited = eventually_some("the cooldown's end", || async {
        let (_, _, keys) = send(proxy.get("/v1/keys")).await;
        let limited = keys["data"][0]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key"] == masked(1))
            .unwrap()
            .clone();
        (limited["state"] != "cooling").then_some(limited)
    })
    .await;
    assert_eq!(limited["state"], "available", "{limited}");
    let metrics = proxy.get_text("/metrics").await;
    assert!(
        metrics.contains("keyrelay_keys{provider=\"mock\",state=\"cooling\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyrelay_keys{provider=\"mock\",state=\"available\"} 2"),
        "{metrics}"
    );

    let (status, _, _) = send(proxy.client.get(format!("{}/metrics", proxy.url))).await;
    assert_eq!(status, 401, "metrics need the proxy key like the API");
}

#[tokio::test]
async fn the_console_log_has_one_line_per_request_and_no_secret() {
    let mock = one_limited_key("30").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("providers")).unwrap();
    std::fs::write(
        dir.path().join("providers/mock.yaml"),
        provider_yaml(&mock.base_url, "selection: sequential\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "PROXY_API_KEY={PROXY_KEY}\nMOCK_API_KEY_1={}\nMOCK_API_KEY_2={}\n",
            key(1),
            key(2)
        ),
    )
    .unwrap();
    for format in ["text", "json"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyrelay"))
            .current_dir(dir.path())
            .env_clear()
            .env("RUST_LOG", "keyrelay=debug")
            .args([
                "--port",
                "0",
                "--enable-request-logging",
                "--log-format",
                format,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut banner = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            banner.push(byte[0]);
        }
        let banner = String::from_utf8(banner).unwrap();
        // `--log-format json` writes the banner as JSON too.
        let url = banner
            .split("listening on ")
            .nth(1)
            .unwrap()
            .trim_end_matches("\"}")
            .to_string();
        let client = http_client();
        let chat = |token: &'static str, model: &str| {
            client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(token)
                .json_body(
                    &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
                )
                .send()
        };
        assert_eq!(chat(PROXY_KEY, "mock/m").await.unwrap().status(), 200);
        assert_eq!(chat("wrong", "mock/m").await.unwrap().status(), 401);
        // A client's model name cannot put an escape sequence on the operator's terminal.
        let sneaky = chat(PROXY_KEY, "nope\u{1b}[2J/m").await.unwrap();
        assert_eq!(sneaky.status(), 400, "refused at the edge");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        let all = format!(
            "{banner}\n{rest}{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_no_secret(&all, "the console output");
        assert!(
            all.contains("[2J") && !all.contains('\u{1b}'),
            "the model name is logged, its escape character escaped:\n{all}"
        );
        let served: Vec<&str> = all.lines().filter(|l| l.contains("served")).collect();
        assert_eq!(served.len(), 1, "one line per request:\n{all}");
        assert!(
            served[0].contains("mock/m")
                && served[0].contains(&masked(2))
                && served[0].contains("200"),
            "{}",
            served[0]
        );
        if format == "json" {
            let line: Value =
                serde_json::from_str(served[0]).unwrap_or_else(|e| panic!("{e}: {}", served[0]));
            // Key 1's cooldown from the first run survived the restart (usage file): one attempt this time.
            assert_eq!(line["attempts"], 1);
            assert_eq!(line["key"], masked(2));
            assert_eq!(line["status"], 200);
        }
    }
    for entry in std::fs::read_dir(dir.path().join("logs")).unwrap() {
        assert_no_secret(
            &std::fs::read_to_string(entry.unwrap().path()).unwrap(),
            "a request log",
        );
    }
    assert_no_secret(
        &std::fs::read_to_string(dir.path().join("key_usage.json")).unwrap(),
        "the usage file",
    );
}

/// Debian's Chromium, where installed (`.ci/run` installs it).
fn chromium() -> Option<String> {
    std::env::var("CHROMIUM")
        .ok()
        .into_iter()
        .chain(
            [
                "/usr/bin/chromium",
                "/usr/bin/chromium-browser",
                "/usr/bin/google-chrome",
            ]
            .map(String::from),
        )
        .find(|p| Path::new(p).exists())
}

#[tokio::test]
#[ignore = "needs chromium; .ci/run installs it"]
async fn the_dashboard_shows_keys_states_and_cooldowns_in_a_real_browser() {
    let browser = chromium().expect(
        "this test drives headless Chromium and none was found: run .ci/run (which installs it), or \
         apt-get install chromium, or set CHROMIUM to a Chromium or Chrome binary",
    );
    let mock = one_limited_key("600").await;
    let proxy = Proxy::start(Setup::one(&mock, 3).config("selection: sequential\n")).await;
    assert_eq!(proxy.chat("mock/m", "hi").await.0, 200);
    let (status, headers, page) = send(proxy.client.get(format!("{}/dashboard", proxy.url))).await;
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").starts_with("text/html"));
    let page = page.as_str().unwrap().to_string();
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "self-contained: no external assets"
    );

    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/dashboard#key={PROXY_KEY}", proxy.url);
    let args = vec![
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-quic".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        format!("--user-data-dir={}", profile.path().display()),
        "--virtual-time-budget=10000".into(),
        "--dump-dom".into(),
        url,
    ];
    let output =
        tokio::task::spawn_blocking(move || Command::new(browser).args(args).output().unwrap())
            .await
            .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        dom.contains("data-provider=\"mock\""),
        "the provider is shown:\n{dom}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for i in 1..=3 {
        assert!(
            dom.contains(&format!("data-key=\"{}\"", masked(i))),
            "key {i} is shown"
        );
    }
    assert!(
        dom.contains("class=\"state cooling\""),
        "the rate-limited key shows as cooling"
    );
    assert!(
        dom.contains("rate_limit, 9m") || dom.contains("rate_limit, 10m"),
        "with a countdown"
    );
    assert!(dom.contains("class=\"state available\""));
    assert!(dom.contains("configuration generation 1"));
    assert!(
        !dom.contains(PROXY_KEY),
        "the proxy key is not left in the page"
    );
}
