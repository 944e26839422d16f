//! The in-process store applying the policy: selection, limits, cooldowns, the daily reset, retirement.

use super::*;
use crate::config::DailyReset;
use crate::usage::Cost;
use std::time::Duration;

fn policy() -> StorePolicy {
    StorePolicy {
        daily_reset: DailyReset::parse("03:00", "UTC").unwrap(),
        pause: None,
    }
}

fn keys(n: usize) -> Vec<ApiKey> {
    (0..n)
        .map(|i| ApiKey::new("p", &format!("key-number-{i:04}")))
        .collect()
}

fn ask<'a>(keys: &'a [ApiKey], tuning: &'a Tuning, exclude: &'a [KeyId]) -> Ask<'a> {
    Ask {
        provider: "p",
        model: "m",
        keys,
        exclude,
        tuning,
    }
}

const SUCCESS: Outcome = Outcome::Success {
    prompt_tokens: 0,
    completion_tokens: 0,
    cost: Cost(0),
};

fn fail(class: ErrorClass, retry_after: Option<Duration>) -> Outcome {
    Outcome::Failure {
        class,
        scope: class.default_scope(),
        retry_after,
    }
}

// 2026-01-10T02:59:00Z
const START: UnixMs = 1_768_013_940_000;

#[tokio::test(start_paused = true)]
async fn a_lease_released_twice_frees_one_slot_and_counts_once() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(1);
    let tuning = Tuning::default();
    let first = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    let other = Ask {
        model: "other",
        ..ask(&keys, &tuning, &[])
    };
    let second = store.try_acquire(other).unwrap();
    assert_ne!(first.lease, second.lease, "each lease has its own id");
    store.release(&first, SUCCESS, &tuning);
    store.release(&first, SUCCESS, &tuning);
    let status = &store.status("p", &keys)[0];
    assert_eq!(status.in_flight, 1, "the second lease still holds the key");
    assert_eq!(status.lifetime.successes, 1);
    store.release(&second, SUCCESS, &tuning);
    assert_eq!(store.status("p", &keys)[0].in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn by_default_parallel_requests_spread_over_idle_keys_then_stack() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(3);
    let tuning = Tuning::default();
    let grants: Vec<Grant> = (0..6)
        .map(|_| store.try_acquire(ask(&keys, &tuning, &[])).unwrap())
        .collect();
    let on = |g: &[Grant]| {
        let mut ids: Vec<_> = g.iter().map(|g| g.key.id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    assert_eq!(
        on(&grants[..3]),
        3,
        "every key serves one before any serves two"
    );
    assert_eq!(
        on(&grants[3..]),
        3,
        "then each takes a second, never waiting"
    );
    let in_flight: Vec<u32> = store
        .status("p", &keys)
        .iter()
        .map(|k| k.in_flight)
        .collect();
    assert_eq!(in_flight, [2, 2, 2]);
}

#[tokio::test(start_paused = true)]
async fn parallel_rate_limits_on_one_key_are_one_episode_not_an_escalation() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(1);
    let tuning = Tuning::default();
    let grants: Vec<Grant> = (0..6)
        .map(|_| store.try_acquire(ask(&keys, &tuning, &[])).unwrap())
        .collect();
    for g in &grants {
        store.release(
            g,
            fail(ErrorClass::RateLimit, Some(Duration::from_secs(1))),
            &tuning,
        );
    }
    let status = &store.status("p", &keys)[0];
    let (_, until, _) = status.model_cooldowns[0].clone();
    assert_eq!(
        until,
        START + 1_000,
        "six at once rest the stated second, not five steps of the schedule"
    );
    assert_eq!(status.streak, 1);
    // The next one, after that rest, is the second in a row.
    tokio::time::advance(Duration::from_millis(1_100)).await;
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(
        &g,
        fail(ErrorClass::RateLimit, Some(Duration::from_secs(1))),
        &tuning,
    );
    let status = &store.status("p", &keys)[0];
    assert_eq!(status.streak, 2);
    assert!(status.model_cooldowns[0].1 >= START + 1_100 + 10_000);
}

#[tokio::test(start_paused = true)]
async fn balanced_spreads_and_limits_concurrency() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(4);
    let tuning = Tuning {
        per_key_model: 1,
        ..Tuning::default()
    };
    let grants: Vec<Grant> = (0..4)
        .map(|_| store.try_acquire(ask(&keys, &tuning, &[])).unwrap())
        .collect();
    let mut ids: Vec<_> = grants.iter().map(|g| g.key.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "one request per key and model");
    let why = store.try_acquire(ask(&keys, &tuning, &[])).unwrap_err();
    assert_eq!(
        why,
        Unavailable {
            busy: 4,
            ..Default::default()
        }
    );
    // A different model may use the same keys at once.
    let other = Ask {
        model: "other",
        ..ask(&keys, &tuning, &[])
    };
    assert!(store.try_acquire(other).is_ok());
    store.release(
        &grants[2],
        Outcome::Success {
            prompt_tokens: 1,
            completion_tokens: 2,
            cost: Cost(300),
        },
        &tuning,
    );
    assert_eq!(
        store.try_acquire(ask(&keys, &tuning, &[])).unwrap().key.id,
        grants[2].key.id
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limit_cools_for_stated_time_then_escalates() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(1);
    let tuning = Tuning::default();
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(
        &g,
        fail(ErrorClass::RateLimit, Some(Duration::from_secs(2))),
        &tuning,
    );
    let why = store.try_acquire(ask(&keys, &tuning, &[])).unwrap_err();
    assert_eq!(why.ready_at, Some(START + 2000));
    tokio::time::advance(Duration::from_millis(1999)).await;
    assert!(store.try_acquire(ask(&keys, &tuning, &[])).is_err());
    tokio::time::advance(Duration::from_millis(1)).await;
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    // Second consecutive rate limit without a stated wait: the schedule's second step, 30 s.
    store.release(&g, fail(ErrorClass::RateLimit, None), &tuning);
    let why = store.try_acquire(ask(&keys, &tuning, &[])).unwrap_err();
    assert_eq!(why.ready_at, Some(START + 2000 + 30_000));
    tokio::time::advance(Duration::from_secs(30)).await;
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(&g, SUCCESS, &tuning);
    // A success resets the streak: the next rate limit is back to 10 s.
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(&g, fail(ErrorClass::RateLimit, None), &tuning);
    let now = store.clock().now();
    assert_eq!(
        store
            .try_acquire(ask(&keys, &tuning, &[]))
            .unwrap_err()
            .ready_at,
        Some(now + 10_000)
    );
}

#[tokio::test(start_paused = true)]
async fn auth_benches_the_key_for_every_model() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(1);
    let tuning = Tuning::default();
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(&g, fail(ErrorClass::Auth, None), &tuning);
    let other = Ask {
        model: "other",
        ..ask(&keys, &tuning, &[])
    };
    assert_eq!(
        store.try_acquire(other).unwrap_err().ready_at,
        Some(START + 300_000)
    );
    let report = store.status("p", &keys);
    assert_eq!(report[0].cooling_reason, Some(ErrorClass::Auth));
}

#[tokio::test(start_paused = true)]
async fn quota_lasts_until_the_daily_reset_which_clears_today() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(2);
    let tuning = Tuning::default();
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(&g, fail(ErrorClass::Quota, None), &tuning);
    // The reset is at 03:00, one minute after START.
    let other = keys.iter().find(|k| k.id != g.key.id).unwrap().id.clone();
    let why = store
        .try_acquire(ask(&keys, &tuning, &[other]))
        .unwrap_err();
    assert_eq!(why.ready_at, Some(START + 60_000));
    assert_eq!(
        store
            .status("p", &keys)
            .iter()
            .map(|k| k.today.requests)
            .sum::<u64>(),
        1
    );
    tokio::time::advance(Duration::from_secs(60)).await;
    let g2 = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    let report = store.status("p", &keys);
    assert_eq!(
        report.iter().map(|k| k.today.requests).sum::<u64>(),
        1,
        "today restarted at the reset"
    );
    assert_eq!(
        report.iter().map(|k| k.lifetime.requests).sum::<u64>(),
        2,
        "lifetime kept"
    );
    drop(g2);
}

#[tokio::test(start_paused = true)]
async fn sequential_stays_then_moves_on() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(3);
    let tuning = Tuning {
        selection: Selection::Sequential,
        ..Tuning::default()
    };
    for _ in 0..3 {
        let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
        assert_eq!(g.key.id, keys[0].id);
        store.release(&g, SUCCESS, &tuning);
    }
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(&g, fail(ErrorClass::RateLimit, None), &tuning);
    for _ in 0..2 {
        let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
        assert_eq!(g.key.id, keys[1].id);
        store.release(&g, SUCCESS, &tuning);
    }
    // Still on key 1 after key 0 recovers.
    tokio::time::advance(Duration::from_secs(11)).await;
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    assert_eq!(g.key.id, keys[1].id);
}

#[tokio::test(start_paused = true)]
async fn provider_pause_after_several_keys_limit() {
    let mut p = policy();
    p.pause = Some(crate::config::PauseRule {
        keys: 2,
        window: Duration::from_secs(10),
    });
    let store = MemoryStore::new(Clock::starting_at(START), p);
    let keys = keys(3);
    let tuning = Tuning::default();
    for _ in 0..2 {
        let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
        store.release(
            &g,
            fail(ErrorClass::RateLimit, Some(Duration::from_secs(5))),
            &tuning,
        );
    }
    let why = store.try_acquire(ask(&keys, &tuning, &[])).unwrap_err();
    assert_eq!(why.ready_at, Some(START + 5000), "the third key is spared");
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(store.try_acquire(ask(&keys, &tuning, &[])).is_ok());
}

#[tokio::test(start_paused = true)]
async fn per_key_limit_spans_models() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(1);
    let tuning = Tuning {
        per_key: 2,
        per_key_model: 0,
        ..Tuning::default()
    };
    let a = Ask {
        model: "a",
        ..ask(&keys, &tuning, &[])
    };
    let b = Ask {
        model: "b",
        ..ask(&keys, &tuning, &[])
    };
    let first = store.try_acquire(a).unwrap();
    let _second = store.try_acquire(b).unwrap();
    assert_eq!(store.try_acquire(a).unwrap_err().busy, 1);
    store.release(&first, Outcome::Cancelled, &tuning);
    assert!(store.try_acquire(a).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_short_cooldown_never_cuts_a_longer_one() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(1);
    let tuning = Tuning {
        per_key_model: 2,
        ..Tuning::default()
    };
    let g1 = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    let g2 = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(&g1, fail(ErrorClass::Quota, None), &tuning);
    store.release(
        &g2,
        fail(ErrorClass::RateLimit, Some(Duration::from_secs(1))),
        &tuning,
    );
    let why = store.try_acquire(ask(&keys, &tuning, &[])).unwrap_err();
    assert_eq!(
        why.ready_at,
        Some(START + 60_000),
        "still cooling until the daily reset"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_model_leaves_no_trace_and_retired_keys_go_when_idle() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(2);
    let tuning = Tuning::default();
    let made_up = Ask {
        model: "made-up-model",
        ..ask(&keys[..1], &tuning, &[])
    };
    let g = store.try_acquire(made_up).unwrap();
    store.release(&g, fail(ErrorClass::InvalidRequest, None), &tuning);
    let report = store.status("p", &keys[..1]);
    assert_eq!(report[0].lifetime.requests, 0, "{report:?}");

    let busy = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    let idle = keys
        .iter()
        .find(|k| k.id != busy.key.id)
        .unwrap()
        .id
        .clone();
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(&g, SUCCESS, &tuning);
    let removed: HashSet<KeyId> = keys.iter().map(|k| k.id.clone()).collect();
    store.retire(&removed, &HashSet::new());
    assert!(
        !store.lock().keys.contains_key(&idle),
        "an idle removed key is forgotten at once"
    );
    assert!(
        store.lock().keys.contains_key(&busy.key.id),
        "a busy one stays until its request ends"
    );
    store.release(&busy, Outcome::Cancelled, &tuning);
    assert!(!store.lock().keys.contains_key(&busy.key.id));
}

#[tokio::test(start_paused = true)]
async fn benched_keys_are_counted() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(1);
    let tuning = Tuning::default();
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    store.release(&g, fail(ErrorClass::Forbidden, None), &tuning);
    let why = store.try_acquire(ask(&keys, &tuning, &[])).unwrap_err();
    assert_eq!((why.cooling, why.benched), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_retired_key_is_never_granted_again_until_it_comes_back() {
    let store = MemoryStore::new(Clock::starting_at(START), policy());
    let keys = keys(2);
    let tuning = Tuning {
        per_key_model: 1,
        ..Tuning::default()
    };
    let removed: HashSet<KeyId> = [keys[0].id.clone()].into();
    let live: HashSet<KeyId> = [keys[1].id.clone()].into();
    store.retire(&removed, &live);
    // A request still on the old configuration lists both keys: only the live one is granted.
    let g = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    assert_eq!(g.key.id, keys[1].id);
    assert_eq!(
        store
            .try_acquire(ask(&keys, &tuning, &[]))
            .unwrap_err()
            .busy,
        1
    );
    store.release(&g, Outcome::Cancelled, &tuning);
    assert!(!store.lock().keys.contains_key(&keys[0].id));
    // Added back by a later reload: usable again.
    let all: HashSet<KeyId> = keys.iter().map(|k| k.id.clone()).collect();
    store.retire(&HashSet::new(), &all);
    let first = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    let second = store.try_acquire(ask(&keys, &tuning, &[])).unwrap();
    assert_ne!(first.key.id, second.key.id);
}
