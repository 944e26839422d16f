//! Browsers: CORS for web chat interfaces with a proxy key, and the guards of a proxy without one (other web
//! pages must not spend the pool through localhost).

use crate::support::*;
use reqwest::Method;
use serde_json::{Value, json};

const ORIGIN: &str = "https://chat.example";

fn preflight(url: &str, origin: &str) -> reqwest::RequestBuilder {
    http_client()
        .request(Method::OPTIONS, format!("{url}/v1/chat/completions"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
}

fn chat_body() -> Value {
    json!({"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn with_a_proxy_key_any_origin_may_call_and_preflights_are_answered() {
    let mock = Mock::echo("from the pool").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;

    let answer = preflight(&proxy.url, ORIGIN).send().await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    let h = answer.headers();
    assert_eq!(header(h, "access-control-allow-origin"), ORIGIN);
    assert!(
        header(h, "access-control-allow-headers").contains("authorization"),
        "the bearer key may be sent: {h:?}"
    );
    assert!(header(h, "access-control-allow-methods").contains("POST"));
    assert!(
        h.get("access-control-allow-credentials").is_none(),
        "no cookies: the key is a bearer token"
    );
    assert!(
        mock.chats().is_empty(),
        "a preflight never reaches upstream"
    );

    let answer = proxy
        .post("/v1/chat/completions", &chat_body())
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let h = answer.headers().clone();
    assert_eq!(header(&h, "access-control-allow-origin"), ORIGIN);
    assert_eq!(
        header(&h, "access-control-expose-headers"),
        "*",
        "pages may read x-keyrelay-* and x-upstream-* (no credentials, so the wildcard holds)"
    );
    assert!(h.get("x-keyrelay-key").is_some());
    let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "from the pool");

    // The key is still required: CORS opens the door to pages, not to requests without the key.
    let anonymous = http_client()
        .post(format!("{}/v1/chat/completions", proxy.url))
        .header("origin", ORIGIN)
        .header("content-type", "application/json")
        .body(chat_body().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn configured_origins_are_the_only_ones_allowed() {
    let mock = Mock::echo("ok").await;
    let config = "cors: {origins: [\"https://a.example\"]}\n";
    let proxy = Proxy::start(Setup::one(&mock, 1).config(config)).await;
    let allowed = preflight(&proxy.url, "https://a.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(allowed.headers(), "access-control-allow-origin"),
        "https://a.example"
    );
    let other = preflight(&proxy.url, "https://b.example")
        .send()
        .await
        .unwrap();
    assert!(
        other.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        other.headers()
    );
}

#[test]
fn an_origin_that_is_not_one_is_refused_at_load() {
    let mock_dir = tempfile::tempdir().unwrap();
    write(
        mock_dir.path(),
        "config.yaml",
        "cors: {origins: [\"https://a.example/path\"]}\n",
    );
    let (passed, text) = check(mock_dir.path());
    assert!(!passed, "{text}");
    assert!(text.contains("cors.origins"), "{text}");
}

/// A directory with provider `mock` and its key, and no proxy key.
fn keyless_dir(mock: &Mock, config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", config);
    write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(&mock.base_url, ""),
    );
    write(dir.path(), ".env", &format!("MOCK_API_KEY_1={}\n", key(1)));
    dir
}

async fn post(url: &str, headers: &[(&str, &str)], body: String) -> (u16, Value) {
    let mut request = http_client()
        .post(format!("{url}/v1/chat/completions"))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    let text = answer.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn without_a_proxy_key_other_pages_cannot_spend_the_pool() {
    let mock = Mock::echo("local").await;
    let dir = keyless_dir(&mock, "");
    let served = start(dir.path(), &[], None);
    let url = served.url.clone();
    let json = ("content-type", "application/json");
    let body = chat_body().to_string();

    // A local client (no browser headers) is served.
    let (status, answer) = post(&url, &[json], body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    // keyrelay's own pages (the dashboard) may call it.
    let own = url.clone();
    let (status, _) = post(&url, &[json, ("origin", &own)], body.clone()).await;
    assert_eq!(status, 200);

    // Another page, by CORS request or by a form that needs no preflight.
    let (status, answer) = post(&url, &[json, ("origin", ORIGIN)], body.clone()).await;
    assert_eq!(
        (status, error_code(&answer)),
        (403, "origin_not_allowed".into())
    );
    let (status, answer) = post(&url, &[("content-type", "text/plain")], body.clone()).await;
    assert_eq!(
        (status, error_code(&answer)),
        (415, "unsupported_media_type".into())
    );
    // DNS rebinding: the page's own name, resolved to 127.0.0.1.
    let port = url.rsplit(':').next().unwrap();
    let rebound = format!("evil.example:{port}");
    let (status, answer) = post(&url, &[json, ("host", &rebound)], body.clone()).await;
    assert_eq!(
        (status, error_code(&answer)),
        (403, "host_not_allowed".into())
    );
    let answer = preflight(&url, ORIGIN).send().await.unwrap();
    assert!(
        answer
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    assert_eq!(
        mock.chats().len(),
        2,
        "only the two allowed requests went upstream"
    );
}

#[tokio::test]
async fn without_a_proxy_key_configured_origins_may_call() {
    let mock = Mock::echo("local").await;
    let dir = keyless_dir(&mock, "cors: {origins: [\"http://localhost:3000\"]}\n");
    let served = start(dir.path(), &[], None);
    let (status, answer) = post(
        &served.url,
        &[
            ("content-type", "application/json"),
            ("origin", "http://localhost:3000"),
        ],
        chat_body().to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let answer = preflight(&served.url, "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(answer.headers(), "access-control-allow-origin"),
        "http://localhost:3000"
    );
}

#[tokio::test]
async fn without_a_proxy_key_every_origin_cannot_be_allowed() {
    let mock = Mock::echo("local").await;
    let dir = keyless_dir(&mock, "cors: {origins: [\"*\"]}\n");
    let (passed, text) = check(dir.path());
    assert!(!passed, "{text}");
    assert!(
        text.contains("cors.origins") && text.contains("PROXY_API_KEY"),
        "{text}"
    );
}
