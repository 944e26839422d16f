//! The table: throughput, latency and CPU per concurrency level, straight to the mock and through keyrelay.

use super::*;

pub(crate) struct Row {
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

pub(crate) async fn row(
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

pub(crate) async fn table() {
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
