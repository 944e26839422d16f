//! What happened to each request, and who is told: the console log line, the request log files, and the
//! metrics. The relay fills a [`Journal`] while it works and hands it to an [`Observer`] when the request ends
//! (for a stream: when the stream ends, however it ends).

pub mod console;
pub mod log_writer;
pub mod metrics;
pub mod request_log;
pub mod throttle;

use crate::clock::UnixMs;
use crate::failure::ErrorClass;
use crate::usage::Cost;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// One upstream attempt, as recorded. Never holds a key: only its masked form.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptRecord {
    /// `provider/model` (fallbacks make several).
    pub model: String,
    pub key: String,
    /// Since the request started.
    pub started_ms: u64,
    pub latency_ms: f64,
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    /// `None` for a success.
    pub class: Option<ErrorClass>,
    /// The start of the upstream's error body.
    pub error: Option<String>,
}

/// Everything about one relayed request.
#[derive(Clone, Debug, Serialize)]
pub struct Journal {
    pub at: UnixMs,
    pub endpoint: &'static str,
    pub provider: String,
    pub model: String,
    pub stream: bool,
    /// The client's body, kept only when an observer wants bodies.
    pub request: Option<Value>,
    pub attempts: Vec<AttemptRecord>,
    /// Time spent waiting for a free or cooled key and in backoff.
    pub waited_ms: f64,
    /// The status the client got (200 for a stream that started).
    pub status: u16,
    /// The error code, when the request failed (or a stream ended badly).
    pub error: Option<String>,
    /// The masked key that served.
    pub key: Option<String>,
    /// The `provider/model` that answered, when it was a fallback.
    pub fallback: Option<String>,
    /// Times a broken stream was continued by another key or model.
    pub continued: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of the prompt tokens, those the upstream read from its cache.
    pub cached_tokens: u64,
    /// What the answer cost, when its model has a price (in dollars in the request log).
    #[serde(rename = "cost_usd", serialize_with = "usd")]
    pub cost: Option<Cost>,
    /// Until the response was ready (for a stream: until its first byte was sent).
    pub first_byte_ms: f64,
    pub total_ms: f64,
    /// The JSON response or, for a stream, its transcript; kept only when an observer wants bodies.
    pub response: Option<Value>,
    #[serde(skip)]
    pub started: std::time::Instant,
    /// The key pools of the providers tried: no key of theirs is written, whoever wrote it (an upstream, or a
    /// client pasting one into a prompt).
    #[serde(skip)]
    pub pools: Vec<std::sync::Arc<crate::secret::Redactor>>,
}

impl Journal {
    pub fn new(
        endpoint: &'static str,
        provider: &str,
        model: &str,
        stream: bool,
        at: UnixMs,
    ) -> Self {
        Self {
            at,
            endpoint,
            provider: provider.into(),
            // A client's model name, however long, is logged bounded (a valid one is at most 256 bytes).
            model: truncate(model, 300),
            stream,
            request: None,
            attempts: Vec::new(),
            waited_ms: 0.0,
            status: 0,
            error: None,
            key: None,
            fallback: None,
            continued: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            cost: None,
            first_byte_ms: 0.0,
            total_ms: 0.0,
            response: None,
            started: std::time::Instant::now(),
            pools: Vec::new(),
        }
    }

    /// Keeps `pool` to mask what is written of this request.
    pub fn masks(&mut self, pool: &std::sync::Arc<crate::secret::Redactor>) {
        if !self.pools.iter().any(|p| std::sync::Arc::ptr_eq(p, pool)) {
            self.pools.push(pool.clone());
        }
    }

    /// `text` (this journal, written out) with every key of the pools tried masked.
    pub fn masked<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut text = std::borrow::Cow::Borrowed(text);
        for pool in &self.pools {
            if let std::borrow::Cow::Owned(masked) = pool.redact(&text) {
                text = std::borrow::Cow::Owned(masked);
            }
        }
        text
    }

    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// Time spent waiting for upstream answers.
    pub fn upstream_ms(&self) -> f64 {
        self.attempts.iter().map(|a| a.latency_ms).sum()
    }

    /// The outcome label used by metrics: `success` or the error code.
    pub fn outcome(&self) -> &str {
        self.error.as_deref().unwrap_or("success")
    }
}

/// Told about every request when it ends.
pub trait Observer: Send + Sync + 'static {
    /// Whether journals should carry request and response bodies (costly; only for request logging).
    fn wants_bodies(&self) -> bool {
        false
    }

    fn finished(&self, journal: Journal);
}

/// Tells nobody.
pub struct Silent;

impl Observer for Silent {
    fn finished(&self, _: Journal) {}
}

/// The console line, metrics and (when enabled) request log files.
pub struct Observatory {
    pub metrics: Arc<metrics::Metrics>,
    pub request_log: Option<request_log::RequestLog>,
}

impl Observer for Observatory {
    fn wants_bodies(&self) -> bool {
        self.request_log.is_some()
    }

    fn finished(&self, journal: Journal) {
        console_line(&journal);
        self.metrics.record(&journal);
        if let Some(log) = &self.request_log {
            log.write(journal);
        }
    }
}

/// One line per request through `tracing` (`RUST_LOG`, `--log-format json`). Text fields are recorded with
/// `%` (Display): the default `Debug` escapes them character by character.
fn console_line(j: &Journal) {
    let key = j.key.as_deref().unwrap_or("-");
    let latency_ms = (j.total_ms * 10.0).round() / 10.0;
    match &j.error {
        None => tracing::info!(
            target: "keyrelay::request",
            endpoint = %j.endpoint,
            model = %format_args!("{}/{}", j.provider, j.model),
            key = %key,
            fallback = %j.fallback.as_deref().unwrap_or("-"),
            attempts = j.attempts.len(),
            status = j.status,
            latency_ms,
            prompt_tokens = j.prompt_tokens,
            completion_tokens = j.completion_tokens,
            cost_usd = j.cost.map(Cost::usd),
            stream = j.stream,
            continued = (j.continued > 0).then_some(j.continued),
            "served"
        ),
        Some(error) => tracing::warn!(
            target: "keyrelay::request",
            endpoint = %j.endpoint,
            model = %format_args!("{}/{}", j.provider, j.model),
            key = %key,
            attempts = j.attempts.len(),
            status = j.status,
            latency_ms,
            error = %error,
            classes = %j.attempts.iter().filter_map(|a| a.class.map(|c| c.as_str())).collect::<Vec<_>>().join(","),
            stream = j.stream,
            continued = (j.continued > 0).then_some(j.continued),
            "failed"
        ),
    }
}

/// Keeps the start of a text (error bodies, transcripts) on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes more)", &text[..end], text.len() - end)
}

fn usd<S: serde::Serializer>(cost: &Option<Cost>, s: S) -> Result<S::Ok, S::Error> {
    match cost {
        Some(cost) => s.serialize_f64(cost.usd()),
        None => s.serialize_none(),
    }
}

/// Milliseconds as a float, for journals.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
