//! Request logging (`--enable-request-logging`): one JSON file per request under `logs/` with the client's
//! request, every upstream attempt (masked key, status, latency, error class, the upstream's error body) and the
//! response or stream transcript. Headers are never recorded, keys appear only masked. Each file is capped, and
//! the oldest files are deleted when the directory grows past its budget, so a busy proxy cannot fill the disk.
//! Files are written by a background thread, off the request path.

use super::Journal;
use serde_json::Value;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Bodies are shortened so that one file stays under this size.
    pub max_file_bytes: usize,
    /// The oldest files are deleted beyond this total.
    pub max_total_bytes: u64,
    pub max_files: usize,
}

pub struct RequestLog {
    tx: mpsc::SyncSender<Journal>,
}

impl RequestLog {
    /// Starts the writer for `dir` (created if missing).
    pub fn start(dir: &Path, limits: Limits) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (tx, rx) = mpsc::sync_channel::<Journal>(1024);
        let mut writer = Writer::new(dir.to_path_buf(), limits)?;
        std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || {
                for journal in rx {
                    if let Err(e) = writer.write(journal) {
                        tracing::error!(error = %e, "cannot write a request log file");
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Queues a journal; under overload (the writer 1,024 files behind) it is dropped rather than slowing
    /// requests.
    pub fn write(&self, journal: Journal) {
        if self.tx.try_send(journal).is_err() {
            tracing::warn!("request log writer is behind; a request log was dropped");
        }
    }
}

struct Writer {
    dir: PathBuf,
    limits: Limits,
    /// Files written (or found at start), oldest first, with their sizes.
    files: VecDeque<(PathBuf, u64)>,
    total: u64,
}

impl Writer {
    fn new(dir: PathBuf, limits: Limits) -> std::io::Result<Self> {
        let mut existing: Vec<(PathBuf, u64)> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
            .collect();
        existing.sort();
        let total = existing.iter().map(|(_, n)| n).sum();
        Ok(Self {
            dir,
            limits,
            files: existing.into(),
            total,
        })
    }

    fn write(&mut self, mut journal: Journal) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(&journal).unwrap_or_default();
        if bytes.len() > self.limits.max_file_bytes {
            let budget = self.limits.max_file_bytes / 3;
            for body in [&mut journal.request, &mut journal.response]
                .into_iter()
                .flatten()
            {
                let text = body.to_string();
                if text.len() > budget {
                    *body = Value::String(super::truncate(&text, budget));
                }
            }
            let per_attempt = budget / journal.attempts.len().max(1);
            for error in journal.attempts.iter_mut().filter_map(|a| a.error.as_mut()) {
                if error.len() > per_attempt {
                    *error = super::truncate(error, per_attempt);
                }
            }
            bytes = serde_json::to_vec_pretty(&journal).unwrap_or_default();
        }
        let provider = if journal.provider.is_empty() {
            "unknown"
        } else {
            journal.provider.as_str()
        };
        let name = format!(
            "{}-{}-{}.json",
            journal.at,
            provider,
            (0..6).map(|_| fastrand::alphanumeric()).collect::<String>()
        );
        let path = self.dir.join(name);
        std::fs::write(&path, &bytes)?;
        self.files.push_back((path, bytes.len() as u64));
        self.total += bytes.len() as u64;
        while self.total > self.limits.max_total_bytes || self.files.len() > self.limits.max_files {
            let Some((old, size)) = self.files.pop_front() else {
                break;
            };
            let _ = std::fs::remove_file(&old);
            self.total = self.total.saturating_sub(size);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_files_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_file_bytes: 4000,
            max_total_bytes: 20_000,
            max_files: 1000,
        };
        let mut w = Writer::new(dir.path().to_path_buf(), limits).unwrap();
        for i in 0..20 {
            let mut j = Journal::new("chat", "p", "m", false, 1_000 + i);
            j.response = Some(Value::String("x".repeat(10_000)));
            w.write(j).unwrap();
        }
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let total: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert!(total <= 20_000, "{total}");
        assert!(
            files
                .iter()
                .all(|f| std::fs::metadata(f).unwrap().len() <= 4000)
        );
        assert!(files.len() < 20, "old files were deleted");
        let newest = files.iter().max().unwrap();
        let text = std::fs::read_to_string(newest).unwrap();
        assert!(text.contains("bytes more"), "bodies were shortened");
    }
}
