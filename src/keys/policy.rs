//! The rules of key use, apart from where key state is kept: which keys may serve a request and in which order
//! (selection), why none can, and what an outcome does to a key (counters, streaks, the cooldown schedule, the
//! provider pause). Pure functions over [`KeyState`]: a store only holds the state, claims and releases keys
//! atomically, and applies these, so that every store (in-process, or shared between instances) follows the
//! same rules. Admission by declared limits is in `limits`.

use super::state::{Cooldown, KeyState};
use super::{Outcome, Unavailable, cooldown_until};
use crate::clock::UnixMs;
use crate::config::{PauseRule, Selection, Tuning};
use crate::failure::{ErrorClass, Scope};
use crate::secret::KeyId;
use std::collections::VecDeque;

/// Where one key stands for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Standing {
    /// Given up on by this request, or retired by a reload.
    Excluded,
    Cooling(Cooldown),
    /// At its concurrency limit.
    Busy,
    /// Usable, with this load (balanced selection prefers the least).
    Free(Load),
}

/// How loaded a usable key is for one model: requests it is serving now, then requests today. Ordered that way,
/// so a key with nothing in flight always comes before a busy one: parallel requests spread over idle keys
/// first, and stack on the least loaded only when every key is serving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Load {
    pub in_flight: u32,
    pub today: u64,
}

/// Where a key with state `key` (none yet: a fresh key) stands for a request for `model`.
pub fn standing(
    key: Option<&KeyState>,
    model: &str,
    excluded: bool,
    tuning: &Tuning,
    now: UnixMs,
) -> Standing {
    if excluded {
        return Standing::Excluded;
    }
    let Some(ks) = key else {
        return Standing::Free(Load::default());
    };
    if ks.disabled {
        return Standing::Excluded;
    }
    let ms = ks.models.get(model);
    if let Some(cooldown) = ks.cooling(ms, now) {
        return Standing::Cooling(cooldown);
    }
    let model_in_flight = ms.map_or(0, |m| m.in_flight);
    let full = |limit: u32, used: u32| limit > 0 && used >= limit;
    if full(tuning.per_key, ks.in_flight) || full(tuning.per_key_model, model_in_flight) {
        return Standing::Busy;
    }
    Standing::Free(Load {
        in_flight: model_in_flight,
        today: ms.map_or(0, |m| m.today.requests),
    })
}

/// The free keys in order of preference. `cursor` is where a sequential selection stays; `all` asks for every
/// free key (when declared limits may refuse the first), else only the best is returned.
pub fn preference(
    standings: &[Standing],
    selection: Selection,
    cursor: Option<usize>,
    all: bool,
) -> Vec<usize> {
    let free = |i: &usize| matches!(standings[*i], Standing::Free(_));
    match selection {
        // Only the best key matters: one pass, no sort.
        Selection::Balanced if !all => least_used(standings).into_iter().collect(),
        Selection::Balanced => {
            // The least-used first; ties in random order.
            let mut order: Vec<usize> = (0..standings.len()).filter(free).collect();
            fastrand::shuffle(&mut order);
            order.sort_by_key(|&i| match standings[i] {
                Standing::Free(load) => load,
                _ => Load {
                    in_flight: u32::MAX,
                    today: u64::MAX,
                },
            });
            order
        }
        Selection::Sequential => {
            let start = cursor.unwrap_or(0);
            (0..standings.len())
                .map(|offset| (start + offset) % standings.len())
                .filter(free)
                .collect()
        }
    }
}

/// Whether a sequential selection moves on to the key chosen: it stays on its key while that key is merely busy,
/// and moves once the key cools or was given up on.
pub fn moves_cursor(standings: &[Standing], cursor: Option<usize>) -> bool {
    !matches!(
        cursor.map(|c| standings[c]),
        Some(Standing::Busy | Standing::Free(_))
    )
}

/// The free key with the least load, ties broken uniformly at random.
fn least_used(standings: &[Standing]) -> Option<usize> {
    let mut best: Option<(usize, Load)> = None;
    let mut ties = 0u32;
    for (i, standing) in standings.iter().enumerate() {
        let Standing::Free(used) = *standing else {
            continue;
        };
        match best {
            Some((_, b)) if used > b => {}
            Some((_, b)) if used == b => {
                ties += 1;
                if fastrand::u32(0..ties) == 0 {
                    best = Some((i, used));
                }
            }
            _ => {
                best = Some((i, used));
                ties = 1;
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Why no key could be had, from where each stands.
pub fn unavailable(standings: &[Standing]) -> Unavailable {
    let mut why = Unavailable::default();
    for standing in standings {
        match *standing {
            Standing::Excluded | Standing::Free(_) => {}
            Standing::Busy => why.busy += 1,
            Standing::Cooling(Cooldown { until, reason }) => {
                why.cooling += 1;
                if matches!(reason, ErrorClass::Auth | ErrorClass::Forbidden) {
                    why.benched += 1;
                }
                why.ready_at = Some(why.ready_at.map_or(until, |r| r.min(until)));
            }
        }
    }
    why
}

/// The key rests after an auth or permission refusal for a model other than `model`.
fn refused_for_another_model(key: &KeyState, model: &str, now: UnixMs) -> bool {
    key.models.iter().any(|(name, m)| {
        name != model
            && m.cooldown.is_some_and(|c| {
                c.until > now && matches!(c.reason, ErrorClass::Auth | ErrorClass::Forbidden)
            })
    })
}

/// What an outcome does to a key and its state for `model`: counts, streaks and, for a failure, the cooldown of
/// the schedule. Returns the cooldown started, if any. (Claims and releases are the store's.)
pub fn settle(
    key: &mut KeyState,
    model: &str,
    outcome: &Outcome,
    tuning: &Tuning,
    now: UnixMs,
    next_reset: UnixMs,
) -> Option<Cooldown> {
    // Two keys refusing one request rest for its model only (the relay's call); one key refused for a second
    // model while it still rests after a refusal on another is refused whatever it asks: it rests whole.
    let escalated;
    let outcome = match *outcome {
        Outcome::Failure {
            class: class @ (ErrorClass::Auth | ErrorClass::Forbidden),
            scope: Scope::Model,
            retry_after,
        } if refused_for_another_model(key, model, now) => {
            escalated = Outcome::Failure {
                class,
                scope: Scope::Key,
                retry_after,
            };
            &escalated
        }
        _ => outcome,
    };
    if !key.models.contains_key(model) {
        key.models.insert(model.to_string(), Default::default());
    }
    let model = key.models.get_mut(model).expect("just inserted");
    let key_streak = &mut key.streak;
    match *outcome {
        Outcome::Cancelled => None,
        Outcome::Success {
            prompt_tokens,
            completion_tokens,
            cost,
        } => {
            for c in [&mut model.today, &mut model.lifetime] {
                c.successes += 1;
                // Counts come from the upstream: never let a silly one overflow.
                c.prompt_tokens = c.prompt_tokens.saturating_add(prompt_tokens);
                c.completion_tokens = c.completion_tokens.saturating_add(completion_tokens);
                c.cost = c.cost.plus(cost);
            }
            model.streak = 0;
            *key_streak = 0;
            None
        }
        Outcome::Failure {
            class,
            scope,
            retry_after,
        } => {
            model.today.failures += 1;
            model.lifetime.failures += 1;
            key.last_error = Some(Cooldown {
                until: now,
                reason: class,
            });
            // A failure reported while a cooldown of the same scope still runs was in flight when that cooldown
            // began (parallel requests on one key): part of the same episode, it does not escalate the schedule.
            let running = match scope {
                Scope::Model => model.cooldown,
                Scope::Key => key.cooldown,
            }
            .is_some_and(|c| c.until > now);
            let streak = match scope {
                Scope::Model => &mut model.streak,
                Scope::Key => key_streak,
            };
            if !running {
                *streak += 1;
            }
            let until = cooldown_until(
                class,
                retry_after,
                (*streak).max(1),
                tuning,
                now,
                next_reset,
            )?;
            let slot = match scope {
                Scope::Model => &mut model.cooldown,
                Scope::Key => &mut key.cooldown,
            };
            let cooldown = Cooldown {
                until,
                reason: class,
            };
            // Concurrent failures may report in any order: a short cooldown never cuts a longer one.
            if slot.is_none_or(|c| c.until < until) {
                *slot = Some(cooldown);
            }
            Some(cooldown)
        }
    }
}

/// The provider pause: when `rule.keys` distinct keys hit a rate limit within `rule.window`, the whole provider
/// rests until the latest of their cooldowns. `recent` is the provider's recent rate limits; returns the pause's
/// end when this one (of `key`, cooling until `until`) starts one.
pub fn pause(
    recent: &mut VecDeque<(UnixMs, KeyId)>,
    rule: PauseRule,
    key: &KeyId,
    now: UnixMs,
    until: UnixMs,
) -> Option<UnixMs> {
    let window = rule.window.as_millis() as i64;
    recent.retain(|(at, _)| now - at < window);
    recent.push_back((now, key.clone()));
    let mut keys: Vec<&KeyId> = recent.iter().map(|(_, k)| k).collect();
    keys.sort();
    keys.dedup();
    (keys.len() as u32 >= rule.keys).then_some(until)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(today: u64) -> Standing {
        Standing::Free(Load {
            in_flight: 0,
            today,
        })
    }

    #[test]
    fn an_idle_key_comes_before_a_less_used_busy_one() {
        let serving = Standing::Free(Load {
            in_flight: 1,
            today: 0,
        });
        let standings = [serving, used(50), serving];
        for all in [false, true] {
            let order = preference(&standings, Selection::Balanced, None, all);
            assert_eq!(order[0], 1, "{order:?}");
        }
        let stacked = [
            Standing::Free(Load {
                in_flight: 3,
                today: 0,
            }),
            Standing::Free(Load {
                in_flight: 1,
                today: 9,
            }),
        ];
        assert_eq!(
            preference(&stacked, Selection::Balanced, None, false),
            [1],
            "with every key serving, the least loaded"
        );
    }

    #[test]
    fn preference_follows_the_selection() {
        let standings = [
            used(3),
            Standing::Busy,
            used(1),
            Standing::Excluded,
            used(1),
        ];
        for _ in 0..20 {
            let best = preference(&standings, Selection::Balanced, None, false);
            assert!(best == [2] || best == [4], "{best:?}");
            let all = preference(&standings, Selection::Balanced, None, true);
            assert_eq!(all.len(), 3);
            assert_eq!(all[2], 0, "the most used last");
        }
        assert_eq!(
            preference(&standings, Selection::Sequential, Some(2), true),
            [2, 4, 0]
        );
        assert!(!moves_cursor(&standings, Some(1)), "stays while busy");
        assert!(moves_cursor(&standings, Some(3)), "moves once given up on");
    }

    #[test]
    fn settling_counts_escalates_and_never_shortens_a_cooldown() {
        let tuning = Tuning::default();
        let mut key = KeyState::default();
        let limited = Outcome::Failure {
            class: ErrorClass::RateLimit,
            scope: Scope::Model,
            retry_after: None,
        };
        let first = settle(&mut key, "m", &limited, &tuning, 0, 0).unwrap();
        // Reported while the first rest runs: in flight with it, the same episode.
        let parallel = settle(&mut key, "m", &limited, &tuning, 5_000, 0).unwrap();
        assert_eq!((first.until, parallel.until), (10_000, 15_000));
        assert_eq!(key.models["m"].streak, 1);
        // After the rest, the next one is the second in a row.
        let second = settle(&mut key, "m", &limited, &tuning, 15_000, 0).unwrap();
        assert_eq!(second.until, 45_000);
        assert_eq!(key.models["m"].streak, 2);
        assert_eq!(key.models["m"].today.failures, 3);
        let stated = Outcome::Failure {
            class: ErrorClass::RateLimit,
            scope: Scope::Model,
            retry_after: Some(std::time::Duration::from_secs(2)),
        };
        settle(&mut key, "m", &stated, &tuning, 0, 0);
        assert_eq!(
            key.models["m"].cooldown.unwrap().until,
            45_000,
            "not cut short"
        );
        let ok = Outcome::Success {
            prompt_tokens: 5,
            completion_tokens: u64::MAX,
            cost: crate::usage::Cost(u64::MAX),
        };
        settle(&mut key, "m", &ok, &tuning, 1, 0);
        let m = &key.models["m"];
        assert_eq!((m.streak, m.today.completion_tokens), (0, u64::MAX));
        assert_eq!(m.today.cost.0, u64::MAX);
        settle(&mut key, "m", &ok, &tuning, 2, 0);
        assert_eq!(key.models["m"].lifetime.cost.0, u64::MAX, "saturates");
        let why = unavailable(&[Standing::Cooling(first), Standing::Busy, used(0)]);
        assert_eq!((why.busy, why.cooling, why.ready_at), (1, 1, Some(10_000)));
    }
}
