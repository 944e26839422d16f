//! Prometheus metrics through the `metrics` facade and its Prometheus exporter, kept per running server (a
//! recorder of its own, never the process-global one) and rendered on keyrelay's own `/metrics` route.
//!
//! Labels stay low-cardinality: provider (configured ones only), model (at most [`MAX_MODELS`] per provider, the
//! rest counted as `other`), outcome, error class, key state. A key never appears.

use super::Journal;
use crate::failure::ErrorClass;
use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use metrics_util::MetricKindMask;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Distinct model label values per provider; clients can send any model name.
pub const MAX_MODELS: usize = 50;

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

/// Values read at scrape time are set just before rendering; a gauge not set for this long belongs to
/// something that is gone (a provider removed by a reload) and is no longer shown.
const STALE_GAUGE: Duration = Duration::from_secs(5);

/// The exporter keeps each histogram sample until an upkeep folds it into the buckets; doing that every this many
/// requests bounds that memory however rarely `/metrics` is scraped.
const UPKEEP_EVERY: u64 = 4096;

/// Live values read at scrape time.
#[derive(Default)]
pub struct Gauges {
    /// (provider, state) -> keys.
    pub keys: BTreeMap<(String, &'static str), u64>,
    pub config_generation: u64,
    pub reload_failures: u64,
    /// provider -> script failures of its current script (counted from zero again when a reload loads it anew).
    pub script_errors: BTreeMap<String, u64>,
    /// Where key state lives now (`memory`, `redis`, `degraded`).
    pub store: &'static str,
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// provider -> its handles, registered on first use: recording is then a few atomic adds, with no label
    /// built or looked up in the registry.
    providers: Mutex<HashMap<String, ProviderMetrics>>,
    overhead: Histogram,
    /// Requests recorded: every [`UPKEEP_EVERY`], histogram samples are folded into their buckets.
    recorded: AtomicU64,
    /// provider -> (the script's count at the last scrape, the total since start): script failures stay a
    /// counter across reloads, which start a script's own count again.
    script_errors: Mutex<HashMap<String, (u64, u64)>>,
}

/// One provider's metric handles.
struct ProviderMetrics {
    /// The provider's label value.
    label: String,
    /// Model label -> outcome -> requests. The models that earned a label of their own, and `other`.
    requests: HashMap<String, HashMap<String, Counter>>,
    attempts: HashMap<&'static str, Counter>,
    cooldowns: HashMap<&'static str, Counter>,
    latency: Histogram,
    continuations: Counter,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    cost: Counter,
}

impl ProviderMetrics {
    fn new(label: String) -> Self {
        let p = label.clone();
        Self {
            requests: HashMap::new(),
            attempts: HashMap::new(),
            cooldowns: HashMap::new(),
            latency: histogram!("keyrelay_upstream_latency_seconds", "provider" => p.clone()),
            continuations: counter!("keyrelay_stream_continuations_total", "provider" => p.clone()),
            prompt_tokens: counter!("keyrelay_tokens_total", "provider" => p.clone(), "kind" => "prompt"),
            completion_tokens: counter!("keyrelay_tokens_total", "provider" => p.clone(), "kind" => "completion"),
            cost: counter!("keyrelay_cost_nano_usd_total", "provider" => p),
            label,
        }
    }

    /// Models with a label of their own.
    fn labelled(&self) -> usize {
        self.requests.len() - usize::from(self.requests.contains_key("other"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    "keyrelay_upstream_latency_seconds".into(),
                ),
                LATENCY_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "keyrelay_proxy_overhead_seconds".into(),
                    ),
                    OVERHEAD_BUCKETS,
                )
            })
            .expect("the bucket lists are not empty")
            .idle_timeout(MetricKindMask::GAUGE, Some(STALE_GAUGE))
            .build_recorder();
        let handle = recorder.handle();
        let overhead = metrics::with_local_recorder(&recorder, || {
            describe();
            histogram!("keyrelay_proxy_overhead_seconds")
        });
        Self {
            recorder,
            handle,
            providers: Mutex::default(),
            overhead,
            recorded: AtomicU64::new(0),
            script_errors: Mutex::default(),
        }
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "keyrelay_requests_total",
        "Relayed requests by provider, model and outcome."
    );
    describe_counter!(
        "keyrelay_upstream_attempts_total",
        "Upstream attempts by provider and result (success or error class)."
    );
    describe_counter!(
        "keyrelay_cooldowns_started_total",
        "Cooldowns started, by provider and reason."
    );
    describe_counter!(
        "keyrelay_tokens_total",
        "Tokens reported by upstreams, by provider and kind."
    );
    describe_counter!(
        "keyrelay_cost_nano_usd_total",
        "What answers cost at the provider files' prices, in nano-dollars (1e-9 USD), by provider."
    );
    describe_counter!(
        "keyrelay_stream_continuations_total",
        "Broken streams continued by another key or model, by the provider the stream started on."
    );
    describe_histogram!(
        "keyrelay_upstream_latency_seconds",
        "Upstream attempt latency by provider."
    );
    describe_histogram!(
        "keyrelay_proxy_overhead_seconds",
        "Time keyrelay added to successful requests, excluding upstream time and waits."
    );
    describe_gauge!(
        "keyrelay_keys",
        "Keys by provider and state (available, busy, cooling, benched, disabled)."
    );
    describe_counter!("keyrelay_script_errors_total", "Provider script failures.");
    describe_gauge!(
        "keyrelay_config_generation",
        "The configuration generation serving (1 at start, +1 per reload)."
    );
    describe_counter!(
        "keyrelay_config_reload_failures_total",
        "Reloads rejected because the files were invalid."
    );
    describe_gauge!(
        "keyrelay_slow_work_running",
        "Slow jobs (script calls; token counts and large bodies) running, by pool."
    );
    describe_gauge!(
        "keyrelay_slow_work_waiting",
        "Slow jobs waiting for their client's turn, by pool."
    );
    describe_counter!(
        "keyrelay_slow_work_refused_total",
        "Requests refused with 503 server_busy: their client had too much waiting, or they waited too long."
    );
}

/// A label value with every control character but the newline (which the exporter escapes) written as its
/// code (`\u{1b}`), so that nothing a client named reaches a scraper or a terminal raw.
fn label(value: &str) -> String {
    if !value.chars().any(|c| c.is_control() && c != '\n') {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            c if c.is_control() && c != '\n' => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

impl Metrics {
    pub fn record(&self, j: &Journal) {
        let mut providers = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        let name = if j.provider.is_empty() {
            "unknown"
        } else {
            j.provider.as_str()
        };
        if !providers.contains_key(name) {
            let p =
                metrics::with_local_recorder(&self.recorder, || ProviderMetrics::new(label(name)));
            providers.insert(name.to_string(), p);
        }
        let p = providers.get_mut(name).expect("inserted above");
        let model = if j.provider.is_empty() {
            "-"
        } else if p.requests.contains_key(&j.model)
            // A model earns its own label by being served once (a stream that started counts, however it
            // ended); names clients make up stay `other`.
            || ((200..300).contains(&j.status) && p.labelled() < MAX_MODELS)
        {
            j.model.as_str()
        } else {
            "other"
        };
        let outcome = j.outcome();
        let registered = p
            .requests
            .get(model)
            .and_then(|outcomes| outcomes.get(outcome))
            .cloned();
        let requests = registered.unwrap_or_else(|| {
            let counter = metrics::with_local_recorder(&self.recorder, || {
                counter!("keyrelay_requests_total", "provider" => p.label.clone(), "model" => label(model), "outcome" => label(outcome))
            });
            p.requests
                .entry(model.to_string())
                .or_default()
                .insert(outcome.to_string(), counter.clone());
            counter
        });
        requests.increment(1);
        for a in &j.attempts {
            let class = a.class.map_or("success", |c| c.as_str());
            let provider = &p.label;
            p.attempts
                .entry(class)
                .or_insert_with(|| {
                    metrics::with_local_recorder(&self.recorder, || {
                        counter!("keyrelay_upstream_attempts_total", "provider" => provider.clone(), "result" => class)
                    })
                })
                .increment(1);
            p.latency.record(a.latency_ms / 1000.0);
            if let Some(c) = a.class.filter(|c| {
                matches!(
                    c,
                    ErrorClass::RateLimit
                        | ErrorClass::Quota
                        | ErrorClass::Auth
                        | ErrorClass::Forbidden
                )
            }) {
                let reason = c.as_str();
                p.cooldowns
                    .entry(reason)
                    .or_insert_with(|| {
                        metrics::with_local_recorder(&self.recorder, || {
                            counter!("keyrelay_cooldowns_started_total", "provider" => provider.clone(), "reason" => reason)
                        })
                    })
                    .increment(1);
            }
        }
        if j.continued > 0 {
            p.continuations.increment(u64::from(j.continued));
        }
        if j.prompt_tokens > 0 {
            p.prompt_tokens.increment(j.prompt_tokens);
        }
        if j.completion_tokens > 0 {
            p.completion_tokens.increment(j.completion_tokens);
        }
        if let Some(cost) = j.cost.filter(|c| c.0 > 0) {
            p.cost.increment(cost.0);
        }
        if !j.attempts.is_empty() && j.error.is_none() {
            // What keyrelay itself added before the response was ready: not upstream time, not waiting.
            let overhead = (j.first_byte_ms - j.upstream_ms() - j.waited_ms).max(0.0) / 1000.0;
            self.overhead.record(overhead);
        }
        drop(providers);
        if self.recorded.fetch_add(1, Ordering::Relaxed) % UPKEEP_EVERY == UPKEEP_EVERY - 1 {
            self.handle.run_upkeep();
        }
    }

    /// The Prometheus text exposition, with the values read at scrape time.
    pub fn render(&self, gauges: &Gauges) -> String {
        metrics::with_local_recorder(&self.recorder, || {
            for ((p, state), n) in &gauges.keys {
                gauge!("keyrelay_keys", "provider" => label(p), "state" => *state).set(*n as f64);
            }
            let mut totals = self.script_errors.lock().unwrap_or_else(|e| e.into_inner());
            for (p, n) in &gauges.script_errors {
                let (last, total) = totals.entry(p.clone()).or_default();
                // A count below the last one is a new script's, counted from zero.
                *total += if *n >= *last { *n - *last } else { *n };
                *last = *n;
                counter!("keyrelay_script_errors_total", "provider" => label(p)).absolute(*total);
            }
            gauge!("keyrelay_config_generation").set(gauges.config_generation as f64);
            // 1 while a shared store is away and this instance serves from its own key state.
            gauge!("keyrelay_store_degraded").set(f64::from(u8::from(gauges.store == "degraded")));
            counter!("keyrelay_config_reload_failures_total").absolute(gauges.reload_failures);
            for pool in crate::offload::Pool::ALL {
                let stats = crate::offload::stats(pool);
                gauge!("keyrelay_slow_work_running", "pool" => pool.name())
                    .set(stats.running as f64);
                gauge!("keyrelay_slow_work_waiting", "pool" => pool.name())
                    .set(stats.waiting as f64);
                counter!("keyrelay_slow_work_refused_total", "pool" => pool.name())
                    .absolute(stats.refused);
            }
        });
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::AttemptRecord;

    #[test]
    fn label_values_never_carry_control_characters() {
        let m = Metrics::default();
        m.record(&journal("nope\u{1b}[2J\u{7}", None));
        m.record(&journal("a\"b\nd", None));
        let text = m.render(&Gauges::default());
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
        assert!(text.contains(r#"model="nope\\u{1b}[2J\\u{7}""#), "{text}");
        assert!(text.contains(r#"model="a\"b\nd""#), "{text}");
    }

    #[test]
    fn histogram_samples_are_folded_while_nobody_scrapes() {
        let m = Metrics::default();
        let j = journal("m", None);
        for _ in 0..UPKEEP_EVERY {
            m.record(&j);
        }
        let before = crate::alloc::thread_net();
        for _ in 0..20 * UPKEEP_EVERY {
            m.record(&j);
        }
        let grown = crate::alloc::thread_net() - before;
        // Kept as samples, 20 x 4096 requests' three samples would hold about 2 MB.
        assert!(grown < 256 << 10, "{grown} bytes kept");
        let text = m.render(&Gauges::default());
        let requests = 21 * UPKEEP_EVERY;
        assert!(
            text.contains(&format!("keyrelay_proxy_overhead_seconds_count {requests}")),
            "no sample lost: {text}"
        );
    }

    #[test]
    fn script_failures_stay_a_counter_across_reloads() {
        let m = Metrics::default();
        let mut gauges = Gauges::default();
        gauges.script_errors.insert("p".into(), 3);
        gauges.keys.insert(("p".into(), "available"), 2);
        m.render(&gauges);
        // A reload loaded the script anew: its own count starts again.
        gauges.script_errors.insert("p".into(), 1);
        let text = m.render(&gauges);
        assert!(
            text.contains("keyrelay_script_errors_total{provider=\"p\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE keyrelay_script_errors_total counter"),
            "{text}"
        );
        assert!(
            text.contains("keyrelay_keys{provider=\"p\",state=\"available\"} 2"),
            "{text}"
        );
    }

    fn journal(model: &str, error: Option<&str>) -> Journal {
        let mut j = Journal::new("chat", "p", model, false, 0);
        j.attempts.push(AttemptRecord {
            model: "p/m".into(),
            key: "...0001".into(),
            started_ms: 0,
            latency_ms: 20.0,
            status: Some(429),
            class: Some(ErrorClass::RateLimit),
            error: None,
        });
        j.attempts.push(AttemptRecord {
            model: "p/m".into(),
            key: "...0002".into(),
            started_ms: 20,
            latency_ms: 30.0,
            status: Some(200),
            class: None,
            error: None,
        });
        j.status = if error.is_none() { 200 } else { 502 };
        j.error = error.map(String::from);
        j.prompt_tokens = 5;
        j.cost = error.is_none().then_some(crate::usage::Cost(1500));
        j.first_byte_ms = 51.0;
        j
    }

    #[test]
    fn renders_counters_histograms_and_caps_models() {
        let m = Metrics::default();
        m.record(&journal("m\"1", None));
        m.record(&journal("m\"1", Some("deadline_exceeded")));
        for i in 0..(MAX_MODELS + 5) {
            m.record(&journal(&format!("spam-{i}"), None));
        }
        let text = m.render(&Gauges::default());
        assert!(
            text.contains(
                "keyrelay_requests_total{provider=\"p\",model=\"m\\\"1\",outcome=\"success\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("model=\"m\\\"1\",outcome=\"deadline_exceeded\"} 1"),
            "{text}"
        );
        m.record(&journal("made-up", Some("upstream_invalid_request")));
        let text = m.render(&Gauges::default());
        assert!(
            text.contains("model=\"other\",outcome=\"upstream_invalid_request\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "keyrelay_upstream_attempts_total{provider=\"p\",result=\"rate_limit\"} 58"
            )
        );
        assert!(
            text.contains(
                "keyrelay_cooldowns_started_total{provider=\"p\",reason=\"rate_limit\"} 58"
            )
        );
        assert!(text.contains("keyrelay_tokens_total{provider=\"p\",kind=\"prompt\"} 290"));
        assert!(
            text.contains("keyrelay_cost_nano_usd_total{provider=\"p\"} 84000"),
            "{text}"
        );
        assert!(text.contains("model=\"other\",outcome=\"success\"} 6"));
        assert!(
            text.contains(
                "keyrelay_upstream_latency_seconds_bucket{provider=\"p\",le=\"0.025\"} 58"
            )
        );
        assert!(text.contains("keyrelay_proxy_overhead_seconds_count 56"));
    }
}
