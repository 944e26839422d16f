//! Key state shared through Redis: several instances apply one pool's leases, cooldowns, streaks, usage,
//! limits and manual states, as one instance would.
//!
//! The rules stay the policy's ([`super::policy`]), in Rust. Choosing a key takes two round trips: a script
//! reads what the policy needs ([`scripts::READ`]), the policy chooses, and a script claims the key only if it
//! is still eligible ([`scripts::CLAIM`]); a lost race asks the policy again. Releasing takes one: the outcome's
//! counters are added outright, and the key's new verdict (decided on the verdict read when the key was
//! claimed) is written only if no other instance changed it meanwhile ([`scripts::SETTLE`]); if one did, the
//! verdict alone is decided again on a fresh read. How the state is laid out is in [`shape`] and [`scripts`].
//!
//! Leases are members of sorted sets scored by their expiry and renewed while held, so a crashed instance's
//! leases free themselves within the lease time. Every release is published: waiting requests on every
//! instance look again at once (one subscription per instance, no polling).
//!
//! Keys are hash-tagged per provider (`{prefix:provider}`), so a Cluster keeps one provider in one slot.
//! Provider keys are never written: only their ids (hashes) and masked forms.
//!
//! Redis trouble never becomes a client error: an operation that fails or takes longer than
//! [`OPERATION_TIMEOUT`] is served by the local [`MemoryStore`] instead (kept current with what Redis said), the
//! store says it is degraded (once in the log, and in [`RedisStore::degraded`]), and a probe rejoins Redis when
//! it answers again: a Redis that kept its data hears the outcomes it missed, one that came back empty is seeded
//! with what this instance knows.
//!
//! Times are each instance's own clock: instances sharing a pool need synchronised clocks (NTP), as cooldown
//! ends written by one are compared by the others. The store warns when its clock and Redis's differ by more
//! than [`CLOCK_SKEW_WARNING`].

mod claim;
mod outage;
mod scripts;
mod settle;
mod shape;
mod target;
mod tasks;

use super::MemoryStore;
use super::state::KeyState;
use super::{
    Ask, BoxFuture, Grant, KeyAction, KeyStatus, KeyStore, LeaseId, Outcome, StorePolicy,
    Unavailable,
};
use crate::clock::{Clock, UnixMs};
use crate::config::Tuning;
use crate::secret::{ApiKey, KeyId};
use claim::View;
use shape::Verdict;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
pub use target::{Conn, Target};
use tokio::sync::Notify;

/// The longest a Redis operation may take before the local store serves instead.
const OPERATION_TIMEOUT: Duration = Duration::from_millis(250);
/// Leases granted by the local store while degraded carry this bit.
const LOCAL: u64 = 1 << 63;
/// How long a lease lives without renewal, unless configured.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// A day's counters outlive it by a day, then go.
const DAY_TTL_MS: i64 = 50 * 3600 * 1000;
/// A difference between this instance's clock and Redis's worth a warning.
pub const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(1);

/// A lease this instance holds: for renewal, and the verdict it was claimed on.
#[derive(Clone, Debug)]
struct Held {
    /// Renewals go per provider (one hash slot each).
    provider: Arc<str>,
    member: String,
    version: i64,
    verdict: Option<Verdict>,
}

pub struct RedisStore {
    /// Itself, for work done in the background (releases never block).
    this: std::sync::Weak<RedisStore>,
    target: Target,
    /// Made at start, or once Redis first answers.
    conn: Mutex<Option<Conn>>,
    prefix: String,
    /// Distinguishes this instance's lease members.
    instance: String,
    clock: Clock,
    next_lease: AtomicU64,
    held: Mutex<HashMap<LeaseId, Held>>,
    policy: Mutex<StorePolicy>,
    scripts: Scripts,
    /// Serves while Redis is away; kept current with the states Redis returns.
    local: Arc<MemoryStore>,
    degraded: AtomicBool,
    /// How long a lease lives without renewal: a crashed instance's leases are free after this.
    lease_ttl: Duration,
    /// Keys with a failure this instance is still writing to Redis: not granted meanwhile, so that a retry does
    /// not meet the same failure before its cooldown is recorded.
    settling: Mutex<HashSet<KeyId>>,
    /// Changes to give Redis when it is back.
    pending: Mutex<VecDeque<outage::Pending>>,
    /// Leases granted from the local copy and not yet released, by key, and whether Redis has their request
    /// (written back from the local copy, which counts a request when it grants it).
    local_leases: Mutex<HashMap<u64, (KeyId, bool)>>,
    /// The start of each provider's state in Redis as this instance last saw it (its `alive` mark).
    epochs: Mutex<HashMap<String, UnixMs>>,
    /// Keys a reload removed: never granted again.
    retired: Mutex<HashSet<KeyId>>,
    /// Keys whose operator decision is being given back to Redis.
    restoring: Mutex<HashSet<KeyId>>,
    /// Keys whose request or token window, or day's quota, is known full until then (windows only fill up
    /// meanwhile, so this holds whatever other instances do).
    full: Mutex<HashMap<KeyId, UnixMs>>,
    /// What was last read per provider and model, to choose from.
    views: Mutex<HashMap<String, HashMap<String, View>>>,
}

struct Scripts {
    read: redis::Script,
    claim: redis::Script,
    settle: redis::Script,
    report: redis::Script,
    seed: redis::Script,
    verdict: redis::Script,
    renew: redis::Script,
}

/// A hash's fields and values, as read.
type Fields = Vec<(String, String)>;
/// One key and model's counters as read, in [`shape::COUNTERS`] order, then its last use.
type Counted = Vec<Option<i64>>;

impl Scripts {
    /// Loads every script, so that none costs a round trip more on its first use.
    async fn load(&self, conn: &mut Conn) -> redis::RedisResult<()> {
        let all = [
            &self.read,
            &self.claim,
            &self.settle,
            &self.report,
            &self.seed,
            &self.verdict,
            &self.renew,
        ];
        for script in all {
            script.load_async(conn).await?;
        }
        Ok(())
    }
}

impl RedisStore {
    /// Starts sharing key state through `target`; key names start with `prefix`. `local` serves while Redis is
    /// away (and holds what this instance knew before).
    pub async fn connect(
        target: Target,
        prefix: &str,
        clock: Clock,
        policy: StorePolicy,
        local: Arc<MemoryStore>,
        lease_ttl: Duration,
    ) -> Arc<Self> {
        let store = Arc::new_cyclic(|this| Self {
            this: this.clone(),
            target,
            conn: Mutex::new(None),
            prefix: prefix.to_string(),
            instance: (0..12).map(|_| fastrand::alphanumeric()).collect(),
            clock,
            next_lease: AtomicU64::new(0),
            held: Mutex::default(),
            policy: Mutex::new(policy),
            scripts: Scripts {
                read: redis::Script::new(scripts::READ),
                claim: redis::Script::new(scripts::CLAIM),
                settle: redis::Script::new(scripts::SETTLE),
                report: redis::Script::new(scripts::REPORT),
                seed: redis::Script::new(scripts::SEED),
                verdict: redis::Script::new(scripts::VERDICT),
                renew: redis::Script::new(scripts::RENEW),
            },
            local,
            degraded: AtomicBool::new(false),
            lease_ttl,
            settling: Mutex::default(),
            pending: Mutex::default(),
            retired: Mutex::default(),
            restoring: Mutex::default(),
            epochs: Mutex::default(),
            local_leases: Mutex::default(),
            full: Mutex::default(),
            views: Mutex::default(),
        });
        tokio::spawn(tasks::renew(Arc::downgrade(&store)));
        // Redis away at start is Redis away: this instance serves from its own state until it answers.
        let joined = match store.connection().await {
            Ok(_) => store.rejoin().await,
            Err(e) => Err(e),
        };
        if let Err(e) = joined {
            store.degrade(&e);
        }
        tokio::spawn(outage::probe(Arc::downgrade(&store)));
        tokio::spawn(tasks::listen(Arc::downgrade(&store)));
        store
    }

    /// The connection, when there is one.
    fn conn(&self) -> redis::RedisResult<Conn> {
        lock(&self.conn).clone().ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "not connected to Redis yet"))
        })
    }

    /// The connection, made if there is none yet.
    async fn connection(&self) -> redis::RedisResult<Conn> {
        if let Ok(conn) = self.conn() {
            return Ok(conn);
        }
        let conn = self.target.connect(OPERATION_TIMEOUT).await?;
        *lock(&self.conn) = Some(conn.clone());
        Ok(conn)
    }

    /// Warns when this instance's clock and Redis's disagree: cooldown ends written by one instance are read by
    /// the others' clocks.
    async fn check_clock(&self, conn: &mut Conn) -> redis::RedisResult<()> {
        let before = self.clock.now();
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
        let after = self.clock.now();
        let skew = secs * 1000 + micros / 1000 - (before + after) / 2;
        if skew.unsigned_abs() > CLOCK_SKEW_WARNING.as_millis() as u64 {
            tracing::warn!(
                skew_ms = skew,
                "this machine's clock differs from Redis's: instances sharing keys need synchronised clocks (NTP), or cooldowns end early or late"
            );
        }
        Ok(())
    }

    /// Redis is away: the local store serves.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// A connection for data kept beside the key state (the Responses conversations), while Redis is up, and the
    /// prefix of the store's names.
    pub fn beside(&self) -> Option<(Conn, &str)> {
        if self.degraded() {
            return None;
        }
        Some((self.conn().ok()?, &self.prefix))
    }

    /// This instance's name among those sharing the store (random, for the life of the process).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn degrade(&self, e: &dyn std::fmt::Display) {
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "Redis is unreachable: serving from this instance's own key state until it is back");
        }
    }

    /// When `provider`'s state began in Redis: gone, or newer than last seen, means Redis lost what it had.
    fn marker(&self, provider: &str) -> String {
        self.name(provider, format_args!("alive"))
    }

    /// Where instances say that a key of a provider may be free (a release, a change of state).
    fn channel(&self) -> String {
        format!("{}:wake", self.prefix)
    }

    /// A key name of `provider`'s, in its hash slot.
    fn name(&self, provider: &str, rest: std::fmt::Arguments<'_>) -> String {
        format!("{{{}:{provider}}}:{rest}", self.prefix)
    }

    fn hash(&self, provider: &str) -> String {
        self.name(provider, format_args!("state"))
    }

    /// The provider's leases in flight, scored by their expiry.
    fn leases(&self, provider: &str) -> String {
        self.name(provider, format_args!("leases"))
    }

    /// The provider's counts of leases in flight, per key and per key and model.
    fn inflight(&self, provider: &str) -> String {
        self.name(provider, format_args!("inflight"))
    }

    /// The key's window of requests (`requests`) or tokens (`tokens`) over the last minute.
    fn window(&self, provider: &str, id: &KeyId, what: &str) -> String {
        self.name(provider, format_args!("{what}:{id}"))
    }

    /// The provider's counters of the day that started at `day_start`.
    fn day(&self, provider: &str, day_start: UnixMs) -> String {
        self.name(provider, format_args!("day:{day_start}"))
    }

    /// The provider's counters of all time.
    fn life(&self, provider: &str) -> String {
        self.name(provider, format_args!("life"))
    }

    /// The start of the current day, and of the next.
    fn days(&self, now: UnixMs) -> (UnixMs, UnixMs) {
        let policy = lock(&self.policy);
        (
            policy.daily_reset.last_at_or_before(now),
            policy.daily_reset.next_after(now),
        )
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl KeyStore for RedisStore {
    fn acquire<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Grant, Unavailable>> {
        Box::pin(async move {
            if !self.degraded() {
                match tokio::time::timeout(2 * OPERATION_TIMEOUT, self.claim(ask)).await {
                    Ok(Ok(result)) => return result,
                    Ok(Err(e)) => self.degrade(&e),
                    Err(_) => self.degrade(&"no answer in time"),
                }
            }
            // Served locally; the lease says so.
            self.local.try_acquire(ask).map(|mut grant| {
                lock(&self.local_leases).insert(grant.lease.0, (grant.key.id.clone(), false));
                grant.lease = LeaseId(grant.lease.0 | LOCAL);
                grant
            })
        })
    }

    fn release(&self, grant: &Grant, outcome: Outcome, tuning: &Tuning) {
        let now = self.clock.now();
        // Release never blocks: Redis is told in the background. The store outlives its requests (the engine
        // holds it for the process).
        let Some(store) = self.this.upgrade() else {
            return;
        };
        if grant.lease.0 & LOCAL != 0 {
            store.release_local(grant, outcome, tuning, now);
        } else {
            store.release_held(grant, outcome, tuning, now);
        }
    }

    fn wakeup(&self, provider: &str) -> Arc<Notify> {
        self.local.wakeup(provider)
    }

    fn configure(&self, policy: StorePolicy) {
        // Limits may have changed: what was known full is looked at again.
        lock(&self.full).clear();
        self.local.configure(policy.clone());
        *lock(&self.policy) = policy;
    }

    fn kind(&self) -> &'static str {
        if self.degraded() { "degraded" } else { "redis" }
    }

    fn retire(&self, removed: &HashSet<KeyId>, live: &HashSet<KeyId>) {
        self.local.retire(removed, live);
        let mut retired = lock(&self.retired);
        retired.extend(removed.iter().cloned());
        retired.retain(|id| !live.contains(id));
    }

    fn control(&self, provider: &str, key: &ApiKey, action: &KeyAction) -> bool {
        self.local.control(provider, key, action);
        let Some(store) = self.this.upgrade() else {
            return false;
        };
        let pending = outage::Pending {
            provider: provider.into(),
            key: key.clone(),
            what: outage::Missed::Control(action.clone()),
            at: self.clock.now(),
        };
        if self.degraded() {
            // Redis hears of it when it is back.
            self.postpone(pending);
            return true;
        }
        let provider = pending.provider.clone();
        tokio::spawn(async move {
            if let Err(e) = store.give(pending, false).await {
                store.degrade(&e);
            }
            store.wakeup(&provider).notify_waiters();
        });
        true
    }

    fn report<'a>(
        &'a self,
        provider: &'a str,
        keys: &'a [ApiKey],
    ) -> BoxFuture<'a, Vec<KeyStatus>> {
        Box::pin(async move {
            if self.degraded() {
                return self.local.status(provider, keys);
            }
            match self.pool_report(provider, keys).await {
                Ok(report) => report,
                Err(e) => {
                    self.degrade(&e);
                    self.local.status(provider, keys)
                }
            }
        })
    }
}

impl RedisStore {
    /// The pool's state of `keys`, for operators.
    async fn pool_report(
        &self,
        provider: &str,
        keys: &[ApiKey],
    ) -> redis::RedisResult<Vec<KeyStatus>> {
        let now = self.clock.now();
        let (day_start, _) = self.days(now);
        let mut invocation = self.scripts.report.prepare_invoke();
        invocation
            .key(self.hash(provider))
            .key(self.day(provider, day_start))
            .key(self.life(provider))
            .key(self.leases(provider))
            .key(self.inflight(provider))
            .key(self.name(provider, format_args!("expired")))
            .key(self.name(provider, format_args!("pause")))
            .arg(now);
        for key in keys {
            invocation.arg(key.id.as_str());
        }
        let (today, lifetime, rows, paused): (Fields, Fields, Vec<(String, u32)>, UnixMs) =
            invocation.invoke_async(&mut self.conn()?).await?;
        let today = shape::by_key(&today);
        let lifetime = shape::by_key(&lifetime);
        Ok(keys
            .iter()
            .zip(rows)
            .map(|(key, (verdict, in_flight))| {
                // What the choice is made on: Redis's verdict with the later operator decision of the two, or
                // this instance's copy where Redis has none.
                let known =
                    Verdict::parse(&verdict).or_else(|| self.local_verdict(provider, &key.id));
                let mut state = known
                    .as_ref()
                    .map_or_else(KeyState::default, |v| v.state(provider));
                if let Some((disabled, at)) = self.local.decision(&key.id) {
                    state.decide(disabled, at);
                }
                state.roll(day_start, now);
                for (all, is_today) in [(&today, true), (&lifetime, false)] {
                    if let Some(fields) = all.get(key.id.as_str()) {
                        shape::add_counters(&mut state, fields, is_today);
                    }
                }
                let known = known.is_some() || !state.models.is_empty();
                let mut status = KeyStatus::of(key, known.then_some(&state), in_flight, now);
                status.paused(paused, now);
                status
            })
            .collect())
    }
}
