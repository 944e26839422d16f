//! Proactive per-key limits, declared per provider (free tiers publish them): requests per minute and tokens per
//! minute over a sliding minute, and requests per day (today's counters). A key without capacity is skipped by
//! selection, like a cooling one, so known limits never turn into a 429 upstream.
//!
//! A per-minute limit of N is kept in every 60-second window, not on average: a request is admitted only while
//! fewer than N were admitted in the minute before it, and room returns a minute after the oldest of them. The
//! Redis store's claim script applies the same rule to the same windows (`keys/redis/scripts.rs`), and a test
//! feeds both stores the same requests and requires the same admissions.

use crate::clock::UnixMs;
use crate::config::KeyLimits;
use std::collections::VecDeque;

/// One key's use against its limits.
#[derive(Debug, Default)]
pub struct Meter {
    /// When each request admitted in the last minute was, oldest first (at most the limit's size, plus what a
    /// reload that lowered the limit left to age out).
    requests: VecDeque<UnixMs>,
    /// Tokens reported in the last minute: (time, tokens).
    tokens: VecDeque<(UnixMs, u64)>,
}

/// A window's length. An entry stamped `at` is in the window at `now` while `now - at < MINUTE`.
const MINUTE: i64 = 60_000;

/// Drops what left the window ending at `now`.
fn slide<T>(window: &mut VecDeque<T>, now: UnixMs, at: impl Fn(&T) -> UnixMs) {
    while window.front().is_some_and(|e| now - at(e) >= MINUTE) {
        window.pop_front();
    }
}

impl Meter {
    /// Takes one request from the key's allowance, or says when it will have room. The checks run in the
    /// order the Redis claim runs them (day, requests, tokens), so both name the same time.
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
        slide(&mut self.requests, now, |at| *at);
        if let Some(rpm) = limits.requests_per_minute
            && self.requests.len() >= rpm.get() as usize
        {
            let oldest = self.requests.front().copied().unwrap_or(now);
            return Err(oldest + MINUTE);
        }
        if let Some(max) = limits.tokens_per_minute {
            slide(&mut self.tokens, now, |(at, _)| *at);
            let used: u64 = self.tokens.iter().map(|(_, n)| n).sum();
            if used >= max {
                let oldest = self.tokens.front().map_or(now, |(at, _)| *at);
                return Err(oldest + MINUTE);
            }
        }
        if limits.requests_per_minute.is_some() {
            self.requests.push_back(now);
        }
        Ok(())
    }

    /// Counts tokens an upstream reported for this key.
    pub fn spend_tokens(&mut self, now: UnixMs, tokens: u64) {
        // Only the last minute counts: older spends go here too, so a key without a tokens-per-minute limit
        // (whose admission never prunes) keeps a minute's worth at most.
        slide(&mut self.tokens, now, |(at, _)| *at);
        if tokens > 0 {
            self.tokens.push_back((now, tokens));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn each_limit_holds_and_says_when_room_returns() {
        let mut m = Meter::default();
        let rpm = KeyLimits {
            requests_per_minute: NonZeroU32::new(2),
            ..Default::default()
        };
        assert!(m.admit(&rpm, 0, 0, 0).is_ok());
        assert!(m.admit(&rpm, 0, 10_000, 0).is_ok());
        assert_eq!(m.admit(&rpm, 0, 20_000, 0), Err(60_000));
        // Room returns a minute after the oldest, one request at a time: never 3 in any minute.
        assert_eq!(m.admit(&rpm, 0, 59_999, 0), Err(60_000));
        assert!(m.admit(&rpm, 0, 60_000, 0).is_ok());
        assert_eq!(m.admit(&rpm, 0, 60_000, 0), Err(70_000));
        assert!(m.admit(&rpm, 0, 70_000, 0).is_ok());

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

    /// The case: `requests_per_minute: 6` once let 8 through within 25 s (a token bucket refills on top
    /// of a full burst). Whatever the arrival pattern, no 60-second window holds more than the limit.
    #[test]
    fn no_window_of_a_minute_holds_more_than_the_limit() {
        let limits = KeyLimits {
            requests_per_minute: NonZeroU32::new(6),
            ..Default::default()
        };
        let mut m = Meter::default();
        let mut admitted = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut now = 0;
        for _ in 0..5_000 {
            now += rng.i64(0..4_000);
            if m.admit(&limits, 0, now, i64::MAX).is_ok() {
                admitted.push(now);
            }
        }
        for (i, start) in admitted.iter().enumerate() {
            let within = admitted[i..]
                .iter()
                .take_while(|at| **at - start < MINUTE)
                .count();
            assert!(within <= 6, "{within} requests in the minute from {start}");
        }
        assert!(
            admitted.len() > 5_000 * 2 / 60 * 6 / 2,
            "the limit admits its share"
        );
    }
}
