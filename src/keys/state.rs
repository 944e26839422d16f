//! What is kept about each key, whatever store keeps it: counters, cooldowns and failure streaks, per key and per
//! key and model. Persisted (the usage file) and, with a shared store, shared.

use crate::clock::UnixMs;
use crate::failure::ErrorClass;
use crate::usage::Cost;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Request and token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What the successes cost, where the model has a price.
    #[serde(rename = "cost_nano_usd")]
    pub cost: Cost,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.requests = self.requests.saturating_add(other.requests);
        self.successes = self.successes.saturating_add(other.successes);
        self.failures = self.failures.saturating_add(other.failures);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.cost = self.cost.plus(other.cost);
    }
}

/// What an operator can do to a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyAction {
    /// End its cooldowns and failure streaks: for one model, or the whole key and every model.
    Reset {
        model: Option<String>,
    },
    /// Out of rotation until enabled, across restarts and reloads.
    Disable,
    Enable,
}

/// A key (or key and model) out of rotation until `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooldown {
    pub until: UnixMs,
    pub reason: ErrorClass,
}

/// One key's state for one model.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelState {
    #[serde(skip)]
    pub in_flight: u32,
    pub today: Counters,
    pub lifetime: Counters,
    pub last_used: Option<UnixMs>,
    pub cooldown: Option<Cooldown>,
    /// Consecutive cooling failures (rate limit, quota) for this model; a success resets it.
    pub streak: u32,
}

/// One key's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyState {
    pub provider: String,
    /// The masked form, so the usage file is readable by a person; never the key.
    pub masked: String,
    #[serde(skip)]
    pub in_flight: u32,
    /// A whole-key cooldown (auth, forbidden).
    pub cooldown: Option<Cooldown>,
    /// Consecutive whole-key failures; a success resets it.
    pub streak: u32,
    pub last_error: Option<Cooldown>,
    pub models: BTreeMap<String, ModelState>,
    /// Taken out of rotation by an operator until enabled again (kept in the usage file).
    pub disabled: bool,
    /// When an operator last disabled or enabled it (0: never, or before this was recorded): of two views of
    /// the key, the later decision holds, so that a shared store that lost its state and was written again from
    /// a copy that did not know the decision gets it back.
    pub decided_at: UnixMs,
    /// The start of the day its `today` counters count (a shared store rolls each key's day when it reads it).
    pub day: UnixMs,
}

impl KeyState {
    /// Applies an operator's action, taken at `at`.
    pub fn control(&mut self, action: &KeyAction, at: UnixMs) {
        match action {
            KeyAction::Disable | KeyAction::Enable => {
                let disabled = *action == KeyAction::Disable;
                // The decision stands as the latest known even if another one was stamped later by a clock
                // ahead of this one.
                let at = at.max(self.decided_at.saturating_add(1));
                self.decide(disabled, at);
            }
            KeyAction::Reset { model: None } => {
                self.cooldown = None;
                self.streak = 0;
                for m in self.models.values_mut() {
                    m.cooldown = None;
                    m.streak = 0;
                }
            }
            KeyAction::Reset { model: Some(model) } => {
                if let Some(m) = self.models.get_mut(model) {
                    m.cooldown = None;
                    m.streak = 0;
                }
            }
        }
    }

    /// The operator's decision about the key: disabled or not, and when it was taken.
    pub fn decision(&self) -> (bool, UnixMs) {
        (self.disabled, self.decided_at)
    }

    /// Takes an operator's decision (`disabled`, taken at `at`) if it is later than the one it holds; whether
    /// it did.
    pub fn decide(&mut self, disabled: bool, at: UnixMs) -> bool {
        if !later((disabled, at), self.decision()) {
            return false;
        }
        (self.disabled, self.decided_at) = (disabled, at);
        true
    }

    /// Starts the day beginning at `day_start` if the key's counters are older: today's counters go to zero and
    /// streaks whose cooldown has ended are forgotten.
    pub fn roll(&mut self, day_start: UnixMs, now: UnixMs) {
        if self.day >= day_start {
            return;
        }
        self.day = day_start;
        if self.cooldown.is_none_or(|c| c.until <= now) {
            self.streak = 0;
        }
        for model in self.models.values_mut() {
            model.today = Counters::default();
            if model.cooldown.is_none_or(|c| c.until <= now) {
                model.streak = 0;
            }
        }
    }

    /// When the key is usable again for `model`, and why it rests, if it is cooling.
    pub(super) fn cooling(&self, model: Option<&ModelState>, now: UnixMs) -> Option<Cooldown> {
        let key = self.cooldown.filter(|c| c.until > now);
        let model = model.and_then(|m| m.cooldown).filter(|c| c.until > now);
        match (key, model) {
            (Some(k), Some(m)) => Some(if k.until >= m.until { k } else { m }),
            (k, m) => k.or(m),
        }
    }
}

/// Whether operator decision `a` (disabled or not, when) overrides `b`: taken later, or at the same time as a
/// different one and disabling (the safe side). A decision of unknown time (0) never overrides.
pub fn later(a: (bool, UnixMs), b: (bool, UnixMs)) -> bool {
    a.1 > 0 && (a.1 > b.1 || (a.1 == b.1 && a.0 && !b.0))
}
