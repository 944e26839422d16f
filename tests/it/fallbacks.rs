//! Model fallbacks: from config.yaml and per request, a separate list for context-window errors, content
//! filters answered unless configured, and the answering model reported.

use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;

/// A primary provider `main` whose upstream fails with `failure`, and a `backup` provider that answers.
async fn pair(
    failure: impl Fn() -> Reply + Send + Sync + 'static,
    config: &str,
) -> (Proxy, Mock, Mock) {
    let main = Mock::start(move |_, _| failure()).await;
    let backup = Mock::echo("from the backup").await;
    let setup = Setup { env: mock_keys("MAIN", 2), ..Setup::empty() }
        .provider("main", provider_yaml(&main.base_url, "errors:\n  - {status: 400, body: context_length_exceeded, class: context_window}\n  - {status: 400, body: content_policy, class: content_filter}\n"))
        .provider("backup", provider_yaml(&backup.base_url, ""))
        .env("BACKUP_API_KEY", &key(3))
        .config(config);
    (Proxy::start(setup).await, main, backup)
}

fn rate_limited() -> Reply {
    Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
        .with_header("retry-after", "60")
}

#[tokio::test]
async fn a_model_whose_keys_all_cool_falls_back_to_the_configured_model() {
    let (proxy, main, backup) =
        pair(rate_limited, "fallbacks:\n  main/big: [backup/small]\n").await;
    let (status, headers, body) = proxy.chat("main/big", "hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "from the backup");
    assert_eq!(body["model"], "small", "the model that actually answered");
    assert_eq!(body["usage"]["total_tokens"], 18, "that attempt's usage");
    assert_eq!(header(&headers, "x-keyrelay-fallback"), "backup/small");
    assert_eq!(header(&headers, "x-keyrelay-provider"), "backup");
    assert_eq!(
        header(&headers, "x-keyrelay-attempts"),
        "3",
        "two keys of main, then backup"
    );
    assert_eq!(main.chats().len(), 2);
    assert_eq!(backup.chats()[0].model(), "small");
    // A model without fallbacks is not rerouted.
    let (status, headers, _) = proxy.chat("main/other", "hi").await;
    assert_eq!(status, 429);
    assert!(header(&headers, "x-keyrelay-fallback").is_empty());
}

#[tokio::test]
async fn fallbacks_in_the_body_are_used_and_not_forwarded() {
    let (proxy, _, backup) = pair(
        || Reply::error(503, "overloaded", "server_error", ""),
        "retries: {backoff: 5ms}\n",
    )
    .await;
    let body = json!({"model": "main/big", "fallbacks": ["nobody/x", "backup/small"], "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, reply) = send(proxy.post("/v1/chat/completions", &body)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        header(&headers, "x-keyrelay-fallback"),
        "backup/small",
        "an unknown fallback is skipped"
    );
    assert!(
        backup.chats()[0].body.get("fallbacks").is_none(),
        "the field is consumed"
    );
}

#[tokio::test]
async fn context_window_errors_use_their_own_list() {
    let context = || {
        Reply::error(
            400,
            "This model's maximum context length is 8192 tokens",
            "invalid_request_error",
            "context_length_exceeded",
        )
    };
    let config =
        "fallbacks:\n  main/big: [main/other]\ncontext_fallbacks:\n  main/big: [backup/long]\n";
    let (proxy, main, backup) = pair(context, config).await;
    let (status, headers, body) = proxy.chat("main/big", "a very long prompt").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-keyrelay-fallback"), "backup/long");
    assert_eq!(
        main.chats().len(),
        1,
        "a context error is not retried or rotated on main"
    );
    assert_eq!(backup.chats().len(), 1);
    // Without a context list, the client gets the upstream's error, not the general fallbacks.
    let (proxy, _, backup) = pair(context, "fallbacks:\n  main/big: [backup/small]\n").await;
    let (status, _, body) = proxy.chat("main/big", "long").await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&body), "context_length_exceeded");
    assert!(backup.chats().is_empty());
}

#[tokio::test]
async fn a_content_filter_is_answered_unless_configured() {
    let filtered = || {
        Reply::error(
            400,
            "Your request was rejected by our content_policy",
            "invalid_request_error",
            "content_policy_violation",
        )
    };
    let (proxy, _, backup) = pair(filtered, "fallbacks:\n  main/big: [backup/small]\n").await;
    let (status, _, body) = proxy.chat("main/big", "hi").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        error_code(&body),
        "content_policy_violation",
        "the upstream's own error"
    );
    assert!(backup.chats().is_empty(), "not routed around by default");
    let (proxy, _, backup) = pair(
        filtered,
        "fallbacks:\n  main/big: [backup/small]\nfallback_on_content_filter: true\n",
    )
    .await;
    assert_eq!(proxy.chat("main/big", "hi").await.0, 200);
    assert_eq!(backup.chats().len(), 1);
}

#[tokio::test]
async fn a_silent_model_costs_only_its_share_of_the_deadline() {
    let (proxy, _, _) = pair(
        || Reply::Hang,
        "request_timeout: 4s\nfallbacks:\n  main/big: [backup/small]\n",
    )
    .await;
    let started = tokio::time::Instant::now();
    let body = json!({"model": "main/big", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let response = proxy
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(response.headers(), "x-keyrelay-fallback"),
        "backup/small"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(4),
        "half of 4 s for main: {elapsed:?}"
    );
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(reassemble(&data), "from the backup");
}

#[test]
fn a_fallback_to_an_unknown_provider_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "fallbacks:\n  nobody/x: [also-nobody/y]\n",
    )
    .unwrap();
    let opts = keyrelay::snapshot::LoadOptions {
        config: dir.path().join("config.yaml"),
        config_required: true,
        env_file: dir.path().join(".env"),
        host: None,
        port: None,
        request_logging: false,
    };
    let errors = keyrelay::Snapshot::load(&opts).unwrap_err().to_string();
    assert!(
        errors.contains("fallback \"nobody/x\" names no configured provider"),
        "{errors}"
    );
    assert!(errors.contains("also-nobody/y"), "{errors}");
    let _: Value = json!(null);
}
