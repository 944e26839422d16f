//! A breaker per model: during an outage of one model, requests that have a fallback go to it at once instead of
//! trying every key of the failing model again.
//!
//! A model that fails for server or timeout reasons on [`TRIP_AFTER`] keys in a row is skipped, by requests that
//! have somewhere else to go, for a short while that escalates while it keeps failing ([`OPEN_FOR`]). When the
//! while is over, the next request tries the model again: a success closes the breaker, a failure opens it
//! again for the next step. Requests without a fallback always try the model (there is nothing better to do),
//! and their outcomes count too. The longest step is a few seconds, so a recovery is noticed within seconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Failures on this many keys in a row open the breaker.
pub const TRIP_AFTER: u32 = 3;

/// How long the breaker stays open the 1st, 2nd, ... time in a row; the last step repeats.
pub const OPEN_FOR: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// Models tracked at once; models clients make up cannot grow the table without bound.
const MAX_TRACKED: usize = 1024;

#[derive(Default)]
struct State {
    /// Keys that failed in a row since the last success or opening.
    failures: u32,
    /// Times opened in a row.
    opened: u32,
    open_until: Option<Instant>,
}

#[derive(Default)]
pub struct Breakers {
    models: Mutex<HashMap<String, State>>,
    /// How many models are tracked: while none is, which is nearly always, nothing is locked.
    tracked: AtomicUsize,
}

impl Breakers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, State>> {
        self.models.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the breaker of `label` (`provider/model`) is open, until when.
    pub fn open_until(&self, label: &str) -> Option<Instant> {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let models = self.lock();
        models
            .get(label)?
            .open_until
            .filter(|until| *until > Instant::now())
    }

    /// The model answered.
    pub fn success(&self, label: &str) {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut models = self.lock();
        if models.remove(label).is_some() {
            self.tracked.store(models.len(), Ordering::Relaxed);
        }
    }

    /// The model failed on a key for server, timeout or connection reasons; true when that opened the breaker.
    pub fn failure(&self, label: &str) -> bool {
        let mut models = self.lock();
        if models.len() >= MAX_TRACKED && !models.contains_key(label) {
            // Forget a breaker that is not open rather than grow.
            let now = Instant::now();
            let closed = models
                .iter()
                .find(|(_, s)| s.open_until.is_none_or(|u| u <= now))
                .map(|(k, _)| k.clone());
            match closed {
                Some(k) => {
                    models.remove(&k);
                }
                None => return false,
            }
        }
        if !models.contains_key(label) {
            models.insert(label.to_string(), State::default());
            self.tracked.store(models.len(), Ordering::Relaxed);
        }
        let state = models.get_mut(label).expect("inserted above");
        state.failures += 1;
        // After an opening, one more failure (the probe) opens it again.
        let needed = if state.opened > 0 { 1 } else { TRIP_AFTER };
        if state.failures < needed {
            return false;
        }
        let step = OPEN_FOR[(state.opened as usize).min(OPEN_FOR.len() - 1)];
        state.opened += 1;
        state.failures = 0;
        state.open_until = Some(Instant::now() + step);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_escalates_and_closes_on_success() {
        let b = Breakers::default();
        assert!(!b.failure("p/m") && !b.failure("p/m"));
        assert!(b.open_until("p/m").is_none());
        assert!(b.failure("p/m"), "the third opens it");
        assert!(b.open_until("p/m").is_some());
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(b.open_until("p/m").is_none(), "the probe goes through");
        assert!(b.failure("p/m"), "a failed probe opens it again");
        let until = b.open_until("p/m").unwrap();
        assert!(
            until - Instant::now() > Duration::from_millis(1500),
            "for longer"
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        b.success("p/m");
        assert!(!b.failure("p/m"), "closed: counting from scratch");
        assert!(b.open_until("other/m").is_none());
    }
}
