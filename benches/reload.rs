//! Reload benchmark: what a configuration reload costs, how long a saved file takes to serve, and whether
//! requests pause meanwhile. Run with `cargo bench --bench reload`; prints a table.
//!
//! Setup: 50 providers with 20 keys each (1,000 keys) in a temporary directory, two loopback mock upstreams
//! answering with their own name, and keyrelay in-process on a loopback port with its file watcher running.

use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PROVIDERS: usize = 50;
const KEYS_PER_PROVIDER: usize = 20;
const ROUNDS: usize = 20;

async fn mock(name: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(move || async move {
        axum::Json(json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": name}, "finish_reason": "stop"}]}))
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn provider(base: &str) -> String {
    format!(
        "base_url: {base}\nmodels: {{list: static, static: [m]}}\nconcurrency: {{per_key_model: 0}}\n"
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn ask(client: &reqwest::Client, url: &str) -> (String, Duration) {
    let started = Instant::now();
    let body = json!({"model": "p0/m", "messages": []}).to_string();
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    (text, started.elapsed())
}

fn write_config(root: &Path, base: &str) {
    std::fs::create_dir_all(root.join("providers")).unwrap();
    let mut env = String::new();
    for p in 0..PROVIDERS {
        std::fs::write(root.join(format!("providers/p{p}.yaml")), provider(base)).unwrap();
        for k in 1..=KEYS_PER_PROVIDER {
            env.push_str(&format!("P{p}_API_KEY_{k}=bench-key-{p}-{k}-0123456789\n"));
        }
    }
    std::fs::write(root.join(".env"), env).unwrap();
    std::fs::write(root.join("config.yaml"), "").unwrap();
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = mock("a").await;
    let b = mock("b").await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &a);
    let opts = keyrelay::snapshot::LoadOptions {
        config: dir.path().join("config.yaml"),
        config_required: true,
        env_file: dir.path().join(".env"),
        host: Some("127.0.0.1".into()),
        port: Some(0),
        request_logging: false,
    };

    // 1. The cost of building and validating the whole configuration (what every reload does).
    let mut builds = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let snapshot = keyrelay::Snapshot::load(&opts).unwrap();
        builds.push(started.elapsed());
        assert_eq!(
            snapshot
                .providers
                .values()
                .map(|p| p.keys.len())
                .sum::<usize>(),
            PROVIDERS * KEYS_PER_PROVIDER
        );
    }
    builds.sort();

    let snapshot = keyrelay::Snapshot::load(&opts).unwrap();
    let running = keyrelay::app::start(snapshot, Some(opts), keyrelay::clock::Clock::system())
        .await
        .unwrap();
    let url = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    assert!(ask(&client, &url).await.0.contains("\"a\""));

    // 3 (baseline). The same traffic with no reload, for comparison.
    let mut quiet = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        quiet.push(ask(&client, &url).await.1);
    }
    quiet.sort();

    // 3 (background). Steady traffic, to see whether reloads pause request handling.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                latencies.push(ask(&client, &url).await.1);
            }
            latencies
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 2. Save -> first request served by the new configuration.
    let mut save_to_serve = Vec::new();
    let file = dir.path().join("providers/p0.yaml");
    for round in 0..ROUNDS {
        let (base, expect) = if round % 2 == 0 {
            (&b, "\"b\"")
        } else {
            (&a, "\"a\"")
        };
        let saved = Instant::now();
        std::fs::write(&file, provider(base)).unwrap();
        loop {
            let (text, _) = ask(&client, &url).await;
            if text.contains(expect) {
                save_to_serve.push(saved.elapsed());
                break;
            }
            assert!(
                saved.elapsed() < Duration::from_secs(10),
                "reload never served"
            );
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    save_to_serve.sort();
    stop.store(true, Ordering::Relaxed);
    let mut during = background.await.unwrap();
    during.sort();

    println!(
        "keyrelay reload benchmark: {PROVIDERS} providers, {} keys, {ROUNDS} rounds",
        PROVIDERS * KEYS_PER_PROVIDER
    );
    println!("| measure | p50 | max |");
    println!("|---|---|---|");
    println!(
        "| build + validate the configuration | {} | {} |",
        ms(percentile(&builds, 0.5)),
        ms(builds[builds.len() - 1])
    );
    println!(
        "| file saved -> first request served by it (includes {} ms debounce) | {} | {} |",
        100,
        ms(percentile(&save_to_serve, 0.5)),
        ms(save_to_serve[save_to_serve.len() - 1])
    );
    println!(
        "| request latency, no reload ({} requests; p99 {}) | {} | {} |",
        quiet.len(),
        ms(percentile(&quiet, 0.99)),
        ms(percentile(&quiet, 0.5)),
        ms(quiet[quiet.len() - 1])
    );
    println!(
        "| request latency while reloading ({} requests; p99 {}) | {} | {} |",
        during.len(),
        ms(percentile(&during, 0.99)),
        ms(percentile(&during, 0.5)),
        ms(during[during.len() - 1])
    );
    running.shutdown().await.expect("usage written");
}
