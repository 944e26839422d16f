//! Warnings that could repeat once per request or per connection (a full connection table, a failing disk) are
//! let through at most once per interval, with a count of what was held back in between.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Throttle {
    interval: Duration,
    /// When the last message went out, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// One message a minute.
    pub const fn per_minute() -> Self {
        Self::new(Duration::from_secs(60))
    }

    /// `Some(held back since the last one)` when a message may go out now; `None` (and counted) otherwise.
    pub fn ready(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let held = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_through_per_interval_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.ready(), Some(2));
    }
}
