//! Wiring: the key store and its usage file, the relay, the HTTP server, and graceful shutdown.

use crate::clock::Clock;
use crate::config::is_loopback;
use crate::http::{AppState, router};
use crate::keys::{KeyStore, MemoryStore, Persister, StorePolicy};
use crate::observe::Observatory;
use crate::observe::metrics::Metrics;
use crate::observe::request_log::{self, RequestLog};
use crate::relay::Relay;
use crate::reload::{Reloader, spawn_watcher};
use crate::snapshot::{LoadOptions, Snapshot};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
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
    #[error("cannot watch the configuration files: {0}")]
    Watch(notify::Error),
    #[error("cannot write request logs to {dir}: {source}")]
    RequestLog { dir: String, source: std::io::Error },
}

/// A server running in the background.
pub struct Running {
    pub addr: SocketAddr,
    pub relay: Relay,
    pub reloader: Option<Arc<Reloader>>,
    stop: CancellationToken,
    /// The result of the final usage write.
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (bounded by `shutdown_grace`), writes the usage file.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.stop.cancel();
        self.wait().await
    }

    /// A handle that stops the server when cancelled.
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until the server has stopped; an error when the final usage write failed.
    pub async fn wait(self) -> std::io::Result<()> {
        self.task
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

/// Starts serving `snapshot` on its host and port. With `reload`, the files it names are watched and every
/// valid change is applied live.
pub async fn start(
    snapshot: Snapshot,
    reload: Option<LoadOptions>,
    clock: Clock,
) -> Result<Running, StartError> {
    let settings = snapshot.settings.clone();
    let addr = format!("{}:{}", settings.host, settings.port);
    if snapshot.proxy_key.is_none() && !is_loopback(&settings.host) {
        return Err(StartError::OpenWithoutKey(addr));
    }
    // Every client connection is a file: as many as the system allows this process, and no more connections than
    // it can hold.
    let cap = settings
        .edge
        .connection_cap(crate::config::raise_open_file_limit());
    if let Some(why) = &cap.lowered {
        tracing::warn!("{why}");
    }
    // The trust anchors for HTTPS upstreams, read now rather than at the first request.
    if let Ok(Err(why)) = tokio::task::spawn_blocking(crate::upstream::load_trust_anchors).await {
        tracing::warn!("{why}: {}", https_upstreams(&snapshot));
    }
    let policy = StorePolicy {
        daily_reset: settings.daily_reset.clone(),
        pause: settings.provider_pause,
    };
    crate::keys::remove_leftovers(&settings.usage_path);
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
    use crate::conversations::Conversations;
    let mut conversations = Conversations::default();
    let store: Arc<dyn KeyStore> = match &settings.store {
        crate::config::Store::Memory => store,
        crate::config::Store::Redis {
            url,
            prefix,
            lease_ttl,
            ca,
            cluster,
        } => {
            use crate::keys::redis::{RedisStore, Target};
            match Target::new(url, ca.as_deref(), *cluster) {
                Ok(target) => {
                    let shared = RedisStore::connect(
                        target,
                        prefix,
                        clock,
                        policy.clone(),
                        store.clone(),
                        *lease_ttl,
                    )
                    .await;
                    tracing::info!(prefix = %prefix, cluster = *cluster, "key state shared through Redis");
                    conversations = Conversations::shared(shared.clone());
                    shared
                }
                Err(e) => {
                    // Only a URL the client cannot use gets here; config.yaml's check refuses those first.
                    tracing::error!(error = %e, "the Redis URL cannot be used: key state stays in this process");
                    store
                }
            }
        }
    };
    let metrics = Arc::new(Metrics::default());
    let request_log = match &settings.request_logging {
        Some(logging) => Some(
            RequestLog::start(
                &logging.dir,
                request_log::Limits {
                    max_file_bytes: logging.max_file_bytes,
                    max_total_bytes: logging.max_total_bytes,
                    max_files: 100_000,
                },
            )
            .map_err(|source| StartError::RequestLog {
                dir: logging.dir.display().to_string(),
                source,
            })?,
        ),
        None => None,
    };
    let observer = Arc::new(Observatory {
        metrics: metrics.clone(),
        request_log,
    });
    let closing = CancellationToken::new();
    let relay = Relay::new(config.clone(), store.clone(), clock)
        .with_observer(observer)
        .with_closing(closing.clone());
    let stop = CancellationToken::new();
    let reloader = match reload {
        Some(opts) => {
            let reloader = Arc::new(Reloader::new(opts, config, store, clock));
            spawn_watcher(reloader.clone(), stop.clone()).map_err(StartError::Watch)?;
            Some(reloader)
        }
        None => None,
    };
    let app = router(AppState::new(crate::http::App {
        relay: relay.clone(),
        started: std::time::Instant::now(),
        reloader: reloader.clone(),
        metrics,
        conversations: Arc::new(conversations),
    }));
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(persister.run(settings.usage_flush, writer_stop.clone()));

    let signals = crate::http::Signals {
        stop: stop.clone(),
        closing,
        grace: settings.shutdown_grace,
    };
    let task = tokio::spawn(async move {
        crate::http::serve(listener, app, settings.edge, signals).await;
        // The writer finishes any write in progress, then writes the final state.
        writer_stop.cancel();
        writer
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    });
    Ok(Running {
        addr: local,
        relay,
        reloader,
        stop,
        task,
    })
}

/// Which providers a missing trust store stops, for the warning that says so.
fn https_upstreams(snapshot: &Snapshot) -> String {
    let https: Vec<String> = snapshot
        .providers
        .values()
        .filter(|p| {
            p.base_url
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        })
        .map(|p| format!("{} ({})", p.name, crate::upstream::public_url(&p.base_url)))
        .collect();
    match https.len() {
        0 => "no provider is reached over HTTPS now; http:// upstreams never need TLS".into(),
        _ => format!(
            "this stops the providers reached over HTTPS: {}; http:// upstreams never need TLS",
            https.join(", ")
        ),
    }
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
