//! Key state shared through a real `redis-server`: two stores stand for two instances of keyrelay, and hold one
//! pool's caps, cooldowns, counts, pause, sequence and day between them, in two round trips a request. Redis away
//! or emptied is in `redis_outage`.

use crate::support::redis::Redis;
use crate::support::stores::*;
use crate::support::{eventually, eventually_some};
use keyrelay::clock::Clock;
use keyrelay::config::Tuning;
use keyrelay::failure::{ErrorClass, Scope};
use keyrelay::keys::redis::{RedisStore, Target};
use keyrelay::keys::{Ask, KeyStore, MemoryStore, Outcome, StorePolicy};
use keyrelay::secret::ApiKey;
use keyrelay::usage::Cost;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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
                    // The scenario: a client that asks again a moment after being told no key is free.
                    Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            };
            let i = keys.iter().position(|k| k.id == grant.key.id).unwrap();
            let now = in_flight[i].fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            // The scenario: the request takes a while upstream, holding its key.
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
    let counted = today(&stores[1], &keys, |c| c.successes == 32).await;
    assert_eq!(counted.requests, 32);
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
    eventually("the other instance sees the cooldown", || async {
        stores[1]
            .report("p", &keys)
            .await
            .iter()
            .any(|k| k.id == limited.to_string() && !k.model_cooldowns.is_empty())
    })
    .await;
    for _ in 0..5 {
        let grant = stores[1].acquire(ask(&keys, &tuning)).await.unwrap();
        assert_ne!(grant.key.id, limited, "the cooling key is not granted");
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
    for n in 1..=3 {
        let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
        let absurd = Outcome::Success {
            prompt_tokens: u64::MAX / 2,
            completion_tokens: 1,
            cost: Cost(u64::MAX),
        };
        stores[0].release(&grant, absurd, &tuning);
        let counted = today(&stores[0], &keys, |c| c.successes == n).await;
        assert_eq!(counted.requests, n);
    }
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
    for (n, store) in stores.iter().enumerate() {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, limited.clone(), &tuning);
        eventually("the rate limit in Redis", || async {
            let report = store.report("p", &keys).await;
            report
                .iter()
                .filter(|k| !k.model_cooldowns.is_empty())
                .count()
                == n + 1
        })
        .await;
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
    today(store, &keys, |c| c.successes == 1).await;
    let before = commands(&redis).await;
    // Every round trip is a script; what the scripts call inside is not a round trip.
    let scripts_since_before = || async {
        let after = commands(&redis).await;
        ["evalsha", "eval"]
            .iter()
            .map(|c| after.get(*c).unwrap_or(&0) - before.get(*c).unwrap_or(&0))
            .sum::<u64>()
    };
    let outcomes = [SUCCESS, rate_limited(60), SUCCESS, Outcome::Cancelled];
    for n in 0..40 {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, outcomes[n % 4].clone(), &tuning);
        // Released in the background: the next request comes once Redis has heard of this one.
        eventually("the release to reach Redis", || async {
            scripts_since_before().await >= 2 * (n as u64 + 1)
        })
        .await;
    }
    let sent = scripts_since_before().await;
    // The claim chooses on what the previous claim read (a first request reads first: three round trips).
    assert_eq!(sent, 40 * 2, "{before:?}");
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
            // The scenario: requests in flight together, so that their releases race.
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
    let today = today(&stores[1], &keys, |c| c.successes + c.failures == 40).await;
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
    today(&stores[1], &keys, |c| c.failures == 1).await;
    let moved = stores[1].acquire(ask(&keys, &tuning)).await.unwrap();
    stores[1].release(&moved, SUCCESS, &tuning);
    today(&stores[0], &keys, |c| c.successes == 1).await;
    for n in 0..6 {
        let store = &stores[n % 2];
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        assert_eq!(grant.key.id, moved.key.id, "request {n}");
        store.release(&grant, SUCCESS, &tuning);
        today(&stores[(n + 1) % 2], &keys, |c| c.successes == n as u64 + 2).await;
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
        // Until the last failure is written, this instance leaves the key alone.
        let grant = eventually_some("the key to be granted again", || async {
            stores[0].acquire(refused(model)).await.ok()
        })
        .await;
        stores[0].release(
            &grant,
            Outcome::Failure {
                class: ErrorClass::InvalidRequest,
                scope: Scope::Model,
                retry_after: None,
            },
            &tuning,
        );
    }
    let grant = eventually_some("the key to be granted again", || async {
        stores[0].acquire(ask(&keys, &tuning)).await.ok()
    })
    .await;
    stores[0].release(&grant, SUCCESS, &tuning);
    today(&stores[0], &keys, |c| c.successes == 1).await;
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
    eventually("the rate limit in Redis", || async {
        stores[0].report("p", &keys).await[0].model_cooldowns.len() == 1
    })
    .await;
    let before = commands(&redis).await;
    // The first succeeds, on the verdict it read before the rate limit: written as it was, the success would
    // have erased the cooldown.
    stores[0].release(&early, SUCCESS, &tuning);
    // Each look at the report is a script too: counted, to be left out.
    let looks = std::cell::Cell::new(0);
    let report = eventually_some("the success's verdict to be written", || async {
        looks.set(looks.get() + 1);
        let report = stores[0].report("p", &keys).await.remove(0);
        (report.streak == 0 && report.today.successes == 1).then_some(report)
    })
    .await;
    let after = commands(&redis).await;
    // The release, a read of the verdict alone, and the verdict written.
    assert_eq!(
        after["evalsha"] - before["evalsha"] - looks.get(),
        3,
        "read again once"
    );
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
    // The scenario: three lease times pass (nothing shows a renewal but the lease still being held).
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
    for (n, provider) in providers.iter().enumerate() {
        eventually("the releases in Redis", || async {
            let report = &stores[1].report(provider, &keys[index(provider)]).await[0];
            match n {
                0 => !report.model_cooldowns.is_empty(),
                _ => report.in_flight == 0 && report.today.successes == 1,
            }
        })
        .await;
    }
    let why = stores[1].acquire(on(providers[0])).await.unwrap_err();
    assert_eq!(why.cooling, 1, "{why:?}");
    for provider in &providers[1..] {
        let grant = stores[1].acquire(on(provider)).await.unwrap();
        stores[1].release(&grant, SUCCESS, &tuning);
    }
    for provider in &providers[1..] {
        let report = eventually_some("the releases in Redis", || async {
            let report = stores[0]
                .report(provider, &keys[index(provider)])
                .await
                .remove(0);
            (report.today.successes == 2).then_some(report)
        })
        .await;
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
    today(&stores[0], &keys, |c| c.successes == 2).await;
    // Two requests today, pool-wide: the day's quota is spent on both instances, until the reset.
    for store in &stores {
        let why = store.acquire(ask(&keys, &tuning)).await.unwrap_err();
        assert_eq!(why.ready_at, Some(reset), "{why:?}");
    }
    // A new day: today's counts start again for both, the lifetime's stay.
    let report = eventually_some("the day to turn", || async {
        let report = stores[1].report("p", &keys).await.remove(0);
        (report.today.requests == 0).then_some(report)
    })
    .await;
    assert_eq!(
        (report.today.requests, report.lifetime.requests),
        (0, 2),
        "{report:?}"
    );
    for store in &stores {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, SUCCESS, &tuning);
    }
    let report = eventually_some("the releases in Redis", || async {
        let report = stores[0].report("p", &keys).await.remove(0);
        (report.today.successes == 2).then_some(report)
    })
    .await;
    assert_eq!(
        (report.today.requests, report.lifetime.requests),
        (2, 4),
        "{report:?}"
    );
}
