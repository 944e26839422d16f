//! Choosing and claiming a key: the Rust policy chooses on a reading of the provider's keys (this instance's
//! recent view of them, or a fresh read), and the `CLAIM` script claims the chosen key only if it is still
//! eligible, reading again as it claims when the view is getting old.

use super::shape::Verdict;
use super::{DAY_TTL_MS, Held, RedisStore, lock, outage};
use crate::clock::UnixMs;
use crate::config::Selection;
use crate::failure::ErrorClass;
use crate::keys::policy::{self, Standing};
use crate::keys::state::{Cooldown, KeyState, later};
use crate::keys::{Ask, Grant, LeaseId, Unavailable};
use crate::secret::{ApiKey, KeyId};
use std::sync::atomic::Ordering;

/// Claims retried after a lost race before the request waits like any other.
const CLAIM_TRIES: usize = 4;
/// How old a reading may be to choose from (a claim checks it anyway).
const VIEW_AGE_MS: UnixMs = 1000;
/// How old a reading may be before a claim reads again as it claims (this instance's own claims and releases
/// are in it already; other instances' show within this time).
const REFRESH_MS: UnixMs = 100;
/// Models of one provider whose last reading is kept, at most.
const MAX_VIEWS: usize = 4096;

/// A claim sent and not answered yet. Dropped unanswered (this instance stopped waiting, or the answer was an
/// error), it is kept for Redis, which may have run it all the same.
struct Claiming<'a> {
    store: &'a RedisStore,
    ask: &'a Ask<'a>,
    key: &'a ApiKey,
    member: &'a str,
    at: UnixMs,
    answered: bool,
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.store.postpone(outage::Pending {
            provider: self.ask.provider.into(),
            key: self.key.clone(),
            what: outage::Missed::Claim {
                model: self.ask.model.into(),
                member: self.member.to_string(),
            },
            at: self.at,
        });
    }
}

/// A provider's keys for one model as last read.
pub(super) struct View {
    pub(super) at: UnixMs,
    pub(super) ids: Vec<KeyId>,
    pub(super) reading: Reading,
}

impl Reading {
    /// From what a reading script returned, for `keys` keys; a verdict left out is the one `known` holds (the
    /// reading whose versions the script was given).
    fn parse(raw: &[redis::Value], keys: usize, known: Option<&Reading>) -> Self {
        let value = |i: usize| raw.get(i).cloned().unwrap_or(redis::Value::Nil);
        let int = |i: usize| redis::from_redis_value::<i64>(value(i)).unwrap_or(0);
        let mut reading = Reading {
            paused_until: int(0),
            cursor: redis::from_redis_value(value(1)).unwrap_or_default(),
            keys: Vec::with_capacity(keys),
        };
        for k in 0..keys {
            let at = 2 + 6 * k;
            let (verdict, fresh) = match value(at) {
                redis::Value::Nil => (known.and_then(|r| r.keys.get(k)?.verdict.clone()), false),
                text => (
                    Verdict::parse(&redis::from_redis_value::<String>(text).unwrap_or_default()),
                    true,
                ),
            };
            reading.keys.push(Read {
                verdict,
                fresh,
                version: int(at + 1),
                leases: (int(at + 2) as u32, int(at + 3) as u32),
                today: (int(at + 4).max(0) as u64, int(at + 5).max(0) as u64),
            });
        }
        reading
    }
}

/// A key as read for choosing.
#[derive(Clone)]
pub(super) struct Read {
    pub(super) verdict: Option<Verdict>,
    /// The verdict was read now, not carried over from an older reading.
    pub(super) fresh: bool,
    pub(super) version: i64,
    /// Leases in flight: the key's, and the key and model's.
    pub(super) leases: (u32, u32),
    /// Requests today: the model's on this key, and the key's.
    pub(super) today: (u64, u64),
}

/// What choosing needs: the provider's pause, the model's sequential cursor, and the keys.
#[derive(Clone)]
pub(super) struct Reading {
    pub(super) paused_until: UnixMs,
    pub(super) cursor: String,
    pub(super) keys: Vec<Read>,
}

impl RedisStore {
    /// The keys every choosing script reads: state, pause, cursor, day hash, leases, in-flight counts, expired
    /// leases.
    fn reading_keys(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
        provider: &str,
        now: UnixMs,
    ) {
        let (day_start, _) = self.days(now);
        invocation
            .key(self.hash(provider))
            .key(self.name(provider, format_args!("pause")))
            .key(self.name(provider, format_args!("cursor")))
            .key(self.day(provider, day_start))
            .key(self.leases(provider))
            .key(self.inflight(provider))
            .key(self.name(provider, format_args!("expired")));
    }

    /// The keys of `ask` as the reading scripts take them: each id, with the version of its verdict `known`
    /// holds (the script leaves out verdicts of those versions).
    fn key_args(
        invocation: &mut redis::ScriptInvocation<'_>,
        ask: &Ask<'_>,
        known: Option<&Reading>,
    ) {
        for (k, key) in ask.keys.iter().enumerate() {
            let version = known.and_then(|r| r.keys.get(k)).map_or(-1, |r| r.version);
            invocation.arg(key.id.as_str()).arg(version);
        }
    }

    /// Reads what choosing a key for `model` needs; `known` is an older reading of the same keys.
    async fn read(
        &self,
        ask: &Ask<'_>,
        now: UnixMs,
        known: Option<&Reading>,
    ) -> redis::RedisResult<Reading> {
        let mut invocation = self.scripts.read.prepare_invoke();
        self.reading_keys(&mut invocation, ask.provider, now);
        invocation.arg(now).arg(ask.model);
        Self::key_args(&mut invocation, ask, known);
        let raw: Vec<redis::Value> = invocation.invoke_async(&mut self.conn()?).await?;
        let mut reading = Reading::parse(&raw, ask.keys.len(), known);
        self.reconcile(ask, &mut reading);
        self.remember(ask, &reading, now);
        Ok(reading)
    }

    /// What this instance last read of `ask`'s keys, if recent, and when it was read: a claim re-checks all
    /// that matters, so choosing from it saves a round trip.
    fn view(&self, ask: &Ask<'_>, now: UnixMs) -> Option<(Reading, UnixMs)> {
        let views = lock(&self.views);
        let view = views.get(ask.provider)?.get(ask.model)?;
        let same_keys = view.ids.len() == ask.keys.len()
            && view.ids.iter().zip(ask.keys).all(|(id, key)| *id == key.id);
        (same_keys && now - view.at <= VIEW_AGE_MS).then(|| (view.reading.clone(), view.at))
    }

    fn remember(&self, ask: &Ask<'_>, reading: &Reading, now: UnixMs) {
        let mut views = lock(&self.views);
        let models = views.entry(ask.provider.to_string()).or_default();
        // Model names come from clients: the views kept are bounded.
        if models.len() >= MAX_VIEWS {
            models.clear();
        }
        models.insert(
            ask.model.to_string(),
            View {
                at: now,
                ids: ask.keys.iter().map(|k| k.id.clone()).collect(),
                reading: reading.clone(),
            },
        );
    }

    /// Applies `change` to key `id` in this instance's views of `provider`, with whether the view is of
    /// `model`: its own claims, releases and verdicts, so that its next choices know of them before it reads
    /// again.
    pub(super) fn note(
        &self,
        provider: &str,
        model: &str,
        id: &KeyId,
        change: impl Fn(&mut Read, bool),
    ) {
        let mut views = lock(&self.views);
        for (name, view) in views.get_mut(provider).into_iter().flatten() {
            if let Some(i) = view.ids.iter().position(|k| k == id) {
                change(&mut view.reading.keys[i], name == model);
            }
        }
    }

    /// Notes, once per provider, when its state began in Redis, so that a later check can tell that Redis lost
    /// it (in the background: one round trip per provider and instance).
    fn learn_epoch(&self, provider: &str) {
        let mut epochs = lock(&self.epochs);
        if epochs.contains_key(provider) {
            return;
        }
        // Asked already: not asked again meanwhile.
        epochs.insert(provider.to_string(), UnixMs::MIN);
        drop(epochs);
        let (Some(store), provider) = (self.this.upgrade(), provider.to_string()) else {
            return;
        };
        tokio::spawn(async move {
            let Ok(mut conn) = store.conn() else { return };
            let mark = redis::cmd("GET")
                .arg(store.marker(&provider))
                .query_async::<Option<UnixMs>>(&mut conn)
                .await;
            let mut epochs = lock(&store.epochs);
            match mark {
                Ok(Some(at)) => {
                    epochs.entry(provider).and_modify(|e| *e = (*e).max(at));
                }
                // Asked again on the next claim.
                _ => {
                    epochs.remove(&provider);
                }
            }
        });
    }

    /// Operators' decisions in the verdicts just read, against this instance's copy: a later one in Redis is
    /// learnt (so that it holds here even if Redis loses it), a later one here is what the choice is made on,
    /// and is given back to Redis (which lost it, and was written again from a copy that had not heard of it).
    fn reconcile(&self, ask: &Ask<'_>, reading: &mut Reading) {
        for (key, read) in ask.keys.iter().zip(&mut reading.keys) {
            let Some(verdict) = read.verdict.as_mut().filter(|_| read.fresh) else {
                continue;
            };
            let redis = (verdict.disabled, verdict.decided_at);
            let here = self.local.decision(&key.id).unwrap_or((false, 0));
            if later(redis, here) {
                self.local
                    .decide(ask.provider, key, verdict.disabled, verdict.decided_at);
            } else if later(here, redis) {
                (verdict.disabled, verdict.decided_at) = here;
                self.restore_decision(ask.provider, &key.id, &key.masked);
            }
        }
    }

    /// What this instance knows of a key's verdict, for a key Redis has none for.
    pub(super) fn local_verdict(&self, provider: &str, id: &KeyId) -> Option<Verdict> {
        self.local
            .get(id)
            .filter(|state| state.provider == provider)
            .map(|state| Verdict::of(&state))
    }

    /// Chooses by the policy and claims. The choice is made on this instance's last reading when it is recent
    /// (one round trip: the claim, which returns a fresh reading), else on a fresh one; a key is said
    /// unavailable only on a fresh reading.
    pub(super) async fn claim(
        &self,
        ask: Ask<'_>,
    ) -> redis::RedisResult<Result<Grant, Unavailable>> {
        // A reading taken by this call (by a read or a claim), and whether the next choice needs one.
        let mut fresh: Option<Reading> = None;
        let mut must_read = false;
        for _ in 0..CLAIM_TRIES {
            let now = self.clock.now();
            let (reading, read_at, is_fresh) = match (fresh.take(), self.view(&ask, now)) {
                (Some(reading), _) => (reading, now, true),
                (None, Some((view, at))) if !must_read => (view, at, false),
                (None, view) => {
                    let known = view.map(|(reading, _)| reading);
                    (self.read(&ask, now, known.as_ref()).await?, now, true)
                }
            };
            // A claim also reads when what it chose on is getting old.
            let read_after = now - read_at >= REFRESH_MS;
            if reading.paused_until > now {
                if !is_fresh {
                    must_read = true;
                    continue;
                }
                return Ok(Err(Unavailable {
                    cooling: ask.keys.len(),
                    ready_at: Some(reading.paused_until),
                    ..Unavailable::default()
                }));
            }
            let mut standings = self.standings(&ask, &reading, now);
            let limits = ask.tuning.limits.as_ref();
            let cursor = ask
                .keys
                .iter()
                .position(|k| k.id.as_str() == reading.cursor);
            let order =
                policy::preference(&standings, ask.tuning.selection, cursor, limits.is_some());
            // The first key of the order whose claim holds; a key out of room in its windows waits like a
            // cooling one.
            let mut lost = false;
            for index in order {
                let key = &ask.keys[index];
                let moves = ask.tuning.selection == Selection::Sequential
                    && policy::moves_cursor(&standings, cursor);
                let (claimed, after, lease, held) = self
                    .claim_one(&ask, index, &reading, now, moves, read_after)
                    .await?;
                match claimed {
                    1 => {
                        lock(&self.held).insert(lease, held);
                        self.learn_epoch(ask.provider);
                        return Ok(Ok(Grant {
                            lease,
                            provider: ask.provider.into(),
                            model: ask.model.into(),
                            key: key.clone(),
                        }));
                    }
                    0 => {
                        // Not eligible any more: choose again on what the claim read, or read.
                        fresh = after;
                        lost = true;
                        break;
                    }
                    until => {
                        // Full until then, whatever other instances do: not claimed again before.
                        let mut full = lock(&self.full);
                        full.retain(|_, at| *at > now);
                        full.insert(key.id.clone(), until);
                        drop(full);
                        standings[index] = Standing::Cooling(Cooldown {
                            until,
                            reason: ErrorClass::RateLimit,
                        });
                        fresh = after.or(fresh);
                    }
                }
            }
            if lost || !is_fresh {
                // Lost a race, or nothing claimed on an older reading: choose again on a fresh one.
                must_read = true;
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

    /// Where each key stands for `ask` on `reading`: the policy's verdict on what Redis holds (or, for a key
    /// Redis has no verdict for, what this instance knows), with the pool's leases and requests of the day; a
    /// key being settled here, or known full until later, waits like a cooling one.
    fn standings(&self, ask: &Ask<'_>, reading: &Reading, now: UnixMs) -> Vec<Standing> {
        let (day_start, next_reset) = self.days(now);
        let settling = lock(&self.settling).clone();
        let retired = lock(&self.retired).clone();
        let full = lock(&self.full).clone();
        let requests_per_day = ask.tuning.limits.as_ref().and_then(|l| l.requests_per_day);
        ask.keys
            .iter()
            .zip(&reading.keys)
            .map(|(key, read)| {
                if settling.contains(&key.id) {
                    return Standing::Cooling(Cooldown {
                        until: now + 50,
                        reason: ErrorClass::RateLimit,
                    });
                }
                if let Some(&until) = full.get(&key.id).filter(|&&until| until > now) {
                    return Standing::Cooling(Cooldown {
                        until,
                        reason: ErrorClass::RateLimit,
                    });
                }
                let known = match &read.verdict {
                    Some(verdict) => Some(verdict.clone()),
                    None => self.local_verdict(ask.provider, &key.id),
                };
                let mut state = known.map_or_else(KeyState::default, |v| v.state(ask.provider));
                state.roll(day_start, now);
                // In flight and today's requests are the pool's, whether or not the key has a verdict yet.
                state.in_flight = read.leases.0;
                let ms = state.models.entry(ask.model.to_string()).or_default();
                ms.in_flight = read.leases.1;
                ms.today.requests = read.today.0;
                let excluded = ask.exclude.contains(&key.id) || retired.contains(&key.id);
                match policy::standing(Some(&state), ask.model, excluded, ask.tuning, now) {
                    Standing::Free(_)
                        if requests_per_day.is_some_and(|max| read.today.1 >= max) =>
                    {
                        Standing::Cooling(Cooldown {
                            until: next_reset,
                            reason: ErrorClass::Quota,
                        })
                    }
                    standing => standing,
                }
            })
            .collect()
    }

    /// Runs the claim script for the key at `index`: Redis's answer (1: claimed, 0: not eligible any more, else
    /// the time its windows or quota have room), the reading it returned when asked, and the lease it is for.
    async fn claim_one(
        &self,
        ask: &Ask<'_>,
        index: usize,
        reading: &Reading,
        now: UnixMs,
        moves: bool,
        read_after: bool,
    ) -> redis::RedisResult<(i64, Option<Reading>, LeaseId, Held)> {
        let key = &ask.keys[index];
        let (_, next_reset) = self.days(now);
        let limits = ask.tuning.limits.as_ref();
        let rpm = limits
            .and_then(|l| l.requests_per_minute)
            .map_or(0, |n| n.get());
        let tpm = limits.and_then(|l| l.tokens_per_minute).unwrap_or(0);
        let requests_per_day = limits.and_then(|l| l.requests_per_day);
        let lease = LeaseId(self.next_lease.fetch_add(1, Ordering::Relaxed));
        let held = Held {
            provider: ask.provider.into(),
            member: format!("{}:{}:{}:{}", key.id, self.instance, lease.0, ask.model),
            version: reading.keys[index].version,
            verdict: reading.keys[index].verdict.clone(),
        };
        self.note(ask.provider, ask.model, &key.id, |read, same_model| {
            read.leases.0 += 1;
            if same_model {
                read.leases.1 += 1;
                read.today.0 += 1;
            }
            read.today.1 += 1;
        });
        let mut invocation = self.scripts.claim.prepare_invoke();
        self.reading_keys(&mut invocation, ask.provider, now);
        invocation
            .key(self.life(ask.provider))
            .key(self.window(ask.provider, &key.id, "requests"))
            .key(self.window(ask.provider, &key.id, "tokens"))
            .key(self.marker(ask.provider))
            .arg(now)
            .arg(ask.model)
            .arg(key.id.as_str())
            .arg(&held.member)
            .arg(now + self.lease_ttl.as_millis() as UnixMs)
            .arg(ask.tuning.per_key)
            .arg(ask.tuning.per_key_model)
            .arg(rpm)
            .arg(tpm)
            .arg(requests_per_day.unwrap_or(0))
            .arg(next_reset)
            .arg(DAY_TTL_MS)
            .arg(if moves { "1" } else { "0" })
            .arg(if read_after { "1" } else { "0" });
        Self::key_args(&mut invocation, ask, Some(reading));
        // Until Redis answers, the claim may have run: if this instance stops waiting, it is taken back later.
        let mut claiming = Claiming {
            store: self,
            ask,
            key,
            member: &held.member,
            at: now,
            answered: false,
        };
        let raw: Vec<redis::Value> = invocation.invoke_async(&mut self.conn()?).await?;
        claiming.answered = true;
        drop(claiming);
        let claimed = raw
            .first()
            .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok())
            .unwrap_or(0);
        let after = read_after.then(|| {
            let mut after = Reading::parse(
                raw.get(1..).unwrap_or_default(),
                ask.keys.len(),
                Some(reading),
            );
            self.reconcile(ask, &mut after);
            self.remember(ask, &after, now);
            after
        });
        Ok((claimed, after, lease, held))
    }
}
