//! Costs: prices declared per model in a provider file, the cost of each answer in the request log and the
//! console line, today's and lifetime cost per key and model in `/v1/keys` (kept across restarts), and a cost
//! counter in `/metrics`.

use crate::support::*;
use serde_json::{Value, json};

/// $0.15 / $0.60 / $0.075 per million tokens for `priced`; `glob-*` at $1 / $2; nothing for other models.
const PRICES: &str = "prices:\n  taken: 2026-11-29\n  source: a test\n  models:\n    priced: {input: 0.15, output: 0.6, cached_input: 0.075}\n    'glob-*': {input: 1, output: 2}\n";

/// 2000 prompt tokens of which 1000 cached, 500 completion tokens: at `priced`'s prices
/// 1000 × 0.15 + 1000 × 0.075 + 500 × 0.6 = 525 micro-dollars.
const PRICED_USD: f64 = 0.000525;

fn usage() -> Value {
    json!({"prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500,
           "prompt_tokens_details": {"cached_tokens": 1000}})
}

/// Answers with `usage()`, streamed (its usage in the last chunk) when asked.
async fn metered() -> Mock {
    Mock::start(|seen, _| {
        let mut answer = completion(seen.model(), "priced answer");
        answer["usage"] = usage();
        if seen.body["stream"] == json!(true) {
            let mut events = chunks(seen.model(), &["priced ", "stream"], false);
            events.push(
                json!({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": seen.model(),
                       "choices": [], "usage": usage()})
                .to_string(),
            );
            return Reply::sse(events, End::Done);
        }
        Reply::ok(answer)
    })
    .await
}

fn setup(mock: &Mock) -> Setup {
    Setup::one(mock, 1)
        .provider("mock", provider_yaml(&mock.base_url, PRICES))
        .config("request_logging: {enabled: true}\n")
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-12)
}

async fn key_json(proxy: &Proxy) -> Value {
    let keys: Value = serde_json::from_str(&proxy.get_text("/v1/keys").await).unwrap();
    keys["data"][0]["keys"][0].clone()
}

fn model<'a>(key: &'a Value, name: &str) -> &'a Value {
    key["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == name)
        .unwrap_or_else(|| panic!("no model {name} in {key}"))
}

#[tokio::test]
async fn answers_are_priced_per_key_and_model_in_keys_logs_and_metrics() {
    let mock = metered().await;
    let proxy = Proxy::start(setup(&mock)).await;
    let (status, _, body) = proxy.chat("mock/priced", "hi").await;
    assert_eq!(status, 200, "{body}");
    // The client's answer is the upstream's, usage and all.
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"],
        1000
    );
    let stream = json!({"model": "mock/priced", "stream": true, "messages": [{"role": "user", "content": "s"}]});
    let text = proxy.post_text("/v1/chat/completions", &stream).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // A pattern's price; and a model without one costs nothing anyone could mistake for a price.
    assert_eq!(proxy.chat("mock/glob-x", "hi").await.0, 200);
    assert_eq!(proxy.chat("mock/unpriced", "hi").await.0, 200);

    let key = key_json(&proxy).await;
    // glob-x: 2000 × $1 + 500 × $2 per million (no cached price: cached tokens cost input).
    let glob_usd = 0.003;
    let total = 2.0 * PRICED_USD + glob_usd;
    assert!(close(&key["today"]["cost_usd"], total), "{key}");
    assert!(close(&key["lifetime"]["cost_usd"], total), "{key}");
    let priced = model(&key, "priced");
    assert_eq!(priced["today"]["successes"], 2);
    assert!(
        close(&priced["today"]["cost_usd"], 2.0 * PRICED_USD),
        "{priced}"
    );
    assert!(close(
        &model(&key, "glob-x")["lifetime"]["cost_usd"],
        glob_usd
    ));
    assert!(close(&model(&key, "unpriced")["today"]["cost_usd"], 0.0));
    assert_eq!(model(&key, "unpriced")["today"]["prompt_tokens"], 2000);

    let metrics = proxy.get_text("/metrics").await;
    let nanos = (total * 1e9).round() as u64;
    assert!(
        metrics.contains(&format!(
            "keyrelay_cost_nano_usd_total{{provider=\"mock\"}} {nanos}"
        )),
        "{metrics}"
    );

    // Each request's log: its own cost, in dollars; none for the model without a price.
    let logs = request_logs(&proxy.dir.path().join("logs"), 4).await;
    assert_eq!(logs.len(), 4);
    let log = |model: &str, stream: bool| {
        logs.iter()
            .find(|l| l["model"] == model && l["stream"] == stream)
            .unwrap_or_else(|| panic!("no log of {model}"))
    };
    for stream in [false, true] {
        let l = log("priced", stream);
        assert!(close(&l["cost_usd"], PRICED_USD), "{l}");
        assert_eq!(
            (l["cached_tokens"].as_u64(), l["completion_tokens"].as_u64()),
            (Some(1000), Some(500))
        );
    }
    assert_eq!(log("unpriced", false)["cost_usd"], Value::Null);

    // Today's and lifetime costs are kept across a restart.
    let dir = proxy.stop().await;
    let proxy = Proxy::start_in(setup(&mock), dir).await;
    let key = key_json(&proxy).await;
    assert!(close(&key["lifetime"]["cost_usd"], total), "{key}");
    assert!(close(
        &model(&key, "priced")["today"]["cost_usd"],
        2.0 * PRICED_USD
    ));
}

#[tokio::test]
async fn the_console_line_shows_the_cost_and_check_the_prices() {
    let mock = metered().await;
    let dir = binary::mock_dir(&mock, "");
    binary::write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(&mock.base_url, PRICES),
    );
    let (ok, out) = binary::check(dir.path());
    assert!(ok, "{out}");
    assert!(
        out.contains("prices for 2 models (taken 2026-11-29)"),
        "{out}"
    );
    let served = binary::start(dir.path(), &[], None);
    let answer = served.chat("mock/priced").send().await.unwrap();
    assert_eq!(answer.status(), 200);
    served
        .log_once("the cost", |l| {
            l.contains("served") && l.contains("cost_usd=0.000525")
        })
        .await;
}

#[tokio::test]
async fn a_price_that_is_not_one_is_refused_with_its_file() {
    let mock = metered().await;
    let dir = binary::mock_dir(&mock, "");
    binary::write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(
            &mock.base_url,
            "prices:\n  models:\n    m: {input: -1, output: 2}\n",
        ),
    );
    let (ok, out) = binary::check(dir.path());
    assert!(!ok, "{out}");
    assert!(out.contains("mock.yaml"), "{out}");
    assert!(out.contains("`taken` must give the day"), "{out}");
    assert!(out.contains("m: input is -1"), "{out}");
}
