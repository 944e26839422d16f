//! Conversations shared between instances through the key store's Redis: each whole, under its id, for
//! `max_age` (`{prefix}:conversation:<id>`). Redis away: nothing is written or found there.

use crate::keys::redis::RedisStore;
use std::sync::Arc;
use std::time::Duration;

/// Writes `value` under `id` for `ttl`, in the background.
pub fn put(store: &Arc<RedisStore>, id: &str, value: Vec<u8>, ttl: Duration) {
    let Some((mut conn, prefix)) = store.beside() else {
        return;
    };
    let key = format!("{prefix}:conversation:{id}");
    tokio::spawn(async move {
        let written = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async::<()>(&mut conn)
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "a Responses conversation could not be shared through Redis");
        }
    });
}

/// What is kept under `id`, if anything.
pub async fn fetch(store: &RedisStore, id: &str) -> Option<Vec<u8>> {
    let (mut conn, prefix) = store.beside()?;
    let key = format!("{prefix}:conversation:{id}");
    redis::cmd("GET")
        .arg(key)
        .query_async::<Option<Vec<u8>>>(&mut conn)
        .await
        .ok()
        .flatten()
}
