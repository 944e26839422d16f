//! Several keyrelay processes, one pool, through a real `redis-server`.

use crate::support::redis::Redis;
use crate::support::*;
use std::sync::Arc;
use std::time::Duration;

/// A keyrelay process in its own directory, sharing key state through `redis`.
fn instance(mock: &Mock, redis: &Redis, extra: &str) -> (tempfile::TempDir, binary::Served) {
    let config = format!(
        "store: {{redis: {{url: \"{}\"}}}}\nconcurrency: {{per_key_model: 1}}\n{extra}",
        redis.url()
    );
    configured(mock, &config)
}

/// A keyrelay process in its own directory, with `config` as its config.yaml.
fn configured(mock: &Mock, config: &str) -> (tempfile::TempDir, binary::Served) {
    let dir = binary::mock_dir(mock, config);
    let served = binary::start(dir.path(), &[], None);
    (dir, served)
}

async fn chat(url: &str) -> u16 {
    http_client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(PROXY_KEY)
        .header("content-type", "application/json")
        .body(r#"{"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]}"#)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn two_instances_hold_one_cap_and_count_one_usage() {
    let redis = Redis::start();
    let mock = Arc::new(
        Mock::start(|seen, _| {
            Reply::ok(completion(seen.model(), "ok")).delayed(Duration::from_millis(5))
        })
        .await,
    );
    let (_a_dir, a) = instance(&mock, &redis, "");
    let (_b_dir, b) = instance(&mock, &redis, "");
    let mut clients = Vec::new();
    for i in 0..64 {
        let url = if i % 2 == 0 {
            a.url.clone()
        } else {
            b.url.clone()
        };
        clients.push(tokio::spawn(async move { chat(&url).await }));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), 200);
    }
    assert_eq!(
        mock.max_in_flight(),
        1,
        "one request at a time on the one key, across both instances"
    );
    // Both report the pool's usage (settled in the background: looked at until it is all there).
    for served in [&a, &b] {
        assert_eq!(pool_requests(served, 64).await, 64);
    }
    let live: serde_json::Value = a.get_json("/").await;
    assert_eq!(live["store"], "redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_killed_instances_leases_free_themselves_within_the_lease_time() {
    let redis = Redis::start();
    // The first request hangs upstream; later ones answer.
    let mock = Arc::new(
        Mock::start(|seen, i| {
            if i == 0 {
                Reply::Hang
            } else {
                Reply::ok(completion(seen.model(), "ok"))
            }
        })
        .await,
    );
    let ttl = "store: {redis: {url: \"URL\", lease_ttl: 2s}}\nconcurrency: {per_key_model: 1}\n"
        .replace("URL", &redis.url());
    let dir_a = binary::mock_dir(&mock, &ttl);
    let dir_b = binary::mock_dir(&mock, &ttl);
    let mut a = binary::start(dir_a.path(), &[], None);
    let b = binary::start(dir_b.path(), &[], None);
    let a_url = a.url.clone();
    let _hanging = tokio::spawn(async move { chat(&a_url).await });
    eventually("A to hold the one key", || async {
        !mock.seen().is_empty()
    })
    .await;
    assert_eq!(mock.seen().len(), 1);
    a.child.kill().unwrap(); // SIGKILL: no release is ever sent
    a.child.wait().unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(
        chat(&b.url).await,
        200,
        "B gets the key once A's lease expired: {:?}",
        b.log()
    );
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "freed within the lease time: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_requests_per_minute_limit_holds_pool_wide() {
    let redis = Redis::start();
    let mock = Arc::new(Mock::echo("ok").await);
    let limited = "limits: {requests_per_minute: 3}\nrequest_timeout: 5s\n";
    let config = format!("store: {{redis: {{url: \"{}\"}}}}\n", redis.url());
    let make = || {
        let dir = binary::mock_dir(&mock, &config);
        binary::write(
            dir.path(),
            "providers/mock.yaml",
            &provider_yaml(&mock.base_url, limited.split('\n').next().unwrap()),
        );
        dir
    };
    let (dir_a, dir_b) = (make(), make());
    let a = binary::start(dir_a.path(), &[], None);
    let b = binary::start(dir_b.path(), &[], None);
    // Three requests per minute on the one key, wherever they arrive.
    let mut codes = Vec::new();
    for url in [&a.url, &b.url, &a.url, &b.url, &a.url] {
        codes.push(chat(url).await);
    }
    assert_eq!(
        codes,
        [200, 200, 200, 429, 429],
        "the fourth and fifth exceed the pool's minute"
    );
    assert_eq!(mock.chats().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn redis_stopped_and_restarted_under_load_costs_no_client_an_error() {
    let redis = Redis::start();
    let port = redis.port;
    let mock = Arc::new(
        Mock::start(|seen, _| {
            Reply::ok(completion(seen.model(), "ok")).delayed(Duration::from_millis(5))
        })
        .await,
    );
    let (_a_dir, a) = instance(&mock, &redis, "");
    let (_b_dir, b) = instance(&mock, &redis, "");
    let urls = [a.url.clone(), b.url.clone()];
    let load = |n: usize| {
        let urls = urls.clone();
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..n {
                codes.push(chat(&urls[i % 2]).await);
            }
            codes
        })
    };
    let before = load(40);
    eventually("the load to be under way", || async {
        mock.chats().len() >= 10
    })
    .await;
    drop(redis);
    let during = load(40);
    for served in [&a, &b] {
        eventually("both instances to find Redis gone", || async {
            served.get_json("/").await["store"] == "degraded"
        })
        .await;
    }
    let redis = Redis::start_on(port);
    let after = load(40);
    for codes in [
        before.await.unwrap(),
        during.await.unwrap(),
        after.await.unwrap(),
    ] {
        assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    }
    for served in [&a, &b] {
        eventually("both instances to rejoin Redis", || async {
            served.get_json("/").await["store"] == "redis"
        })
        .await;
    }
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn an_instance_started_while_redis_is_away_serves_and_joins_it_later() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mock = Arc::new(Mock::echo("ok").await);
    let config = format!("store: {{redis: {{url: \"redis://127.0.0.1:{port}\"}}}}\n");
    let dir = binary::mock_dir(&mock, &config);
    let a = binary::start(dir.path(), &[], None);
    let store = || async {
        let live: serde_json::Value = a.get_json("/").await;
        live["store"].as_str().unwrap_or("").to_string()
    };
    assert_eq!(store().await, "degraded");
    assert_eq!(chat(&a.url).await, 200);
    let _redis = Redis::start_on(port);
    eventually("the instance to join Redis", || async {
        store().await == "redis"
    })
    .await;
    assert_eq!(chat(&a.url).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_rate_limit_seen_by_one_instance_cools_the_key_for_the_other() {
    let redis = Redis::start();
    // Key 1 answers 429 (for a minute), key 2 serves.
    let mock = Arc::new(
        Mock::start(|seen, _| {
            if seen.key == key(1) {
                Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
                    .with_header("retry-after", "60")
            } else {
                Reply::ok(completion(seen.model(), "ok"))
            }
        })
        .await,
    );
    let config = format!(
        "store: {{redis: {{url: \"{}\"}}}}\nselection: sequential\n",
        redis.url()
    );
    let two_keys = |dir: &tempfile::TempDir| {
        let env = format!(
            "PROXY_API_KEY={PROXY_KEY}\nMOCK_API_KEY_1={}\nMOCK_API_KEY_2={}\n",
            key(1),
            key(2)
        );
        binary::write(dir.path(), ".env", &env);
    };
    let (dir_a, dir_b) = (
        binary::mock_dir(&mock, &config),
        binary::mock_dir(&mock, &config),
    );
    two_keys(&dir_a);
    two_keys(&dir_b);
    let a = binary::start(dir_a.path(), &[], None);
    let b = binary::start(dir_b.path(), &[], None);
    // A meets the 429 on key 1 (sequential selection starts there) and moves on to key 2.
    assert_eq!(chat(&a.url).await, 200);
    let tried_first = mock.chats().len();
    assert_eq!(tried_first, 2);
    eventually("B to see key 1 cooling", || async {
        let keys = b.get_json("/v1/keys").await;
        keys["data"][0]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["key"] == masked(1) && k["state"] == "cooling")
    })
    .await;
    // B, which never saw the 429, does not try key 1.
    assert_eq!(chat(&b.url).await, 200);
    let after = mock.chats();
    assert_eq!(after.len(), 3);
    assert_eq!(
        after[2].key,
        key(2),
        "the cooling key is left alone by the other instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_reload_on_one_instance_leaves_the_shared_state_alone() {
    let redis = Redis::start();
    let mock = Arc::new(Mock::echo("ok").await);
    let (a_dir, a) = instance(&mock, &redis, "");
    let (_b_dir, b) = instance(&mock, &redis, "");
    for url in [&a.url, &b.url, &a.url] {
        assert_eq!(chat(url).await, 200);
    }
    let requests =
        |keys: serde_json::Value| keys["data"][0]["keys"][0]["today"]["requests"].as_u64();
    assert_eq!(pool_requests(&b, 3).await, 3);
    // A's provider file changes: A reloads.
    let generation = a.get_json("/").await["config"]["generation"]
        .as_u64()
        .unwrap();
    binary::write(
        a_dir.path(),
        "providers/mock.yaml",
        &provider_yaml(
            &mock.base_url,
            "models:\n  static: [static-model, another]\n",
        )
        .replace("models:\n  list: both\n  static: [static-model]\n", ""),
    );
    eventually("A to reload", || async {
        a.get_json("/").await["config"]["generation"]
            .as_u64()
            .unwrap()
            > generation
    })
    .await;
    assert_eq!(
        requests(b.get_json("/v1/keys").await),
        Some(3),
        "the pool's usage is untouched"
    );
    assert_eq!(requests(a.get_json("/v1/keys").await), Some(3));
    assert_eq!(chat(&a.url).await, 200);
}

/// The pool's requests today on the one key, as `served` reports them, once `want` (settled in the background).
async fn pool_requests(served: &binary::Served, want: u64) -> u64 {
    eventually_some(&format!("{want} requests in the pool's usage"), || async {
        let keys: serde_json::Value = served.get_json("/v1/keys").await;
        let requests = keys["data"][0]["keys"][0]["today"]["requests"].as_u64();
        (requests == Some(want)).then_some(want)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn redis_over_tls_with_a_private_ca_and_over_a_unix_socket() {
    let mock = Mock::start(|seen, _| Reply::ok(completion(seen.model(), "ok"))).await;
    for redis in [Redis::start_tls(), Redis::start_unix()] {
        let ca = redis
            .ca_file()
            .map(|ca| format!(", ca_file: \"{}\"", ca.display()))
            .unwrap_or_default();
        let config = format!("store: {{redis: {{url: \"{}\"{ca}}}}}\n", redis.url());
        let (_a_dir, a) = configured(&mock, &config);
        let (_b_dir, b) = configured(&mock, &config);
        for served in [&a, &b, &a] {
            assert_eq!(chat(&served.url).await, 200, "{}", redis.url());
        }
        let live: serde_json::Value = b.get_json("/").await;
        assert_eq!(live["store"], "redis", "{}", redis.url());
        assert_eq!(pool_requests(&b, 3).await, 3, "{}", redis.url());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_tls_server_the_instance_cannot_verify_is_not_used() {
    let redis = Redis::start_tls();
    let mock = Mock::start(|seen, _| Reply::ok(completion(seen.model(), "ok"))).await;
    // No CA file: the certificate is not one the system trusts.
    let config = format!("store: {{redis: {{url: \"{}\"}}}}\n", redis.url());
    let (_dir, served) = configured(&mock, &config);
    assert_eq!(chat(&served.url).await, 200, "served from its own state");
    let live: serde_json::Value = served.get_json("/").await;
    assert_eq!(live["store"], "degraded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_responses_conversation_continues_on_another_instance() {
    let redis = Redis::start();
    let mock = Mock::start(|seen, _| Reply::ok(completion(seen.model(), "Noted."))).await;
    let (_a_dir, a) = instance(&mock, &redis, "");
    let (_b_dir, b) = instance(&mock, &redis, "");
    let post = |url: String, body: serde_json::Value| async move {
        let response = http_client()
            .post(format!("{url}/v1/responses"))
            .bearer_auth(PROXY_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        )
    };
    let (status, first) = post(
        a.url.clone(),
        serde_json::json!({"model": "mock/m", "input": "My name is Ada."}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    // Written in the background: the follow-up goes to the other instance once it is in Redis.
    let client = ::redis::Client::open(redis.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("*:conversation:{}", first["id"].as_str().unwrap());
    eventually("the conversation in Redis", || {
        let mut conn = conn.clone();
        let pattern = pattern.clone();
        async move {
            let found: Vec<String> = ::redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .unwrap();
            !found.is_empty()
        }
    })
    .await;
    let (status, second) = post(
        b.url.clone(),
        serde_json::json!({"model": "mock/m", "input": "What is my name?", "previous_response_id": first["id"]}),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    let messages = mock.chats().last().unwrap().body["messages"].clone();
    assert_eq!(
        messages,
        serde_json::json!([
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "What is my name?"}
        ])
    );
    let (status, unknown) = post(
        b.url.clone(),
        serde_json::json!({"model": "mock/m", "input": "?", "previous_response_id": "resp_unknown"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(unknown["error"]["code"], "previous_response_not_found");
}
