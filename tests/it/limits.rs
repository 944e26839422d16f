//! One limit semantics for both stores: the same random request sequences, at the same times, fed to the
//! in-process store and to the store shared through a real `redis-server`, are admitted alike, and no minute
//! ever holds more requests than the limit.

use crate::support::eventually;
use crate::support::redis::Redis;
use keyrelay::clock::{Clock, UnixMs};
use keyrelay::config::{DailyReset, KeyLimits, Tuning};
use keyrelay::keys::redis::{RedisStore, Target};
use keyrelay::keys::{Ask, KeyStore, MemoryStore, Outcome, StorePolicy, Unavailable};
use keyrelay::secret::ApiKey;
use keyrelay::usage::Cost;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// 2026-06-01 04:00 UTC, an hour after the daily reset.
const START: UnixMs = 1_780_286_400_000;
const MINUTE: UnixMs = 60_000;

fn policy() -> StorePolicy {
    StorePolicy {
        daily_reset: DailyReset::parse("03:00", "UTC").unwrap(),
        pause: None,
    }
}

/// Random declared limits: always requests per minute, sometimes tokens per minute and requests per day.
fn limits(rng: &mut fastrand::Rng) -> KeyLimits {
    KeyLimits {
        requests_per_minute: NonZeroU32::new(rng.u32(1..=6)),
        tokens_per_minute: rng.bool().then(|| rng.u64(20..200)),
        requests_per_day: (rng.u8(0..4) == 0).then(|| rng.u64(3..30)),
    }
}

/// Admitted, or the time room returns.
fn verdict(acquired: &Result<keyrelay::keys::Grant, Unavailable>) -> Result<(), Option<UnixMs>> {
    match acquired {
        Ok(_) => Ok(()),
        Err(why) => Err(why.ready_at),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn both_stores_admit_the_same_requests_and_never_more_than_the_limit_in_a_minute() {
    let redis = Redis::start();
    let keys = [ApiKey::new("p", "the-one-key-0001")];
    let mut admissions = 0;
    for seed in 0..12u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let declared = limits(&mut rng);
        let tuning = Tuning {
            limits: Some(declared.clone()),
            per_key: 0,
            per_key_model: 0,
            ..Tuning::default()
        };
        let ask = Ask {
            provider: "p",
            model: "m",
            keys: &keys,
            exclude: &[],
            tuning: &tuning,
        };
        // Time moves only when this test moves it, and both stores read it.
        let time: &'static AtomicI64 = Box::leak(Box::new(AtomicI64::new(START)));
        let clock = Clock::manual(time);
        let memory = MemoryStore::new(clock, policy());
        let shared = RedisStore::connect(
            Target::new(&redis.url(), None, false).unwrap(),
            &format!("limits{seed}"),
            clock,
            policy(),
            Arc::new(MemoryStore::new(clock, policy())),
            Duration::from_secs(15),
        )
        .await;
        let mut admitted = Vec::new();
        for step in 0..80 {
            // Mostly bursts and gaps within a minute; now and then the next day.
            let gap = match rng.u8(0..40) {
                0 => 24 * 60 * MINUTE,
                1..=10 => 0,
                _ => rng.i64(0..25_000),
            };
            let now = time.fetch_add(gap, Ordering::Relaxed) + gap;
            let local = memory.acquire(ask).await;
            let remote = shared.acquire(ask).await;
            assert!(
                !shared.degraded(),
                "seed {seed}, step {step}: Redis answered"
            );
            assert_eq!(
                verdict(&local),
                verdict(&remote),
                "seed {seed}, step {step}, {declared:?}: the stores disagree"
            );
            let (Ok(local), Ok(remote)) = (local, remote) else {
                continue;
            };
            admitted.push(now);
            let tokens = rng.u64(1..40);
            let outcome = Outcome::Success {
                prompt_tokens: tokens,
                completion_tokens: 1,
                cost: Cost(0),
            };
            memory.release(&local, outcome.clone(), &tuning);
            shared.release(&remote, outcome, &tuning);
            // Redis takes the release in the background: the next request must see it there too.
            eventually("Redis settled the release", || async {
                shared.report("p", &keys).await[0].in_flight == 0
            })
            .await;
        }
        let rpm = declared.requests_per_minute.unwrap().get() as usize;
        for (i, start) in admitted.iter().enumerate() {
            let within = admitted[i..]
                .iter()
                .take_while(|at| **at - start < MINUTE)
                .count();
            assert!(
                within <= rpm,
                "seed {seed}: {within} requests in the minute from {start}"
            );
        }
        admissions += admitted.len();
    }
    assert!(
        admissions > 200,
        "the limits admitted their share: {admissions}"
    );
}
