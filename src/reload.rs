//! Live configuration: rebuild, validate, swap — triggered by file changes or SIGHUP.
//!
//! The watcher only signals; [`Reloader::reload`] is the one path that does the work. It builds a complete new
//! [`Snapshot`] with the same code as start-up and `keyrelay check`, and publishes it only when every file is
//! valid. Requests already running keep the snapshot they started with. Key state lives in the store, keyed by
//! key hash, so a key that stays configured keeps its usage, leases, cooldowns and streak.

use crate::clock::{Clock, UnixMs};
use crate::keys::{KeyStore, StorePolicy};
use crate::snapshot::{LoadOptions, Snapshot};
use arc_swap::ArcSwap;
use notify::{EventKind, RecursiveMode, Watcher};
use serde::Serialize;
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events closer together than this are one change (editors write a file in several steps).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What `GET /` reports about the configuration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadStatus {
    pub generation: u64,
    pub loaded_at: UnixMs,
    /// Why the newest files were rejected, while the previous configuration keeps serving.
    pub last_error: Option<String>,
    pub last_error_at: Option<UnixMs>,
    /// Reloads rejected since start.
    pub failures: u64,
}

pub struct Reloader {
    opts: LoadOptions,
    config: Arc<ArcSwap<Snapshot>>,
    store: Arc<dyn KeyStore>,
    clock: Clock,
    /// The host the server listens on (fixed until a restart).
    host: String,
    /// Which inputs existed at start (config.yaml, the env file, the providers and plugins directories): a
    /// reload that finds one gone is refused.
    present_at_start: [bool; 4],
    status: Mutex<ReloadStatus>,
    /// One reload at a time; a signal arriving meanwhile leads to one more afterwards.
    busy: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        opts: LoadOptions,
        config: Arc<ArcSwap<Snapshot>>,
        store: Arc<dyn KeyStore>,
        clock: Clock,
    ) -> Self {
        let current = config.load();
        let status = ReloadStatus {
            generation: current.generation,
            loaded_at: current.loaded_at,
            ..Default::default()
        };
        let present_at_start = inputs(&opts, &current).map(|p| p.exists());
        let host = current.settings.host.clone();
        drop(current);
        Self {
            opts,
            config,
            store,
            clock,
            host,
            present_at_start,
            status: Mutex::new(status),
            busy: tokio::sync::Mutex::new(()),
        }
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rebuilds the configuration from the files and publishes it if it is valid. Returns whether a new snapshot
    /// was published. `confirmed` (SIGHUP) accepts a configuration that narrows the running one on purpose (see
    /// [`narrowing`]).
    pub async fn reload(&self, confirmed: bool) -> bool {
        let _one_at_a_time = self.busy.lock().await;
        let opts = self.opts.clone();
        let built = tokio::task::spawn_blocking(move || Snapshot::load(&opts)).await;
        let old = self.config.load_full();
        let refused = |new: &Snapshot| {
            self.refusal(new).or_else(|| {
                let narrowing = narrowing(&old, new);
                (!confirmed && !narrowing.is_empty()).then(|| {
                    format!(
                        "the new configuration {}; keeping the running one (if this is meant, send SIGHUP to keyrelay, or restart it)",
                        narrowing.join(", and ")
                    )
                })
            })
        };
        let mut new = match built {
            Ok(Ok(new)) => match refused(&new) {
                None => new,
                Some(why) => {
                    self.reject(why, old.generation);
                    return false;
                }
            },
            Ok(Err(errors)) => {
                self.reject(errors.to_string(), old.generation);
                return false;
            }
            Err(panic) => {
                self.reject(
                    format!("the reload failed unexpectedly: {panic}"),
                    old.generation,
                );
                return false;
            }
        };
        let changes = describe_changes(&old, &new);
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_error = None;
        status.last_error_at = None;
        if changes.is_empty() {
            tracing::debug!("configuration files touched but nothing changed");
            return false;
        }
        let (a, b) = (&old.settings, &new.settings);
        let at_restart = [
            ("host", a.host != b.host),
            ("port", a.port != b.port),
            (
                "usage",
                a.usage_path != b.usage_path || a.usage_flush != b.usage_flush,
            ),
            ("request_logging", a.request_logging != b.request_logging),
            ("shutdown_grace", a.shutdown_grace != b.shutdown_grace),
            ("store", a.store != b.store),
            (
                "server (connections)",
                a.edge.max_connections != b.edge.max_connections
                    || a.edge.header_timeout != b.edge.header_timeout
                    || a.edge.idle_timeout != b.edge.idle_timeout
                    || a.edge.write_timeout != b.edge.write_timeout,
            ),
        ];
        let pending: Vec<&str> = at_restart
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| *name)
            .collect();
        if !pending.is_empty() {
            tracing::warn!(
                "changes to {} take effect after a restart",
                pending.join(", ")
            );
        }
        if a.edge.max_connections != b.edge.max_connections
            && let Some(why) = b
                .edge
                .connection_cap(crate::config::raise_open_file_limit())
                .lowered
        {
            tracing::warn!("at the next start: {why}");
        }
        new.generation = old.generation + 1;
        new.loaded_at = self.clock.now();
        self.store.configure(StorePolicy {
            daily_reset: new.settings.daily_reset.clone(),
            pause: new.settings.provider_pause,
        });
        let live = live_keys(&new);
        let removed: HashSet<_> = live_keys(&old)
            .into_iter()
            .filter(|k| !live.contains(k))
            .collect();
        status.generation = new.generation;
        status.loaded_at = new.loaded_at;
        for warning in new.warnings.iter().filter(|w| !old.warnings.contains(w)) {
            tracing::warn!("{warning}");
        }
        tracing::info!(
            generation = new.generation,
            "configuration reloaded: {}",
            changes.join("; ")
        );
        // Publish first, then retire: no new request can pick a removed key from the new snapshot, and the
        // store refuses it to requests still running on the old one.
        self.config.store(Arc::new(new));
        self.store.retire(&removed, &live);
        true
    }

    /// Why a valid configuration must still not be published: it would open the proxy to anyone, or an input
    /// has vanished (a checkout or sync under way, most likely) and serving without it would drop providers or
    /// keys.
    fn refusal(&self, new: &Snapshot) -> Option<String> {
        if new.proxy_key.is_none() && !crate::config::is_loopback(&self.host) {
            return Some(format!(
                "PROXY_API_KEY is no longer set while keyrelay listens on {}: that would let anyone use it; keeping the running configuration (restore the key, or restart on a loopback host)",
                self.host
            ));
        }
        // Each input that was there at start must be there now (a directory where the new config.yaml puts it).
        let missing: Vec<String> = inputs(&self.opts, new)
            .iter()
            .zip(self.present_at_start)
            .filter(|(path, was)| *was && !path.exists())
            .map(|(path, _)| path.display().to_string())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "{} no longer exist{}; keeping the running configuration until {} back",
                missing.join(", "),
                if missing.len() == 1 { "s" } else { "" },
                if missing.len() == 1 {
                    "it is"
                } else {
                    "they are"
                }
            )
        })
    }

    fn reject(&self, error: String, serving: u64) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.last_error.as_deref() != Some(error.as_str()) {
            tracing::error!(
                serving_generation = serving,
                "configuration rejected, the previous one keeps serving:\n{error}"
            );
        }
        status.last_error = Some(error);
        status.failures += 1;
        status.last_error_at = Some(self.clock.now());
    }

    /// The directories whose changes trigger a reload.
    fn watched_dirs(&self) -> BTreeSet<PathBuf> {
        let snapshot = self.config.load();
        let dir_of = |file: &Path| match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        [
            dir_of(&self.opts.config),
            dir_of(&self.opts.env_file),
            snapshot.settings.providers_dir.clone(),
            snapshot.settings.plugins_dir.clone(),
        ]
        .into_iter()
        .filter(|d| d.is_dir())
        .collect()
    }

    /// Whether a change at `path` may change the configuration: `config.yaml`, the env file, a provider file, a
    /// script, either directory itself, or an entry of a Kubernetes-style atomic swap (`..data`). Logs, the usage
    /// file and anything else written beside them are not.
    fn is_input(&self, path: &Path) -> bool {
        let snapshot = self.config.load();
        let s = &snapshot.settings;
        // Most events are keyrelay's own writes (the usage file, logs): told apart by name alone, before paths
        // are made absolute and compared.
        let named = |p: &Path| p.file_name() == path.file_name();
        let extension = path.extension().and_then(|e| e.to_str());
        let maybe = [
            &self.opts.config,
            &self.opts.env_file,
            &s.providers_dir,
            &s.plugins_dir,
        ]
        .iter()
        .any(|input| named(input))
            || matches!(extension, Some("yaml" | "yml" | "rhai"))
            || path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("..") && n != "..");
        if !maybe {
            return false;
        }
        // The watcher reports absolute paths (`/srv/./config.yaml` for a watched `.`): compare absolute paths
        // without `.` components.
        let plain = |p: &Path| -> PathBuf {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect()
        };
        let path = plain(path);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let in_dir = |dir: &Path| path.parent() == Some(plain(dir).as_path());
        [
            &self.opts.config,
            &self.opts.env_file,
            &s.providers_dir,
            &s.plugins_dir,
        ]
        .iter()
        .any(|input| path == plain(input))
            || (in_dir(&s.providers_dir) && matches!(extension, Some("yaml" | "yml")))
            || (in_dir(&s.plugins_dir) && extension == Some("rhai"))
            || (name.starts_with("..") && name != "..")
    }
}

/// The inputs a configuration is read from: config.yaml, the env file, the providers and plugins directories.
fn inputs<'a>(opts: &'a LoadOptions, snapshot: &'a Snapshot) -> [&'a Path; 4] {
    [
        &opts.config,
        &opts.env_file,
        &snapshot.settings.providers_dir,
        &snapshot.settings.plugins_dir,
    ]
}

/// How `new` narrows `old` in ways a file being rewritten, synced or unmounted produces by accident: served only
/// when the operator confirms it.
pub fn narrowing(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    if old.proxy_key.is_some() && new.proxy_key.is_none() {
        out.push(
            "has no PROXY_API_KEY: the proxy would be open to anyone who can reach it".to_string(),
        );
    }
    let from_files = |s: &Snapshot| s.providers.values().filter(|p| p.source.is_some()).count();
    if from_files(old) > 0 && from_files(new) == 0 {
        out.push("has no provider file left".to_string());
    }
    let generic: Vec<&str> = new
        .providers
        .iter()
        .filter(|(name, p)| {
            p.source.is_none() && old.providers.get(*name).is_some_and(|o| o.source.is_some())
        })
        .map(|(name, _)| name.as_str())
        .collect();
    if !generic.is_empty() {
        out.push(format!(
            "serves {} as a generic OpenAI-compatible provider (its file is gone, its <NAME>_API_BASE remains)",
            generic.join(", ")
        ));
    }
    out
}

/// Every key id in a snapshot.
pub fn live_keys(snapshot: &Snapshot) -> HashSet<crate::secret::KeyId> {
    snapshot
        .providers
        .values()
        .flat_map(|p| p.keys.iter().map(|k| k.id.clone()))
        .collect()
}

/// One line per kind of change, keys masked; empty when nothing changed.
fn describe_changes(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let added: Vec<&str> = new
        .providers
        .keys()
        .filter(|n| !old.providers.contains_key(*n))
        .map(String::as_str)
        .collect();
    let removed: Vec<&str> = old
        .providers
        .keys()
        .filter(|n| !new.providers.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !added.is_empty() {
        out.push(format!("providers added: {}", added.join(", ")));
    }
    if !removed.is_empty() {
        out.push(format!("providers removed: {}", removed.join(", ")));
    }
    for (name, p) in &new.providers {
        let Some(before) = old.providers.get(name) else {
            continue;
        };
        if before.fingerprint != p.fingerprint {
            out.push(format!("provider {name} changed"));
        }
        let had: HashSet<_> = before.keys.iter().map(|k| &k.id).collect();
        let has: HashSet<_> = p.keys.iter().map(|k| &k.id).collect();
        let plus: Vec<&str> = p
            .keys
            .iter()
            .filter(|k| !had.contains(&k.id))
            .map(|k| &*k.masked)
            .collect();
        let minus: Vec<&str> = before
            .keys
            .iter()
            .filter(|k| !has.contains(&k.id))
            .map(|k| &*k.masked)
            .collect();
        if !plus.is_empty() {
            out.push(format!("{name} keys added: {}", plus.join(" ")));
        }
        if !minus.is_empty() {
            out.push(format!("{name} keys removed: {}", minus.join(" ")));
        }
    }
    if format!("{:?}", old.settings) != format!("{:?}", new.settings) {
        out.push("settings changed".into());
    }
    if old.proxy_key != new.proxy_key {
        out.push("proxy key changed".into());
    }
    out
}

/// Watches the configuration directories and reloads on change or SIGHUP, until `stop`.
pub fn spawn_watcher(
    reloader: Arc<Reloader>,
    stop: CancellationToken,
) -> Result<(), notify::Error> {
    // One pending signal is enough: the reload reads everything anew. A SIGHUP among them confirms it.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let confirmed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let filter = reloader.clone();
    let events = tx.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        // Some backends report an overflow without paths: reload to be safe.
        if !event.paths.is_empty() && !event.paths.iter().any(|p| filter.is_input(p)) {
            return;
        }
        let _ = events.try_send(());
    })?;
    let mut watching = BTreeSet::new();
    rewatch(&mut watcher, &mut watching, reloader.watched_dirs());

    #[cfg(unix)]
    {
        let stop = stop.clone();
        let tx = tx.clone();
        let confirmed = confirmed.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = hup.recv() => {
                        if got.is_none() || tx.is_closed() { return }
                        confirmed.store(true, std::sync::atomic::Ordering::Relaxed);
                        let _ = tx.try_send(());
                    }
                }
            }
        });
    }
    drop(tx);

    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = rx.recv() => if got.is_none() { return },
            }
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            let confirmed = confirmed.swap(false, std::sync::atomic::Ordering::Relaxed);
            reloader.reload(confirmed).await;
            // Directories may have been replaced (symlink swaps) or renamed in settings: watch what is there now.
            rewatch(&mut watcher, &mut watching, reloader.watched_dirs());
        }
    });
    Ok(())
}

fn rewatch(
    watcher: &mut notify::RecommendedWatcher,
    watching: &mut BTreeSet<PathBuf>,
    wanted: BTreeSet<PathBuf>,
) {
    for dir in watching.iter() {
        let _ = watcher.unwatch(dir);
    }
    watching.clear();
    for dir in wanted {
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watching.insert(dir);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a configuration directory")
            }
        }
    }
}
