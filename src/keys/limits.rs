//! Proactive per-key limits, declared per provider (free tiers publish them): requests per minute (a
//! `governor` rate limiter per key), tokens per minute (a sliding minute of reported usage) and requests per day
//! (today's counters). A key without capacity is skipped by selection, like a cooling one, so known limits never
//! turn into a 429 upstream.

use crate::clock::UnixMs;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A provider's declared limits, each per key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    pub requests_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
}

/// governor's clock reading the store's time, which is set before each check: the limiter runs on the same
/// clock as every other rule (tests that pause time move it too, and a shared store can feed it its own).
#[derive(Clone, Debug, Default)]
struct StoreTime(Arc<AtomicI64>);

impl governor::clock::Clock for StoreTime {
    /// Time since the Unix epoch.
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed).max(0) as u64)
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, StoreTime, NoOpMiddleware<Duration>>;

/// One key's use against its limits.
#[derive(Default)]
pub struct Meter {
    /// The limiter and the rate it was built for (a reload may change it).
    requests: Option<(NonZeroU32, Limiter)>,
    time: StoreTime,
    /// Tokens reported in the last minute: (time, tokens).
    tokens: VecDeque<(UnixMs, u64)>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

const MINUTE: i64 = 60_000;

impl Meter {
    /// Takes one request from the key's allowance, or says when it will have room.
    pub fn admit(
        &mut self,
        limits: &KeyLimits,
        requests_today: u64,
        now: UnixMs,
        next_reset: UnixMs,
    ) -> Result<(), UnixMs> {
        if limits
            .requests_per_day
            .is_some_and(|max| requests_today >= max)
        {
            return Err(next_reset);
        }
        if let Some(max) = limits.tokens_per_minute {
            self.tokens.retain(|(at, _)| now - at < MINUTE);
            let used: u64 = self.tokens.iter().map(|(_, n)| n).sum();
            if used >= max {
                let oldest = self.tokens.front().map_or(now, |(at, _)| *at);
                return Err(oldest + MINUTE);
            }
        }
        if let Some(rpm) = limits.requests_per_minute {
            if self.requests.as_ref().is_none_or(|(rate, _)| *rate != rpm) {
                let limiter =
                    RateLimiter::direct_with_clock(Quota::per_minute(rpm), self.time.clone());
                self.requests = Some((rpm, limiter));
            }
            let (_, limiter) = self.requests.as_ref().expect("set above");
            self.time.0.store(now, Ordering::Relaxed);
            if let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(Duration::from_millis(now.max(0) as u64));
                return Err(now + wait.as_millis() as i64 + 1);
            }
        }
        Ok(())
    }

    /// Counts tokens an upstream reported for this key.
    pub fn spend_tokens(&mut self, now: UnixMs, tokens: u64) {
        // Only the last minute counts: older spends go here too, so a key without a tokens-per-minute limit
        // (whose admission never prunes) keeps a minute's worth at most.
        while self
            .tokens
            .front()
            .is_some_and(|(at, _)| now - at >= MINUTE)
        {
            self.tokens.pop_front();
        }
        if tokens > 0 {
            self.tokens.push_back((now, tokens));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_holds_and_says_when_room_returns() {
        let mut m = Meter::default();
        let rpm = KeyLimits {
            requests_per_minute: NonZeroU32::new(2),
            ..Default::default()
        };
        assert!(m.admit(&rpm, 0, 0, 0).is_ok());
        assert!(m.admit(&rpm, 0, 0, 0).is_ok());
        let ready = m.admit(&rpm, 0, 1_000, 0).unwrap_err();
        assert!(ready > 1_000 && ready <= 1_000 + 30_001, "{ready}");
        // The limiter runs on the store's time, not the machine's: room returns when that time says so.
        assert!(m.admit(&rpm, 0, ready - 2, 0).is_err());
        assert!(m.admit(&rpm, 0, ready, 0).is_ok());
        assert!(m.admit(&rpm, 0, ready, 0).is_err());

        let tpm = KeyLimits {
            tokens_per_minute: Some(100),
            ..Default::default()
        };
        let mut m = Meter::default();
        m.spend_tokens(5_000, 60);
        assert!(m.admit(&tpm, 0, 6_000, 0).is_ok());
        m.spend_tokens(7_000, 50);
        assert_eq!(m.admit(&tpm, 0, 8_000, 0), Err(65_000));
        assert!(
            m.admit(&tpm, 0, 65_000, 0).is_ok(),
            "the first spend left the window"
        );

        let rpd = KeyLimits {
            requests_per_day: Some(3),
            ..Default::default()
        };
        assert_eq!(Meter::default().admit(&rpd, 3, 10, 99), Err(99));
        assert!(Meter::default().admit(&rpd, 2, 10, 99).is_ok());
    }
}
