//! Tests wait for conditions, not for time: one polling helper, in its async and blocking forms. (Self-contained:
//! `support/redis.rs`, which the store bench includes on its own, brings this file with it.)

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How long a test waits for something to happen before it fails. Everything a test waits for happens well
/// within it; the bound only ends a failing test.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How often a waiting test looks again.
const POLL: Duration = Duration::from_millis(20);

/// Tests wait for conditions, not for time: polls `check` until it holds, for at most [`PATIENCE`]; panics naming
/// `what` when it never does.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(PATIENCE, what, || {
        let checked = check();
        async move { checked.await.then_some(()) }
    })
    .await
}

/// [`eventually`] for a value: polls `find` until it returns one, and returns it.
pub async fn eventually_some<T, F, Fut>(what: &str, find: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(PATIENCE, what, find).await
}

/// [`eventually_some`] with its own bound, for what the code under test itself only does every few seconds.
pub async fn eventually_within<T, F, Fut>(bound: Duration, what: &str, mut find: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + bound;
    loop {
        if let Some(found) = find().await {
            return found;
        }
        assert!(
            Instant::now() < until,
            "waited {bound:?} in vain for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually_some`] outside async code (a harness starting a server, a std thread).
pub fn eventually_blocking<T>(what: &str, mut find: impl FnMut() -> Option<T>) -> T {
    let until = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(found) = find() {
            return found;
        }
        assert!(
            std::time::Instant::now() < until,
            "waited {PATIENCE:?} in vain for {what}"
        );
        std::thread::sleep(POLL);
    }
}
