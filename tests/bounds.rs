//! Everything an upstream or a script hands keyrelay is bounded: bodies, model lists, script memory and time, and
//! slow work never runs where it could stall other requests.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

#[tokio::test]
async fn an_endless_upstream_body_is_cut_at_max_response_size_and_the_process_stays_small() {
    let base = endless_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", "max_response_size: 8MiB\n");
    write(
        dir.path(),
        "providers/endless.yaml",
        &format!("base_url: {base}\nmodels: {{list: static, static: [m]}}\n"),
    );
    write(
        dir.path(),
        ".env",
        &format!("PROXY_API_KEY={PROXY_KEY}\nENDLESS_API_KEY_1={}\n", key(1)),
    );
    let server = start(dir.path(), &[], None);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let body = json!({"model": "endless/m", "messages": [{"role": "user", "content": "hi"}]});
    let asks = (0..4).map(|_| {
        client
            .post(format!("{}/v1/chat/completions", server.url))
            .bearer_auth(PROXY_KEY)
            .json_body(&body)
            .send()
    });
    for response in futures_util::future::join_all(asks).await {
        let response = response.expect("answered, not read forever");
        assert_eq!(response.status(), 502);
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(error_code(&body), "upstream_response_too_large");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_response_size"),
            "{body}"
        );
    }
    let rss = rss(server.pid());
    assert!(rss < 200 << 20, "RSS {} MB", rss >> 20);
    // Still serving.
    let (status, _, _) = send(client.get(format!("{}/", server.url))).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_model_list_that_hangs_or_never_ends_is_remembered_as_failed() {
    let hanging = Mock::start(|_, _| Reply::Hang).await;
    let endless = endless_upstream().await;
    let setup = Setup {
        env: [mock_keys("HANG", 1), mock_keys("ENDLESS", 1)].concat(),
        ..Setup::empty()
    }
    .provider("hang", provider_yaml(&hanging.base_url, ""))
    .provider("endless", provider_yaml(&endless, ""))
    .config("max_response_size: 1MiB\n");
    let proxy = Proxy::start(setup).await;
    let list = |proxy: &Proxy| {
        let request = proxy.get("/v1/models").timeout(Duration::from_secs(8));
        async move {
            let (status, _, body) = send(request).await;
            assert_eq!(status, 200);
            let mut ids: Vec<String> = body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            ids
        }
    };
    // The first listing waits for the upstreams a little, then serves the static models.
    assert_eq!(
        list(&proxy).await,
        ["endless/static-model", "hang/static-model"]
    );
    // Later listings do not wait again.
    for _ in 0..3 {
        let quick = tokio::time::timeout(Duration::from_secs(1), list(&proxy)).await;
        assert_eq!(
            quick.expect("no wait on a list known to fail"),
            ["endless/static-model", "hang/static-model"]
        );
    }
}
