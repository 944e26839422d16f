//! The soak: about a million requests against flaky and rate-limited keys.

use super::*;

pub(crate) async fn soak(total: usize) {
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
