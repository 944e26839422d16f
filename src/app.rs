//! Wiring: the key store and its usage file, the relay, the HTTP server, and graceful shutdown.

use crate::clock::Clock;
use crate::http::{AppState, router};
use crate::keys::{KeyStore, MemoryStore, Persister, StorePolicy};
use crate::relay::Relay;
use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "refusing to listen on {0} without PROXY_API_KEY: anyone who can reach it could spend your keys (set PROXY_API_KEY or use --host 127.0.0.1)"
    )]
    OpenWithoutKey(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(#[from] crate::keys::UsageFileError),
}

/// Whether `host` only accepts connections from this machine.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A server running in the background.
pub struct Running {
    pub addr: SocketAddr,
    pub relay: Relay,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (bounded by `shutdown_grace`), writes the usage file.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// A handle that stops the server when cancelled.
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Starts serving `snapshot` on its host and port.
pub async fn start(snapshot: Snapshot, clock: Clock) -> Result<Running, StartError> {
    let settings = snapshot.settings.clone();
    let addr = format!("{}:{}", settings.host, settings.port);
    if snapshot.proxy_key.is_none() && !is_loopback(&settings.host) {
        return Err(StartError::OpenWithoutKey(addr));
    }
    let policy = StorePolicy {
        daily_reset: settings.daily_reset.clone(),
        pause: settings.provider_pause,
    };
    let state = match crate::keys::load_usage(&settings.usage_path) {
        Ok(state) => state,
        Err(e @ crate::keys::UsageFileError::Invalid { .. }) => {
            let aside = settings
                .usage_path
                .with_extension(format!("corrupt-{}", clock.now() / 1000));
            tracing::warn!(error = %e, moved_to = %aside.display(), "starting with empty usage");
            std::fs::rename(&settings.usage_path, &aside).map_err(|source| {
                crate::keys::UsageFileError::Read {
                    path: settings.usage_path.clone(),
                    source,
                }
            })?;
            Default::default()
        }
        Err(e) => return Err(e.into()),
    };
    let store = Arc::new(MemoryStore::with_state(clock, policy.clone(), state));
    store.configure(policy);
    let persister = Arc::new(Persister::new(store.clone(), settings.usage_path.clone()));

    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;

    let config = Arc::new(ArcSwap::from_pointee(snapshot));
    let relay = Relay::new(config, store as Arc<dyn KeyStore>, clock);
    let app = router(AppState {
        relay: relay.clone(),
        started: std::time::Instant::now(),
    });
    let stop = CancellationToken::new();
    let writer = tokio::spawn(persister.clone().run(settings.usage_flush));

    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let server =
                axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
            let grace = async {
                stop.cancelled().await;
                tokio::time::sleep(settings.shutdown_grace).await;
            };
            tokio::select! {
                result = server => {
                    if let Err(e) = result {
                        tracing::error!(error = %e, "the server stopped with an error");
                    }
                }
                _ = grace => tracing::warn!(
                    grace = ?settings.shutdown_grace,
                    "in-flight requests did not finish in time; closing them"
                ),
            }
            writer.abort();
            if let Err(e) = persister.flush().await {
                tracing::error!(error = %e, "cannot write the usage file on shutdown");
            }
        })
    };
    Ok(Running {
        addr: local,
        relay,
        stop,
        task,
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
