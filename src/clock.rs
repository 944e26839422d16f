//! Wall-clock time derived from tokio's clock, so that tests with paused time move cooldowns and daily resets
//! exactly as they move timers.
//!
//! Key state is stamped in Unix milliseconds (it is persisted, and later shared between instances), while waits
//! use tokio's monotonic clock. A [`Clock`] ties the two together at one reference point.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Milliseconds since the Unix epoch.
pub type UnixMs = i64;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall_at_origin: UnixMs,
    origin: Instant,
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self::starting_at(wall)
    }

    /// A clock whose wall time reads `wall` now and advances with tokio's clock (tests pause and advance it).
    pub fn starting_at(wall: UnixMs) -> Self {
        Self {
            wall_at_origin: wall,
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> UnixMs {
        self.wall_at_origin + self.origin.elapsed().as_millis() as i64
    }

    /// The monotonic instant at which the wall clock will read `wall` (now, if that is in the past).
    pub fn instant_at(&self, wall: UnixMs) -> Instant {
        let ahead = (wall - self.now()).max(0) as u64;
        Instant::now() + Duration::from_millis(ahead)
    }

    /// The wall time at a monotonic instant.
    pub fn wall_at(&self, at: Instant) -> UnixMs {
        let now = Instant::now();
        if at >= now {
            self.now() + (at - now).as_millis() as i64
        } else {
            self.now() - (now - at).as_millis() as i64
        }
    }
}
