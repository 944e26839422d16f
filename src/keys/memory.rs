//! The in-process key store: all key state under one mutex, with a wakeup per provider.
//!
//! A `std::sync::Mutex` is right here: every critical section is a short scan of one provider's keys with no
//! `.await` inside, far cheaper than an async lock. Waiters are woken through a `Notify` per provider, so a
//! release wakes only requests that could use the key.

use super::policy::{self, Standing};
use super::state::{Cooldown, Counters, KeyState, ModelState};
use super::{
    Ask, BoxFuture, Grant, KeyAction, KeyStatus, KeyStore, LeaseId, Outcome, StorePolicy,
    Unavailable,
};
use crate::clock::{Clock, UnixMs};
use crate::config::{Selection, Tuning};
use crate::failure::ErrorClass;
use crate::secret::{ApiKey, KeyId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Per-provider state that is not about one key.
#[derive(Debug, Default)]
struct ProviderState {
    /// Sequential selection: the key each model is staying on.
    cursor: HashMap<String, KeyId>,
    /// Recent rate limits (time, key), for the provider-wide pause.
    recent_limits: VecDeque<(UnixMs, KeyId)>,
    paused_until: UnixMs,
}

/// Everything persisted, plus what is not.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The daily reset that started the current day.
    pub day_start: UnixMs,
    pub keys: BTreeMap<KeyId, KeyState>,
    #[serde(skip)]
    next_reset: UnixMs,
    #[serde(skip)]
    providers: HashMap<String, ProviderState>,
    /// The store-wide rules (daily reset, provider pause), kept under the same lock as the state they govern.
    #[serde(skip)]
    policy: Option<StorePolicy>,
    /// Declared per-key limits in use (requests and tokens per minute).
    #[serde(skip)]
    meters: HashMap<KeyId, super::limits::Meter>,
    /// Keys a reload removed: never granted again (requests on an older snapshot still list them), and
    /// forgotten once their last lease ends.
    #[serde(skip)]
    retired: HashSet<KeyId>,
    /// Leases granted and not yet released, and the id the next one gets.
    #[serde(skip)]
    leases: HashSet<LeaseId>,
    #[serde(skip)]
    next_lease: u64,
}

impl State {
    /// The state of `key` of `provider`, made when it has none yet.
    fn key(&mut self, provider: &str, key: &ApiKey) -> &mut KeyState {
        self.keys.entry(key.id.clone()).or_insert_with(|| KeyState {
            provider: provider.to_string(),
            masked: key.masked.to_string(),
            ..KeyState::default()
        })
    }

    /// Starts a new day when a reset time has passed: today's counters go to zero and streaks whose cooldown has
    /// ended are forgotten. Lifetime totals stay.
    fn roll(&mut self, now: UnixMs) {
        if now < self.next_reset {
            return;
        }
        let Some(policy) = self.policy.clone() else {
            return;
        };
        let day_start = policy.daily_reset.last_at_or_before(now);
        if self.day_start < day_start {
            for key in self.keys.values_mut() {
                if key.cooldown.is_none_or(|c| c.until <= now) {
                    key.streak = 0;
                }
                for model in key.models.values_mut() {
                    model.today = Counters::default();
                    if model.cooldown.is_none_or(|c| c.until <= now) {
                        model.streak = 0;
                    }
                }
            }
            self.day_start = day_start;
        }
        self.next_reset = policy.daily_reset.next_after(now);
    }
}

pub struct MemoryStore {
    clock: Clock,
    state: Mutex<State>,
    wakeups: Mutex<HashMap<String, Arc<Notify>>>,
    /// Signalled on every change, for the usage file writer.
    changed: Notify,
}

impl MemoryStore {
    pub fn new(clock: Clock, policy: StorePolicy) -> Self {
        Self::with_state(clock, policy, State::default())
    }

    pub fn with_state(clock: Clock, policy: StorePolicy, mut state: State) -> Self {
        state.policy = Some(policy);
        state.next_reset = 0;
        Self {
            clock,
            state: Mutex::new(state),
            wakeups: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Signalled after any change to the state (for persistence).
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// A copy of the persistent part of the state, taken under the lock; serialising it happens elsewhere, so
    /// requests never wait for JSON.
    pub fn export(&self) -> State {
        let state = self.lock();
        State {
            day_start: state.day_start,
            keys: state.keys.clone(),
            ..State::default()
        }
    }

    /// What this store knows of key `id`.
    pub fn get(&self, id: &KeyId) -> Option<KeyState> {
        self.lock().keys.get(id).cloned()
    }

    /// Puts `state` in place of what this store knows of key `id` (its leases in flight kept): a shared store
    /// keeps its local copy current, to serve from when the shared one is away.
    pub fn put(&self, id: &KeyId, mut state: KeyState) {
        let mut guard = self.lock();
        // The day is this store's: rolled first, so that a state put today is not taken for yesterday's.
        guard.roll(self.clock.now());
        if let Some(old) = guard.keys.get(id) {
            state.in_flight = old.in_flight;
            for (model, ms) in &mut state.models {
                ms.in_flight = old.models.get(model).map_or(0, |m| m.in_flight);
            }
        }
        guard.keys.insert(id.clone(), state);
        drop(guard);
        self.changed.notify_one();
    }

    /// The operator's decision about key `id` this store knows: disabled or not, and when.
    pub fn decision(&self, id: &KeyId) -> Option<(bool, UnixMs)> {
        self.lock().keys.get(id).map(KeyState::decision)
    }

    /// Takes an operator's decision about `key` learnt elsewhere (another instance's, through a shared store),
    /// if it is later than the one known here.
    pub fn decide(&self, provider: &str, key: &ApiKey, disabled: bool, at: UnixMs) {
        let mut state = self.lock();
        let known = state.keys.get(&key.id).map(KeyState::decision);
        if !super::state::later((disabled, at), known.unwrap_or((false, 0))) {
            return;
        }
        let ks = state.key(provider, key);
        ks.decide(disabled, at);
        drop(state);
        self.changed.notify_one();
        self.wakeup(provider).notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written in a way that matters more than
        // refusing all further requests would: keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a lease now or says why not; the synchronous core of [`KeyStore::acquire`]. The choice is the
    /// policy's; this only reads the state and claims the key chosen.
    pub fn try_acquire(&self, ask: Ask<'_>) -> Result<Grant, Unavailable> {
        let now = self.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        state.roll(now);
        let provider = slot(&mut state.providers, ask.provider);
        if provider.paused_until > now {
            return Err(Unavailable {
                cooling: ask.keys.len(),
                ready_at: Some(provider.paused_until),
                ..Unavailable::default()
            });
        }
        let mut standings: Vec<Standing> = ask
            .keys
            .iter()
            .map(|key| {
                let excluded = ask.exclude.contains(&key.id)
                    || (!state.retired.is_empty() && state.retired.contains(&key.id));
                policy::standing(
                    state.keys.get(&key.id),
                    ask.model,
                    excluded,
                    ask.tuning,
                    now,
                )
            })
            .collect();
        let cursor = provider
            .cursor
            .get(ask.model)
            .and_then(|id| ask.keys.iter().position(|k| &k.id == id));
        let order = policy::preference(
            &standings,
            ask.tuning.selection,
            cursor,
            ask.tuning.limits.is_some(),
        );
        // The first that the key's declared limits admit (a key without capacity waits like a cooling one).
        let mut chosen = None;
        for i in order {
            let id = &ask.keys[i].id;
            let admitted = match &ask.tuning.limits {
                None => Ok(()),
                Some(limits) => {
                    let requests_today = state
                        .keys
                        .get(id)
                        .map_or(0, |k| k.models.values().map(|m| m.today.requests).sum());
                    state.meters.entry(id.clone()).or_default().admit(
                        limits,
                        requests_today,
                        now,
                        state.next_reset,
                    )
                }
            };
            match admitted {
                Ok(()) => {
                    chosen = Some(i);
                    break;
                }
                Err(until) => {
                    standings[i] = Standing::Cooling(Cooldown {
                        until,
                        reason: ErrorClass::RateLimit,
                    })
                }
            }
        }
        let Some(index) = chosen else {
            return Err(policy::unavailable(&standings));
        };
        if ask.tuning.selection == Selection::Sequential && policy::moves_cursor(&standings, cursor)
        {
            provider
                .cursor
                .insert(ask.model.to_string(), ask.keys[index].id.clone());
        }

        let key = &ask.keys[index];
        let ks = state.key(ask.provider, key);
        ks.in_flight += 1;
        let ms = model_slot(&mut ks.models, ask.model);
        ms.in_flight += 1;
        ms.today.requests += 1;
        ms.lifetime.requests += 1;
        ms.last_used = Some(now);
        let lease = LeaseId(state.next_lease);
        state.next_lease += 1;
        state.leases.insert(lease);
        drop(guard);
        self.changed.notify_one();
        Ok(Grant {
            lease,
            provider: ask.provider.into(),
            model: ask.model.into(),
            key: key.clone(),
        })
    }

    /// Releases a claim and applies the outcome by the policy.
    fn record(&self, grant: &Grant, outcome: Outcome, tuning: &Tuning) {
        let now = self.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        state.roll(now);
        let next_reset = state.next_reset;
        let pause = state.policy.as_ref().and_then(|p| p.pause);
        if !state.leases.remove(&grant.lease) {
            return;
        }
        let Some(ks) = state.keys.get_mut(&grant.key.id) else {
            return;
        };
        ks.in_flight = ks.in_flight.saturating_sub(1);
        let ms = model_slot(&mut ks.models, &grant.model);
        ms.in_flight = ms.in_flight.saturating_sub(1);
        let started = policy::settle(ks, &grant.model, &outcome, tuning, now, next_reset);
        if let (Outcome::Success { .. }, Some(meter)) =
            (&outcome, state.meters.get_mut(&grant.key.id))
        {
            meter.spend_tokens(now, outcome.tokens());
        }
        // A model the upstream refused outright (an unknown name, say) leaves no trace: clients cannot grow
        // the state with made-up model names.
        let refused = matches!(
            outcome,
            Outcome::Failure {
                class: ErrorClass::InvalidRequest,
                ..
            }
        );
        let ks = state.keys.get_mut(&grant.key.id).expect("looked up above");
        if refused
            && ks.models.get(&*grant.model).is_some_and(|ms| {
                ms.in_flight == 0 && ms.lifetime.successes == 0 && ms.cooldown.is_none()
            })
        {
            ks.models.remove(&*grant.model);
        }
        if let (
            Some(Cooldown {
                until,
                reason: ErrorClass::RateLimit,
            }),
            Some(rule),
        ) = (started, pause)
        {
            let provider = slot(&mut state.providers, &grant.provider);
            if let Some(until) =
                policy::pause(&mut provider.recent_limits, rule, &grant.key.id, now, until)
            {
                provider.paused_until = provider.paused_until.max(until);
                tracing::warn!(
                    provider = %grant.provider,
                    pause_ms = until - now,
                    "several keys rate-limited at once: pausing the provider"
                );
            }
        }
        let ks = state.keys.get(&grant.key.id).expect("looked up above");
        if ks.in_flight == 0 && !state.retired.is_empty() && state.retired.contains(&grant.key.id) {
            state.keys.remove(&grant.key.id);
        }
        drop(guard);
        self.changed.notify_one();
        self.wakeup(&grant.provider).notify_waiters();
    }
}

impl KeyStore for MemoryStore {
    fn acquire<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Grant, Unavailable>> {
        Box::pin(std::future::ready(self.try_acquire(ask)))
    }

    fn release(&self, grant: &Grant, outcome: Outcome, tuning: &Tuning) {
        self.record(grant, outcome, tuning);
    }

    fn wakeup(&self, provider: &str) -> Arc<Notify> {
        let mut map = self.wakeups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get(provider) {
            return n.clone();
        }
        map.entry(provider.to_string()).or_default().clone()
    }

    fn configure(&self, policy: StorePolicy) {
        let mut state = self.lock();
        state.policy = Some(policy);
        state.next_reset = 0;
    }

    fn retire(&self, removed: &HashSet<KeyId>, live: &HashSet<KeyId>) {
        let mut state = self.lock();
        state.retired.retain(|id| !live.contains(id));
        for id in removed.iter().filter(|id| !live.contains(*id)) {
            state.retired.insert(id.clone());
            if state.keys.get(id).is_some_and(|k| k.in_flight == 0) {
                state.keys.remove(id);
            }
        }
        drop(state);
        self.changed.notify_one();
    }

    fn control(&self, provider: &str, key: &ApiKey, action: &KeyAction) -> bool {
        let mut state = self.lock();
        if let KeyAction::Reset { model: Some(model) } = action
            && !state
                .keys
                .get(&key.id)
                .is_some_and(|k| k.models.contains_key(model))
        {
            return false;
        }
        let ks = state.key(provider, key);
        ks.control(action, self.clock.now());
        drop(state);
        self.changed.notify_one();
        // A key back in rotation may serve requests waiting for one.
        self.wakeup(provider).notify_waiters();
        true
    }

    fn report<'a>(
        &'a self,
        provider: &'a str,
        keys: &'a [ApiKey],
    ) -> BoxFuture<'a, Vec<KeyStatus>> {
        Box::pin(std::future::ready(self.status(provider, keys)))
    }
}

impl MemoryStore {
    /// [`KeyStore::report`], at once.
    pub fn status(&self, provider: &str, keys: &[ApiKey]) -> Vec<KeyStatus> {
        let now = self.clock.now();
        let state = self.lock();
        let paused = state.providers.get(provider).map_or(0, |p| p.paused_until);
        keys.iter()
            .map(|key| {
                let ks = state.keys.get(&key.id);
                let mut status = KeyStatus::of(key, ks, ks.map_or(0, |k| k.in_flight), now);
                status.paused(paused, now);
                status
            })
            .collect()
    }
}

/// The value for `name`, inserted when missing; allocates the name only then (these run on every request).
fn slot<'a, V: Default>(map: &'a mut HashMap<String, V>, name: &str) -> &'a mut V {
    if !map.contains_key(name) {
        map.insert(name.to_string(), V::default());
    }
    map.get_mut(name).expect("just inserted")
}

/// [`slot`] for a key's per-model states.
fn model_slot<'a>(map: &'a mut BTreeMap<String, ModelState>, name: &str) -> &'a mut ModelState {
    if !map.contains_key(name) {
        map.insert(name.to_string(), ModelState::default());
    }
    map.get_mut(name).expect("just inserted")
}

#[cfg(test)]
mod tests;
