//! Work that can take long (script calls, token counting) runs on tokio's blocking threads, never on the async
//! workers that serve every other request, and at most one job per core at a time: more would only slow each
//! other down, and the bound keeps a flood of such work from spawning threads without end.

use std::sync::{Arc, OnceLock};
use tokio::sync::Semaphore;

fn permits() -> &'static Arc<Semaphore> {
    static PERMITS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Semaphore::new(cores.max(2)))
    })
}

/// Runs `job` off the async workers once a place is free, and returns its result. A job keeps its place until it
/// ends, even if the caller stops waiting; a panic in it is raised again in the caller.
pub async fn run<T, F>(job: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let permit = permits()
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
