//! The official OpenAI Python SDK against a real keyrelay: chat, streaming, embeddings, models, and the
//! exception types for 401, 404 and 429. Fails, saying what to install, where Python or the `openai` package
//! is missing; `.ci/run` installs it.

mod support;

use std::process::Command;
use support::*;

fn python_with_openai() -> Option<&'static str> {
    ["python3", "python"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test]
async fn the_openai_python_sdk_works_against_keyrelay() {
    let python = python_with_openai().expect(
        "this test drives the official OpenAI Python SDK and python3 with the openai package was not found: \
         run .ci/run (which installs it), or pip install openai",
    );
    let mock = Mock::echo("Hello from the SDK test").await;
    let limited = Mock::start(|_, _| {
        Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
            .with_header("retry-after", "120")
    })
    .await;
    let setup = Setup::one(&mock, 2)
        .provider("limited", provider_yaml(&limited.base_url, ""))
        .env("LIMITED_API_KEY", &key(3))
        .config("request_timeout: 3s\n");
    let proxy = Proxy::start(setup).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk.py");
    let url = format!("{}/v1", proxy.url);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("KEYRELAY_URL", url)
            .env("KEYRELAY_KEY", PROXY_KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
