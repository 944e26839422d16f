//! Load benchmark: a zero-latency mock upstream and keyrelay run as separate processes on loopback; this process
//! is the load generator. Prints, for concurrency 1, 16, 64 and 256, streaming and not, throughput and p50/p99
//! latency direct to the mock and through keyrelay, the added latency, keyrelay's CPU time per 1,000 requests and
//! its peak RSS; then idle RSS with 1,000 keys and RSS with 256 open streams.
//!
//! `cargo bench --bench load` runs the table; `cargo bench --bench load -- soak [REQUESTS]` runs the soak: about
//! a million requests (by default) against keys of which a quarter rate-limit and a tenth are flaky, reporting
//! client-visible errors and RSS over time. Table options: `levels=1,64` (chosen rows only), `runs=3` (each row
//! measured three times, medians printed), `quick` (concurrency 16 only, no RSS runs).
//!
//! `cargo bench --bench load -- store=redis` compares the key stores instead: a real `redis-server` on loopback,
//! keyrelay with the in-process store and with the Redis store at concurrency 1 (the latency Redis adds) and 64
//! (throughput, with one and with two instances sharing the pool), and the Redis commands sent per request.

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const COMPLETION: &str = r#"{"id":"chatcmpl-load","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a short answer from the load mock."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":11,"total_tokens":23}}"#;

// ----------------------------------------------------------------------------------------------- the mock

fn chunk(content: &str, finish: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-load\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":{finish}}}]}}\n\n"
    )
}

/// Per-key behaviour for the soak: keys named `limited-*` rate-limit one request in three, `flaky-*` fail one in
/// ten with a 500; others always answer.
fn fault_for(key: &str, n: u64) -> Option<Response> {
    if key.starts_with("limited-") && n.is_multiple_of(3) {
        let body = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        return Some(
            (
                [("retry-after", "1"), ("content-type", "application/json")],
                body,
            )
                .into_response()
                .with_status(429),
        );
    }
    if key.starts_with("flaky-") && n.is_multiple_of(10) {
        return Some(
            (
                [("content-type", "application/json")],
                r#"{"error":{"message":"boom","type":"server_error"}}"#,
            )
                .into_response()
                .with_status(500),
        );
    }
    None
}

trait WithStatus {
    fn with_status(self, status: u16) -> Response;
}

impl WithStatus for Response {
    fn with_status(mut self, status: u16) -> Response {
        *self.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
        self
    }
}

async fn mock_chat(headers: HeaderMap, body: Bytes, slow: bool, count: Arc<AtomicU64>) -> Response {
    let n = count.fetch_add(1, Ordering::Relaxed);
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_start_matches("Bearer ");
    if let Some(fault) = fault_for(key, n) {
        return fault;
    }
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    if !stream {
        return ([("content-type", "application/json")], COMPLETION).into_response();
    }
    let mut frames: Vec<String> = [
        "Hello",
        "!",
        " This",
        " is",
        " a",
        " short",
        " streamed",
        " answer",
        ".",
    ]
    .iter()
    .map(|w| chunk(w, "null"))
    .collect();
    frames.push(chunk("", "\"stop\""));
    frames.push("data: {\"id\":\"chatcmpl-load\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":9,\"total_tokens\":21}}\n\ndata: [DONE]\n\n".into());
    let gap = if slow {
        Duration::from_millis(100)
    } else {
        Duration::ZERO
    };
    let stream = futures_util::stream::unfold(frames.into_iter(), move |mut it| async move {
        let frame = it.next()?;
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(frame)), it))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn run_mock() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let count = Arc::new(AtomicU64::new(0));
        let (fast, slow) = (count.clone(), count.clone());
        let app = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(move |h: HeaderMap, b: Bytes| {
                    mock_chat(h, b, false, fast.clone())
                }),
            )
            .route(
                "/slow/v1/chat/completions",
                axum::routing::post(move |h: HeaderMap, b: Bytes| {
                    mock_chat(h, b, true, slow.clone())
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTEN {}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}

// ------------------------------------------------------------------------------------------ the processes

/// A child process that printed its address; killed on drop.
struct Process {
    child: Child,
    addr: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn spawn(mut cmd: Command, marker: &str) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the process printed its address")
                .unwrap();
            if let Some(rest) = line.split(marker).nth(1) {
                break rest.trim().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Self { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn mock() -> Process {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("KEYRELAY_LOAD_MOCK", "1");
    Process::spawn(cmd, "LISTEN ")
}

/// keyrelay over `dir`, whose files the caller wrote.
fn keyrelay(dir: &Path) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrelay"));
    cmd.current_dir(dir)
        .env_clear()
        .env("RUST_LOG", "keyrelay=info")
        .envs(std::env::var("TOKIO_WORKER_THREADS").map(|n| ("TOKIO_WORKER_THREADS", n)))
        .args(["--port", "0"]);
    Process::spawn(cmd, "listening on http://")
}

/// Writes a keyrelay directory: `providers` providers with `keys` keys each, all pointing at `base`.
fn write_config(dir: &Path, base: &str, providers: usize, keys: impl Fn(usize) -> Vec<String>) {
    std::fs::create_dir_all(dir.join("providers")).unwrap();
    std::fs::write(dir.join("config.yaml"), "concurrency: {per_key_model: 0}\n").unwrap();
    let mut env = String::new();
    for p in 0..providers {
        let name = if p == 0 {
            "mock".to_string()
        } else {
            format!("mock{p}")
        };
        std::fs::write(
            dir.join(format!("providers/{name}.yaml")),
            format!("base_url: {base}\nmodels: {{list: static, static: [m]}}\n"),
        )
        .unwrap();
        for (i, key) in keys(p).iter().enumerate() {
            env.push_str(&format!(
                "{}_API_KEY_{}={key}\n",
                name.to_uppercase(),
                i + 1
            ));
        }
    }
    std::fs::write(dir.join(".env"), env).unwrap();
}

/// (user, user + system) CPU time of a process.
fn cpu(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (user, system) = (ticks(11), ticks(12));
    (
        Duration::from_millis(user * 10),
        Duration::from_millis((user + system) * 10),
    )
}

/// (user + system CPU time, current RSS in KiB, peak RSS in KiB) of a process.
fn usage(pid: u32) -> (Duration, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu(pid).1, kb("VmRSS:"), kb("VmHWM:"))
}

// ------------------------------------------------------------------------------------------------- the load

struct Run {
    /// Requests measured (after the warm-up).
    requests: usize,
    /// Every request made, warm-up included: what CPU time is divided by.
    all: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn percentile(&self, p: f64) -> Duration {
        self.latencies[((self.latencies.len() - 1) as f64 * p).round() as usize]
    }

    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// `concurrency` clients sending requests for `duration` (after a short warm-up).
async fn load(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    stream: bool,
    duration: Duration,
    model: &str,
) -> Run {
    let body = format!(
        r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"Say hello in one short sentence."}}]}}"#
    );
    let warm_up = Duration::from_millis(300);
    let start = Instant::now();
    let measure_from = start + warm_up;
    let until = measure_from + duration;
    let errors = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, body, errors, all) = (
                client.clone(),
                url.to_string(),
                body.clone(),
                errors.clone(),
                all.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let sent = Instant::now();
                    if sent >= until {
                        break;
                    }
                    let ok = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let good = r.status().is_success();
                            let text = r.bytes().await;
                            good && text.is_ok_and(|t| !stream || t.ends_with(b"data: [DONE]\n\n"))
                        }
                        Err(_) => false,
                    };
                    all.fetch_add(1, Ordering::Relaxed);
                    if sent >= measure_from {
                        latencies.push(sent.elapsed());
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    latencies.sort();
    Run {
        requests: latencies.len(),
        all: all.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: duration,
        latencies,
    }
}

/// One row's figures: a direct run, then the same load through keyrelay.
struct Row {
    direct_rps: f64,
    relayed_rps: f64,
    /// p50 and p99, in milliseconds.
    direct_ms: [f64; 2],
    relayed_ms: [f64; 2],
    added_ms: [f64; 2],
    cpu_per_k: f64,
    user_per_k: f64,
    floor_per_k: f64,
    errors: usize,
}

async fn row(
    client: &reqwest::Client,
    mock: &Process,
    proxy: &Process,
    direct_url: &str,
    proxy_url: &str,
    concurrency: usize,
    stream: bool,
) -> Row {
    let duration = Duration::from_secs(3);
    // The direct run's CPU, the mock's and this process's (the client): what one HTTP server plus one HTTP
    // client cost per request on this machine, the floor for any proxy, which is both.
    let (mock_before, _, _) = usage(mock.pid());
    let (client_before, _, _) = usage(std::process::id());
    let direct = load(client, direct_url, concurrency, stream, duration, "m").await;
    let floor_per_k = (usage(mock.pid()).0 - mock_before
        + (usage(std::process::id()).0 - client_before))
        .as_secs_f64()
        * 1e6
        / direct.all.max(1) as f64;
    let (user_before, cpu_before) = cpu(proxy.pid());
    let relayed = load(client, proxy_url, concurrency, stream, duration, "mock/m").await;
    let (user_after, cpu_after) = cpu(proxy.pid());
    let per_k = |d: Duration| d.as_secs_f64() * 1e6 / relayed.all.max(1) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pair = |run: &Run| [ms(run.percentile(0.5)), ms(run.percentile(0.99))];
    let added = |p: f64| ms(relayed.percentile(p).saturating_sub(direct.percentile(p)));
    Row {
        direct_rps: direct.throughput(),
        relayed_rps: relayed.throughput(),
        direct_ms: pair(&direct),
        relayed_ms: pair(&relayed),
        added_ms: [added(0.5), added(0.99)],
        cpu_per_k: per_k(cpu_after - cpu_before),
        user_per_k: per_k(user_after - user_before),
        floor_per_k,
        errors: direct.errors + relayed.errors,
    }
}

async fn table() {
    let mock = mock();
    let base = format!("http://{}/v1", mock.addr);
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &base, 1, |_| {
        (1..=16)
            .map(|i| format!("load-key-{i:04}-abcdefgh"))
            .collect()
    });
    let proxy = keyrelay(dir.path());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let direct_url = format!("{base}/chat/completions");
    let proxy_url = format!("http://{}/v1/chat/completions", proxy.addr);

    println!(
        "keyrelay load benchmark (zero-latency mock, loopback, both processes and the load on this machine)"
    );
    println!(
        "| concurrency | mode | direct req/s | keyrelay req/s | ratio | direct p50 / p99 ms | keyrelay p50 / p99 ms | added p50 / p99 ms | keyrelay CPU per 1k req | direct: mock + client CPU per 1k req | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let quick = std::env::args().any(|a| a == "quick");
    // `levels=1,64` picks the concurrency levels (and skips the RSS runs, like `quick`).
    let chosen: Option<Vec<usize>> = std::env::args()
        .find_map(|a| a.strip_prefix("levels=").map(String::from))
        .map(|l| l.split(',').filter_map(|n| n.parse().ok()).collect());
    let quick = quick || chosen.is_some();
    let levels = chosen.unwrap_or_else(|| {
        if quick {
            vec![16]
        } else {
            vec![1, 16, 64, 256]
        }
    });
    // `runs=3` measures each row three times and prints the median of each figure (this VM's timings move by
    // 10-30% between runs).
    let runs: usize = std::env::args()
        .find_map(|a| a.strip_prefix("runs=").and_then(|n| n.parse().ok()))
        .unwrap_or(1)
        .max(1);
    for &concurrency in &levels {
        for stream in [false, true] {
            let mut rows = Vec::new();
            for _ in 0..runs {
                rows.push(
                    row(
                        &client,
                        &mock,
                        &proxy,
                        &direct_url,
                        &proxy_url,
                        concurrency,
                        stream,
                    )
                    .await,
                );
            }
            let median = |f: fn(&Row) -> f64| {
                let mut v: Vec<f64> = rows.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let ms = |f: fn(&Row) -> f64| format!("{:.3}", median(f));
            println!(
                "| {concurrency} | {} | {:.0} | {:.0} | {:.0}% | {} / {} | {} / {} | {} / {} | {:.0} ms ({:.0} user) | {:.0} ms | {} |",
                if stream { "stream" } else { "json" },
                median(|r| r.direct_rps),
                median(|r| r.relayed_rps),
                median(|r| 100.0 * r.relayed_rps / r.direct_rps),
                ms(|r| r.direct_ms[0]),
                ms(|r| r.direct_ms[1]),
                ms(|r| r.relayed_ms[0]),
                ms(|r| r.relayed_ms[1]),
                ms(|r| r.added_ms[0]),
                ms(|r| r.added_ms[1]),
                median(|r| r.cpu_per_k),
                median(|r| r.user_per_k),
                median(|r| r.floor_per_k),
                rows.iter().map(|r| r.errors).sum::<usize>(),
            );
        }
    }
    let (_, _, peak) = usage(proxy.pid());
    println!(
        "\nkeyrelay peak RSS over the table: {:.1} MB",
        peak as f64 / 1024.0
    );
    drop(proxy);
    if quick {
        return;
    }

    // Idle with 1,000 keys (50 providers x 20 keys).
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &base, 50, |p| {
        (1..=20)
            .map(|i| format!("idle-key-{p:02}-{i:04}-abcdefgh"))
            .collect()
    });
    let idle = keyrelay(dir.path());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, rss, _) = usage(idle.pid());
    println!(
        "keyrelay idle RSS with 1,000 keys: {:.1} MB",
        rss as f64 / 1024.0
    );
    drop(idle);

    // 256 concurrent streams held open (the slow route: 11 chunks, 100 ms apart).
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!("http://{}/slow/v1", mock.addr),
        1,
        |_| {
            (1..=16)
                .map(|i| format!("slow-key-{i:04}-abcdefgh"))
                .collect()
        },
    );
    let streams = keyrelay(dir.path());
    let url = format!("http://{}/v1/chat/completions", streams.addr);
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, pid) = (peak.clone(), streams.pid());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(usage(pid).1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let run = load(&client, &url, 256, true, Duration::from_secs(4), "mock/m").await;
    sampler.abort();
    println!(
        "keyrelay RSS with 256 concurrent streams: {:.1} MB peak ({} streams completed, {} errors)",
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
        run.requests,
        run.errors
    );
}

// ------------------------------------------------------------------------------------------- the stores

/// The tests' `redis-server` (loopback, a free port, no persistence, killed on drop).
#[path = "../tests/it/support/redis.rs"]
#[allow(dead_code)]
mod test_redis;

/// Scripts Redis ran (`EVALSHA`, `EVAL`), and the microseconds it spent in them: each is one of keyrelay's
/// round trips (the commands a script runs inside are not).
async fn redis_scripts(redis: &test_redis::Redis) -> (u64, u64) {
    let stats = redis.command_stats().await;
    ["evalsha", "eval"]
        .iter()
        .filter_map(|name| stats.get(*name))
        .fold((0, 0), |(c, u), (calls, usec)| (c + calls, u + usec))
}

/// `concurrency` clients spread over `urls`, as one run.
async fn load_spread(
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

async fn stores() {
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

fn redis_version() -> String {
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

async fn soak(total: usize) {
    let mock = mock();
    let base = format!("http://{}/v1", mock.addr);
    let dir = tempfile::tempdir().unwrap();
    // 40 keys: 10 rate-limit (a quarter), 4 are flaky (a tenth), 26 healthy.
    write_config(dir.path(), &base, 1, |_| {
        (0..40)
            .map(|i| match i {
                0..10 => format!("limited-{i:04}-abcdefgh"),
                10..14 => format!("flaky-{i:04}-abcdefgh"),
                _ => format!("healthy-{i:04}-abcdefgh"),
            })
            .collect()
    });
    let proxy = keyrelay(dir.path());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr);
    let sent = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    println!("keyrelay soak: {total} requests, 32 clients, 40 keys (10 rate-limiting, 4 flaky)");
    println!("| requests | elapsed s | req/s | client-visible errors | RSS MB |");
    println!("|---|---|---|---|---|");
    let workers: Vec<_> = (0..32)
        .map(|i| {
            let (client, url, sent, errors) = (client.clone(), url.clone(), sent.clone(), errors.clone());
            tokio::spawn(async move {
                let body = format!(r#"{{"model":"mock/m","stream":{},"messages":[{{"role":"user","content":"hi"}}]}}"#, i % 4 == 0);
                while sent.fetch_add(1, Ordering::Relaxed) < total {
                    let ok = match client.post(&url).header("content-type", "application/json").body(body.clone()).send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let step = (total / 10).max(1);
    let mut next = step;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let finished = workers.iter().all(|w| w.is_finished());
        let done = sent.load(Ordering::Relaxed).min(total);
        if done >= next || finished {
            let elapsed = started.elapsed().as_secs_f64();
            let (_, rss, _) = usage(proxy.pid());
            println!(
                "| {done} | {elapsed:.0} | {:.0} | {} | {:.1} |",
                done as f64 / elapsed,
                errors.load(Ordering::Relaxed),
                rss as f64 / 1024.0
            );
            next = done + step;
        }
        if finished {
            break;
        }
    }
}

fn main() {
    if std::env::var("KEYRELAY_LOAD_MOCK").is_ok() {
        return run_mock();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.iter().any(|a| a == "store=redis") {
        rt.block_on(stores());
    } else if let Some(i) = args.iter().position(|a| a == "soak") {
        let total = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000_000);
        rt.block_on(soak(total));
    } else {
        rt.block_on(table());
    }
}
