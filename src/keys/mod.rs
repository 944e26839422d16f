//! Key state: which key serves a request, who holds it, and what its failures cost it.
//!
//! Everything the engine knows about keys at run time (usage, in-flight leases, cooldowns, failure streaks) sits
//! behind the narrow [`KeyStore`] trait, so that one process or many (sharing a store) apply the same rules.
//! [`MemoryStore`] is the in-process store and the default. The engine holds a key through a [`Lease`], which
//! gives it back when dropped: on success, error, client disconnect and panic alike.

mod cooldown;
pub mod limits;
mod memory;
mod persist;
pub mod policy;
pub mod redis;
mod state;

use crate::clock::UnixMs;
use crate::config::{DailyReset, PauseRule, Tuning};
use crate::failure::{ErrorClass, Scope};
use crate::secret::{ApiKey, KeyId};
use crate::usage::Cost;
pub use cooldown::cooldown_until;
pub use memory::MemoryStore;
pub use persist::{
    Persister, USAGE_FILE_VERSION, UsageFileError, load as load_usage, remove_leftovers,
};
use serde::Serialize;
pub use state::{Cooldown, Counters, KeyAction, KeyState, ModelState};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A request for a key.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    pub provider: &'a str,
    pub model: &'a str,
    /// The provider's keys in configured order.
    pub keys: &'a [ApiKey],
    /// Keys this request already tried and gave up on.
    pub exclude: &'a [KeyId],
    pub tuning: &'a Tuning,
}

/// Names one lease, unique within the store that granted it: a shared store keeps each in-flight lease under
/// its id (with a time to live renewed while it is held), so that a lease given back twice frees one slot and a
/// crashed holder's leases can expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub u64);

/// A key handed to one request, until released.
#[derive(Clone, Debug)]
pub struct Grant {
    pub lease: LeaseId,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub key: ApiKey,
}

/// Why no key was granted, and when that may change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unavailable {
    /// Usable keys at their concurrency limit (a release may free one).
    pub busy: usize,
    /// Keys cooling down for this model, or the whole provider paused.
    pub cooling: usize,
    /// Of those, keys benched for auth or forbidden errors (a wait rarely helps).
    pub benched: usize,
    /// The earliest time a cooling key returns.
    pub ready_at: Option<UnixMs>,
}

/// How a lease ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Success {
        prompt_tokens: u64,
        completion_tokens: u64,
        /// Zero when the model has no price.
        cost: Cost,
    },
    Failure {
        class: ErrorClass,
        scope: Scope,
        retry_after: Option<Duration>,
    },
    /// The client went away or the request was abandoned: no verdict on the key.
    Cancelled,
}

impl Outcome {
    /// The tokens it spent (none but a success's).
    pub fn tokens(&self) -> u64 {
        match self {
            Outcome::Success {
                prompt_tokens,
                completion_tokens,
                ..
            } => prompt_tokens.saturating_add(*completion_tokens),
            _ => 0,
        }
    }
}

/// Rules the store applies on its own: when the day turns, and when a provider pauses.
#[derive(Clone, Debug)]
pub struct StorePolicy {
    pub daily_reset: DailyReset,
    pub pause: Option<PauseRule>,
}

/// One key's state as reported to operators.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KeyStatus {
    pub key: String,
    pub id: String,
    pub in_flight: u32,
    /// Whole-key cooldown end (auth, forbidden), when cooling.
    pub cooling_until: Option<UnixMs>,
    pub cooling_reason: Option<ErrorClass>,
    /// Models this key is cooling for, with the end time and reason.
    pub model_cooldowns: Vec<(String, UnixMs, ErrorClass)>,
    /// The longest current failure streak (whole key or one model).
    pub streak: u32,
    /// Summed over models.
    pub today: Counters,
    pub lifetime: Counters,
    /// Per model, by name.
    pub models: Vec<(String, Counters, Counters)>,
    /// The last failure's class and time.
    pub last_error: Option<(ErrorClass, UnixMs)>,
    /// Taken out of rotation by an operator.
    pub disabled: bool,
}

impl KeyStatus {
    /// The status of `key` from its state (if it has one) and its requests in flight.
    pub fn of(key: &ApiKey, state: Option<&KeyState>, in_flight: u32, now: UnixMs) -> Self {
        let cooldown = state.and_then(|k| k.cooldown).filter(|c| c.until > now);
        let mut status = KeyStatus {
            key: key.masked.to_string(),
            id: key.id.to_string(),
            in_flight,
            cooling_until: cooldown.map(|c| c.until),
            cooling_reason: cooldown.map(|c| c.reason),
            model_cooldowns: Vec::new(),
            streak: state.map_or(0, |k| k.streak),
            today: Counters::default(),
            lifetime: Counters::default(),
            models: Vec::new(),
            last_error: state
                .and_then(|k| k.last_error)
                .map(|e| (e.reason, e.until)),
            disabled: state.is_some_and(|k| k.disabled),
        };
        for (model, ms) in state.map(|k| &k.models).into_iter().flatten() {
            status.today.add(&ms.today);
            status.lifetime.add(&ms.lifetime);
            status.models.push((model.clone(), ms.today, ms.lifetime));
            status.streak = status.streak.max(ms.streak);
            if let Some(c) = ms.cooldown.filter(|c| c.until > now) {
                status
                    .model_cooldowns
                    .push((model.clone(), c.until, c.reason));
            }
        }
        status
    }

    /// Reports the provider's pause (until `paused`, if later than `now`) as this key resting, unless it rests
    /// longer already.
    pub fn paused(&mut self, paused: UnixMs, now: UnixMs) {
        if paused > now && self.cooling_until.is_none_or(|until| until < paused) {
            self.cooling_until = Some(paused);
            self.cooling_reason = Some(ErrorClass::RateLimit);
        }
    }

    /// `disabled` (by an operator), `benched` (whole key cooling), `cooling` (for some model), `busy` (serving) or
    /// `available`.
    pub fn state(&self) -> &'static str {
        if self.disabled {
            "disabled"
        } else if self.cooling_until.is_some() {
            "benched"
        } else if !self.model_cooldowns.is_empty() {
            "cooling"
        } else if self.in_flight > 0 {
            "busy"
        } else {
            "available"
        }
    }
}

/// Where key state lives. The in-process [`MemoryStore`] is the default; a shared store (Redis) implements the
/// same contract so that several instances agree on usage, leases and cooldowns.
///
/// The rules are not the store's: which key is best, whether its limits admit a request and what an outcome
/// does to it are the pure functions of [`policy`], [`cooldown`] and [`limits`] over a key's [`KeyState`]. A
/// store reads state, lets the policy decide, and claims or updates atomically (a shared store claims only if
/// the key is still eligible, and asks the policy again when it lost a race). The shape suits a networked
/// store:
/// - `acquire` and `report` are async (a round trip away);
/// - each grant carries a [`LeaseId`], the handle of its in-flight record;
/// - `release` never blocks, since it runs when a [`Lease`] drops; a remote store sends it in the background;
/// - `wakeup` is how waiting requests learn that a key may be free: a shared store also fires it for releases
///   and ended cooldowns it hears of from other instances;
/// - every time the rules see comes from the one [`crate::clock::Clock`] the store was built with, the
///   requests-per-minute limiter's included.
pub trait KeyStore: Send + Sync + 'static {
    /// Takes a lease on the best usable key for `ask`, or says why none is free.
    fn acquire<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Grant, Unavailable>>;

    /// Gives a key back and records how its use ended. Must not block: a remote store sends it in the
    /// background. A lease released twice is released once.
    fn release(&self, grant: &Grant, outcome: Outcome, tuning: &Tuning);

    /// Notified whenever a key of `provider` may have become free: a release, or a change of its state.
    fn wakeup(&self, provider: &str) -> Arc<Notify>;

    /// Replaces the store-wide rules (on start and on reload).
    fn configure(&self, policy: StorePolicy);

    /// Forgets the keys a reload `removed` from the configuration: at once when idle, otherwise when their last
    /// in-flight request ends. Keys in `live` (the configuration now) keep their usage, cooldowns and streaks,
    /// even if an earlier reload had removed them. Keys the store knows but no configuration ever named (from a
    /// usage file) are left alone.
    fn retire(&self, removed: &HashSet<KeyId>, live: &HashSet<KeyId>);

    /// Applies an operator's action to `key` of `provider`; false when it names a model the key has no state for.
    fn control(&self, provider: &str, key: &ApiKey, action: &KeyAction) -> bool;

    /// The state of `keys` of `provider`, for operators.
    fn report<'a>(&'a self, provider: &'a str, keys: &'a [ApiKey])
    -> BoxFuture<'a, Vec<KeyStatus>>;

    /// Where the state lives now: `memory`, `redis`, or `degraded` (a shared store away, this instance serving
    /// from its own).
    fn kind(&self) -> &'static str {
        "memory"
    }
}
