//! The usage file: key state written atomically (temporary file, fsync, rename) at most one flush interval after
//! a change, and once more on shutdown. Keys appear by hash and masked form only.

use super::memory::{MemoryStore, State};
use crate::clock::UnixMs;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Bumped on any incompatible change to the file's layout.
pub const USAGE_FILE_VERSION: u32 = 1;

#[derive(Serialize)]
struct FileOut<'a> {
    version: u32,
    saved_at: UnixMs,
    #[serde(flatten)]
    state: &'a State,
}

#[derive(Deserialize)]
struct FileIn {
    version: u32,
    #[serde(flatten)]
    state: State,
}

#[derive(Debug, thiserror::Error)]
pub enum UsageFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a keyrelay usage file ({reason})")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{path}: usage file version {found} is not supported (this keyrelay writes version {USAGE_FILE_VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
}

/// Reads the usage file; a missing file is an empty state.
pub fn load(path: &Path) -> Result<State, UsageFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(source) => {
            return Err(UsageFileError::Read {
                path: path.into(),
                source,
            });
        }
    };
    let file: FileIn = serde_json::from_slice(&bytes).map_err(|e| UsageFileError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if file.version != USAGE_FILE_VERSION {
        return Err(UsageFileError::Version {
            path: path.into(),
            found: file.version,
        });
    }
    Ok(file.state)
}

/// Removes temporary files a write interrupted by a crash left beside the usage file (`.key_usage.json.*.tmp`).
pub fn remove_leftovers(path: &Path) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if file.starts_with(&prefix) && file.ends_with(".tmp") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %file, "removed a temporary usage file left by an interrupted write")
                }
                Err(e) => {
                    tracing::warn!(file = %file, error = %e, "cannot remove a leftover temporary usage file")
                }
            }
        }
    }
}

/// Writes `bytes` to `path` so that a reader (or a crash at any moment) sees either the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::files::create_dir_all(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("key_usage.json");
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
    let result = (|| {
        let mut file = crate::files::create_new(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the store's state to the usage file after changes.
pub struct Persister {
    store: Arc<MemoryStore>,
    path: PathBuf,
    /// One write at a time, so that the newest state is also the last one written.
    writing: tokio::sync::Mutex<()>,
}

impl Persister {
    pub fn new(store: Arc<MemoryStore>, path: PathBuf) -> Self {
        Self {
            store,
            path,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// Writes the current state now.
    pub async fn flush(&self) -> std::io::Result<()> {
        let _one_at_a_time = self.writing.lock().await;
        let saved_at = self.store.clock().now();
        let state = self.store.export();
        let path = self.path.clone();
        // Awaited even if the caller is cancelled meanwhile: the guard is held until the blocking write ends.
        tokio::task::spawn_blocking(move || {
            let out = FileOut {
                version: USAGE_FILE_VERSION,
                saved_at,
                state: &state,
            };
            let bytes = serde_json::to_vec_pretty(&out).map_err(std::io::Error::other)?;
            write_atomically(&path, &bytes)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Writes after each change, letting changes gather for `interval`, until `stop`; then writes once more and
    /// returns how that last write went.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.store.changed().notified() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.flush().await {
                tracing::error!(path = %self.path.display(), error = %e, "cannot write the usage file");
            }
        }
        let last = self.flush().await;
        if let Err(e) = &last {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the usage file on shutdown");
        }
        last
    }
}
