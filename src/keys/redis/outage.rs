//! When Redis is away: the changes it missed are kept and given to it when it is back, each exactly once, and
//! what it lost is written back from what this instance knows.
//!
//! - An outcome whose release could not reach Redis is kept with its lease: Redis applies it later only if
//!   that lease is still held or expired unreleased (it may have applied it already, its answer lost).
//! - An outcome of a lease granted while Redis was away is kept with an id of its own, which Redis marks when
//!   it applies it.
//! - An outcome whose counts Redis took but whose verdict it did not is kept as the verdict alone.
//! - An operator's action is kept as it is.
//! - A claim this instance stopped waiting for is taken back if Redis ran it (its lease still held or
//!   expired), as the request was served from the local copy instead.
//!
//! Each provider's state carries an `alive` mark: when it began (its first claim, or an instance writing back
//! what it knows). A mark gone, or newer than this instance last saw, means Redis lost the provider's state
//! (restarted empty, a failover to an empty replica, a Cluster node that lost its data). Its keys Redis has no
//! verdict for are then written back from this instance's copy, which holds the changes it missed; changes
//! older than the mark are applied whatever Redis once did with them. The mark is looked at on every rejoin
//! and every ten seconds.

use super::settle::{Settle, forgets, spends_tokens};
use super::{RedisStore, Verdict, lock, shape};
use crate::clock::UnixMs;
use crate::config::Tuning;
use crate::keys::state::{KeyAction, KeyState, later};
use crate::keys::{KeyStore, Outcome};
use crate::secret::{ApiKey, KeyId};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Changes kept for a Redis that is away, at most; the oldest go first.
const MAX_PENDING: usize = 10_000;
/// How often a healthy store checks that Redis still holds what it wrote.
const CHECK_EVERY: u32 = 10;

/// A change Redis has not heard of.
pub(super) struct Pending {
    pub provider: Arc<str>,
    pub key: ApiKey,
    pub what: Missed,
    pub at: UnixMs,
}

pub(super) enum Missed {
    Outcome {
        model: Arc<str>,
        outcome: Outcome,
        tuning: Box<Tuning>,
        /// The lease it ended, when Redis granted it; else the outcome's own id.
        member: String,
        op: String,
        /// The request itself, when Redis never counted it (a lease granted while it was away).
        requests: u64,
        /// Redis took its counts already: only the verdict is missing.
        counted: bool,
    },
    Control(KeyAction),
    /// A claim this instance stopped waiting for, which Redis may have run (a lease held and a request
    /// counted that no request uses): taken back if it did.
    Claim {
        model: Arc<str>,
        member: String,
    },
}

impl RedisStore {
    /// Keeps a change for Redis, away now.
    pub(super) fn postpone(&self, pending: Pending) {
        let mut kept = lock(&self.pending);
        if kept.len() >= MAX_PENDING {
            kept.pop_front();
        }
        kept.push_back(pending);
    }

    /// Gives Redis one change it missed. `lost`: Redis lost its state since the change, so the change is
    /// applied whatever Redis once did with it. `Ok(false)`: Redis refused it (a bad value, not an outage), and
    /// it is dropped. An error is an outage: what remains of the change is kept.
    pub(super) async fn give(&self, pending: Pending, lost: bool) -> redis::RedisResult<bool> {
        let Pending {
            provider,
            key,
            what,
            at,
        } = pending;
        let next_reset = self.days(at).1;
        let result = match &what {
            Missed::Outcome {
                model,
                outcome,
                tuning,
                member,
                op,
                requests,
                counted,
            } => {
                let change = |state: &mut KeyState| {
                    crate::keys::policy::settle(state, model, outcome, tuning, at, next_reset)
                };
                // Redis lost it all: the request too (its claim), and the lease is gone.
                let (counted, requests, member) = match lost {
                    true => (false, 1, ""),
                    false => (*counted, *requests, member.as_str()),
                };
                let mut job = Settle {
                    provider: &provider,
                    key: &key.id,
                    masked: &key.masked,
                    model,
                    member: if counted { "" } else { member },
                    counts: if counted {
                        [0; 6]
                    } else {
                        shape::counts(requests, outcome)
                    },
                    replay: !counted && !lost,
                    op: if counted || lost { "" } else { op },
                    window: spends_tokens(tuning),
                    applied: false,
                    forget: forgets(outcome),
                    change: &change,
                    known: None,
                    now: at,
                };
                let result = self.settle(&mut job).await;
                let counted = counted || job.applied;
                result.map_err(|e| (e, counted))
            }
            Missed::Control(action) => {
                let change = |state: &mut KeyState| {
                    match action {
                        // The later decision holds (this instance's copy, with its own, is merged in too).
                        KeyAction::Disable | KeyAction::Enable => {
                            state.decide(*action == KeyAction::Disable, at);
                        }
                        reset => state.control(reset, at),
                    }
                    None
                };
                let mut job = Settle::control(&provider, &key.id, &key.masked, &change, at);
                self.settle(&mut job).await.map_err(|e| (e, false))
            }
            // Redis lost it with the rest.
            Missed::Claim { .. } if lost => Ok(()),
            Missed::Claim { model, member } => {
                let change = |_: &mut KeyState| None;
                let mut job = Settle {
                    model,
                    member,
                    counts: [-1, 0, 0, 0, 0, 0],
                    replay: true,
                    ..Settle::control(&provider, &key.id, &key.masked, &change, at)
                };
                self.settle(&mut job).await.map_err(|e| (e, false))
            }
        };
        match result {
            Ok(()) => Ok(true),
            Err((e, _)) if refused(&e) => {
                tracing::warn!(error = %e, provider = %provider, "Redis refused a change kept for it: dropped");
                Ok(false)
            }
            Err((e, counted)) => {
                let mut what = what;
                if let Missed::Outcome { counted: was, .. } = &mut what {
                    *was |= counted;
                }
                lock(&self.pending).push_front(Pending {
                    provider,
                    key,
                    what,
                    at,
                });
                Err(e)
            }
        }
    }

    /// Back from an outage, or started: checks the clocks, loads the scripts, and catches Redis up.
    pub(super) async fn rejoin(&self) -> redis::RedisResult<()> {
        let mut conn = self.connection().await?;
        self.check_clock(&mut conn).await?;
        self.scripts.load(&mut conn).await?;
        self.catch_up().await
    }

    /// Writes back what Redis lost of the providers this instance knows, then gives it the changes it missed.
    async fn catch_up(&self) -> redis::RedisResult<()> {
        // What this instance knows now: its copy, the local leases in flight, and the changes kept so far.
        let known = self.local.export();
        let leases: HashSet<u64> = lock(&self.local_leases).keys().copied().collect();
        let kept = lock(&self.pending).len();
        let mut providers: BTreeSet<String> =
            known.keys.values().map(|s| s.provider.clone()).collect();
        providers.extend(lock(&self.pending).iter().map(|p| p.provider.to_string()));
        // When each provider's state began: changes older than that were lost with what Redis had before.
        let mut since: HashMap<String, UnixMs> = HashMap::new();
        let mut written: HashSet<KeyId> = HashSet::new();
        for provider in &providers {
            let mark: Option<UnixMs> = redis::cmd("GET")
                .arg(self.marker(provider))
                .query_async(&mut self.conn()?)
                .await?;
            // (`MIN`: being learnt.)
            let seen = lock(&self.epochs)
                .get(provider)
                .copied()
                .filter(|&at| at != UnixMs::MIN);
            let start = match mark {
                Some(at) if seen.is_none_or(|seen| seen == at) => at,
                // Gone, or begun again since this instance last looked: Redis lost what it had.
                _ => {
                    written.extend(self.seed(&known, &leases, provider).await?);
                    let now = self.clock.now();
                    let _: () = redis::cmd("SET")
                        .arg(self.marker(provider))
                        .arg(now)
                        .arg("NX")
                        .query_async(&mut self.conn()?)
                        .await?;
                    let at: Option<UnixMs> = redis::cmd("GET")
                        .arg(self.marker(provider))
                        .query_async(&mut self.conn()?)
                        .await?;
                    at.unwrap_or(now)
                }
            };
            lock(&self.epochs).insert(provider.clone(), start);
            since.insert(provider.clone(), start);
        }
        let mut given = 0;
        loop {
            let Some(pending) = lock(&self.pending).pop_front() else {
                return Ok(());
            };
            given += 1;
            // A key written back from this instance's copy has the changes kept before that copy was taken.
            if given <= kept && written.contains(&pending.key.id) {
                continue;
            }
            // A change older than the state Redis has now: whatever Redis did with it is gone.
            let lost = since
                .get(&*pending.provider)
                .is_some_and(|at| pending.at < *at);
            self.give(pending, lost).await?;
        }
    }

    /// Writes what this instance knows of `provider`'s keys that Redis has no verdict for; returns those keys.
    /// The local copy counted the requests of the local `leases` in flight: where its day's counters are
    /// written, Redis has those requests.
    async fn seed(
        &self,
        known: &crate::keys::memory::State,
        leases: &HashSet<u64>,
        provider: &str,
    ) -> redis::RedisResult<Vec<KeyId>> {
        let (day_start, _) = self.days(self.clock.now());
        let mut written = Vec::new();
        for (id, state) in known.keys.iter().filter(|(_, s)| s.provider == provider) {
            let mut verdict = Verdict::of(state);
            // The local store rolls one day for all its keys: their counters are of its day.
            verdict.day = verdict.day.max(known.day_start);
            let (today, lifetime) = shape::counter_fields(state);
            let today = if known.day_start == day_start {
                today
            } else {
                Vec::new()
            };
            let mut invocation = self.scripts.seed.prepare_invoke();
            invocation
                .key(self.hash(provider))
                .key(self.day(provider, day_start))
                .key(self.life(provider))
                .arg(id.as_str())
                .arg(verdict.to_json())
                .arg(super::DAY_TTL_MS)
                .arg(today.len());
            for (field, n) in today.iter().chain(&lifetime) {
                invocation.arg(field).arg(n);
            }
            let seeded: i64 = invocation.invoke_async(&mut self.conn()?).await?;
            // Written again already, by an instance whose copy may not know an operator's later decision.
            if seeded == 0 && state.decided_at > 0 {
                self.restore_now(provider, id, &state.masked).await?;
            }
            if seeded == 2 {
                for (lease, (key, counted)) in lock(&self.local_leases).iter_mut() {
                    *counted |= key == id && leases.contains(lease);
                }
            }
            if seeded > 0 {
                written.push(id.clone());
            }
        }
        Ok(written)
    }
}

impl RedisStore {
    /// Gives Redis back an operator's decision about a key that this instance knows of and Redis's verdict
    /// lacks, in the background, one at a time per key.
    pub(super) fn restore_decision(&self, provider: &str, id: &KeyId, masked: &str) {
        if self.degraded() || !lock(&self.restoring).insert(id.clone()) {
            return;
        }
        let Some(store) = self.this.upgrade() else {
            return;
        };
        let (provider, id, masked) = (provider.to_string(), id.clone(), masked.to_string());
        tokio::spawn(async move {
            let restored = store.restore_now(&provider, &id, &masked).await;
            lock(&store.restoring).remove(&id);
            match restored {
                Ok(()) => store.local.wakeup(&provider).notify_waiters(),
                Err(e) if refused(&e) => {
                    tracing::warn!(error = %e, provider = %provider, "Redis refused an operator's decision given back")
                }
                Err(e) => store.degrade(&e),
            }
        });
    }

    /// [`RedisStore::restore_decision`], now: written if Redis has no verdict for the key, or one with an
    /// earlier decision than this instance's (the settle merges this instance's in).
    async fn restore_now(
        &self,
        provider: &str,
        id: &KeyId,
        masked: &str,
    ) -> redis::RedisResult<()> {
        let (version, stored) = self.read_verdict(provider, id).await?;
        let here = self.local.decision(id).unwrap_or((false, 0));
        if let Some(verdict) = &stored
            && !later(here, (verdict.disabled, verdict.decided_at))
        {
            return Ok(());
        }
        let change = |_: &mut KeyState| None;
        let mut job = Settle {
            known: Some((version, stored)),
            ..Settle::control(provider, id, masked, &change, self.clock.now())
        };
        self.settle(&mut job).await
    }
}

/// Redis answered, with an error that trying again would not change (a value out of range, a script error, a
/// permission): not an outage.
pub(super) fn refused(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    matches!(
        e.kind(),
        ErrorKind::Server(S::ResponseError | S::ExecAbort | S::CrossSlot | S::NoPerm)
            | ErrorKind::Parse
            | ErrorKind::UnexpectedReturnType
    )
}

/// While degraded, asks Redis every second whether it is back, and rejoins when it is; while healthy, checks
/// every ten seconds that Redis still holds what was written.
pub(super) async fn probe(store: std::sync::Weak<RedisStore>) {
    let mut ticks = 0u32;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        ticks = ticks.wrapping_add(1);
        if !store.degraded() {
            if ticks.is_multiple_of(CHECK_EVERY)
                && let Err(e) = store.catch_up().await
            {
                store.degrade(&e);
            }
            continue;
        }
        let ping = match store.connection().await {
            Ok(mut conn) => redis::cmd("PING").query_async::<String>(&mut conn).await,
            Err(e) => Err(e),
        };
        if ping.is_ok() && store.rejoin().await.is_ok() {
            store.degraded.store(false, Ordering::Relaxed);
            tracing::info!("Redis is back: serving from the shared key state again");
        }
    }
}
