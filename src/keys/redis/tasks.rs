//! The store's background tasks: hearing from other instances that a key may be free, and renewing the leases
//! this instance holds.

use super::{RedisStore, lock};
use crate::clock::UnixMs;
use crate::keys::KeyStore;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Wakes this instance's waiting requests when another instance says a key of their provider may be free:
/// one subscription per instance, no polling. Resubscribes after a lost connection.
pub(super) async fn listen(store: std::sync::Weak<RedisStore>) {
    use futures_util::StreamExt;
    loop {
        let (channel, client) = match store.upgrade() {
            Some(s) => (s.channel(), s.target.subscriber().clone()),
            None => return,
        };
        if let Ok(mut pubsub) = client.get_async_pubsub().await
            && pubsub.subscribe(&channel).await.is_ok()
        {
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let Some(store) = store.upgrade() else {
                    return;
                };
                if let Ok(provider) = message.get_payload::<String>() {
                    store.local.wakeup(&provider).notify_waiters();
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Renews the leases held, every third of their lifetime, while the store lives.
pub(super) async fn renew(store: std::sync::Weak<RedisStore>) {
    loop {
        let ttl = match store.upgrade() {
            Some(s) => s.lease_ttl,
            None => return,
        };
        tokio::time::sleep(ttl / 3).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        // Per provider: a Cluster keeps each provider's leases in one slot.
        let mut by_provider: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for h in lock(&store.held).values() {
            by_provider
                .entry(h.provider.clone())
                .or_default()
                .push(h.member.clone());
        }
        let expiry = store.clock.now() + store.lease_ttl.as_millis() as UnixMs;
        for (provider, held) in &by_provider {
            for members in held.chunks(1000) {
                let mut invocation = store.scripts.renew.prepare_invoke();
                invocation
                    .key(store.leases(provider))
                    .arg(expiry)
                    .arg(members);
                let renewed = match store.conn() {
                    Ok(mut conn) => invocation.invoke_async::<i64>(&mut conn).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = renewed {
                    tracing::warn!(error = %e, "renewing leases in Redis failed");
                }
            }
        }
    }
}
