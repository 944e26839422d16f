//! Settling: an outcome, an operator's action or a change Redis missed, applied to a key in one round trip
//! (the `SETTLE` script), its verdict decided again on a fresh read when another instance changed it first.

use super::shape::{self, Verdict};
use super::{Counted, DAY_TTL_MS, LOCAL, RedisStore, lock, outage};
use crate::clock::UnixMs;
use crate::config::Tuning;
use crate::failure::ErrorClass;
use crate::keys::state::{Cooldown, KeyState};
use crate::keys::{Grant, KeyStore, LeaseId, Outcome, policy};
use crate::secret::KeyId;
use std::sync::Arc;

/// What a verdict change is: applied to the key's state, returns the cooldown it started, if any.
pub(super) type Change<'a> = &'a (dyn Fn(&mut KeyState) -> Option<Cooldown> + Sync);

/// One change to a key in Redis: counts to add, a lease to free, and a change of verdict.
pub(super) struct Settle<'a> {
    pub(super) provider: &'a str,
    pub(super) key: &'a KeyId,
    /// The key's masked form, kept with its verdict.
    pub(super) masked: &'a str,
    /// The model the counts are for ("": none, an operator's action).
    pub(super) model: &'a str,
    /// The lease to free ("": none).
    pub(super) member: &'a str,
    /// What to add to the counters (a claim that ran unbeknown to this instance is taken back with -1
    /// requests).
    pub(super) counts: [i64; 6],
    /// Given after an outage: applied only if Redis has not seen it (see [`super::scripts::SETTLE`]).
    pub(super) replay: bool,
    /// The outcome's id, for a replayed lease granted while Redis was away ("": none).
    pub(super) op: &'a str,
    /// Spend the tokens in the key's window (a tokens-per-minute limit is declared).
    pub(super) window: bool,
    /// Set once Redis took the counts and the lease: only the verdict can be missing after that.
    pub(super) applied: bool,
    /// A model the upstream refused: its counters go unless it ever succeeded.
    pub(super) forget: bool,
    pub(super) change: Change<'a>,
    /// The verdict as last read, with its version (none: read it first).
    pub(super) known: Option<(i64, Option<Verdict>)>,
    pub(super) now: UnixMs,
}

impl RedisStore {
    /// A key's verdict and its version, alone.
    pub(super) async fn read_verdict(
        &self,
        provider: &str,
        key: &KeyId,
    ) -> redis::RedisResult<(i64, Option<Verdict>)> {
        let (text, version): (Option<String>, Option<i64>) = self
            .scripts
            .verdict
            .key(self.hash(provider))
            .arg(key.as_str())
            .invoke_async(&mut self.conn()?)
            .await?;
        Ok((
            version.unwrap_or(0),
            text.as_deref().and_then(Verdict::parse),
        ))
    }

    /// Applies one change to a key: its counts at once, its verdict if no other instance changed it since it
    /// was read (else decided again on a fresh read). The local copy follows, to serve from if Redis goes away.
    /// What Redis has applied is cleared from `job` as it goes (its counts and lease, once counted), so that a
    /// failure leaves in `job` exactly what remains to give it.
    pub(super) async fn settle(&self, job: &mut Settle<'_>) -> redis::RedisResult<()> {
        let (provider, key, model, now) = (job.provider, job.key, job.model, job.now);
        let (day_start, _) = self.days(now);
        let pause = lock(&self.policy).pause;
        loop {
            let (version, stored) = match job.known.take() {
                Some(known) => known,
                None => self.read_verdict(provider, key).await?,
            };
            // No verdict in Redis (a key never used, or state Redis lost): what this instance knows of it.
            let mut state = match &stored {
                Some(verdict) => verdict.state(provider),
                None => self
                    .local_verdict(provider, key)
                    .map_or_else(KeyState::default, |v| v.state(provider)),
            };
            // An operator's decision this instance knows of and Redis does not (Redis lost it, and was written
            // again from a copy that had not heard of it) is given back: the later decision holds.
            if stored.is_some()
                && let Some((disabled, at)) = self.local.decision(key)
            {
                state.decide(disabled, at);
            }
            state.masked = job.masked.to_string();
            state.roll(day_start, now);
            let started = (job.change)(&mut state);
            if job.forget
                && state
                    .models
                    .get(model)
                    .is_some_and(|m| m.cooldown.is_none())
            {
                state.models.remove(model);
            }
            let verdict = Verdict::of(&state);
            let changed = stored.as_ref() != Some(&verdict);
            // A rate limit that started a cooldown counts towards the provider's pause.
            let limited = match (pause, started) {
                (
                    Some(_),
                    Some(Cooldown {
                        until,
                        reason: ErrorClass::RateLimit,
                    }),
                ) => until,
                _ => 0,
            };
            let mut invocation = self.scripts.settle.prepare_invoke();
            invocation
                .key(self.hash(provider))
                .key(self.leases(provider))
                .key(self.inflight(provider))
                .key(self.window(provider, key, "tokens"))
                .key(self.day(provider, day_start))
                .key(self.life(provider))
                .key(self.name(provider, format_args!("pause")))
                .key(self.name(provider, format_args!("limited")))
                .key(self.name(provider, format_args!("expired")))
                .key(self.name(provider, format_args!("done:{}", job.op)))
                .arg(key.as_str())
                .arg(job.member)
                .arg(self.channel())
                .arg(provider)
                .arg(now)
                .arg(model);
            for n in job.counts {
                invocation.arg(n);
            }
            invocation
                .arg(DAY_TTL_MS)
                .arg(if job.forget { "1" } else { "0" })
                .arg(version)
                .arg(if changed {
                    verdict.to_json()
                } else {
                    String::new()
                })
                .arg(pause.map_or(0, |p| p.keys))
                .arg(pause.map_or(0, |p| p.window.as_millis() as u64))
                .arg(limited)
                .arg(if job.replay { "1" } else { "0" })
                .arg(job.op)
                .arg(if job.window { "1" } else { "0" });
            let (written, paused, today, lifetime): (i64, i64, Counted, Counted) =
                invocation.invoke_async(&mut self.conn()?).await?;
            // Whatever the verdict, the counts and the lease are Redis's now.
            job.applied = true;
            job.member = "";
            job.counts = [0; 6];
            job.replay = false;
            if paused > 0 {
                tracing::warn!(provider = %provider, pause_ms = paused - now, "several keys rate-limited at once: pausing the provider");
            }
            match written {
                // Another instance changed the verdict: it is decided again.
                0 => continue,
                // A replay Redis had seen.
                2 => return Ok(()),
                1 => self.note(provider, model, key, |read, _| {
                    read.version = version + 1;
                    read.verdict = Some(verdict.clone());
                }),
                _ => {}
            }
            // The local copy: this verdict, the model's counters as they are now, the other models' as known.
            let mut whole = verdict.state(provider);
            if let Some(known) = self.local.get(key) {
                for (name, ms) in known.models {
                    let m = whole.models.entry(name).or_default();
                    (m.today, m.lifetime, m.last_used) = (ms.today, ms.lifetime, ms.last_used);
                }
            }
            if !model.is_empty() {
                let m = whole.models.entry(model.to_string()).or_default();
                m.today = shape::counters(&today);
                m.lifetime = shape::counters(&lifetime);
                m.last_used = lifetime.get(6).copied().flatten();
            }
            self.local.put(key, whole);
            return Ok(());
        }
    }
}

/// Whether outcomes spend tokens in their key's window: only when a tokens-per-minute limit is declared.
pub(super) fn spends_tokens(tuning: &Tuning) -> bool {
    tuning
        .limits
        .as_ref()
        .is_some_and(|l| l.tokens_per_minute.is_some())
}

/// A model the upstream refused outright (an unknown name, say) leaves no counters behind unless it ever
/// succeeded: clients cannot grow the shared state with made-up model names.
pub(super) fn forgets(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Failure {
            class: ErrorClass::InvalidRequest,
            ..
        }
    )
}

impl<'a> Settle<'a> {
    /// An operator's action on a key: no counts, no lease.
    pub(super) fn control(
        provider: &'a str,
        key: &'a KeyId,
        masked: &'a str,
        change: Change<'a>,
        now: UnixMs,
    ) -> Self {
        Settle {
            provider,
            key,
            masked,
            model: "",
            member: "",
            counts: [0; 6],
            replay: false,
            op: "",
            window: false,
            applied: false,
            forget: false,
            change,
            known: None,
            now,
        }
    }
}

impl RedisStore {
    /// Releases a lease granted while Redis was away: the local copy takes it now, Redis when it answers (at
    /// once if it is back already).
    pub(super) fn release_local(
        self: Arc<Self>,
        grant: &Grant,
        outcome: Outcome,
        tuning: &Tuning,
        now: UnixMs,
    ) {
        let store = self.clone();
        // Granted while Redis was away: the local copy takes it now, Redis when it answers (at once if it
        // is back already).
        let lease = grant.lease.0 & !LOCAL;
        let local = Grant {
            lease: LeaseId(lease),
            ..grant.clone()
        };
        self.local.release(&local, outcome.clone(), tuning);
        let known = lock(&self.local_leases).remove(&lease);
        let pending = outage::Pending {
            provider: grant.provider.clone(),
            key: grant.key.clone(),
            what: outage::Missed::Outcome {
                model: grant.model.clone(),
                outcome,
                tuning: Box::new(tuning.clone()),
                member: String::new(),
                op: format!("{}:{lease}", self.instance),
                requests: if known.is_some_and(|(_, counted)| counted) {
                    0
                } else {
                    1
                },
                counted: false,
            },
            at: now,
        };
        if self.degraded() {
            self.postpone(pending);
        } else {
            tokio::spawn(async move {
                if let Err(e) = store.give(pending, false).await {
                    store.degrade(&e);
                }
            });
        }
    }

    /// Releases a lease Redis granted: its outcome is settled in the background, and kept to be given again
    /// later should Redis not take it now.
    pub(super) fn release_held(
        self: Arc<Self>,
        grant: &Grant,
        outcome: Outcome,
        tuning: &Tuning,
        now: UnixMs,
    ) {
        let store = self.clone();
        let Some(held) = lock(&self.held).remove(&grant.lease) else {
            return;
        };
        self.note(
            &grant.provider,
            &grant.model,
            &grant.key.id,
            |read, same_model| {
                read.leases.0 = read.leases.0.saturating_sub(1);
                if same_model {
                    read.leases.1 = read.leases.1.saturating_sub(1);
                }
            },
        );
        let failed = matches!(outcome, Outcome::Failure { .. });
        if failed {
            lock(&self.settling).insert(grant.key.id.clone());
        }
        let (grant, tuning) = (grant.clone(), tuning.clone());
        tokio::spawn(async move {
            let next_reset = store.days(now).1;
            let change = |state: &mut KeyState| {
                policy::settle(state, &grant.model, &outcome, &tuning, now, next_reset)
            };
            let mut job = Settle {
                provider: &grant.provider,
                key: &grant.key.id,
                masked: &grant.key.masked,
                model: &grant.model,
                member: &held.member,
                counts: shape::counts(0, &outcome),
                replay: false,
                op: "",
                window: spends_tokens(&tuning),
                applied: false,
                forget: forgets(&outcome),
                change: &change,
                known: Some((held.version, held.verdict)),
                now,
            };
            let settled = store.settle(&mut job).await;
            let counted = job.applied;
            match settled {
                Ok(()) => {}
                Err(e) if outage::refused(&e) => {
                    tracing::warn!(error = %e, provider = %grant.provider, "Redis refused an outcome: not counted");
                }
                Err(e) => {
                    // Nothing is lost: the local copy takes the outcome now, Redis when it is back.
                    store.degrade(&e);
                    let mut state = store.local.get(&grant.key.id).unwrap_or_else(|| KeyState {
                        provider: grant.provider.to_string(),
                        masked: grant.key.masked.to_string(),
                        ..KeyState::default()
                    });
                    let ms = state.models.entry(grant.model.to_string()).or_default();
                    ms.today.requests += 1;
                    ms.lifetime.requests += 1;
                    change(&mut state);
                    store.local.put(&grant.key.id, state);
                    store.postpone(outage::Pending {
                        provider: grant.provider.clone(),
                        key: grant.key.clone(),
                        what: outage::Missed::Outcome {
                            model: grant.model.clone(),
                            outcome,
                            tuning: Box::new(tuning.clone()),
                            member: held.member.clone(),
                            op: String::new(),
                            requests: 0,
                            counted,
                        },
                        at: now,
                    });
                }
            }
            if failed {
                lock(&store.settling).remove(&grant.key.id);
            }
            store.wakeup(&grant.provider).notify_waiters();
        });
    }
}
