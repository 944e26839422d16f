//! Operator controls over HTTP: ending a key's cooldowns, and taking a key out of rotation by hand (kept across
//! restarts).

use crate::support::*;
use serde_json::{Value, json};

/// The id `/v1/keys` shows for the key masked as `masked`.
async fn key_id(proxy: &Proxy, masked: &str) -> String {
    let keys: Value = serde_json::from_str(&proxy.get_text("/v1/keys").await).unwrap();
    keys["data"][0]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == masked)
        .map(|k| k["id"].as_str().unwrap().to_string())
        .unwrap()
}

async fn act(proxy: &Proxy, id: &str, action: &str, body: Option<Value>) -> (u16, Value) {
    let request = match body {
        Some(body) => proxy.post(&format!("/v1/keys/{id}/{action}"), &body),
        None => http_client()
            .post(format!("{}/v1/keys/{id}/{action}", proxy.url))
            .bearer_auth(PROXY_KEY),
    };
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    (
        status,
        serde_json::from_str(&answer.text().await.unwrap()).unwrap(),
    )
}

fn keys_used(mock: &Mock) -> Vec<String> {
    mock.chats().iter().map(|s| s.key.clone()).collect()
}

#[tokio::test]
async fn a_disabled_key_serves_nothing_until_enabled_even_after_a_restart() {
    let mock = Mock::echo("ok").await;
    let proxy = Proxy::start(Setup::one(&mock, 2)).await;
    let id = key_id(&proxy, &masked(1)).await;
    let (status, answer) = act(&proxy, &id, "disable", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["key"]["state"], "disabled");
    assert_eq!(answer["key"]["key"], masked(1));
    for _ in 0..4 {
        let (status, headers, _) = proxy.chat("mock/m", "hi").await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-keyrelay-key"), masked(2));
    }
    assert!(keys_used(&mock).iter().all(|k| *k == key(2)));

    // Kept in the usage file: still disabled after a restart.
    let dir = proxy.stop().await;
    let proxy = Proxy::start_in(Setup::one(&mock, 2), dir).await;
    let keys: Value = serde_json::from_str(&proxy.get_text("/v1/keys").await).unwrap();
    let first = &keys["data"][0]["keys"][0];
    assert_eq!(
        (first["key"].clone(), first["disabled"].clone()),
        (json!(masked(1)), json!(true))
    );
    let (status, _, _) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status, 200);
    assert!(keys_used(&mock).iter().all(|k| *k == key(2)));

    let (status, answer) = act(&proxy, &id, "enable", None).await;
    assert_eq!(
        (status, answer["key"]["state"].clone()),
        (200, json!("available"))
    );
    // The enabled key has served fewer requests today: it is chosen next.
    let (_, headers, _) = proxy.chat("mock/m", "hi").await;
    assert_eq!(header(&headers, "x-keyrelay-key"), masked(1));
}

#[tokio::test]
async fn a_reset_ends_a_keys_cooldowns_for_one_model_or_all() {
    let cooling = key(1);
    let cooling_in_mock = cooling.clone();
    // The first key is rate-limited while clients say "cool".
    let mock = Mock::start(move |seen, _| {
        if seen.key == cooling_in_mock && seen.body["messages"][0]["content"] == "cool" {
            Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
                .with_header("retry-after", "600")
        } else {
            Reply::ok(completion(seen.model(), "ok"))
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 2)).await;
    let id = key_id(&proxy, &masked(1)).await;
    // Balanced selection tries the first key for each model until it cools.
    for model in ["mock/m", "mock/n"] {
        let mut cooled = false;
        for _ in 0..4 {
            let (status, _, _) = proxy.chat(model, "cool").await;
            assert_eq!(status, 200);
            let status = proxy.key_status("mock").await;
            let name = model.trim_start_matches("mock/");
            cooled = status[0].model_cooldowns.iter().any(|(m, _, _)| m == name);
            if cooled {
                break;
            }
        }
        assert!(cooled, "{model} cools on the first key");
    }

    let (status, answer) = act(&proxy, &id, "reset", Some(json!({"model": "never-used"}))).await;
    assert_eq!((status, error_code(&answer)), (404, "unknown_model".into()));
    let (status, answer) = act(&proxy, &id, "reset", Some(json!({"model": "mock/m"}))).await;
    assert_eq!(status, 200, "{answer}");
    let models: Vec<&str> = answer["key"]["model_cooldowns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["n"], "only m's cooldown ended");
    let (status, answer) = act(&proxy, &id, "reset", None).await;
    assert_eq!(status, 200);
    assert_eq!(answer["key"]["state"], "available");
    assert_eq!(answer["key"]["model_cooldowns"], json!([]));
    assert_eq!(answer["key"]["streak"], 0);
    let before = mock.chats().len();
    for _ in 0..4 {
        proxy.chat("mock/n", "hi").await;
    }
    assert!(
        mock.chats()[before..].iter().any(|s| s.key == cooling),
        "the reset key serves again"
    );
}

#[tokio::test]
async fn unknown_keys_actions_and_bodies_get_clear_errors() {
    let mock = Mock::echo("ok").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let id = key_id(&proxy, &masked(1)).await;
    let (status, answer) = act(&proxy, "0000000000000000", "disable", None).await;
    assert_eq!((status, error_code(&answer)), (404, "unknown_key".into()));
    let (status, answer) = act(&proxy, &id, "delete", None).await;
    assert_eq!((status, error_code(&answer)), (404, "unknown_route".into()));
    let (status, answer) = act(&proxy, &id, "reset", Some(json!({"model": 5}))).await;
    assert_eq!(
        (status, error_code(&answer)),
        (400, "invalid_request".into())
    );
    let anonymous = http_client()
        .post(format!("{}/v1/keys/{id}/disable", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        anonymous.status(),
        401,
        "operator actions need the proxy key"
    );
}
