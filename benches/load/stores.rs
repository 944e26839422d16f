//! `store=redis`: the in-process store against the Redis store, one and two instances.

use super::*;

/// The tests' `redis-server` (loopback, a free port, no persistence, killed on drop).
#[path = "../../tests/it/support/redis.rs"]
#[allow(dead_code)]
mod test_redis;

/// Scripts Redis ran (`EVALSHA`, `EVAL`), and the microseconds it spent in them: each is one of keyrelay's
/// round trips (the commands a script runs inside are not).
pub(crate) async fn redis_scripts(redis: &test_redis::Redis) -> (u64, u64) {
    let stats = redis.command_stats().await;
    ["evalsha", "eval"]
        .iter()
        .filter_map(|name| stats.get(*name))
        .fold((0, 0), |(c, u), (calls, usec)| (c + calls, u + usec))
}

/// `concurrency` clients spread over `urls`, as one run.
pub(crate) async fn load_spread(
    client: &reqwest::Client,
    urls: &[String],
    concurrency: usize,
    duration: Duration,
) -> Run {
    let runs = futures_util::future::join_all(urls.iter().map(|url| {
        load(
            client,
            url,
            concurrency / urls.len(),
            false,
            duration,
            "mock/m",
        )
    }))
    .await;
    let mut all = Run {
        requests: 0,
        all: 0,
        errors: 0,
        elapsed: duration,
        latencies: Vec::new(),
    };
    for run in runs {
        all.requests += run.requests;
        all.all += run.all;
        all.errors += run.errors;
        all.latencies.extend(run.latencies);
    }
    all.latencies.sort();
    all
}

pub(crate) async fn stores() {
    let mock = mock();
    let base = format!("http://{}/v1", mock.addr);
    let redis = test_redis::Redis::start();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let keys = |_| {
        (1..=16)
            .map(|i| format!("load-key-{i:04}-abcdefgh"))
            .collect()
    };
    // One directory per instance; the Redis ones share the pool.
    let instance = |store: &str| {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), &base, 1, keys);
        let config = dir.path().join("config.yaml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(store);
        std::fs::write(&config, text).unwrap();
        let process = keyrelay(dir.path());
        let url = format!("http://{}/v1/chat/completions", process.addr);
        (dir, process, url)
    };
    let memory = instance("store: memory\n");
    let shared = format!(
        "store: {{redis: {{url: \"redis://127.0.0.1:{}\"}}}}\n",
        redis.port
    );
    let first = instance(&shared);
    let second = instance(&shared);
    let duration = Duration::from_secs(5);
    println!(
        "keyrelay key stores (zero-latency mock, redis-server {} on loopback, no persistence; JSON requests)",
        redis_version()
    );
    println!(
        "| store | instances | concurrency | req/s | p50 / p99 ms | Redis round trips per request | Redis time per request | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut p50 = Vec::new();
    for (name, urls, concurrency) in [
        ("memory", vec![memory.2.clone()], 1),
        ("redis", vec![first.2.clone()], 1),
        ("memory", vec![memory.2.clone()], 64),
        ("redis", vec![first.2.clone()], 64),
        ("redis", vec![first.2.clone(), second.2.clone()], 64),
    ] {
        let before = redis_scripts(&redis).await;
        let run = load_spread(&client, &urls, concurrency, duration).await;
        let after = redis_scripts(&redis).await;
        let per_request = |n: u64| n as f64 / run.all.max(1) as f64;
        let (trips, usec) = (
            per_request(after.0 - before.0),
            per_request(after.1 - before.1),
        );
        let ms = |p: f64| run.percentile(p).as_secs_f64() * 1000.0;
        if concurrency == 1 {
            p50.push((ms(0.5), ms(0.99)));
        }
        println!(
            "| {name} | {} | {concurrency} | {:.0} | {:.3} / {:.3} | {} | {} | {} |",
            urls.len(),
            run.throughput(),
            ms(0.5),
            ms(0.99),
            if name == "redis" {
                format!("{trips:.2}")
            } else {
                "-".into()
            },
            if name == "redis" {
                format!("{usec:.0} µs")
            } else {
                "-".into()
            },
            run.errors,
        );
    }
    println!(
        "\nlatency the Redis store adds at concurrency 1: p50 {:.3} ms, p99 {:.3} ms",
        p50[1].0 - p50[0].0,
        p50[1].1 - p50[0].1
    );
}

pub(crate) fn redis_version() -> String {
    let out = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or("?")
        .to_string()
}
