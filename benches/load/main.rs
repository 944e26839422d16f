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

mod mock;
mod soak;
mod stores;
mod table;

use mock::*;
use soak::soak;
use stores::stores;
use table::table;

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

/// keyrelay over `dir`, whose files the caller wrote: this build's binary, or the one `KEYRELAY_BIN` names (to
/// compare builds run interleaved).
fn keyrelay(dir: &Path) -> Process {
    let bin =
        std::env::var("KEYRELAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_keyrelay").into());
    let mut cmd = Command::new(bin);
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
