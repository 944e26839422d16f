//! Everything an upstream or a script hands keyrelay is bounded: bodies, model lists, script memory and time, and
//! slow work never runs where it could stall other requests.

use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;

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

/// A provider whose script misbehaves on command (the last message says how), within budgets of its own.
fn greedy(mock: &Mock) -> Setup {
    const SCRIPT: &str = r#"
fn request(ctx) {
    let last = ctx.body.messages[ctx.body.messages.len() - 1].content;
    if last == "map" {
        let s = "x"; for i in 0..20 { s += s; }
        let m = #{};
        for i in 0..5000 { m[`k${i}`] = s; }
        return #{ path: "/chat/completions", body: m };
    }
    if last == "vars" {
        let s = "x"; for i in 0..25 { s += s; }
        let kept = [];
        for i in 0..50 { kept.push(s + i); }
        return #{ path: "/chat/completions", body: #{ n: kept.len() } };
    }
    if last == "pad" {
        let s = "x";
        s.pad(2_000_000_000, 'y');
        return #{ path: "/chat/completions", body: #{ s: s } };
    }
    if last == "blob" {
        let b = blob(2_000_000_000);
        return #{ path: "/chat/completions", body: #{ n: b.len() } };
    }
    if last == "slow" {
        let s = "x"; for i in 0..23 { s += s; }
        loop { let t = s + "y"; }
    }
    #{ path: "/chat/completions", body: #{ model: ctx.model, messages: ctx.body.messages } }
}

fn response(ctx) { ctx.body }
"#;
    Setup {
        env: mock_keys("GREEDY", 1),
        ..Setup::empty()
    }
    .provider(
        "greedy",
        format!(
            "base_url: {}\nscript: greedy.rhai\nmodels: {{list: static, static: [m]}}\nscripts: {{time: 2s}}\n",
            mock.base_url
        ),
    )
    .plugin("greedy.rhai", SCRIPT)
}

#[tokio::test]
async fn a_script_over_its_memory_or_time_budget_fails_its_request_and_the_next_one_works() {
    let mock = Mock::echo("fine").await;
    let proxy = Proxy::start(greedy(&mock)).await;
    for (trigger, reason) in [
        ("map", None),
        ("vars", Some("it built more than 64 MiB (scripts.memory)")),
        (
            "pad",
            Some("pad would be larger than the script's memory budget"),
        ),
        (
            "blob",
            Some("blob would be larger than the script's memory budget"),
        ),
        ("slow", Some("it ran longer than 2s (scripts.time)")),
    ] {
        let (status, _, body) = proxy.chat("greedy/m", trigger).await;
        assert_eq!(status, 502, "{trigger}: {body}");
        assert_eq!(error_code(&body), "script_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("greedy.rhai") && message.contains("failed in request"),
            "{trigger}: {message}"
        );
        if let Some(reason) = reason {
            assert!(message.contains(reason), "{trigger}: {message}");
        }
        let (status, _, body) = proxy.chat("greedy/m", "hello").await;
        assert_eq!(status, 200, "after {trigger}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "fine");
    }
    assert!(mock.chats().iter().all(|s| s.body["n"].is_null()));
}

/// The longest of several `GET /` round trips made while `busy` runs.
async fn liveness_while<F: std::future::Future>(proxy: &Proxy, busy: F) -> Duration {
    let probe = async {
        // The busy requests show nothing to wait for once under way: they get a head start.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut worst = Duration::ZERO;
        for _ in 0..8 {
            let started = std::time::Instant::now();
            let (status, _, _) = send(proxy.get("/")).await;
            assert_eq!(status, 200);
            worst = worst.max(started.elapsed());
            // The probes are spread over the busy time.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worst
    };
    let (worst, _) = tokio::join!(probe, busy);
    worst
}

#[tokio::test]
async fn liveness_answers_at_once_while_two_maximal_scripts_run() {
    let mock = Mock::echo("fine").await;
    let proxy = Proxy::start(greedy(&mock)).await;
    let slow = futures_util::future::join(
        proxy.chat("greedy/m", "slow"),
        proxy.chat("greedy/m", "slow"),
    );
    let worst = liveness_while(&proxy, slow).await;
    assert!(worst < Duration::from_millis(50), "GET / took {worst:?}");
}

#[tokio::test]
async fn large_token_counts_do_not_hold_up_other_requests() {
    let mock = Mock::echo("fine").await;
    // The real binary, so that the test's own client work (uploading the bodies) never slows the server down.
    let dir = mock_dir(&mock, "");
    let server = start(dir.path(), &[], None);
    let client = http_client();
    // About 11 MB of text each: counting one takes a good part of a second.
    let text = "lorem ipsum dolor sit amet, consectetur adipiscing elit ".repeat(200_000);
    let payload =
        json!({"model": "mock/m", "messages": [{"role": "user", "content": text}]}).to_string();
    let count = || {
        let request = client
            .post(format!("{}/v1/token-count", server.url))
            .bearer_auth(PROXY_KEY)
            .header("content-type", "application/json")
            .body(payload.clone());
        async move {
            let (status, _, body) = send(request).await;
            assert_eq!(status, 200, "{body}");
            assert!(body["token_count"].as_u64().unwrap() > 1_000_000, "{body}");
        }
    };
    let counts = futures_util::future::join_all((0..4).map(|_| count()));
    let probe = async {
        // The counts show nothing to wait for once under way: they get a head start, and their uploads (on this
        // test's own thread) are over before the first probe is timed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut worst = Duration::ZERO;
        for _ in 0..8 {
            let started = std::time::Instant::now();
            let (status, _, _) = send(client.get(format!("{}/", server.url))).await;
            assert_eq!(status, 200);
            worst = worst.max(started.elapsed());
            // The probes are spread over the counting time.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worst
    };
    let (worst, _) = tokio::join!(probe, counts);
    assert!(worst < Duration::from_millis(50), "GET / took {worst:?}");
}

#[tokio::test]
async fn fallback_lists_are_capped_and_must_name_models() {
    let mock = Mock::echo("fine").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let ask = |fallbacks: Value| json!({"model": "mock/m", "fallbacks": fallbacks, "messages": [{"role": "user", "content": "hi"}]});
    let many: Vec<String> = (0..17).map(|i| format!("mock/f{i}")).collect();
    for fallbacks in [json!(many), json!(["mock/a", 7]), json!("mock/a")] {
        let (status, _, body) = send(proxy.post("/v1/chat/completions", &ask(fallbacks))).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error_code(&body), "invalid_request");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("at most 16 model names"),
            "{body}"
        );
    }
    assert!(mock.chats().is_empty());
    let sixteen: Vec<String> = (0..16).map(|i| format!("mock/f{i}")).collect();
    let (status, _, _) = send(proxy.post("/v1/chat/completions", &ask(json!(sixteen)))).await;
    assert_eq!(status, 200);
}
