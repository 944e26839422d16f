//! Conversations shared between instances through the key store's Redis: each whole, as the text kept in
//! process, under its id for `max_age` (`{prefix}:conversation:<id>`). Redis away: nothing is written or found
//! there.
//!
//! What one instance writes is bounded as what it keeps (`responses.max_entries`, `max_size`): it accounts its
//! writes in Redis, in two keys of one hash slot, `{prefix:conversations:<instance>}:order` (the ids it wrote,
//! scored by when) and `…:sizes` (their sizes, and their sum under `""`), and removes its oldest conversations
//! beyond the bounds as it writes a new one. A conversation is written first and accounted right after, so
//! none is left unaccounted by a race between two writes; the account lives as long as what it counts
//! (`max_age` from its last write). An instance that restarts starts a new account: what the previous run
//! wrote goes with its age.

use crate::config::ResponsesStore;
use crate::conversations::Conversation;
use crate::keys::redis::RedisStore;
use std::sync::{Arc, LazyLock};

/// Accounts a conversation just written and returns the ids to remove: those beyond the bounds, oldest first.
/// KEYS: order, sizes. ARGV: id, its size, max age (ms), max entries, max bytes. Entries older than the max
/// age are gone from Redis already and are only forgotten.
static ACCOUNT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local order, sizes = KEYS[1], KEYS[2]
local id, size, age = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_entries, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local total = tonumber(redis.call('HGET', sizes, '') or '0')
local function forget(gone)
  total = total - tonumber(redis.call('HGET', sizes, gone) or '0')
  redis.call('HDEL', sizes, gone)
  redis.call('ZREM', order, gone)
end
for _, old in ipairs(redis.call('ZRANGEBYSCORE', order, '-inf', now - age)) do forget(old) end
if redis.call('ZSCORE', order, id) then forget(id) end
redis.call('ZADD', order, now, id)
redis.call('HSET', sizes, id, size)
total = total + size
local removed = {}
while total > max_bytes or redis.call('ZCARD', order) > max_entries do
  local oldest = redis.call('ZRANGE', order, 0, 0)[1]
  if not oldest then break end
  forget(oldest)
  removed[#removed + 1] = oldest
end
if total < 0 then total = 0 end
redis.call('HSET', sizes, '', total)
redis.call('PEXPIRE', order, age)
redis.call('PEXPIRE', sizes, age)
return removed
"#,
    )
});

/// Reads a conversation no larger than ARGV[1] bytes. KEYS: the conversation.
static FETCH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local size = redis.call('STRLEN', KEYS[1])
if size == 0 or size > tonumber(ARGV[1]) then return false end
return redis.call('GET', KEYS[1])
"#,
    )
});

fn key(prefix: &str, id: &str) -> String {
    format!("{prefix}:conversation:{id}")
}

/// The keys of this instance's account of what it wrote: the ids by time, and their sizes.
pub fn account(prefix: &str, instance: &str) -> [String; 2] {
    let tag = format!("{{{prefix}:conversations:{instance}}}");
    [format!("{tag}:order"), format!("{tag}:sizes")]
}

/// Writes `conversation` under `id` for `limits.max_age`, accounts it, and removes what this instance wrote
/// beyond `limits`, in the background.
pub fn put(
    store: &Arc<RedisStore>,
    id: &str,
    conversation: &Conversation,
    limits: &ResponsesStore,
) {
    let Some((mut conn, prefix)) = store.beside() else {
        return;
    };
    let [order, sizes] = account(prefix, store.instance());
    let (name, id, prefix) = (key(prefix, id), id.to_string(), prefix.to_string());
    // Accounted as in process: its text and an entry's bookkeeping.
    let (conversation, size, limits) = (conversation.clone(), conversation.cost(), *limits);
    let age_ms = limits.max_age.as_millis().clamp(1, i64::MAX as u128) as i64;
    tokio::spawn(async move {
        let written = async {
            redis::cmd("SET")
                .arg(&name)
                .arg(conversation.json())
                .arg("PX")
                .arg(age_ms)
                .query_async::<()>(&mut conn)
                .await?;
            drop(conversation);
            let removed: Vec<String> = ACCOUNT
                .key(&order)
                .key(&sizes)
                .arg(&id)
                .arg(size)
                .arg(age_ms)
                .arg(limits.max_entries)
                .arg(limits.max_bytes)
                .invoke_async(&mut conn)
                .await?;
            // One at a time: in a Cluster, each lives in a slot of its own.
            for gone in removed {
                redis::cmd("UNLINK")
                    .arg(key(&prefix, &gone))
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            redis::RedisResult::Ok(())
        };
        if let Err(e) = written.await {
            tracing::warn!(error = %e, "a Responses conversation could not be shared through Redis");
        }
    });
}

/// What is kept under `id`, if anything no larger than `max_bytes`.
pub async fn fetch(store: &RedisStore, id: &str, max_bytes: usize) -> Option<Vec<u8>> {
    let (mut conn, prefix) = store.beside()?;
    FETCH
        .key(key(prefix, id))
        .arg(max_bytes)
        .invoke_async::<Option<Vec<u8>>>(&mut conn)
        .await
        .ok()
        .flatten()
}
