//! Redis stores standing for instances of keyrelay in the store tests (`redis_store`, `redis_outage`), and what
//! those tests ask of them and of Redis.

use super::eventually;
use super::eventually_some;
use super::redis::Redis;
use keyrelay::clock::Clock;
use keyrelay::config::{DailyReset, Tuning};
use keyrelay::failure::{ErrorClass, Scope};
use keyrelay::keys::redis::{RedisStore, Target};
use keyrelay::keys::{Ask, KeyStore, MemoryStore, Outcome, StorePolicy};
use keyrelay::secret::ApiKey;
use keyrelay::usage::Cost;
use std::sync::Arc;
use std::time::Duration;

pub fn policy() -> StorePolicy {
    StorePolicy {
        daily_reset: DailyReset::parse("03:00", "UTC").unwrap(),
        pause: None,
    }
}

pub async fn stores(redis: &Redis, n: usize) -> Vec<Arc<RedisStore>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            RedisStore::connect(
                Target::new(&redis.url(), None, false).unwrap(),
                "kr",
                Clock::system(),
                policy(),
                local(),
                Duration::from_secs(15),
            )
            .await,
        );
    }
    out
}

pub fn local() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new(Clock::system(), policy()))
}

pub fn keys(n: usize) -> Vec<ApiKey> {
    (0..n)
        .map(|i| ApiKey::new("p", &format!("key-number-{i:04}")))
        .collect()
}

pub fn ask<'a>(keys: &'a [ApiKey], tuning: &'a Tuning) -> Ask<'a> {
    Ask {
        provider: "p",
        model: "m",
        keys,
        exclude: &[],
        tuning,
    }
}

/// A rate limit on the model, to retry after `seconds`.
pub fn rate_limited(seconds: u64) -> Outcome {
    Outcome::Failure {
        class: ErrorClass::RateLimit,
        scope: Scope::Model,
        retry_after: Some(Duration::from_secs(seconds)),
    }
}

pub const SUCCESS: Outcome = Outcome::Success {
    prompt_tokens: 3,
    completion_tokens: 2,
    cost: Cost(0),
};

/// Redis stops answering for `seconds` (its data kept), from when this returns; the handle ends when it
/// answers again.
pub async fn stall(redis: &Redis, seconds: f64) -> tokio::task::JoinHandle<()> {
    let client = redis::Client::open(redis.url()).unwrap();
    let probe = client.get_multiplexed_async_connection().await.unwrap();
    let sleeper = tokio::spawn(async move {
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // Its own answer comes after its client stopped waiting: whatever it says.
        let _ = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(seconds)
            .query_async::<()>(&mut conn)
            .await;
    });
    eventually("Redis to stop answering", || {
        let mut probe = probe.clone();
        async move {
            let ping = redis::cmd("PING");
            let pong = ping.query_async::<String>(&mut probe);
            tokio::time::timeout(Duration::from_millis(50), pong)
                .await
                .is_err()
        }
    })
    .await;
    sleeper
}

/// Waits until `store` rejoins Redis (its probe asks every second).
pub async fn rejoined(store: &RedisStore) {
    eventually("the store to rejoin Redis", || async { !store.degraded() }).await;
}

/// `store`'s pool-wide counts of today over `keys`, once `done` says they are all there.
pub async fn today(
    store: &RedisStore,
    keys: &[ApiKey],
    done: impl Fn(&keyrelay::keys::Counters) -> bool,
) -> keyrelay::keys::Counters {
    eventually_some("the counts of today", || async {
        let mut counted = keyrelay::keys::Counters::default();
        for key in store.report("p", keys).await {
            counted.add(&key.today);
        }
        done(&counted).then_some(counted)
    })
    .await
}

/// Top-level commands Redis has served, by name.
pub async fn commands(redis: &Redis) -> std::collections::HashMap<String, u64> {
    let stats = redis.command_stats().await;
    stats
        .into_iter()
        .map(|(name, (calls, _))| (name, calls))
        .collect()
}
