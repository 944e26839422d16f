//! Shared pools are fair: slow work (script calls, token counts, large bodies) takes turns by client, the
//! connection's address, so one client's flood cannot hold up another's request; a client with too much waiting
//! is refused at once with 503 `server_busy` and `Retry-After`, a request that waits too long likewise, and the
//! work of a request under way (a stream's events) is never refused. Each client is a loopback address of its own
//! (127.0.0.2, 127.0.0.3: Linux routes all of 127/8 to `lo`), against the real binary, whose pools are its own.

use crate::support::*;
use serde_json::{Value, json};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// New jobs one client may have waiting in a pool (`offload::MAX_WAITING`).
const MAX_WAITING: usize = 32;

/// Iterations of the request hook's loop for a slow request: a good part of a second in a debug build, so that a
/// flood of them queues up well before the first ends.
const SPIN: u64 = 300_000;

/// A provider whose request hook loops `spin` times (a stand-in for a long agent conversation's mapping) and
/// whose stream hook passes each chunk through (so that every event is a script call).
const SLOW_SCRIPT: &str = r#"
fn request(ctx) {
    let body = ctx.body;
    let spin = body.spin ?? 0;
    body.remove("spin");
    body.remove("pad");
    let n = 0;
    while n < spin { n += 1; }
    #{ path: "/chat/completions", body: body }
}

fn stream_event(event) {
    if type_of(event.data) == "string" { return #{ done: true }; }
    event.data
}
"#;

/// The cores the server sees: the places of each pool.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// A client whose connections come from `address`.
fn client_from(address: &str) -> reqwest::Client {
    let _ = http_client();
    reqwest::Client::builder()
        .local_address(address.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// The binary serving provider `slow` (the script above) in front of `mock`, with `config`.
fn slow_server(mock: &Mock, config: &str) -> (tempfile::TempDir, Served) {
    let dir = tempfile::tempdir().unwrap();
    // Budgets wide enough that a loaded machine never fails a slow call: the test is about waiting, not budgets.
    write(
        dir.path(),
        "config.yaml",
        &format!("scripts: {{time: 60s}}\n{config}"),
    );
    write(
        dir.path(),
        "providers/slow.yaml",
        &format!(
            "base_url: {}\nscript: slow.rhai\nmodels: {{list: static, static: [m]}}\n",
            mock.base_url
        ),
    );
    write(dir.path(), "plugins/slow.rhai", SLOW_SCRIPT);
    write(
        dir.path(),
        ".env",
        &format!("PROXY_API_KEY={PROXY_KEY}\nSLOW_API_KEY_1={}\n", key(1)),
    );
    let served = start(dir.path(), &[], None);
    (dir, served)
}

fn chat(
    server: &Served,
    client: &reqwest::Client,
    tag: &str,
    spin: u64,
) -> reqwest::RequestBuilder {
    // A script call may run 8 operations per byte of its input: the loop is paid for by padding.
    let pad = "x".repeat(spin as usize);
    let body = json!({"model": "slow/m", "spin": spin, "pad": pad, "messages": [{"role": "user", "content": tag}]});
    client
        .post(format!("{}/v1/chat/completions", server.url))
        .bearer_auth(PROXY_KEY)
        .json_body(&body)
}

/// The tag (the user message) of each chat the mock received, in order.
fn tags(mock: &Mock) -> Vec<String> {
    mock.chats()
        .iter()
        .map(|s| {
            s.body["messages"][0]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// What each of a flood's requests came back with, as they come back.
type Outcomes = Arc<Mutex<Vec<(u16, reqwest::header::HeaderMap, Value)>>>;

/// Sends every request at once, each in a task of its own; the outcomes gather as they arrive.
fn flood(requests: Vec<reqwest::RequestBuilder>) -> (Outcomes, Vec<tokio::task::JoinHandle<()>>) {
    let outcomes: Outcomes = Arc::default();
    let tasks = requests
        .into_iter()
        .map(|request| {
            let outcomes = outcomes.clone();
            tokio::spawn(async move {
                let outcome = send(request).await;
                outcomes.lock().unwrap().push(outcome);
            })
        })
        .collect();
    (outcomes, tasks)
}

/// Asserts a 503 `server_busy` with a `Retry-After` of at least a second, and returns its message.
fn assert_busy((status, headers, body): &(u16, reqwest::header::HeaderMap, Value)) -> String {
    assert_eq!(*status, 503, "{body}");
    assert_eq!(error_code(body), "server_busy", "{body}");
    let retry: u64 = header(headers, "retry-after")
        .parse()
        .unwrap_or_else(|_| panic!("no Retry-After: {headers:?}"));
    assert!((1..=60).contains(&retry), "{retry}");
    body["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn one_clients_flood_does_not_hold_up_another_client_and_its_excess_is_refused() {
    let mock = Mock::echo("fine").await;
    let (_dir, server) = slow_server(&mock, "request_timeout: 600s\n");
    let (a, b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    // Client A: a place per core taken, its queue filled, and a few more.
    let flooding = cores() + MAX_WAITING + 4;
    let (outcomes, tasks) = flood(
        (0..flooding)
            .map(|i| chat(&server, &a, &format!("A-{i}"), SPIN))
            .collect(),
    );
    // A's first request through means the rest have long been waiting (each takes a good part of a second).
    eventually("A's first request at the upstream", || async {
        !tags(&mock).is_empty()
    })
    .await;
    let (status, _, body) = send(chat(&server, &b, "B", 0)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "fine");
    // B went in at its turn: after at most one more of A's jobs per place, not behind A's whole queue (first come,
    // first served, B was behind every one of A's requests).
    let order = tags(&mock);
    let a_before_b = order.iter().position(|t| t == "B").unwrap();
    assert!(
        a_before_b <= cores() + 2,
        "{a_before_b} of A's requests reached the upstream before B's: {order:?}"
    );
    // A's excess was refused at once, each with 503 server_busy and Retry-After, naming the client as the server
    // sees it.
    let refused = eventually_some("A's excess refused", || async {
        let outcomes = outcomes.lock().unwrap();
        let refused: Vec<_> = outcomes.iter().filter(|o| o.0 == 503).cloned().collect();
        (!refused.is_empty()).then_some(refused)
    })
    .await;
    assert!(refused.len() <= 4, "{} refused", refused.len());
    for outcome in &refused {
        let message = assert_busy(outcome);
        assert!(message.contains("127.0.0.2"), "{message}");
        assert!(
            message.contains(&format!("{MAX_WAITING} are waiting")),
            "{message}"
        );
    }
    let metrics = server.get_text("/metrics").await;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("keyrelay_slow_work_refused_total{pool=\"scripts\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The rest of A's flood is not the point: ended with the server.
    for task in tasks {
        task.abort();
    }
}

#[tokio::test]
async fn a_request_that_waits_past_its_deadline_for_its_turn_gets_503_with_retry_after() {
    let mock = Mock::echo("fine").await;
    let (_dir, server) = slow_server(&mock, "request_timeout: 1s\n");
    let a = client_from("127.0.0.2");
    // More than the places can get through within the deadline.
    let (outcomes, tasks) = flood(
        (0..cores() + MAX_WAITING)
            .map(|i| chat(&server, &a, &format!("A-{i}"), SPIN))
            .collect(),
    );
    for task in tasks {
        task.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap();
    let mut waited = 0;
    for outcome in outcomes.iter() {
        match outcome.0 {
            // Mapped in time, or mapped and then out of time at the upstream.
            200 => {}
            504 => assert_eq!(error_code(&outcome.2), "deadline_exceeded", "{}", outcome.2),
            _ => {
                let message = assert_busy(outcome);
                assert!(message.contains("waited"), "{message}");
                waited += 1;
            }
        }
    }
    assert!(
        waited > 0,
        "none waited too long: {:?}",
        outcomes.iter().map(|o| o.0).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_small_token_count_is_not_held_up_by_another_clients_large_ones() {
    let mock = Mock::echo("fine").await;
    let (_dir, server) = slow_server(&mock, "");
    let (a, b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    // About 2 MB of text each: parsed, then counted, both off the async workers.
    let text = "lorem ipsum dolor sit amet, consectetur adipiscing elit ".repeat(40_000);
    let payload =
        json!({"model": "slow/m", "messages": [{"role": "user", "content": text}]}).to_string();
    let count = |client: &reqwest::Client, payload: String| {
        client
            .post(format!("{}/v1/token-count", server.url))
            .bearer_auth(PROXY_KEY)
            .header("content-type", "application/json")
            .body(payload)
    };
    let large = cores() + 8;
    let (outcomes, tasks) = flood((0..large).map(|_| count(&a, payload.clone())).collect());
    eventually("A's first count back", || async {
        !outcomes.lock().unwrap().is_empty()
    })
    .await;
    let small = json!({"model": "slow/m", "messages": [{"role": "user", "content": "hello"}]});
    let (status, _, body) = send(count(&b, small.to_string())).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["token_count"].as_u64().unwrap() > 0, "{body}");
    let a_done = outcomes.lock().unwrap().len();
    assert!(
        a_done <= cores() + 2,
        "{a_done} of A's {large} counts were done before B's small one"
    );
    for task in tasks {
        task.abort();
    }
}

#[tokio::test]
async fn a_stream_under_way_is_never_refused_while_its_client_is_over_its_bound() {
    let gap = std::time::Duration::from_millis(30);
    let mock = Mock::start(move |seen, _| {
        if seen.body["stream"] == json!(true) {
            // A stream that lasts while the flood below is refused (a sleep in the scenario).
            return slow_words(seen.model(), 10, gap);
        }
        Reply::ok(completion(seen.model(), "fine"))
    })
    .await;
    let (_dir, server) = slow_server(&mock, "request_timeout: 600s\n");
    let a = client_from("127.0.0.2");
    let body =
        json!({"model": "slow/m", "stream": true, "messages": [{"role": "user", "content": "S"}]});
    let response = a
        .post(format!("{}/v1/chat/completions", server.url))
        .bearer_auth(PROXY_KEY)
        .json_body(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The same client floods until it is refused: its stream's events then wait in its own queue.
    let (outcomes, tasks) = flood(
        (0..cores() + MAX_WAITING + 4)
            .map(|i| chat(&server, &a, &format!("A-{i}"), SPIN))
            .collect(),
    );
    eventually("A refused", || async {
        outcomes.lock().unwrap().iter().any(|o| o.0 == 503)
    })
    .await;
    let text = response.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    let words: String = (0..10).map(|i| format!("w{i} ")).collect();
    assert_eq!(reassemble(&data), words);
    for task in tasks {
        task.abort();
    }
}
