//! Key state shared through a real `redis-server`: two stores stand for two instances of keyrelay.

use crate::support::redis::Redis;
use keyrelay::clock::Clock;
use keyrelay::config::{DailyReset, Tuning};
use keyrelay::failure::{ErrorClass, Scope};
use keyrelay::keys::redis::{RedisStore, Target};
use keyrelay::keys::{Ask, KeyStore, MemoryStore, Outcome, StorePolicy};
use keyrelay::secret::ApiKey;
use keyrelay::usage::Cost;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn policy() -> StorePolicy {
    StorePolicy {
        daily_reset: DailyReset::parse("03:00", "UTC").unwrap(),
        pause: None,
    }
}

async fn stores(redis: &Redis, n: usize) -> Vec<Arc<RedisStore>> {
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

fn local() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new(Clock::system(), policy()))
}

fn keys(n: usize) -> Vec<ApiKey> {
    (0..n)
        .map(|i| ApiKey::new("p", &format!("key-number-{i:04}")))
        .collect()
}

fn ask<'a>(keys: &'a [ApiKey], tuning: &'a Tuning) -> Ask<'a> {
    Ask {
        provider: "p",
        model: "m",
        keys,
        exclude: &[],
        tuning,
    }
}

/// A rate limit on the model, to retry after `seconds`.
fn rate_limited(seconds: u64) -> Outcome {
    Outcome::Failure {
        class: ErrorClass::RateLimit,
        scope: Scope::Model,
        retry_after: Some(Duration::from_secs(seconds)),
    }
}

const SUCCESS: Outcome = Outcome::Success {
    prompt_tokens: 3,
    completion_tokens: 2,
    cost: Cost(0),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_cap_of_one_per_key_and_model_holds_across_instances_and_usage_adds_up() {
    let redis = Redis::start();
    let stores = stores(&redis, 2).await;
    let keys = Arc::new(keys(2));
    let tuning = Arc::new(Tuning {
        per_key_model: 1,
        ..Tuning::default()
    });
    let in_flight: Arc<Vec<AtomicUsize>> = Arc::new((0..2).map(|_| AtomicUsize::new(0)).collect());
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for client in 0..32 {
        let store = stores[client % 2].clone();
        let (keys, tuning, in_flight, most) = (
            keys.clone(),
            tuning.clone(),
            in_flight.clone(),
            most.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let grant = loop {
                match store.acquire(ask(&keys, &tuning)).await {
                    Ok(grant) => break grant,
                    Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            };
            let i = keys.iter().position(|k| k.id == grant.key.id).unwrap();
            let now = in_flight[i].fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            in_flight[i].fetch_sub(1, Ordering::SeqCst);
            store.release(&grant, SUCCESS, &tuning);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "one request per key and model, pool-wide"
    );
    // Releases settle in the background: the pool-wide count reaches 32.
    let mut total = 0;
    for _ in 0..200 {
        let report = stores[1].report("p", &keys).await;
        total = report.iter().map(|k| k.today.requests).sum::<u64>();
        if total == 32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(total, 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_rate_limit_seen_by_one_instance_cools_the_key_for_the_other() {
    let redis = Redis::start();
    let stores = stores(&redis, 2).await;
    let keys = keys(2);
    let tuning = Tuning::default();
    let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    let limited = grant.key.id.clone();
    stores[0].release(&grant, rate_limited(60), &tuning);
    let mut seen_cooling = false;
    for _ in 0..200 {
        let report = stores[1].report("p", &keys).await;
        if report
            .iter()
            .any(|k| k.id == limited.to_string() && !k.model_cooldowns.is_empty())
        {
            seen_cooling = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_cooling, "the other instance sees the cooldown");
    for _ in 0..5 {
        let grant = stores[1].acquire(ask(&keys, &tuning)).await.unwrap();
        assert_ne!(grant.key.id, limited, "the cooling key is not granted");
        stores[1].release(&grant, SUCCESS, &tuning);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn redis_away_is_served_locally_and_rejoined_when_back() {
    let redis = Redis::start();
    let port = redis.port;
    let stores = stores(&redis, 1).await;
    let store = &stores[0];
    let keys = keys(2);
    let tuning = Tuning::default();
    let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
    store.release(&grant, SUCCESS, &tuning);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(redis);
    // Every request still gets a key, from this instance's own state.
    for _ in 0..5 {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, SUCCESS, &tuning);
    }
    assert!(store.degraded());
    // Back, and empty: rejoined within the probe's period, and seeded with what this instance knew.
    let redis = Redis::start_on(port);
    let mut back = false;
    for _ in 0..100 {
        if !store.degraded() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "rejoined Redis");
    let report = store.report("p", &keys).await;
    assert!(
        report.iter().map(|k| k.today.requests).sum::<u64>() >= 6,
        "{report:?}"
    );
    drop(redis);
}

/// Redis stops answering for `seconds` (its data kept); returns when it answers again.
fn stall(redis: &Redis, seconds: f64) -> tokio::task::JoinHandle<()> {
    let client = redis::Client::open(redis.url()).unwrap();
    tokio::spawn(async move {
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // Its own answer comes after its client stopped waiting: whatever it says.
        let _ = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(seconds)
            .query_async::<()>(&mut conn)
            .await;
    })
}

/// Waits until `store` rejoins Redis.
async fn rejoined(store: &RedisStore) {
    for _ in 0..100 {
        if !store.degraded() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the store never rejoined Redis");
}

/// `store`'s pool-wide counts of today over `keys`, once `done` says they are all there.
async fn today(
    store: &RedisStore,
    keys: &[ApiKey],
    done: impl Fn(&keyrelay::keys::Counters) -> bool,
) -> keyrelay::keys::Counters {
    let mut counted = keyrelay::keys::Counters::default();
    for _ in 0..100 {
        counted = Default::default();
        for key in store.report("p", keys).await {
            counted.add(&key.today);
        }
        if done(&counted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    counted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn an_outcome_redis_missed_while_unresponsive_is_given_to_it_once() {
    let redis = Redis::start();
    let stores = stores(&redis, 2).await;
    let keys = keys(1);
    let tuning = Tuning::default();
    let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    let stalled = stall(&redis, 1.5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Sent, applied when Redis wakes, its answer too late: kept as missed all the same.
    stores[0].release(&grant, SUCCESS, &tuning);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(stores[0].degraded(), "the release could not reach Redis");
    stalled.await.unwrap();
    rejoined(&stores[0]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counted = today(&stores[1], &keys, |c| c.successes >= 1).await;
    assert_eq!(
        (counted.requests, counted.successes, counted.prompt_tokens),
        (1, 1, 3),
        "the other instance sees the outcome once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn what_happens_while_redis_is_away_reaches_it_once_it_is_back() {
    let redis = Redis::start();
    let stores = stores(&redis, 2).await;
    let keys = keys(2);
    let tuning = Tuning::default();
    let stalled = stall(&redis, 1.2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Granted from the instance's own state; one released while Redis is away, one after it is back.
    let early = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    let late = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    assert!(stores[0].degraded());
    stores[0].release(&early, SUCCESS, &tuning);
    // An operator's action while Redis is away.
    stores[0].control("p", &keys[1], &keyrelay::keys::KeyAction::Disable);
    stalled.await.unwrap();
    rejoined(&stores[0]).await;
    stores[0].release(&late, SUCCESS, &tuning);
    let counted = today(&stores[1], &keys, |c| c.successes >= 2).await;
    assert_eq!((counted.requests, counted.successes), (2, 2), "{counted:?}");
    let report = stores[1].report("p", &keys).await;
    assert!(report[1].disabled, "{report:?}");
    for _ in 0..4 {
        let grant = stores[1].acquire(ask(&keys, &tuning)).await.unwrap();
        assert_eq!(grant.key.id, keys[0].id, "the disabled key is left alone");
        stores[1].release(&grant, SUCCESS, &tuning);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn an_absurd_token_count_neither_overflows_nor_stalls_the_store() {
    let redis = Redis::start();
    let stores = stores(&redis, 1).await;
    let keys = keys(1);
    let tuning = Tuning::default();
    for _ in 0..3 {
        let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
        let absurd = Outcome::Success {
            prompt_tokens: u64::MAX / 2,
            completion_tokens: 1,
            cost: Cost(u64::MAX),
        };
        stores[0].release(&grant, absurd, &tuning);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted = today(&stores[0], &keys, |c| c.successes == 3).await;
    assert_eq!(counted.successes, 3);
    assert!(!stores[0].degraded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn keys_a_reload_removed_are_not_granted() {
    let redis = Redis::start();
    let stores = stores(&redis, 1).await;
    let keys = keys(2);
    let tuning = Tuning::default();
    let removed: std::collections::HashSet<_> = [keys[0].id.clone()].into();
    let live: std::collections::HashSet<_> = [keys[1].id.clone()].into();
    stores[0].retire(&removed, &live);
    // Requests still on the old configuration list both keys.
    for _ in 0..4 {
        let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
        assert_eq!(grant.key.id, keys[1].id);
        stores[0].release(&grant, SUCCESS, &tuning);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn state_redis_lost_while_the_instance_was_connected_is_written_back() {
    let redis = Redis::start();
    let stores = stores(&redis, 1).await;
    let keys = keys(3);
    let tuning = Tuning::default();
    let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    let limited = grant.key.id.clone();
    stores[0].release(&grant, rate_limited(120), &tuning);
    let disabled = keys.iter().find(|k| k.id != limited).unwrap().clone();
    stores[0].control("p", &disabled, &keyrelay::keys::KeyAction::Disable);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Redis loses everything without the connection ever failing (a FLUSHALL, a failover to an empty replica).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    // Before it is written back, the instance still leaves the cooling and the disabled key alone.
    for _ in 0..4 {
        let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
        assert!(grant.key.id != limited && grant.key.id != disabled.id);
        stores[0].release(&grant, SUCCESS, &tuning);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Within the ten-second check, the cooldown and the disabled key are back in Redis.
    let mut back = false;
    for _ in 0..60 {
        let report = stores[0].report("p", &keys).await;
        let cooling = report
            .iter()
            .any(|k| k.id == limited.to_string() && !k.model_cooldowns.is_empty());
        let off = report
            .iter()
            .any(|k| k.id == disabled.id.to_string() && k.disabled);
        if cooling && off {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(back, "the cooldown and the disabled key were written back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn the_provider_pause_is_the_pools() {
    let redis = Redis::start();
    let pausing = || StorePolicy {
        pause: Some(keyrelay::config::PauseRule {
            keys: 2,
            window: Duration::from_secs(10),
        }),
        ..policy()
    };
    let mut stores = Vec::new();
    for _ in 0..2 {
        stores.push(
            RedisStore::connect(
                Target::new(&redis.url(), None, false).unwrap(),
                "kr",
                Clock::system(),
                pausing(),
                local(),
                Duration::from_secs(15),
            )
            .await,
        );
    }
    let keys = keys(3);
    let tuning = Tuning::default();
    let limited = rate_limited(30);
    // One key limited on each instance: neither saw two, the pool did.
    for store in &stores {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, limited.clone(), &tuning);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The whole provider rests on both, the third key included, and both report it.
    for store in &stores {
        let why = store.acquire(ask(&keys, &tuning)).await.unwrap_err();
        assert_eq!(why.cooling, 3, "{why:?}");
        let rest = why.ready_at.unwrap() - Clock::system().now();
        assert!((25_000..=30_000).contains(&rest), "{rest}");
        let report = store.report("p", &keys).await;
        assert!(
            report.iter().all(|k| k.cooling_until.is_some()),
            "{report:?}"
        );
    }
}

/// Top-level commands Redis has served, by name.
async fn commands(redis: &Redis) -> std::collections::HashMap<String, u64> {
    let stats = redis.command_stats().await;
    stats
        .into_iter()
        .map(|(name, (calls, _))| (name, calls))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_request_takes_two_round_trips_one_to_claim_and_one_to_release() {
    let redis = Redis::start();
    let stores = stores(&redis, 1).await;
    let store = &stores[0];
    // Enough keys that the rate limits below never leave the pool without one.
    let keys = keys(12);
    let tuning = Tuning::default();
    let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
    store.release(&grant, SUCCESS, &tuning);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = commands(&redis).await;
    let outcomes = [SUCCESS, rate_limited(60), SUCCESS, Outcome::Cancelled];
    for n in 0..40 {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, outcomes[n % 4].clone(), &tuning);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = commands(&redis).await;
    // Every round trip is a script; what the scripts call inside is not a round trip.
    let sent: u64 = ["evalsha", "eval"]
        .iter()
        .map(|c| after.get(*c).unwrap_or(&0) - before.get(*c).unwrap_or(&0))
        .sum();
    // The claim chooses on what the previous claim read (a first request reads first: three round trips).
    assert_eq!(sent, 40 * 2, "{before:?} {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn counts_add_up_exactly_when_instances_race_on_one_key() {
    let redis = Redis::start();
    let stores = stores(&redis, 2).await;
    let keys = Arc::new(keys(1));
    let tuning = Arc::new(Tuning::default());
    let mut tasks = Vec::new();
    for client in 0..40 {
        let (store, keys, tuning) = (stores[client % 2].clone(), keys.clone(), tuning.clone());
        tasks.push(tokio::spawn(async move {
            let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
            // Failures that start no cooldown (a server error) change the verdict: its writes conflict.
            let outcome = if client % 4 == 0 {
                Outcome::Failure {
                    class: ErrorClass::Server,
                    scope: Scope::Model,
                    retry_after: None,
                }
            } else {
                Outcome::Success {
                    prompt_tokens: 10,
                    completion_tokens: 1,
                    cost: Cost(7),
                }
            };
            store.release(&grant, outcome, &tuning);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut today = Default::default();
    for _ in 0..200 {
        today = stores[1].report("p", &keys).await[0].today;
        if today.successes + today.failures == 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        (today.requests, today.successes, today.failures),
        (40, 30, 10)
    );
    assert_eq!((today.prompt_tokens, today.completion_tokens), (300, 30));
    assert_eq!(today.cost, Cost(210));
    let lifetime = stores[0].report("p", &keys).await[0].lifetime;
    assert_eq!(lifetime, today);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn sequential_selection_stays_on_one_key_pool_wide() {
    let redis = Redis::start();
    let stores = stores(&redis, 2).await;
    let keys = keys(3);
    let tuning = Tuning {
        selection: keyrelay::config::Selection::Sequential,
        ..Tuning::default()
    };
    let first = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    assert_eq!(first.key.id, keys[0].id);
    // A rate limit on the first key moves the pool on, and both instances stay on the next key.
    stores[0].release(&first, rate_limited(60), &tuning);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let moved = stores[1].acquire(ask(&keys, &tuning)).await.unwrap();
    stores[1].release(&moved, SUCCESS, &tuning);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for n in 0..6 {
        let store = &stores[n % 2];
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        assert_eq!(grant.key.id, moved.key.id, "request {n}");
        store.release(&grant, SUCCESS, &tuning);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_model_the_upstream_refused_leaves_no_counters() {
    let redis = Redis::start();
    let stores = stores(&redis, 1).await;
    let keys = keys(1);
    let tuning = Tuning::default();
    let refused = |model: &'static str| Ask {
        model,
        ..ask(&keys, &tuning)
    };
    for n in 0..5 {
        let model: &'static str = Box::leak(format!("made-up-{n}").into_boxed_str());
        let grant = stores[0].acquire(refused(model)).await.unwrap();
        stores[0].release(
            &grant,
            Outcome::Failure {
                class: ErrorClass::InvalidRequest,
                scope: Scope::Model,
                retry_after: None,
            },
            &tuning,
        );
        // Until its failure is written, this instance leaves the key alone.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    stores[0].release(&grant, SUCCESS, &tuning);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = &stores[0].report("p", &keys).await[0];
    let models: Vec<&str> = report.models.iter().map(|(m, ..)| m.as_str()).collect();
    assert_eq!(models, ["m"], "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn a_verdict_decided_on_a_stale_read_is_decided_again_not_written_over() {
    let redis = Redis::start();
    let stores = stores(&redis, 2).await;
    let keys = keys(1);
    let tuning = Tuning::default();
    // Both instances hold the key; the second's request is rate-limited first.
    let early = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    let late = stores[1].acquire(ask(&keys, &tuning)).await.unwrap();
    stores[1].release(&late, rate_limited(60), &tuning);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = commands(&redis).await;
    // The first succeeds, on the verdict it read before the rate limit: written as it was, the success would
    // have erased the cooldown.
    stores[0].release(&early, SUCCESS, &tuning);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = commands(&redis).await;
    // The release, a read of the verdict alone, and the verdict written.
    assert_eq!(after["evalsha"] - before["evalsha"], 3, "read again once");
    let report = &stores[0].report("p", &keys).await[0];
    assert_eq!(report.model_cooldowns.len(), 1, "{report:?}");
    assert_eq!(report.streak, 0, "the success ended the streak: {report:?}");
    assert_eq!((report.today.successes, report.today.failures), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and redis-cli; .ci/run installs them"]
async fn a_redis_cluster_holds_each_providers_state_on_the_node_that_owns_it() {
    let cluster = crate::support::redis::Cluster::start(3);
    let mut stores = Vec::new();
    for _ in 0..2 {
        let target = Target::new(&cluster.url(), None, true).unwrap();
        // Leases short enough that holding one across several of them needs its renewals.
        let store = RedisStore::connect(
            target,
            "kr",
            Clock::system(),
            policy(),
            local(),
            Duration::from_millis(900),
        )
        .await;
        stores.push(store);
    }
    let providers: Vec<&'static str> = (0..6)
        .map(|p| &*Box::leak(format!("provider{p}").into_boxed_str()))
        .collect();
    // One key per provider (a key's id depends on its provider).
    let keys: Vec<Vec<ApiKey>> = providers
        .iter()
        .map(|p| vec![ApiKey::new(p, "key-number-0000")])
        .collect();
    let tuning = Tuning {
        per_key_model: 1,
        ..Tuning::default()
    };
    let index = |provider: &str| providers.iter().position(|p| *p == provider).unwrap();
    let on = |provider: &'static str| Ask {
        provider,
        ..ask(&keys[index(provider)], &tuning)
    };
    // Each provider's one key, held by the first instance across three lease times: the second cannot take it.
    let mut held = Vec::new();
    for provider in &providers {
        held.push(stores[0].acquire(on(provider)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(2700)).await;
    for provider in &providers {
        let why = stores[1].acquire(on(provider)).await.unwrap_err();
        assert_eq!(why.busy, 1, "{provider}: {why:?}");
    }
    assert!(!stores[0].degraded() && !stores[1].degraded());
    // Released: a rate limit on the first provider cools it for the second instance too.
    for (n, grant) in held.into_iter().enumerate() {
        let outcome = if n == 0 { rate_limited(60) } else { SUCCESS };
        stores[0].release(&grant, outcome, &tuning);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let why = stores[1].acquire(on(providers[0])).await.unwrap_err();
    assert_eq!(why.cooling, 1, "{why:?}");
    for provider in &providers[1..] {
        let grant = stores[1].acquire(on(provider)).await.unwrap();
        stores[1].release(&grant, SUCCESS, &tuning);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for provider in &providers[1..] {
        let report = &stores[0].report(provider, &keys[index(provider)]).await[0];
        assert_eq!(
            (report.today.requests, report.today.successes),
            (2, 2),
            "{provider}"
        );
    }
    // The providers' state is spread over the nodes, not on one.
    let spread = cluster.keys_per_node();
    assert!(spread.iter().filter(|&&n| n > 0).count() >= 2, "{spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn the_day_turns_for_the_whole_pool_at_the_daily_reset() {
    let redis = Redis::start();
    // Both instances' clocks read a second and a half before the reset.
    let reset = policy().daily_reset.next_after(Clock::system().now());
    let clock = Clock::starting_at(reset - 1_500);
    let mut stores = Vec::new();
    for _ in 0..2 {
        let target = Target::new(&redis.url(), None, false).unwrap();
        let local = Arc::new(MemoryStore::new(clock, policy()));
        let store = RedisStore::connect(
            target,
            "kr",
            clock,
            policy(),
            local,
            Duration::from_secs(15),
        )
        .await;
        stores.push(store);
    }
    let keys = keys(1);
    let tuning = Tuning {
        limits: Some(keyrelay::config::KeyLimits {
            requests_per_day: Some(2),
            ..Default::default()
        }),
        ..Tuning::default()
    };
    for store in &stores {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, SUCCESS, &tuning);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Two requests today, pool-wide: the day's quota is spent on both instances, until the reset.
    for store in &stores {
        let why = store.acquire(ask(&keys, &tuning)).await.unwrap_err();
        assert_eq!(why.ready_at, Some(reset), "{why:?}");
    }
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    // A new day: today's counts start again for both, the lifetime's stay.
    let report = &stores[1].report("p", &keys).await[0];
    assert_eq!(
        (report.today.requests, report.lifetime.requests),
        (0, 2),
        "{report:?}"
    );
    for store in &stores {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, SUCCESS, &tuning);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = &stores[0].report("p", &keys).await[0];
    assert_eq!(
        (report.today.requests, report.lifetime.requests),
        (2, 4),
        "{report:?}"
    );
}
