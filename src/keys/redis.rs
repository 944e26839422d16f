//! Key state shared through Redis (issue 14, work in progress): several instances apply one pool's leases,
//! cooldowns, streaks, usage and manual states.
//!
//! The rules stay the policy's ([`super::policy`]), in Rust: a store reads state, lets the policy decide, and
//! claims or updates atomically.
//!
//! - Each key's [`KeyState`] is one JSON field of the provider's hash, with a version; an outcome is settled by
//!   reading it, applying [`policy::settle`], and writing it back only if the version is unchanged (retried).
//! - Leases are members of sorted sets per key and per key and model, scored by their expiry and renewed while
//!   held: a crashed instance's leases free themselves within the lease time.
//! - Claiming re-checks, in the script, that the chosen key is still eligible (not cooling, not disabled, under
//!   its caps): a lost race asks the policy again.
//!
//! Keys are hash-tagged per provider (`{prefix:provider}`), so a Cluster keeps one provider in one slot.
//! Provider keys are never written: only their ids (hashes) and masked forms.
//!
//! Redis trouble never becomes a client error: an operation that fails or takes longer than
//! [`OPERATION_TIMEOUT`] is served by the local [`MemoryStore`] instead (kept current with what Redis said), the
//! store says it is degraded (once in the log, and in [`RedisStore::degraded`]), and a probe rejoins Redis when
//! it answers again, seeding it with what this instance knows when it came back empty.
//!
//! Not yet: shared proactive limits (requests and tokens per minute), the provider pause, the shared daily
//! reset, the sequential cursor, pub/sub wakeups across instances.

use super::MemoryStore;
use super::policy::{self, Standing};
use super::state::{KeyState, ModelState};
use super::{
    Ask, BoxFuture, Grant, KeyAction, KeyStatus, KeyStore, LeaseId, Outcome, StorePolicy,
    Unavailable,
};
use crate::clock::{Clock, UnixMs};
use crate::config::Tuning;
use crate::secret::{ApiKey, KeyId};
use redis::aio::ConnectionManager;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// The longest a Redis operation may take before the local store serves instead.
const OPERATION_TIMEOUT: Duration = Duration::from_millis(250);
/// Leases granted by the local store while degraded carry this bit.
const LOCAL: u64 = 1 << 63;

/// Outcomes kept for a Redis that is away, at most; the oldest go first.
const MAX_PENDING: usize = 10_000;

/// What an outcome does to a key's state: a request counted, then the policy's verdict.
/// Returns the cooldown it started, if any.
fn apply(
    state: &mut KeyState,
    model: &str,
    outcome: &Outcome,
    tuning: &Tuning,
    now: UnixMs,
    next_reset: UnixMs,
) -> Option<super::Cooldown> {
    let ms: &mut ModelState = state.models.entry(model.to_string()).or_default();
    ms.today.requests += 1;
    ms.lifetime.requests += 1;
    ms.last_used = Some(now);
    policy::settle(state, model, outcome, tuning, now, next_reset)
}

/// A provider's recent rate limits (time, key) and its pause's end.
type Pause = (std::collections::VecDeque<(UnixMs, KeyId)>, UnixMs);

/// An outcome Redis has not heard of yet (it was away when the lease ended).
struct Pending {
    provider: Arc<str>,
    key: ApiKey,
    model: Arc<str>,
    outcome: Outcome,
    tuning: Tuning,
    at: UnixMs,
    next_reset: UnixMs,
}

/// How long a lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// Claims retried after a lost race before the request waits like any other.
const CLAIM_TRIES: usize = 4;

/// Reads, for each key: its state (or ""), its version, and its live leases for the key and for the model.
/// KEYS: the provider's hash, then per key its key lease set and its model lease set. ARGV: now, then the ids.
const READ: &str = r#"
local now = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local lk, lm = KEYS[2 * i - 2], KEYS[2 * i - 1]
  redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', lm, '-inf', now)
  out[#out + 1] = redis.call('HGET', KEYS[1], 's:' .. ARGV[i]) or ''
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], 'v:' .. ARGV[i]) or '0')
  out[#out + 1] = redis.call('ZCARD', lk)
  out[#out + 1] = redis.call('ZCARD', lm)
end
return out
"#;

/// Claims a lease if the key is still eligible: not disabled, not cooling (whole key or this model), under its
/// caps, and within its declared limits over the last minute (requests, tokens; shared windows). KEYS: hash, key
/// lease set, model lease set, the key's request window, its token window. ARGV: id, model, member, expiry, cap
/// per key (0: none), cap per key and model, now, requests per minute (0: none), tokens per minute (0: none).
/// Returns 1 when claimed, 0 when the key is not eligible, or the time a window has room again.
const CLAIM: &str = r#"
local id, model, member, expiry = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local per_key, per_model, now = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local rpm, tpm = tonumber(ARGV[8]), tonumber(ARGV[9])
local raw = redis.call('HGET', KEYS[1], 's:' .. id)
if raw then
  local s = cjson.decode(raw)
  if s.disabled then return 0 end
  if type(s.cooldown) == 'table' and s.cooldown['until'] > now then return 0 end
  local m = type(s.models) == 'table' and s.models[model]
  if type(m) == 'table' and type(m.cooldown) == 'table' and m.cooldown['until'] > now then return 0 end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if per_key > 0 and redis.call('ZCARD', KEYS[2]) >= per_key then return 0 end
if per_model > 0 and redis.call('ZCARD', KEYS[3]) >= per_model then return 0 end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[4]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    return tonumber(oldest[2]) + 60000
  end
end
if tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - 60000)
  local used = 0
  for _, entry in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
    used = used + tonumber(string.match(entry, '^(%d+)'))
  end
  if used >= tpm then
    local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    return tonumber(oldest[2]) + 60000
  end
end
redis.call('ZADD', KEYS[2], expiry, member)
redis.call('ZADD', KEYS[3], expiry, member)
if rpm > 0 then
  redis.call('ZADD', KEYS[4], now, member)
  redis.call('PEXPIRE', KEYS[4], 61000)
end
return 1
"#;

/// Writes a key's state if its version is still `expected`, frees a lease (idempotent), counts the tokens spent
/// in the key's token window, and tells every instance that a key of the provider may be free. KEYS: hash, key
/// lease set, model lease set, token window. ARGV: id, expected version, state, member, wakeup channel,
/// provider, tokens, now. Returns 1 when written.
const SETTLE: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[4])
local v = tonumber(redis.call('HGET', KEYS[1], 'v:' .. ARGV[1]) or '0')
if v ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 's:' .. ARGV[1], ARGV[3], 'v:' .. ARGV[1], v + 1)
if tonumber(ARGV[7]) > 0 then
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[7] .. ':' .. ARGV[4])
  redis.call('PEXPIRE', KEYS[4], 61000)
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"#;

/// Extends the leases held (only those still there).
/// KEYS: lease sets. ARGV: expiry, then one member per key.
const RENEW: &str = r#"
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', ARGV[1], ARGV[i + 1]) end
return 1
"#;

/// A lease this instance holds, for renewal.
#[derive(Clone, Debug)]
struct Held {
    key_set: String,
    model_set: String,
    member: String,
}

pub struct RedisStore {
    /// Itself, for work done in the background (releases never block).
    this: std::sync::Weak<RedisStore>,
    client: redis::Client,
    /// Made at start, or once Redis first answers.
    conn: Mutex<Option<ConnectionManager>>,
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
    /// Outcomes to give Redis when it is back.
    pending: Mutex<std::collections::VecDeque<Pending>>,
    /// `provider_pause`, as this instance sees it (not shared yet): recent rate limits and the pause's end, by
    /// provider.
    pauses: Mutex<HashMap<String, Pause>>,
}

struct Scripts {
    read: redis::Script,
    claim: redis::Script,
    settle: redis::Script,
    renew: redis::Script,
}

/// A key's state as read: the state, its version, and its leases (key, model).
struct Read {
    state: Option<KeyState>,
    version: i64,
    leases: (u32, u32),
}

impl RedisStore {
    /// Connects to `url` (`redis://`, `unix://`); key names start with `prefix`. `local` serves while Redis is
    /// away (and holds what this instance knew before).
    pub async fn connect(
        url: &str,
        prefix: &str,
        clock: Clock,
        policy: StorePolicy,
        local: Arc<MemoryStore>,
        lease_ttl: Duration,
    ) -> Result<Arc<Self>, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let store = Arc::new_cyclic(|this| Self {
            this: this.clone(),
            client: client.clone(),
            conn: Mutex::new(None),
            prefix: prefix.to_string(),
            instance: (0..12).map(|_| fastrand::alphanumeric()).collect(),
            clock,
            next_lease: AtomicU64::new(0),
            held: Mutex::default(),
            policy: Mutex::new(policy),
            scripts: Scripts {
                read: redis::Script::new(READ),
                claim: redis::Script::new(CLAIM),
                settle: redis::Script::new(SETTLE),
                renew: redis::Script::new(RENEW),
            },
            local,
            degraded: AtomicBool::new(false),
            lease_ttl,
            settling: Mutex::default(),
            pending: Mutex::default(),
            pauses: Mutex::default(),
        });
        tokio::spawn(renew(Arc::downgrade(&store)));
        // Redis away at start is Redis away: this instance serves from its own state until it answers.
        match store.connection().await {
            Ok(mut conn) => {
                let marked = redis::cmd("SET")
                    .arg(store.marker())
                    .arg(1)
                    .query_async::<()>(&mut conn)
                    .await;
                if let Err(e) = marked {
                    store.degrade(&e);
                }
            }
            Err(e) => store.degrade(&e),
        }
        tokio::spawn(probe(Arc::downgrade(&store)));
        tokio::spawn(listen(Arc::downgrade(&store), client));
        Ok(store)
    }

    /// The connection, when there is one.
    fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::Io, "not connected to Redis yet"))
            })
    }

    /// The connection, made if there is none yet.
    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        if let Ok(conn) = self.conn() {
            return Ok(conn);
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OPERATION_TIMEOUT))
            .set_response_timeout(Some(OPERATION_TIMEOUT));
        let conn = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Redis is away: the local store serves.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn degrade(&self, e: &dyn std::fmt::Display) {
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "Redis is unreachable: serving from this instance's own key state until it is back");
        }
    }

    /// Applies `provider_pause` to a rate limit that started a cooldown (as this instance sees them).
    fn pause_on(&self, grant: &Grant, started: Option<super::Cooldown>, now: UnixMs) {
        let rule = self.policy.lock().unwrap_or_else(|e| e.into_inner()).pause;
        let (Some(rule), Some(cooldown)) = (rule, started) else {
            return;
        };
        if cooldown.reason != crate::provider::ErrorClass::RateLimit {
            return;
        }
        let mut pauses = self.pauses.lock().unwrap_or_else(|e| e.into_inner());
        let (recent, until) = pauses.entry(grant.provider.to_string()).or_default();
        if let Some(end) = policy::pause(recent, rule, &grant.key.id, now, cooldown.until) {
            *until = (*until).max(end);
            tracing::warn!(provider = %grant.provider, pause_ms = end - now, "several keys rate-limited at once: pausing the provider");
        }
    }

    /// When the provider's pause ends, if it is paused.
    fn paused(&self, provider: &str, now: UnixMs) -> Option<UnixMs> {
        let pauses = self.pauses.lock().unwrap_or_else(|e| e.into_inner());
        pauses
            .get(provider)
            .map(|(_, until)| *until)
            .filter(|until| *until > now)
    }

    /// The key that says Redis still holds the pool's state (it is set when a store first connects).
    fn marker(&self) -> String {
        format!("{}:alive", self.prefix)
    }

    /// Back from an outage. A Redis that kept its data hears the outcomes it missed; one that came back empty
    /// (no marker) is seeded with what this instance knows, those outcomes included.
    async fn rejoin(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn()?;
        let kept: bool = redis::cmd("EXISTS")
            .arg(self.marker())
            .query_async(&mut conn)
            .await?;
        if !kept {
            self.seed().await?;
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            return redis::cmd("SET")
                .arg(self.marker())
                .arg(1)
                .query_async(&mut conn)
                .await;
        }
        loop {
            let next = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some(p) = next else {
                return Ok(());
            };
            let change = |state: &mut KeyState| {
                apply(state, &p.model, &p.outcome, &p.tuning, p.at, p.next_reset);
            };
            let tokens = p.outcome.tokens();
            if let Err(e) = self
                .update(&p.provider, &p.key, &p.model, "", tokens, change)
                .await
            {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_front(p);
                return Err(e);
            }
        }
    }

    /// Writes what this instance knows of keys Redis has no state for (Redis restarted empty).
    async fn seed(&self) -> redis::RedisResult<()> {
        let known = self.local.export();
        let mut pipe = redis::pipe();
        for (id, state) in &known.keys {
            // The local store rolls one day for all its keys: their counters are of its day.
            let mut state = state.clone();
            state.day = state.day.max(known.day_start);
            let Ok(text) = serde_json::to_string(&state) else {
                continue;
            };
            let hash = self.hash(&state.provider);
            pipe.cmd("HSETNX")
                .arg(&hash)
                .arg(format!("s:{id}"))
                .arg(text)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn()?).await
    }

    /// Where instances say that a key of a provider may be free (a release, a change of state).
    fn channel(&self) -> String {
        format!("{}:wake", self.prefix)
    }

    fn hash(&self, provider: &str) -> String {
        format!("{{{}:{provider}}}:state", self.prefix)
    }

    fn key_set(&self, provider: &str, id: &KeyId) -> String {
        format!("{{{}:{provider}}}:lease:{id}", self.prefix)
    }

    /// The key's window of requests (`requests`) or tokens (`tokens`) over the last minute.
    fn window(&self, provider: &str, id: &KeyId, what: &str) -> String {
        format!("{{{}:{provider}}}:{what}:{id}", self.prefix)
    }

    fn model_set(&self, provider: &str, id: &KeyId, model: &str) -> String {
        format!("{{{}:{provider}}}:lease:{id}:{model}", self.prefix)
    }

    async fn read(
        &self,
        provider: &str,
        keys: &[ApiKey],
        model: &str,
    ) -> redis::RedisResult<Vec<Read>> {
        let mut invocation = self.scripts.read.prepare_invoke();
        invocation.key(self.hash(provider));
        invocation.arg(self.clock.now());
        for key in keys {
            invocation
                .key(self.key_set(provider, &key.id))
                .key(self.model_set(provider, &key.id, model))
                .arg(key.id.to_string());
        }
        let raw: Vec<redis::Value> = invocation.invoke_async(&mut self.conn()?).await?;
        let (now, day_start) = {
            let policy = self.policy.lock().unwrap_or_else(|e| e.into_inner());
            let now = self.clock.now();
            (now, policy.daily_reset.last_at_or_before(now))
        };
        let mut out = Vec::with_capacity(keys.len());
        for chunk in raw.chunks(4) {
            let [state, version, key_leases, model_leases] = chunk else {
                break;
            };
            let text: String = redis::from_redis_value(state.clone()).unwrap_or_default();
            let mut state: Option<KeyState> = serde_json::from_str(&text).ok();
            // The day turns for each key as it is read; the next write keeps it turned.
            if let Some(s) = &mut state {
                s.roll(day_start, now);
            }
            out.push(Read {
                state,
                version: redis::from_redis_value(version.clone()).unwrap_or(0),
                leases: (
                    redis::from_redis_value(key_leases.clone()).unwrap_or(0),
                    redis::from_redis_value(model_leases.clone()).unwrap_or(0),
                ),
            });
        }
        Ok(out)
    }

    async fn claim(&self, ask: Ask<'_>) -> redis::RedisResult<Result<Grant, Unavailable>> {
        for _ in 0..CLAIM_TRIES {
            let now = self.clock.now();
            if let Some(until) = self.paused(ask.provider, now) {
                return Ok(Err(Unavailable {
                    cooling: ask.keys.len(),
                    ready_at: Some(until),
                    ..Unavailable::default()
                }));
            }
            let read = self.read(ask.provider, ask.keys, ask.model).await?;
            let mut standings: Vec<Standing> = ask
                .keys
                .iter()
                .zip(&read)
                .map(|(key, r)| {
                    // The leases in flight are the sets', whether or not the key has a state yet.
                    let mut state = r.state.clone().unwrap_or_default();
                    state.in_flight = r.leases.0;
                    state
                        .models
                        .entry(ask.model.to_string())
                        .or_default()
                        .in_flight = r.leases.1;
                    let settling = self
                        .settling
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&key.id);
                    if settling {
                        return Standing::Cooling(super::Cooldown {
                            until: now + 50,
                            reason: crate::provider::ErrorClass::RateLimit,
                        });
                    }
                    let excluded = ask.exclude.contains(&key.id);
                    let standing =
                        policy::standing(Some(&state), ask.model, excluded, ask.tuning, now);
                    // Requests per day count today's requests, all instances' (the state's).
                    let requests_today: u64 = state.models.values().map(|m| m.today.requests).sum();
                    match (
                        &standing,
                        ask.tuning.limits.as_ref().and_then(|l| l.requests_per_day),
                    ) {
                        (Standing::Free(_), Some(max)) if requests_today >= max => {
                            Standing::Cooling(super::Cooldown {
                                until: self.next_reset(),
                                reason: crate::provider::ErrorClass::Quota,
                            })
                        }
                        _ => standing,
                    }
                })
                .collect();
            let limits = ask.tuning.limits.as_ref();
            let rpm = limits
                .and_then(|l| l.requests_per_minute)
                .map_or(0, |n| n.get());
            let tpm = limits.and_then(|l| l.tokens_per_minute).unwrap_or(0);
            let order =
                policy::preference(&standings, ask.tuning.selection, None, limits.is_some());
            // The first key of the order whose claim holds; a key out of room in its windows waits like a
            // cooling one.
            let mut lost = false;
            for index in order {
                let key = &ask.keys[index];
                let lease = LeaseId(self.next_lease.fetch_add(1, Ordering::Relaxed));
                let held = Held {
                    key_set: self.key_set(ask.provider, &key.id),
                    model_set: self.model_set(ask.provider, &key.id, ask.model),
                    member: format!("{}:{}", self.instance, lease.0),
                };
                let claimed: i64 = self
                    .scripts
                    .claim
                    .key(self.hash(ask.provider))
                    .key(&held.key_set)
                    .key(&held.model_set)
                    .key(self.window(ask.provider, &key.id, "requests"))
                    .key(self.window(ask.provider, &key.id, "tokens"))
                    .arg(key.id.to_string())
                    .arg(ask.model)
                    .arg(&held.member)
                    .arg(now + self.lease_ttl.as_millis() as UnixMs)
                    .arg(ask.tuning.per_key)
                    .arg(ask.tuning.per_key_model)
                    .arg(now)
                    .arg(rpm)
                    .arg(tpm)
                    .invoke_async(&mut self.conn()?)
                    .await?;
                match claimed {
                    1 => {
                        self.held
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(lease, held);
                        return Ok(Ok(Grant {
                            lease,
                            provider: ask.provider.into(),
                            model: ask.model.into(),
                            key: key.clone(),
                        }));
                    }
                    0 => {
                        lost = true;
                        break;
                    }
                    until => {
                        standings[index] = Standing::Cooling(super::Cooldown {
                            until,
                            reason: crate::provider::ErrorClass::RateLimit,
                        })
                    }
                }
            }
            if lost {
                continue;
            }
            let mut why = policy::unavailable(&standings);
            // A busy key frees on a release (published) or, its holder gone, when its lease runs out: look
            // again then, whatever is heard.
            if why.busy > 0 {
                let expiry = now + self.lease_ttl.as_millis() as UnixMs;
                why.ready_at = Some(why.ready_at.map_or(expiry, |at| at.min(expiry)));
            }
            return Ok(Err(why));
        }
        // Lost every race: busy, as far as this instance can tell; look again soon.
        Ok(Err(Unavailable {
            busy: ask.keys.len(),
            ready_at: Some(self.clock.now() + 50),
            ..Unavailable::default()
        }))
    }

    /// Applies `change` to a key's state and frees `member`'s lease, retrying when another instance wrote first.
    async fn update(
        &self,
        provider: &str,
        key: &ApiKey,
        model: &str,
        member: &str,
        tokens: u64,
        change: impl Fn(&mut KeyState),
    ) -> redis::RedisResult<()> {
        loop {
            let read = self
                .read(provider, std::slice::from_ref(key), model)
                .await?;
            let Some(current) = read.into_iter().next() else {
                return Ok(());
            };
            let mut state = current.state.unwrap_or_else(|| KeyState {
                provider: provider.to_string(),
                masked: key.masked.to_string(),
                day: self.day_start(),
                ..KeyState::default()
            });
            change(&mut state);
            let text = serde_json::to_string(&state).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Client, "state", e.to_string()))
            })?;
            let written: i64 = self
                .scripts
                .settle
                .key(self.hash(provider))
                .key(self.key_set(provider, &key.id))
                .key(self.model_set(provider, &key.id, model))
                .key(self.window(provider, &key.id, "tokens"))
                .arg(key.id.to_string())
                .arg(current.version)
                .arg(text)
                .arg(member)
                .arg(self.channel())
                .arg(provider)
                .arg(tokens)
                .arg(self.clock.now())
                .invoke_async(&mut self.conn()?)
                .await?;
            if written == 1 {
                // The local copy follows, to serve from if Redis goes away.
                self.local.put(&key.id, state);
                return Ok(());
            }
        }
    }
}

/// Wakes this instance's waiting requests when another instance says a key of their provider may be free:
/// one subscription per instance, no polling. Resubscribes after a lost connection.
async fn listen(store: std::sync::Weak<RedisStore>, client: redis::Client) {
    use futures_util::StreamExt;
    loop {
        let channel = match store.upgrade() {
            Some(s) => s.channel(),
            None => return,
        };
        if let Ok(mut pubsub) = client.get_async_pubsub().await
            && pubsub.subscribe(&channel).await.is_ok()
        {
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let Some(store) = store.upgrade() else {
                    return;
                };
                if let Ok(provider) = message.get_payload::<String>() {
                    store.local.wakeup(&provider).notify_waiters();
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// While degraded, asks Redis every second whether it is back; when it is, seeds it with what this instance
/// knows (keys it has no state for) and serves from it again.
async fn probe(store: std::sync::Weak<RedisStore>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        if !store.degraded() {
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

/// Renews the leases held, every third of their lifetime, while the store lives.
async fn renew(store: std::sync::Weak<RedisStore>) {
    loop {
        let ttl = match store.upgrade() {
            Some(s) => s.lease_ttl,
            None => return,
        };
        tokio::time::sleep(ttl / 3).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let held: Vec<Held> = store
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        if held.is_empty() {
            continue;
        }
        let expiry = store.clock.now() + store.lease_ttl.as_millis() as UnixMs;
        let mut invocation = store.scripts.renew.prepare_invoke();
        invocation.arg(expiry);
        for h in &held {
            invocation
                .key(&h.key_set)
                .arg(&h.member)
                .key(&h.model_set)
                .arg(&h.member);
        }
        let renewed = match store.conn() {
            Ok(mut conn) => invocation.invoke_async::<i64>(&mut conn).await,
            Err(e) => Err(e),
        };
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "renewing leases in Redis failed");
        }
    }
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
                grant.lease = LeaseId(grant.lease.0 | LOCAL);
                grant
            })
        })
    }

    fn release(&self, grant: &Grant, outcome: Outcome, tuning: &Tuning) {
        if grant.lease.0 & LOCAL != 0 {
            let mut local = grant.clone();
            local.lease = LeaseId(grant.lease.0 & !LOCAL);
            self.local.release(&local, outcome, tuning);
            return;
        }
        let Some(held) = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&grant.lease)
        else {
            return;
        };
        // Release never blocks: settled in the background. The store outlives its requests (the engine holds
        // it for the process).
        let grant = grant.clone();
        let tuning = tuning.clone();
        let store = self.self_ref();
        let failed = matches!(outcome, Outcome::Failure { .. });
        if failed {
            self.settling
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(grant.key.id.clone());
        }
        tokio::spawn(async move {
            let Some(store) = store else { return };
            let next_reset = store.next_reset();
            let model = grant.model.clone();
            let tokens = outcome.tokens();
            let now = store.clock.now();
            let started = Mutex::new(None);
            let change = |state: &mut KeyState| {
                *started.lock().unwrap_or_else(|e| e.into_inner()) =
                    apply(state, &model, &outcome, &tuning, now, next_reset);
            };
            let result = store
                .update(
                    &grant.provider,
                    &grant.key,
                    &model,
                    &held.member,
                    tokens,
                    change,
                )
                .await;
            let started = started.lock().unwrap_or_else(|e| e.into_inner()).take();
            store.pause_on(&grant, started, now);
            if failed {
                store
                    .settling
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&grant.key.id);
            }
            if let Err(e) = result {
                // Nothing is lost: the local copy takes the outcome now, Redis when it is back.
                store.degrade(&e);
                let mut state = store.local.get(&grant.key.id).unwrap_or_else(|| KeyState {
                    provider: grant.provider.to_string(),
                    masked: grant.key.masked.to_string(),
                    ..KeyState::default()
                });
                change(&mut state);
                store.local.put(&grant.key.id, state);
                let mut pending = store.pending.lock().unwrap_or_else(|e| e.into_inner());
                if pending.len() >= MAX_PENDING {
                    pending.pop_front();
                }
                pending.push_back(Pending {
                    provider: grant.provider.clone(),
                    key: grant.key.clone(),
                    model: model.clone(),
                    outcome: outcome.clone(),
                    tuning: tuning.clone(),
                    at: now,
                    next_reset,
                });
            }
            store.wakeup(&grant.provider).notify_waiters();
        });
    }

    fn wakeup(&self, provider: &str) -> Arc<Notify> {
        self.local.wakeup(provider)
    }

    fn configure(&self, policy: StorePolicy) {
        self.local.configure(policy.clone());
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    fn kind(&self) -> &'static str {
        if self.degraded() { "degraded" } else { "redis" }
    }

    fn retire(&self, removed: &HashSet<KeyId>, live: &HashSet<KeyId>) {
        self.local.retire(removed, live);
    }

    fn control(&self, provider: &str, key: &ApiKey, action: &KeyAction) -> bool {
        self.local.control(provider, key, action);
        let (provider, key, action) = (provider.to_string(), key.clone(), action.clone());
        let Some(store) = self.self_ref() else {
            return false;
        };
        tokio::spawn(async move {
            let _ = store
                .update(&provider, &key, "-", "", 0, |state| state.control(&action))
                .await;
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
            let now = self.clock.now();
            let read = match self.read(provider, keys, "-").await {
                Ok(read) if !self.degraded() => read,
                Ok(_) => return self.local.status(provider, keys),
                Err(e) => {
                    self.degrade(&e);
                    return self.local.status(provider, keys);
                }
            };
            keys.iter()
                .zip(read)
                .map(|(key, r)| KeyStatus::of(key, r.state.as_ref(), r.leases.0, now))
                .collect()
        })
    }
}

impl RedisStore {
    fn day_start(&self) -> UnixMs {
        let policy = self.policy.lock().unwrap_or_else(|e| e.into_inner());
        policy.daily_reset.last_at_or_before(self.clock.now())
    }

    fn next_reset(&self) -> UnixMs {
        let policy = self.policy.lock().unwrap_or_else(|e| e.into_inner());
        policy.daily_reset.next_after(self.clock.now())
    }

    /// A strong reference to this store, for work done in the background.
    fn self_ref(&self) -> Option<Arc<RedisStore>> {
        self.this.upgrade()
    }
}
