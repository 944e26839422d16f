//! The cooldown schedule: how long a failure keeps a key (or a key for one model) out of rotation.

use crate::clock::UnixMs;
use crate::config::Tuning;
use crate::failure::ErrorClass;
use std::time::Duration;

/// Upstream-stated waits are trusted up to this long; a misbehaving upstream cannot bench a key for a year.
const MAX_STATED_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Every cooldown lasts at least this long, so that `Retry-After: 0` cannot turn rotation into a busy loop.
const MIN_COOLDOWN: Duration = Duration::from_millis(250);

/// When a key (or key and model) that just failed with `class` may be used again, or `None` if the failure does
/// not cool it. `streak` counts consecutive failures including this one; `next_reset` is the next daily reset.
///
/// - rate_limit: the escalating schedule (the last step repeats); a wait the upstream states is a floor. A first
///   rate limit with a stated wait rests exactly that long, and each consecutive one after it at least the
///   schedule's step for the streak before it (stated 1 s: 1 s, then 10 s, 30 s, ... by default), so an
///   upstream that only ever says "retry after 1 s" is not called again every second;
/// - quota: the upstream's stated reset, else the next daily reset;
/// - auth, forbidden: the escalating auth schedule;
/// - anything else: no cooldown (transient faults are retried, client errors are the client's).
pub fn cooldown_until(
    class: ErrorClass,
    retry_after: Option<Duration>,
    streak: u32,
    tuning: &Tuning,
    now: UnixMs,
    next_reset: UnixMs,
) -> Option<UnixMs> {
    let step = |schedule: &[Duration]| {
        let i = (streak.max(1) as usize - 1).min(schedule.len().saturating_sub(1));
        schedule.get(i).copied().unwrap_or(Duration::from_secs(60))
    };
    let wait = match class {
        ErrorClass::RateLimit => match retry_after {
            None => step(&tuning.rate_limit_schedule),
            Some(stated) if streak <= 1 => stated,
            Some(stated) => {
                let schedule = &tuning.rate_limit_schedule;
                let i = (streak as usize - 2).min(schedule.len().saturating_sub(1));
                stated.max(schedule.get(i).copied().unwrap_or_default())
            }
        },
        ErrorClass::Quota => match retry_after {
            Some(stated) => stated,
            None => return Some(next_reset),
        },
        ErrorClass::Auth | ErrorClass::Forbidden => step(&tuning.auth_schedule),
        _ => return None,
    };
    Some(now + wait.clamp(MIN_COOLDOWN, MAX_STATED_WAIT).as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_escalates_and_repeats_last_step() {
        let t = Tuning::default();
        let secs: Vec<i64> = (1..=7)
            .map(|s| cooldown_until(ErrorClass::RateLimit, None, s, &t, 0, 0).unwrap() / 1000)
            .collect();
        assert_eq!(secs, vec![10, 30, 60, 120, 300, 300, 300]);
        let stated = cooldown_until(
            ErrorClass::RateLimit,
            Some(Duration::from_secs(2)),
            4,
            &t,
            1000,
            0,
        );
        assert_eq!(
            stated,
            Some(61_000),
            "the fourth in a row rests at least the third step"
        );
        let stated_ones: Vec<i64> = (1..=7)
            .map(|s| {
                cooldown_until(
                    ErrorClass::RateLimit,
                    Some(Duration::from_secs(1)),
                    s,
                    &t,
                    0,
                    0,
                )
                .unwrap()
                    / 1000
            })
            .collect();
        assert_eq!(stated_ones, vec![1, 10, 30, 60, 120, 300, 300]);
        let long = cooldown_until(
            ErrorClass::RateLimit,
            Some(Duration::from_secs(900)),
            2,
            &t,
            0,
            0,
        );
        assert_eq!(long, Some(900_000), "a longer stated wait is kept");
    }

    #[test]
    fn quota_auth_and_the_rest() {
        let t = Tuning::default();
        assert_eq!(
            cooldown_until(ErrorClass::Quota, None, 1, &t, 5, 777),
            Some(777)
        );
        assert_eq!(
            cooldown_until(
                ErrorClass::Quota,
                Some(Duration::from_secs(1)),
                1,
                &t,
                5,
                777
            ),
            Some(1005)
        );
        assert_eq!(
            cooldown_until(ErrorClass::Auth, None, 2, &t, 0, 0),
            Some(900_000)
        );
        assert_eq!(
            cooldown_until(ErrorClass::Forbidden, None, 1, &t, 0, 0),
            Some(300_000)
        );
        for class in [
            ErrorClass::Server,
            ErrorClass::InvalidRequest,
            ErrorClass::ContextWindow,
            ErrorClass::Timeout,
        ] {
            assert_eq!(cooldown_until(class, None, 1, &t, 0, 0), None);
        }
        let huge = cooldown_until(
            ErrorClass::RateLimit,
            Some(Duration::from_secs(10_000_000)),
            1,
            &t,
            0,
            0,
        );
        assert_eq!(huge, Some(86_400_000));
        let zero = cooldown_until(ErrorClass::RateLimit, Some(Duration::ZERO), 1, &t, 0, 0);
        assert_eq!(zero, Some(250));
    }
}
