//! Engine settings that a provider may need to differ on: key selection, concurrency, cooldowns and retries.
//!
//! They are resolved in three layers, each overriding the one before: the global values in `config.yaml`, the
//! provider's own file, and the provider's entry under `providers:` in `config.yaml` (the user's word is last).

use crate::duration::serde_human;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;
use std::time::Duration;

/// How a key is picked among the usable ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The key with the fewest requests today for this model; ties broken at random.
    #[default]
    Balanced,
    /// Stay on one key until it fails or cools down, then move to the next.
    Sequential,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyPatch {
    pub per_key_model: Option<u32>,
    pub per_key: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CooldownsPatch {
    #[serde(default, deserialize_with = "serde_human::list::deserialize")]
    pub rate_limit: Option<Vec<Duration>>,
    #[serde(default, deserialize_with = "serde_human::list::deserialize")]
    pub auth: Option<Vec<Duration>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesPatch {
    pub attempts: Option<u32>,
    #[serde(default, deserialize_with = "serde_human::option::deserialize")]
    pub backoff: Option<Duration>,
    #[serde(default, deserialize_with = "serde_human::option::deserialize")]
    pub backoff_max: Option<Duration>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsPatch {
    #[serde(default, deserialize_with = "serde_human::option::deserialize")]
    pub connect: Option<Duration>,
    #[serde(default, deserialize_with = "serde_human::option::deserialize")]
    pub response: Option<Duration>,
    #[serde(default, deserialize_with = "serde_human::option::deserialize")]
    pub first_event: Option<Duration>,
    #[serde(default, deserialize_with = "serde_human::option::deserialize")]
    pub stream_idle: Option<Duration>,
    #[serde(default, deserialize_with = "serde_human::option::deserialize")]
    pub stream_total: Option<Duration>,
}

/// Budgets of one script call.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptsPatch {
    pub memory: Option<super::ByteSize>,
    #[serde(default, deserialize_with = "serde_human::option::deserialize")]
    pub time: Option<Duration>,
}

/// One layer of overrides, as written in a file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningPatch {
    pub selection: Option<Selection>,
    pub concurrency: Option<ConcurrencyPatch>,
    pub cooldowns: Option<CooldownsPatch>,
    pub retries: Option<RetriesPatch>,
    pub timeouts: Option<TimeoutsPatch>,
    /// Per-key limits (replaced whole, not merged).
    pub limits: Option<KeyLimits>,
    pub scripts: Option<ScriptsPatch>,
}

/// Resolved settings for one provider.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    pub selection: Selection,
    /// Concurrent requests one key may serve for one model; 0 = unlimited.
    pub per_key_model: u32,
    /// Concurrent requests one key may serve over all models; 0 = unlimited.
    pub per_key: u32,
    /// Cooldown after the 1st, 2nd, … consecutive rate limit of a key for a model; the last repeats.
    pub rate_limit_schedule: Vec<Duration>,
    /// Cooldown of a whole key after the 1st, 2nd, … consecutive auth or forbidden error; the last repeats.
    pub auth_schedule: Vec<Duration>,
    /// Attempts on one key for a transient fault before rotating.
    pub attempts: u32,
    /// First backoff between attempts on one key; doubles each time, with jitter.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Connecting to the upstream.
    pub connect_timeout: Duration,
    /// Waiting for the upstream's response headers (for a non-streaming request, the whole answer); `None`:
    /// only the request's deadline.
    pub response_timeout: Option<Duration>,
    /// From sending a streaming request to its first content event; `None`: only the deadline.
    pub first_event_timeout: Option<Duration>,
    /// The longest silence between two reads of a stream.
    pub stream_idle_timeout: Duration,
    /// The longest a stream may last from its request; `None`: no bound but the idle timeout.
    pub stream_total_timeout: Option<Duration>,
    /// What one script call may build, in bytes.
    pub script_memory: usize,
    /// How long one script call may run.
    pub script_time: Duration,
    /// Declared per-key limits; keys without capacity are skipped.
    pub limits: Option<KeyLimits>,
}

impl Default for Tuning {
    fn default() -> Self {
        let secs = Duration::from_secs;
        Self {
            selection: Selection::Balanced,
            per_key_model: 0,
            per_key: 0,
            rate_limit_schedule: vec![secs(10), secs(30), secs(60), secs(120), secs(300)],
            auth_schedule: vec![secs(300), secs(900), secs(3600)],
            attempts: 2,
            backoff: Duration::from_millis(250),
            backoff_max: secs(5),
            connect_timeout: secs(10),
            response_timeout: None,
            first_event_timeout: None,
            stream_idle_timeout: secs(120),
            stream_total_timeout: None,
            script_memory: 64 << 20,
            script_time: secs(1),
            limits: None,
        }
    }
}

impl Tuning {
    /// This tuning with `patch` applied on top.
    pub fn patched(&self, patch: &TuningPatch) -> Self {
        let mut out = self.clone();
        if let Some(s) = patch.selection {
            out.selection = s;
        }
        if let Some(c) = &patch.concurrency {
            out.per_key_model = c.per_key_model.unwrap_or(out.per_key_model);
            out.per_key = c.per_key.unwrap_or(out.per_key);
        }
        if let Some(c) = &patch.cooldowns {
            out.rate_limit_schedule = c.rate_limit.clone().unwrap_or(out.rate_limit_schedule);
            out.auth_schedule = c.auth.clone().unwrap_or(out.auth_schedule);
        }
        if let Some(r) = &patch.retries {
            out.attempts = r.attempts.unwrap_or(out.attempts);
            out.backoff = r.backoff.unwrap_or(out.backoff);
            out.backoff_max = r.backoff_max.unwrap_or(out.backoff_max);
        }
        if let Some(limits) = &patch.limits {
            out.limits = Some(limits.clone()).filter(|l| *l != Default::default());
        }
        if let Some(t) = &patch.timeouts {
            let off = |d: Duration| (!d.is_zero()).then_some(d);
            out.connect_timeout = t.connect.unwrap_or(out.connect_timeout);
            out.response_timeout = t.response.map_or(out.response_timeout, off);
            out.first_event_timeout = t.first_event.map_or(out.first_event_timeout, off);
            out.stream_idle_timeout = t.stream_idle.unwrap_or(out.stream_idle_timeout);
            out.stream_total_timeout = t.stream_total.map_or(out.stream_total_timeout, off);
        }
        if let Some(s) = &patch.scripts {
            out.script_memory = s.memory.map_or(out.script_memory, |b| b.0);
            out.script_time = s.time.unwrap_or(out.script_time);
        }
        out
    }

    /// What is out of range, if anything.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.rate_limit_schedule.is_empty() {
            out.push("cooldowns.rate_limit must list at least one duration".to_string());
        }
        if self.auth_schedule.is_empty() {
            out.push("cooldowns.auth must list at least one duration".to_string());
        }
        if self.attempts == 0 || self.attempts > 10 {
            out.push(format!(
                "retries.attempts is {}; it must be between 1 and 10",
                self.attempts
            ));
        }
        if self.backoff > self.backoff_max {
            out.push("retries.backoff must not exceed retries.backoff_max".to_string());
        }
        if self.script_memory < (1 << 20) || self.script_time.is_zero() {
            out.push(
                "scripts.memory must be at least 1MiB and scripts.time greater than zero"
                    .to_string(),
            );
        }
        if self.connect_timeout.is_zero() || self.stream_idle_timeout.is_zero() {
            out.push(
                "timeouts.connect and timeouts.stream_idle must be greater than zero".to_string(),
            );
        }
        out
    }

    /// The backoff before attempt `attempt + 1` on the same key (`attempt` counts from 1), with jitter: a random
    /// value between half and all of the exponential step.
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        let step = self
            .backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.backoff_max);
        step.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// A provider's declared limits, each per key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    pub requests_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order() {
        let patch: TuningPatch = serde_yaml::from_str(
            "concurrency: {per_key_model: 4}\ncooldowns: {rate_limit: [1s, 2s]}",
        )
        .unwrap();
        let t = Tuning::default().patched(&patch);
        assert_eq!(t.per_key_model, 4);
        assert_eq!(t.per_key, 0);
        assert_eq!(
            t.rate_limit_schedule,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(t.auth_schedule, Tuning::default().auth_schedule);
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let t = Tuning::default();
        for _ in 0..50 {
            let first = t.backoff_after(1);
            assert!(first >= Duration::from_millis(125) && first <= Duration::from_millis(250));
            assert!(t.backoff_after(30) <= t.backoff_max);
        }
    }
}
