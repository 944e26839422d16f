//! Work that can take long runs on tokio's blocking threads, never on the async workers that serve every other
//! request, and at most one job per core at a time in each of two pools: more would only slow each other down,
//! and the bound keeps a flood of such work from spawning threads without end. Provider scripts have a pool of
//! their own, so that clients' bulk work (token counts, large bodies) never holds up the mapping of answers.

use std::sync::{Arc, OnceLock};
use tokio::sync::Semaphore;

/// Which pool a job runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Provider script calls (each bounded by its budget).
    Scripts,
    /// Work a client's request asks for: counting tokens, parsing a large body.
    Requests,
}

fn permits(pool: Pool) -> &'static Arc<Semaphore> {
    static POOLS: OnceLock<[Arc<Semaphore>; 2]> = OnceLock::new();
    let pools = POOLS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pool = || Arc::new(Semaphore::new(cores.max(2)));
        [pool(), pool()]
    });
    &pools[pool as usize]
}

/// Runs `job` off the async workers once a place is free in `pool`, and returns its result. A job keeps its
/// place until it ends, even if the caller stops waiting; a panic in it is raised again in the caller.
pub async fn run<T, F>(pool: Pool, job: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let permit = permits(pool)
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let done = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        job()
    });
    match done.await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
