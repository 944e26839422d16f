//! Wall-clock time derived from tokio's clock, so that tests with paused time move cooldowns and daily resets
//! exactly as they move timers.
//!
//! Key state is stamped in Unix milliseconds (it is persisted, and later shared between instances), while waits
//! use tokio's monotonic clock. A [`Clock`] ties the two together at one reference point. A manual clock, whose
//! time moves only when told, lets a test feed two stores the very same times (a store on Redis cannot run on
//! paused time: its network waits would time out at once).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Milliseconds since the Unix epoch.
pub type UnixMs = i64;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    source: Source,
}

#[derive(Clone, Copy, Debug)]
enum Source {
    /// The wall time at one instant of tokio's clock, advancing with it.
    Tokio {
        wall_at_origin: UnixMs,
        origin: Instant,
    },
    /// Whatever the cell says.
    Manual(&'static AtomicI64),
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
            source: Source::Tokio {
                wall_at_origin: wall,
                origin: Instant::now(),
            },
        }
    }

    /// A clock that reads `cell` and moves only when `cell` is changed (for tests and simulations).
    pub fn manual(cell: &'static AtomicI64) -> Self {
        Self {
            source: Source::Manual(cell),
        }
    }

    pub fn now(&self) -> UnixMs {
        match self.source {
            Source::Tokio {
                wall_at_origin,
                origin,
            } => wall_at_origin + origin.elapsed().as_millis() as i64,
            Source::Manual(cell) => cell.load(Ordering::Relaxed),
        }
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
