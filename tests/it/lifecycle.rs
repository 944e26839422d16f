//! The binary's life: SIGTERM stops it gracefully (streams ended in band, idle connections not waited for),
//! SIGHUP reloads it, and the usage file survives restarts, `kill -9` and a failed final write.

use crate::support::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

#[tokio::test]
async fn sigterm_stops_gracefully_and_the_usage_file_survives_a_restart() {
    let mock = Mock::echo("hello").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(&mock.base_url, ""),
    );
    write(
        dir.path(),
        ".env",
        &format!(
            "PROXY_API_KEY={PROXY_KEY}\nMOCK_API_KEY_1={}\nMOCK_API_KEY_2={}\n",
            key(1),
            key(2)
        ),
    );
    let client = http_client();
    let chat = |url: String| {
        let client = client.clone();
        async move {
            let body = serde_json::json!({"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]});
            let r = client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(PROXY_KEY)
                .json_body(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };

    let (mut child, url) = serve(dir.path());
    for _ in 0..4 {
        chat(url.clone()).await;
    }
    terminate(&child);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");

    let usage_path = dir.path().join("key_usage.json");
    let text = std::fs::read_to_string(&usage_path).unwrap();
    assert!(
        !text.contains(&key(1)) && !text.contains(&key(2)) && !text.contains(PROXY_KEY),
        "a key leaked: {text}"
    );
    let usage: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(usage["version"], 1);
    let total = |usage: &Value| -> u64 {
        usage["keys"]
            .as_object()
            .unwrap()
            .values()
            .map(|k| k["models"]["m"]["lifetime"]["requests"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(total(&usage), 4);
    let masked_keys: Vec<&str> = usage["keys"]
        .as_object()
        .unwrap()
        .values()
        .map(|k| k["masked"].as_str().unwrap())
        .collect();
    assert!(masked_keys.contains(&masked(1).as_str()));

    let (mut child, url) = serve(dir.path());
    chat(url.clone()).await;
    terminate(&child);
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let usage: Value =
        serde_json::from_str(&std::fs::read_to_string(&usage_path).unwrap()).unwrap();
    assert_eq!(total(&usage), 5, "counts carried over the restart");
}

#[tokio::test]
async fn kill_9_never_leaves_a_corrupt_usage_file() {
    let mock = Mock::echo("hello").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", "usage: {flush_interval: 10ms}\n");
    write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(&mock.base_url, "concurrency: {per_key_model: 0}\n"),
    );
    write(
        dir.path(),
        ".env",
        &format!("PROXY_API_KEY={PROXY_KEY}\nMOCK_API_KEY={}\n", key(1)),
    );
    let client = http_client();
    for round in 0..3 {
        let before = mock.chats().len();
        let (mut child, url) = serve(dir.path());
        let body = serde_json::json!({"model": "mock/m", "messages": []});
        let load = (0..4).map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..1000 {
                    let sent = client
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(PROXY_KEY)
                        .json_body(&body)
                        .send()
                        .await;
                    if sent.is_err() {
                        break;
                    }
                }
            })
        });
        let load: Vec<_> = load.collect();
        eventually(
            "the load goes through and its usage is being written",
            || async {
                mock.chats().len() >= before + 50 && dir.path().join("key_usage.json").exists()
            },
        )
        .await;
        // The scenario: the kill lands at another moment of the writing in each round.
        tokio::time::sleep(Duration::from_millis(round * 170)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        for task in load {
            task.await.unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("key_usage.json")).unwrap();
        let usage: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("round {round}: corrupt usage file: {e}"));
        assert_eq!(usage["version"], 1);
    }
}

#[tokio::test]
async fn sighup_reloads_instead_of_killing_the_process() {
    let first = Mock::echo("before").await;
    let second = Mock::echo("after").await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(&first.base_url, ""),
    );
    write(
        dir.path(),
        ".env",
        &format!("PROXY_API_KEY={PROXY_KEY}\nMOCK_API_KEY={}\n", key(1)),
    );
    let (mut child, url) = serve(dir.path());
    let client = http_client();
    let ask = || async {
        let body = serde_json::json!({"model": "mock/m", "messages": []});
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(PROXY_KEY)
            .json_body(&body)
            .send()
            .await
            .unwrap();
        serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    };
    assert_eq!(ask().await, "before");
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // An answer after the signal shows it was handled: its default action would have ended the process before
    // it could answer.
    assert_eq!(ask().await, "before");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP killed the process"
    );
    write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(&second.base_url, ""),
    );
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the reload moves traffic to the edited URL", || async {
        ask().await == "after"
    })
    .await;
    terminate(&child);
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn shutdown_ends_streams_in_band_and_idle_connections_do_not_hold_it() {
    let mock =
        Mock::start(|seen, _| slow_words(seen.model(), 200, Duration::from_millis(50))).await;
    let dir = mock_dir(&mock, "shutdown_grace: 1s\n");
    let server = start(dir.path(), &[], None);
    // An idle keep-alive connection: it must not hold the shutdown.
    let mut idle = tokio::net::TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut idle, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let body = serde_json::json!({"model": "mock/m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let mut response = http_client()
        .post(format!("{}/v1/chat/completions", server.url))
        .bearer_auth(PROXY_KEY)
        .json_body(&body)
        .send()
        .await
        .unwrap();
    // Both under way: the idle connection was answered, and the stream has started.
    let mut answered = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut idle, &mut answered)
        .await
        .unwrap();
    assert_eq!(&answered, b"HTTP/1.1 200");
    let mut bytes = response.chunk().await.unwrap().unwrap().to_vec();
    let stopped_at = std::time::Instant::now();
    terminate(&server.child);
    while let Some(chunk) = response.chunk().await.unwrap() {
        bytes.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(bytes).unwrap();
    let data = sse_data(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "shutting_down", "{text}");
    assert!(!text.contains("[DONE]"));
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(4),
        "exited after the 1 s grace and the streams' last words, not held by the idle connection: {:?}",
        stopped_at.elapsed()
    );
}

#[tokio::test]
async fn a_failed_final_usage_write_exits_non_zero_and_leftovers_are_cleared_at_start() {
    let mock = Mock::echo("hi").await;
    let dir = mock_dir(&mock, "usage: {path: state/key_usage.json}\n");
    write(
        dir.path(),
        "state/.key_usage.json.4242-0.tmp",
        "half a write",
    );
    let server = start(dir.path(), &[], None);
    assert!(
        !dir.path().join("state/.key_usage.json.4242-0.tmp").exists(),
        "a leftover temporary file is removed at start"
    );
    // The state directory replaced by a file: the last write cannot succeed.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state"), "not a directory").unwrap();
    terminate(&server.child);
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert!(!status.success(), "{status:?}");
}
