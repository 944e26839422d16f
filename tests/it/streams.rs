//! Streams that break, stall or never start: continued as often as it takes (by the same key after a cut when no
//! other is left), logged as one request, and bounded; a model that does not answer, or keeps failing, is left
//! for its fallback at once.

use crate::support::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The first chunks of an answer, without its finish.
fn unfinished(model: &str, parts: &[&str]) -> Vec<String> {
    let mut events = chunks(model, parts, false);
    events.pop();
    events
}

fn usage_chunk(model: &str, prompt: u64, completion: u64) -> String {
    json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
    .to_string()
}

fn continuing(mock: &Mock, keys: usize, config: &str) -> Setup {
    let yaml = provider_yaml(
        &mock.base_url,
        "continuation:\n  assistant: {prefix: true}\n",
    );
    Setup::one(mock, keys)
        .provider("mock", yaml)
        .config(&format!(
            "selection: sequential\nrequest_logging: {{enabled: true}}\n{config}"
        ))
}

fn stream_body(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "What is the answer?"}]})
}

#[tokio::test]
async fn a_cut_with_no_other_key_left_is_continued_by_the_same_key() {
    let mock = Mock::start(|seen, n| match n {
        0 => Reply::sse(unfinished(seen.model(), &["The answer ", "is "]), End::Cut),
        _ => Reply::sse(chunks(seen.model(), &["forty-two."], false), End::Done),
    })
    .await;
    let proxy = Proxy::start(continuing(&mock, 1, "")).await;
    let data = sse_data(
        &proxy
            .post_text("/v1/chat/completions", &stream_body("mock/m"))
            .await,
    );
    assert_eq!(reassemble(&data), "The answer is forty-two.");
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chats = mock.chats();
    assert_eq!(chats.len(), 2);
    assert!(chats.iter().all(|c| c.key == key(1)));
    assert_eq!(
        chats[1].body["messages"][1],
        json!({"role": "assistant", "content": "The answer is ", "prefix": true})
    );
}

#[tokio::test]
async fn a_continuation_that_breaks_is_continued_again_and_the_request_is_one_success() {
    let mock = Mock::start(|seen, n| {
        let model = seen.model();
        match n {
            0 => {
                let mut events = unfinished(model, &["The "]);
                events.push(usage_chunk(model, 5, 1));
                Reply::sse(events, End::Cut)
            }
            // Stalls after its first words (the idle timeout cuts it).
            1 => Reply::Sse {
                events: chunks(model, &["answer "], false)[..2].to_vec(),
                gap: Duration::ZERO,
                end: End::Stall,
            },
            _ => {
                let mut events = chunks(model, &["is 42."], false);
                events.push(usage_chunk(model, 7, 2));
                Reply::sse(events, End::Done)
            }
        }
    })
    .await;
    let proxy = Proxy::start(continuing(&mock, 3, "timeouts: {stream_idle: 300ms}\n")).await;
    let mut body = stream_body("mock/m");
    body["stream_options"] = json!({"include_usage": true});
    let data = sse_data(&proxy.post_text("/v1/chat/completions", &body).await);
    assert_eq!(reassemble(&data), "The answer is 42.");
    assert_eq!(data.last().unwrap(), "[DONE]");
    // The client's usage is the whole answer's: every segment's, not the last one's.
    let usage: Vec<Value> = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c.get("usage").filter(|u| !u.is_null()).cloned())
        .collect();
    assert_eq!(
        usage.last().map(|u| (
            u["prompt_tokens"].as_u64(),
            u["completion_tokens"].as_u64(),
            u["total_tokens"].as_u64()
        )),
        Some((Some(12), Some(3), Some(15))),
        "{usage:?}"
    );
    let chats = mock.chats();
    assert_eq!(chats.len(), 3);
    assert_eq!(
        chats[2].body["messages"][1]["content"], "The answer ",
        "the text sent so far accumulates"
    );
    let logs = request_logs(&proxy.dir.path().join("logs"), 1).await;
    assert_eq!(logs.len(), 1, "one request");
    let log = &logs[0];
    assert_eq!(log["error"], Value::Null, "{log}");
    assert_eq!(log["continued"], 2);
    assert_eq!(log["attempts"].as_array().unwrap().len(), 3, "{log}");
    assert_eq!(log["key"], masked(3));
    assert_eq!(
        (
            log["prompt_tokens"].as_u64(),
            log["completion_tokens"].as_u64()
        ),
        (Some(12), Some(3))
    );
    let metrics = proxy.get_text("/metrics").await;
    for line in [
        "keyrelay_requests_total{provider=\"mock\",model=\"m\",outcome=\"success\"} 1",
        "keyrelay_stream_continuations_total{provider=\"mock\"} 2",
        "keyrelay_upstream_attempts_total{provider=\"mock\",result=\"success\"} 3",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
}

/// An upstream that reads each request and closes the connection without answering.
async fn unanswering_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
            });
        }
    });
    base
}

#[tokio::test]
async fn a_model_that_does_not_answer_is_left_for_its_fallback_at_once() {
    let hanging = Mock::start(|_, _| Reply::Hang).await;
    let mute = Mock::start(|_, _| Reply::Sse {
        events: vec![],
        gap: Duration::ZERO,
        end: End::Stall,
    })
    .await;
    let closing = unanswering_upstream().await;
    let backup = Mock::echo("from the backup").await;
    let setup = |main: &str, timeouts: &str| {
        Setup {
            env: [mock_keys("MAIN", 3), mock_keys("BACKUP", 1)].concat(),
            ..Setup::empty()
        }
        .provider("main", provider_yaml(main, timeouts))
        .provider("backup", provider_yaml(&backup.base_url, ""))
        .config("request_logging: {enabled: true}\n")
    };
    let timeouts = "timeouts: {response: 300ms, first_event: 300ms}\n";
    // Whichever timer fires first before any content, the answer is the same: the stream's idle timer (here
    // shorter than first_event) means no answer too.
    let idle_first = "timeouts: {response: 300ms, first_event: 300ms, stream_idle: 100ms}\n";
    for (what, base, stream, timeouts) in [
        (
            "no response head",
            hanging.base_url.clone(),
            false,
            timeouts,
        ),
        ("no first event", mute.base_url.clone(), true, timeouts),
        (
            "no event, idle timer first",
            mute.base_url.clone(),
            true,
            idle_first,
        ),
        ("closed unanswered", closing.clone(), false, timeouts),
    ] {
        let proxy = Proxy::start(setup(&base, timeouts)).await;
        let mut body = stream_body("main/m");
        body["stream"] = json!(stream);
        body["fallbacks"] = json!(["backup/b"]);
        let response = proxy
            .post("/v1/chat/completions", &body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(
            header(response.headers(), "x-keyrelay-fallback"),
            "backup/b",
            "{what}"
        );
        assert_eq!(
            header(response.headers(), "x-keyrelay-attempts"),
            "2",
            "{what}: one on the silent model"
        );
        let text = response.text().await.unwrap();
        assert!(
            text.contains("from") && text.contains("backup"),
            "{what}: {text}"
        );
        let logs = request_logs(&proxy.dir.path().join("logs"), 1).await;
        assert_eq!(
            logs[0]["fallback"], "backup/b",
            "{what}: logged as served by the fallback"
        );
    }
}

#[tokio::test]
async fn first_event_runs_from_sending_the_request() {
    let mock = Mock::start(|seen, _| {
        if seen.key == key(1) {
            // Headers only after a second.
            return Reply::ok(completion(seen.model(), "late")).delayed(Duration::from_secs(1));
        }
        Reply::sse(chunks(seen.model(), &["on time"], false), End::Done)
    })
    .await;
    let setup = Setup::one(&mock, 2).config(
        "selection: sequential\nretries: {attempts: 1}\ntimeouts: {first_event: 300ms}\nrequest_logging: {enabled: true}\n",
    );
    let proxy = Proxy::start(setup).await;
    let data = sse_data(
        &proxy
            .post_text("/v1/chat/completions", &stream_body("mock/m"))
            .await,
    );
    assert_eq!(reassemble(&data), "on time");
    let logs = request_logs(&proxy.dir.path().join("logs"), 1).await;
    let first = &logs[0]["attempts"][0];
    assert_eq!(first["class"], "timeout", "{first}");
    assert!(
        first["error"]
            .as_str()
            .unwrap()
            .contains("timeouts.first_event"),
        "{first}"
    );
}

#[tokio::test]
async fn a_model_failing_on_every_key_is_skipped_for_a_while_then_tried_again() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let main = Mock::start(move |seen, _| {
        if flag.load(Ordering::SeqCst) {
            Reply::ok(completion(seen.model(), "main is back"))
        } else {
            Reply::error(500, "boom", "server_error", "internal")
        }
    })
    .await;
    let backup = Mock::echo("from the backup").await;
    let setup = Setup {
        env: [mock_keys("MAIN", 3), mock_keys("BACKUP", 1)].concat(),
        ..Setup::empty()
    }
    .provider("main", provider_yaml(&main.base_url, ""))
    .provider("backup", provider_yaml(&backup.base_url, ""))
    .config("retries: {attempts: 1}\nfallbacks:\n  main/m: [backup/b]\n");
    let proxy = Proxy::start(setup).await;
    let (status, headers, _) = proxy.chat("main/m", "hi").await;
    let tripped = std::time::Instant::now();
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-keyrelay-fallback"), "backup/b");
    assert_eq!(main.chats().len(), 3, "failed on its three keys");
    // Open now: straight to the fallback.
    for _ in 0..3 {
        let (status, headers, _) = proxy.chat("main/m", "hi").await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-keyrelay-attempts"), "1");
        assert_eq!(header(&headers, "x-keyrelay-fallback"), "backup/b");
    }
    assert_eq!(main.chats().len(), 3);
    // It recovers; within seconds it serves again.
    healthy.store(true, Ordering::SeqCst);
    let body = eventually_some("the model is tried again and serves", || async {
        let (status, headers, body) = proxy.chat("main/m", "hi").await;
        assert_eq!(status, 200, "{body}");
        (header(&headers, "x-keyrelay-provider") == "main").then_some(body)
    })
    .await;
    assert_eq!(body["choices"][0]["message"]["content"], "main is back");
    assert!(
        tripped.elapsed() < Duration::from_secs(2),
        "skipped for the first step (1 s), not {:?}",
        tripped.elapsed()
    );
}

#[tokio::test]
async fn a_stream_longer_than_its_total_bound_ends_with_an_in_band_error() {
    let mock = Mock::start(|seen, _| slow_words(seen.model(), 40, Duration::from_millis(50))).await;
    let proxy =
        Proxy::start(Setup::one(&mock, 1).config("timeouts: {stream_total: 500ms}\n")).await;
    let text = proxy
        .post_text("/v1/chat/completions", &stream_body("mock/m"))
        .await;
    let data = sse_data(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_too_long", "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(reassemble(&data).starts_with("w0 w1 "));
}
