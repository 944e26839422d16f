//! How a key's state is laid out in Redis: its verdict as one versioned JSON field, its counters in hashes.
//!
//! The split keeps releases to one round trip. Counters only ever grow, so every instance adds to them at once
//! (`HINCRBY`) without reading first. The verdict (cooldowns, streaks, manual state) is what the policy decides
//! on: it changes with failures and the successes that end a streak, and is written only if no other instance
//! changed it since it was read.

use crate::clock::UnixMs;
use crate::keys::state::{Cooldown, Counters, KeyState};
use crate::usage::Cost;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The part of a key's state the policy decides on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Verdict {
    pub masked: String,
    pub cooldown: Option<Cooldown>,
    pub streak: u32,
    pub last_error: Option<Cooldown>,
    pub disabled: bool,
    /// When an operator last disabled or enabled the key (0: never).
    pub decided_at: UnixMs,
    pub day: UnixMs,
    /// Only models with a cooldown or a streak.
    pub models: BTreeMap<String, ModelVerdict>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelVerdict {
    pub cooldown: Option<Cooldown>,
    pub streak: u32,
}

impl Verdict {
    pub fn of(state: &KeyState) -> Self {
        Verdict {
            masked: state.masked.clone(),
            cooldown: state.cooldown,
            streak: state.streak,
            last_error: state.last_error,
            disabled: state.disabled,
            decided_at: state.decided_at,
            day: state.day,
            models: state
                .models
                .iter()
                .filter(|(_, m)| m.cooldown.is_some() || m.streak > 0)
                .map(|(name, m)| {
                    let verdict = ModelVerdict {
                        cooldown: m.cooldown,
                        streak: m.streak,
                    };
                    (name.clone(), verdict)
                })
                .collect(),
        }
    }

    /// Read from Redis ("" or unreadable: none yet).
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a verdict always serialises")
    }

    /// The key's state with this verdict and no counters.
    pub fn state(&self, provider: &str) -> KeyState {
        let mut state = KeyState {
            provider: provider.to_string(),
            masked: self.masked.clone(),
            cooldown: self.cooldown,
            streak: self.streak,
            last_error: self.last_error,
            disabled: self.disabled,
            decided_at: self.decided_at,
            day: self.day,
            ..KeyState::default()
        };
        for (name, m) in &self.models {
            let model = state.models.entry(name.clone()).or_default();
            model.cooldown = m.cooldown;
            model.streak = m.streak;
        }
        state
    }
}

/// The most one outcome adds to a count: Redis counts in signed 64 bits, and an upstream's absurd token count
/// must not make every later addition fail.
const MAX_COUNT: u64 = 1 << 40;

/// The counts one outcome adds, in the order the settle script takes them.
pub fn counts(requests: u64, outcome: &crate::keys::Outcome) -> [i64; 6] {
    use crate::keys::Outcome;
    let counts = match *outcome {
        Outcome::Success {
            prompt_tokens,
            completion_tokens,
            cost,
        } => [requests, 1, 0, prompt_tokens, completion_tokens, cost.0],
        Outcome::Failure { .. } => [requests, 0, 1, 0, 0, 0],
        Outcome::Cancelled => [requests, 0, 0, 0, 0, 0],
    };
    counts.map(|n| n.min(MAX_COUNT) as i64)
}

/// The counters the scripts keep, in their order.
pub const COUNTERS: [&str; 6] = [
    "requests",
    "successes",
    "failures",
    "prompt_tokens",
    "completion_tokens",
    "cost_nano_usd",
];

/// Counters read in [`COUNTERS`] order (absent, or below zero: zero).
pub fn counters(values: &[Option<i64>]) -> Counters {
    let n = |i: usize| values.get(i).copied().flatten().unwrap_or(0).max(0) as u64;
    Counters {
        requests: n(0),
        successes: n(1),
        failures: n(2),
        prompt_tokens: n(3),
        completion_tokens: n(4),
        cost: Cost(n(5)),
    }
}

/// A provider's counter fields (`<id>:<counter>:<model>`) by key id, without the id.
pub fn by_key(fields: &[(String, String)]) -> HashMap<&str, Vec<(&str, &str)>> {
    let mut out: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    for (field, value) in fields {
        if let Some((id, rest)) = field.split_once(':') {
            out.entry(id).or_default().push((rest, value));
        }
    }
    out
}

/// Puts counters read from a hash (`<counter>:<model>` to value) into `state`: `today`'s or `lifetime`'s.
pub fn add_counters(state: &mut KeyState, fields: &[(&str, &str)], today: bool) {
    for (field, value) in fields {
        let Some((name, model)) = field.split_once(':') else {
            continue;
        };
        let Ok(n) = value.parse::<i64>() else {
            continue;
        };
        let n = n.max(0) as u64;
        let ms = state.models.entry(model.to_string()).or_default();
        if name == "last_used" {
            ms.last_used = Some(n as UnixMs);
            continue;
        }
        let c: &mut Counters = if today {
            &mut ms.today
        } else {
            &mut ms.lifetime
        };
        match name {
            "requests" => c.requests = n,
            "successes" => c.successes = n,
            "failures" => c.failures = n,
            "prompt_tokens" => c.prompt_tokens = n,
            "completion_tokens" => c.completion_tokens = n,
            "cost_nano_usd" => c.cost = Cost(n),
            _ => {}
        }
    }
}

/// A counter's hash field and value.
pub type Field = (String, u64);

/// A state's counters as hash fields, for seeding: today's (the key's total requests included), then the
/// lifetime's.
pub fn counter_fields(state: &KeyState) -> (Vec<Field>, Vec<Field>) {
    let mut out = (Vec::new(), Vec::new());
    for (today, fields) in [(true, &mut out.0), (false, &mut out.1)] {
        let mut requests = 0u64;
        for (model, ms) in &state.models {
            let c = if today { &ms.today } else { &ms.lifetime };
            requests = requests.saturating_add(c.requests);
            let values = [
                c.requests,
                c.successes,
                c.failures,
                c.prompt_tokens,
                c.completion_tokens,
                c.cost.0,
            ];
            for (name, n) in COUNTERS.into_iter().zip(values) {
                if n > 0 {
                    fields.push((format!("{name}:{model}"), n));
                }
            }
            if let (false, Some(at)) = (today, ms.last_used) {
                fields.push((format!("last_used:{model}"), at.max(0) as u64));
            }
        }
        if requests > 0 {
            fields.push(("requests".to_string(), requests));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::ErrorClass;
    use crate::keys::Outcome;

    fn state() -> KeyState {
        let mut s = KeyState {
            provider: "p".into(),
            masked: "...abcd".into(),
            streak: 1,
            ..KeyState::default()
        };
        let m = s.models.entry("a:b".into()).or_default();
        m.today.requests = 3;
        m.today.successes = 2;
        m.lifetime.requests = 9;
        m.lifetime.cost = Cost(12_345_678_901_234_567);
        m.last_used = Some(1_700_000_000_000);
        m.cooldown = Some(Cooldown {
            until: 5,
            reason: ErrorClass::RateLimit,
        });
        s.models.entry("idle".into()).or_default().today.requests = 1;
        s
    }

    #[test]
    fn a_state_splits_into_verdict_and_counters_and_comes_back_whole() {
        let s = state();
        let verdict = Verdict::parse(&Verdict::of(&s).to_json()).unwrap();
        // Only the model with a cooldown has a verdict; counters are not in it.
        assert_eq!(verdict.models.keys().collect::<Vec<_>>(), ["a:b"]);
        assert!(!verdict.to_json().contains("requests"));
        let (today, life) = counter_fields(&s);
        let text = |v: &[Field]| -> Vec<(String, String)> {
            v.iter()
                .map(|(f, n)| (format!("id:{f}"), n.to_string()))
                .collect()
        };
        let (today, life) = (text(&today), text(&life));
        let (today, life) = (by_key(&today), by_key(&life));
        let mut back = verdict.state("p");
        add_counters(&mut back, &today["id"], true);
        add_counters(&mut back, &life["id"], false);
        assert_eq!(back.models["a:b"].today, s.models["a:b"].today);
        assert_eq!(back.models["a:b"].lifetime, s.models["a:b"].lifetime);
        assert_eq!(back.models["a:b"].last_used, s.models["a:b"].last_used);
        assert_eq!(back.models["a:b"].cooldown, s.models["a:b"].cooldown);
        assert_eq!(back.models["idle"].today.requests, 1);
        assert_eq!(back.streak, 1);
        assert_eq!(back.masked, "...abcd");
    }

    #[test]
    fn counts_follow_the_outcome() {
        let success = Outcome::Success {
            prompt_tokens: 3,
            completion_tokens: 4,
            cost: Cost(5),
        };
        assert_eq!(counts(0, &success), [0, 1, 0, 3, 4, 5]);
        assert_eq!(counts(1, &Outcome::Cancelled), [1, 0, 0, 0, 0, 0]);
        let absurd = Outcome::Success {
            prompt_tokens: u64::MAX,
            completion_tokens: 1,
            cost: Cost(u64::MAX),
        };
        assert_eq!(counts(0, &absurd), [0, 1, 0, 1 << 40, 1, 1 << 40]);
    }
}
