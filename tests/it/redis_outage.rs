//! Redis away, unresponsive or emptied under a store: every request is served from the instance's own state,
//! and Redis, once back, hears what it missed (once) or is given back what it lost.

use crate::support::redis::Redis;
use crate::support::stores::*;
use crate::support::{eventually, eventually_within};
use keyrelay::config::Tuning;
use keyrelay::keys::KeyStore;
use std::time::Duration;

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
    today(store, &keys, |c| c.successes == 1).await;
    drop(redis);
    // Every request still gets a key, from this instance's own state.
    for _ in 0..5 {
        let grant = store.acquire(ask(&keys, &tuning)).await.unwrap();
        store.release(&grant, SUCCESS, &tuning);
    }
    assert!(store.degraded());
    // Back, and empty: rejoined within the probe's period, and seeded with what this instance knew.
    let redis = Redis::start_on(port);
    rejoined(store).await;
    let report = store.report("p", &keys).await;
    assert!(
        report.iter().map(|k| k.today.requests).sum::<u64>() >= 6,
        "{report:?}"
    );
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server; .ci/run installs it"]
async fn an_outcome_redis_missed_while_unresponsive_is_given_to_it_once() {
    let redis = Redis::start();
    let stores = stores(&redis, 2).await;
    let keys = keys(1);
    let tuning = Tuning::default();
    let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
    let stalled = stall(&redis, 1.5).await;
    // Sent, applied when Redis wakes, its answer too late: kept as missed all the same.
    stores[0].release(&grant, SUCCESS, &tuning);
    eventually("the release to find Redis unresponsive", || async {
        stores[0].degraded()
    })
    .await;
    stalled.await.unwrap();
    // Rejoining gives Redis what it missed before the store says it is back.
    rejoined(&stores[0]).await;
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
    let stalled = stall(&redis, 1.2).await;
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
    let in_redis = || async {
        let report = stores[0].report("p", &keys).await;
        let cooling = report
            .iter()
            .any(|k| k.id == limited.to_string() && !k.model_cooldowns.is_empty());
        let off = report
            .iter()
            .any(|k| k.id == disabled.id.to_string() && k.disabled);
        cooling && off
    };
    eventually("the cooldown and the disabled key in Redis", in_redis).await;
    // Redis loses everything without the connection ever failing (a FLUSHALL, a failover to an empty replica).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    // Before it is written back, the instance still leaves the cooling and the disabled key alone.
    for _ in 0..4 {
        let grant = stores[0].acquire(ask(&keys, &tuning)).await.unwrap();
        assert!(grant.key.id != limited && grant.key.id != disabled.id);
        stores[0].release(&grant, SUCCESS, &tuning);
    }
    // Within the ten-second check, the cooldown and the disabled key are back in Redis.
    eventually_within(
        Duration::from_secs(15),
        "the cooldown and the disabled key to be written back",
        || async { in_redis().await.then_some(()) },
    )
    .await;
}
