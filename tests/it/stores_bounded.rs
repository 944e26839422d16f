//! Every store is bounded by what it holds, and keeps what an operator decided: the Responses conversations in
//! process (by the memory they really take) and in Redis (per instance, in count and bytes), an operator's
//! disable through a Redis that restarts empty or loses its data, and conversation ids no one can guess.

use crate::support::redis::Redis;
use crate::support::stores::*;
use crate::support::*;
use keyrelay::keys::{KeyAction, KeyStore, MemoryStore};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// An OpenAI chat upstream that answers every chat with one short message and keeps nothing of what it was
/// sent (the mock keeps every body: its memory would be this test's, not keyrelay's).
async fn forgetful_upstream() -> String {
    let app = axum::Router::new().fallback(|body: axum::body::Body| async move {
        drop(axum::body::to_bytes(body, usize::MAX).await);
        axum::Json(completion("m", "Noted."))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// A directory the binary serves `base` from as provider `mock` (keys `MOCK_API_KEY_1..=keys`), with `config`.
fn served_dir(base: &str, config: &str, keys: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", config);
    write(
        dir.path(),
        "providers/mock.yaml",
        &format!("base_url: {base}\nmodels: {{list: static, static: [m]}}\n"),
    );
    let mut env = format!("PROXY_API_KEY={PROXY_KEY}\n");
    for i in 1..=keys {
        env.push_str(&format!("MOCK_API_KEY_{i}={}\n", key(i)));
    }
    write(dir.path(), ".env", &env);
    dir
}

/// `POST /v1/responses` with `body`: the status and the answer.
async fn respond(url: &str, body: &Value) -> (u16, Value) {
    respond_text(url, body.to_string()).await
}

/// [`respond`] with the body as text.
async fn respond_text(url: &str, body: String) -> (u16, Value) {
    let response = http_client()
        .post(format!("{url}/v1/responses"))
        .bearer_auth(PROXY_KEY)
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A request of one user message of `parts` one-letter text parts, the shape that costs the most parsed for its
/// size (written as text: parsed here, it would take this test hundreds of megabytes); kept or not (`store`).
fn tiny_parts(parts: usize, store: bool) -> String {
    let part = r#"{"type":"input_text","text":"a"}"#;
    let mut body =
        format!(r#"{{"model":"mock/m","store":{store},"input":[{{"role":"user","content":["#);
    for i in 0..parts {
        if i > 0 {
            body.push(',');
        }
        body.push_str(part);
    }
    body.push_str("]}]}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_conversations_hold_the_memory_they_are_bounded_by() {
    const BOUND: u64 = 16 << 20;
    let base = forgetful_upstream().await;
    let dir = served_dir(&base, "responses: {max_size: 16MiB}\n", 1);
    let server = start(dir.path(), &[], None);
    // The same requests, not kept, first: what serving them costs the process whatever is kept (the
    // allocator keeps some of what requests freed, ready for the next ones).
    for _ in 0..20 {
        let (status, answer) = respond_text(&server.url, tiny_parts(3_600, false)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let before = rss(server.pid());
    // The finding's reproducer, scaled: requests of many one-letter parts (it sent five of 110,000 parts to
    // fill 64 MiB), here 150 conversations of about 100 KB as text, which together fill the 16 MiB bound
    // (all kept). Parsed values would take about 30 times that.
    let mut ids = Vec::new();
    for _ in 0..150 {
        let (status, answer) = respond_text(&server.url, tiny_parts(3_600, true)).await;
        assert_eq!(status, 200, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_string());
    }
    // What the requests built for themselves is freed as they end; what stays is the store's.
    let grown = eventually_some(
        "the process to hold at most twice the store's bound more",
        || async {
            let grown = rss(server.pid()).saturating_sub(before);
            (grown < 2 * BOUND).then_some(grown)
        },
    )
    .await;
    eprintln!(
        "RSS {} MB before, {} MB more with 150 conversations kept (bound {} MB)",
        before >> 20,
        grown >> 20,
        BOUND >> 20
    );
    // Kept all the same: the first and the last continue.
    for id in [&ids[0], &ids[149]] {
        let follow = json!({"model": "mock/m", "input": "and?", "previous_response_id": id});
        let (status, answer) = respond(&server.url, &follow).await;
        assert_eq!(status, 200, "{answer}");
    }
}

/// The conversations in `redis`: each one's id and size.
async fn conversations_in(redis: &Redis) -> Vec<(String, u64)> {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let names: Vec<String> = ::redis::cmd("KEYS")
        .arg("*:conversation:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for name in names {
        let size: u64 = ::redis::cmd("STRLEN")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        let id = name.rsplit(':').next().unwrap().to_string();
        out.push((id, size));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn what_an_instance_writes_to_redis_is_bounded_in_bytes_and_count() {
    let redis = Redis::start();
    let base = forgetful_upstream().await;
    let store = format!("store: {{redis: {{url: \"{}\"}}}}\n", redis.url());
    // A: 4 MiB of conversations at most; B: three at most.
    let dir_a = served_dir(&base, &format!("{store}responses: {{max_size: 4MiB}}\n"), 1);
    let dir_b = served_dir(&base, &format!("{store}responses: {{max_entries: 3}}\n"), 1);
    let a = start(dir_a.path(), &[], None);
    let b = start(dir_b.path(), &[], None);
    // Twelve conversations of 1 MB on A (the finding: twelve requests put 385 MB into Redis for an hour), ten
    // small ones on B.
    let mut big = Vec::new();
    for i in 0..12 {
        let text = format!("{i} {}", "x".repeat(1 << 20));
        let (status, answer) = respond(&a.url, &json!({"model": "mock/m", "input": text})).await;
        assert_eq!(status, 200, "{answer}");
        big.push(answer["id"].as_str().unwrap().to_string());
    }
    let mut small = Vec::new();
    for i in 0..10 {
        let input = format!("small {i}");
        let (status, answer) = respond(&b.url, &json!({"model": "mock/m", "input": input})).await;
        assert_eq!(status, 200, "{answer}");
        small.push(answer["id"].as_str().unwrap().to_string());
    }
    // Written in the background: the last of each is there, and what each wrote is within its bounds.
    let (last_big, last_small) = (big[11].clone(), small[9].clone());
    let held = eventually_some(
        "each instance's conversations in Redis within its bounds",
        || async {
            let held = conversations_in(&redis).await;
            let ids: HashSet<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
            let of = |mine: &[String]| -> Vec<u64> {
                held.iter()
                    .filter(|(id, _)| mine.contains(id))
                    .map(|(_, size)| *size)
                    .collect()
            };
            let (a_sizes, b_sizes) = (of(&big), of(&small));
            let within = a_sizes.iter().sum::<u64>() <= 4 << 20 && b_sizes.len() <= 3;
            (within && ids.contains(last_big.as_str()) && ids.contains(last_small.as_str()))
                .then_some(held)
        },
    )
    .await;
    let total: u64 = held.iter().map(|(_, size)| size).sum();
    eprintln!("Redis holds {} conversations, {} bytes", held.len(), total);
    assert!(
        total <= (4 << 20) + 3 * 4096,
        "Redis holds {total} bytes of conversations"
    );
    // The newest continue on the other instance; the oldest are gone from Redis (and from the instance that
    // wrote them, by the same bounds).
    let follow = |id: &str| json!({"model": "mock/m", "input": "and?", "previous_response_id": id});
    let (status, answer) = respond(&b.url, &follow(&last_big)).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = respond(&a.url, &follow(&last_small)).await;
    assert_eq!(status, 200, "{answer}");
    for (url, id) in [(&b.url, &big[0]), (&a.url, &small[0]), (&a.url, &big[0])] {
        let (status, answer) = respond(url, &follow(id)).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "previous_response_not_found");
    }
    // A conversation larger than the bound is not written at all.
    let text = "y".repeat(5 << 20);
    let (status, answer) = respond(&a.url, &json!({"model": "mock/m", "input": text})).await;
    assert_eq!(status, 200, "{answer}");
    let huge = answer["id"].as_str().unwrap().to_string();
    // The next conversation is written after it would have been: it is not there.
    let (_, after) = respond(&a.url, &json!({"model": "mock/m", "input": "after"})).await;
    let after = after["id"].as_str().unwrap().to_string();
    eventually("the next conversation in Redis", || async {
        conversations_in(&redis)
            .await
            .iter()
            .any(|(id, _)| *id == after)
    })
    .await;
    assert!(
        !conversations_in(&redis)
            .await
            .iter()
            .any(|(id, _)| *id == huge),
        "a conversation over the bound was written"
    );
    // What another writer left there is read as bounded: over the reader's own bound it is no conversation
    // (to A, 4 MiB), within it one (to B), and text that is not a conversation is none either.
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let large = json!([{"role": "user", "content": "z".repeat(5 << 20)}]).to_string();
    for (id, text) in [("resp_large", large.as_str()), ("resp_bogus", "not json")] {
        let _: () = ::redis::cmd("SET")
            .arg(format!("keyrelay:conversation:{id}"))
            .arg(text)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let unknown = |(status, answer): (u16, Value)| {
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "previous_response_not_found");
    };
    unknown(respond(&a.url, &follow("resp_large")).await);
    let (status, answer) = respond(&b.url, &follow("resp_large")).await;
    assert_eq!(status, 200, "{answer}");
    unknown(respond(&b.url, &follow("resp_bogus")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_ids_are_unguessable() {
    let base = forgetful_upstream().await;
    let dir = served_dir(&base, "", 1);
    let server = start(dir.path(), &[], None);
    let mut ids = HashSet::new();
    let mut symbols = HashSet::new();
    for _ in 0..64 {
        let (status, answer) =
            respond(&server.url, &json!({"model": "mock/m", "input": "hi"})).await;
        assert_eq!(status, 200, "{answer}");
        let id = answer["id"].as_str().unwrap().to_string();
        let random = id.strip_prefix("resp_").expect("OpenAI's shape");
        assert_eq!(random.len(), 32, "{id}");
        assert!(random.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        symbols.extend(random.chars());
        ids.insert(id);
    }
    assert_eq!(ids.len(), 64, "every id is new");
    // 32 symbols of 62 (about 190 bits): all 62 show up across 2,048 draws.
    assert_eq!(symbols.len(), 62, "{symbols:?}");
}

/// Sends a chat to `url`: the masked key that served it.
async fn served_by(url: &str) -> String {
    let response = http_client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(PROXY_KEY)
        .header("content-type", "application/json")
        .body(r#"{"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    header(response.headers(), "x-keyrelay-key").to_string()
}

/// Whether the usage file in `dir` says the key `id` is disabled (None: not written yet, or no such key).
fn disabled_in_usage_file(dir: &std::path::Path, id: &str) -> Option<bool> {
    let text = std::fs::read_to_string(dir.join("key_usage.json")).ok()?;
    let usage: Value = serde_json::from_str(&text).ok()?;
    usage["keys"][id]["disabled"].as_bool()
}

/// What Redis holds of key `id`'s verdict: whether it is disabled (None: no verdict).
async fn disabled_in_redis(redis: &Redis, id: &str) -> Option<bool> {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let verdict: Option<String> = ::redis::cmd("HGET")
        .arg("{keyrelay:mock}:state")
        .arg(format!("s:{id}"))
        .query_async(&mut conn)
        .await
        .ok()?;
    serde_json::from_str::<Value>(&verdict?).ok()?["disabled"].as_bool()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn an_operators_disable_survives_a_redis_that_restarts_empty() {
    let redis = Redis::start();
    let port = redis.port;
    let base = forgetful_upstream().await;
    let config = format!("store: {{redis: {{url: \"{}\"}}}}\n", redis.url());
    let (dir_a, dir_b) = (served_dir(&base, &config, 2), served_dir(&base, &config, 2));
    let a = start(dir_a.path(), &[], None);
    let b = start(dir_b.path(), &[], None);
    // Both instances use both keys.
    for served in [&a, &b] {
        let mut seen = HashSet::new();
        for _ in 0..20 {
            seen.insert(served_by(&served.url).await);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
    }
    let keys = a.get_json("/v1/keys").await;
    let off = keys["data"][0]["keys"][1].clone();
    let (id, masked) = (off["id"].as_str().unwrap(), off["key"].as_str().unwrap());
    // The operator disables the second key on A; B hears of it and serves without it.
    let disabled = http_client()
        .post(format!("{}/v1/keys/{id}/disable", a.url))
        .bearer_auth(PROXY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status(), 200);
    eventually("the key disabled in Redis", || async {
        disabled_in_redis(&redis, id).await == Some(true)
    })
    .await;
    for _ in 0..10 {
        assert_ne!(served_by(&b.url).await, masked);
    }
    // Redis restarts empty. Neither instance serves the key meanwhile, nor once they are back.
    drop(redis);
    let redis = Redis::start_on(port);
    for _ in 0..40 {
        for served in [&a, &b] {
            assert_ne!(
                served_by(&served.url).await,
                masked,
                "a disabled key served"
            );
        }
    }
    // Written back to Redis (within the ten-second check, or at once on a rejoin), and in both usage files.
    eventually_within(
        Duration::from_secs(15),
        "the disable written back to Redis",
        || async { (disabled_in_redis(&redis, id).await == Some(true)).then_some(()) },
    )
    .await;
    for (served, dir) in [(&a, &dir_a), (&b, &dir_b)] {
        eventually("the disable in the instance's usage file", || async {
            disabled_in_usage_file(dir.path(), id) == Some(true)
        })
        .await;
        let keys = served.get_json("/v1/keys").await;
        assert_eq!(keys["data"][0]["keys"][1]["disabled"], true, "{keys}");
        for _ in 0..5 {
            assert_ne!(served_by(&served.url).await, masked);
        }
    }
    // The operator enables it again: it serves again, through the same paths.
    let enabled = http_client()
        .post(format!("{}/v1/keys/{id}/enable", b.url))
        .bearer_auth(PROXY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(enabled.status(), 200);
    eventually("the key enabled in Redis", || async {
        disabled_in_redis(&redis, id).await == Some(false)
    })
    .await;
    eventually("the key serving on A again", || async {
        served_by(&a.url).await == masked
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_decision_redis_lost_comes_back_from_the_instance_that_knows_it() {
    let redis = Redis::start();
    let keys = keys(2);
    let tuning = keyrelay::config::Tuning::default();
    let (local_a, local_b) = (local(), local());
    let connect = |local: Arc<MemoryStore>| {
        let url = redis.url();
        async move {
            keyrelay::keys::redis::RedisStore::connect(
                keyrelay::keys::redis::Target::new(&url, None, false).unwrap(),
                "kr",
                keyrelay::clock::Clock::system(),
                policy(),
                local,
                Duration::from_secs(15),
            )
            .await
        }
    };
    let a = connect(local_a.clone()).await;
    let b = connect(local_b.clone()).await;
    // B uses both keys; A disables the second; B hears nothing of it before Redis loses everything.
    for _ in 0..4 {
        let grant = b.acquire(ask(&keys, &tuning)).await.unwrap();
        b.release(&grant, SUCCESS, &tuning);
    }
    today(&b, &keys, |c| c.successes == 4).await;
    assert!(a.control("p", &keys[1], &KeyAction::Disable));
    let in_redis = |store: Arc<keyrelay::keys::redis::RedisStore>| {
        let keys = keys.clone();
        async move { store.report("p", &keys).await[1].disabled }
    };
    eventually("the disable in Redis", || in_redis(b.clone())).await;
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    // B, which never heard of the decision, writes the key's state again from its own copy. A, whose copy has
    // the decision, gives it back: then neither uses the key, and A's own copy never lost it.
    let disabled_id = keys[1].id.clone();
    eventually_within(
        Duration::from_secs(15),
        "both instances leaving the disabled key alone",
        || async {
            let mut clear = true;
            for store in [&a, &b] {
                for _ in 0..4 {
                    let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
                    clear &= grant.key.id != disabled_id;
                    store.release(&grant, SUCCESS, &tuning);
                }
            }
            assert!(
                local_a.get(&disabled_id).unwrap().disabled,
                "A's own copy lost the operator's decision"
            );
            (clear && local_b.get(&disabled_id).is_some_and(|k| k.disabled)).then_some(())
        },
    )
    .await;
    assert!(in_redis(a.clone()).await && in_redis(b.clone()).await);
}
