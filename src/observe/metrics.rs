//! Prometheus metrics, kept per running server (no process-global registry) and rendered in the text format.
//!
//! Labels stay low-cardinality: provider (configured ones only), model (at most [`MAX_MODELS`] per provider, the
//! rest counted as `other`), outcome, error class, key state. A key never appears.

use super::Journal;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Mutex;

/// Distinct model label values per provider; clients can send any model name.
pub const MAX_MODELS: usize = 50;

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if value <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, String), u64>,
    attempts: BTreeMap<(String, String), u64>,
    cooldowns: BTreeMap<(String, String), u64>,
    tokens: BTreeMap<(String, &'static str), u64>,
    continuations: BTreeMap<String, u64>,
    upstream_latency: BTreeMap<String, Histogram>,
    overhead: Option<Histogram>,
    models: BTreeMap<String, BTreeSet<String>>,
}

/// Live values read at scrape time.
#[derive(Default)]
pub struct Gauges {
    /// (provider, state) -> keys.
    pub keys: BTreeMap<(String, &'static str), u64>,
    pub config_generation: u64,
    pub reload_failures: u64,
    /// provider -> script failures.
    pub script_errors: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// A label value, escaped for the text format.
/// A label value as the text format wants it: `\\`, `"` and newlines escaped, and any other control character
/// written as its code (`\\u{1b}`), so that nothing a client named reaches a scraper or a terminal raw.
fn esc(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

impl Metrics {
    pub fn record(&self, j: &Journal) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let provider = if j.provider.is_empty() {
            "unknown".to_string()
        } else {
            j.provider.clone()
        };
        let model = if j.provider.is_empty() {
            "-".to_string()
        } else {
            // A model earns its own label by being served once (a stream that started counts, however it
            // ended); names clients make up stay `other`.
            let served = (200..300).contains(&j.status);
            let seen = m.models.entry(provider.clone()).or_default();
            if seen.contains(&j.model) || (served && seen.len() < MAX_MODELS) {
                seen.insert(j.model.clone());
                j.model.clone()
            } else {
                "other".to_string()
            }
        };
        *m.requests
            .entry((provider.clone(), model, j.outcome().to_string()))
            .or_default() += 1;
        for a in &j.attempts {
            let class = a.class.map_or("success", |c| c.as_str());
            *m.attempts
                .entry((provider.clone(), class.to_string()))
                .or_default() += 1;
            m.upstream_latency
                .entry(provider.clone())
                .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
                .observe(a.latency_ms / 1000.0);
            if let Some(c) = a.class.filter(|c| {
                matches!(
                    c,
                    crate::provider::ErrorClass::RateLimit
                        | crate::provider::ErrorClass::Quota
                        | crate::provider::ErrorClass::Auth
                        | crate::provider::ErrorClass::Forbidden
                )
            }) {
                *m.cooldowns
                    .entry((provider.clone(), c.as_str().to_string()))
                    .or_default() += 1;
            }
        }
        if j.continued > 0 {
            *m.continuations.entry(provider.clone()).or_default() += u64::from(j.continued);
        }
        if j.prompt_tokens > 0 {
            *m.tokens.entry((provider.clone(), "prompt")).or_default() += j.prompt_tokens;
        }
        if j.completion_tokens > 0 {
            *m.tokens
                .entry((provider.clone(), "completion"))
                .or_default() += j.completion_tokens;
        }
        if !j.attempts.is_empty() && j.error.is_none() {
            // What keyrelay itself added before the response was ready: not upstream time, not waiting.
            let overhead = (j.first_byte_ms - j.upstream_ms() - j.waited_ms).max(0.0) / 1000.0;
            m.overhead
                .get_or_insert_with(|| Histogram::new(OVERHEAD_BUCKETS))
                .observe(overhead);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: &Gauges) -> String {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "keyrelay_requests_total",
            "counter",
            "Relayed requests by provider, model and outcome.",
        );
        for ((p, model, outcome), n) in &m.requests {
            let _ = writeln!(
                out,
                "keyrelay_requests_total{{provider=\"{}\",model=\"{}\",outcome=\"{}\"}} {n}",
                esc(p),
                esc(model),
                esc(outcome)
            );
        }
        family(
            &mut out,
            "keyrelay_upstream_attempts_total",
            "counter",
            "Upstream attempts by provider and result (success or error class).",
        );
        for ((p, class), n) in &m.attempts {
            let _ = writeln!(
                out,
                "keyrelay_upstream_attempts_total{{provider=\"{}\",result=\"{class}\"}} {n}",
                esc(p)
            );
        }
        family(
            &mut out,
            "keyrelay_cooldowns_started_total",
            "counter",
            "Cooldowns started, by provider and reason.",
        );
        for ((p, reason), n) in &m.cooldowns {
            let _ = writeln!(
                out,
                "keyrelay_cooldowns_started_total{{provider=\"{}\",reason=\"{reason}\"}} {n}",
                esc(p)
            );
        }
        family(
            &mut out,
            "keyrelay_tokens_total",
            "counter",
            "Tokens reported by upstreams, by provider and kind.",
        );
        for ((p, kind), n) in &m.tokens {
            let _ = writeln!(
                out,
                "keyrelay_tokens_total{{provider=\"{}\",kind=\"{kind}\"}} {n}",
                esc(p)
            );
        }
        family(
            &mut out,
            "keyrelay_stream_continuations_total",
            "counter",
            "Broken streams continued by another key or model, by the provider the stream started on.",
        );
        for (p, n) in &m.continuations {
            let _ = writeln!(
                out,
                "keyrelay_stream_continuations_total{{provider=\"{}\"}} {n}",
                esc(p)
            );
        }
        family(
            &mut out,
            "keyrelay_upstream_latency_seconds",
            "histogram",
            "Upstream attempt latency by provider.",
        );
        for (p, h) in &m.upstream_latency {
            h.render(
                &mut out,
                "keyrelay_upstream_latency_seconds",
                &format!("provider=\"{}\"", esc(p)),
            );
        }
        family(
            &mut out,
            "keyrelay_proxy_overhead_seconds",
            "histogram",
            "Time keyrelay added to successful requests, excluding upstream time and waits.",
        );
        if let Some(h) = &m.overhead {
            h.render(&mut out, "keyrelay_proxy_overhead_seconds", "");
        }
        family(
            &mut out,
            "keyrelay_keys",
            "gauge",
            "Keys by provider and state (available, busy, cooling, benched).",
        );
        for ((p, state), n) in &gauges.keys {
            let _ = writeln!(
                out,
                "keyrelay_keys{{provider=\"{}\",state=\"{state}\"}} {n}",
                esc(p)
            );
        }
        family(
            &mut out,
            "keyrelay_script_errors_total",
            "counter",
            "Provider script failures since the configuration was loaded.",
        );
        for (p, n) in &gauges.script_errors {
            let _ = writeln!(
                out,
                "keyrelay_script_errors_total{{provider=\"{}\"}} {n}",
                esc(p)
            );
        }
        family(
            &mut out,
            "keyrelay_config_generation",
            "gauge",
            "The configuration generation serving (1 at start, +1 per reload).",
        );
        let _ = writeln!(
            out,
            "keyrelay_config_generation {}",
            gauges.config_generation
        );
        family(
            &mut out,
            "keyrelay_config_reload_failures_total",
            "counter",
            "Reloads rejected because the files were invalid.",
        );
        let _ = writeln!(
            out,
            "keyrelay_config_reload_failures_total {}",
            gauges.reload_failures
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::AttemptRecord;
    use crate::provider::ErrorClass;

    #[test]
    fn label_values_never_carry_control_characters() {
        assert_eq!(esc("plain/model-1"), "plain/model-1");
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let escaped = esc("nope\u{1b}[2J\u{7}");
        assert!(!escaped.chars().any(char::is_control), "{escaped}");
        assert_eq!(escaped, "nope\\\\u{1b}[2J\\\\u{7}");
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
        assert!(text.contains("model=\"other\",outcome=\"success\"} 6"));
        assert!(
            text.contains(
                "keyrelay_upstream_latency_seconds_bucket{provider=\"p\",le=\"0.025\"} 58"
            )
        );
        assert!(text.contains("keyrelay_proxy_overhead_seconds_count 56"));
    }
}
