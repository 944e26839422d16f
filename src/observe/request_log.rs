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
    dropped: super::throttle::Throttle,
}

impl RequestLog {
    /// Starts the writer for `dir` (created if missing).
    pub fn start(dir: &Path, limits: Limits) -> std::io::Result<Self> {
        crate::files::create_dir_all(dir)?;
        let (tx, rx) = mpsc::sync_channel::<Journal>(1024);
        let mut writer = Writer::new(dir.to_path_buf(), limits)?;
        std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || {
                let failing = super::throttle::Throttle::per_minute();
                for journal in rx {
                    if let Err(e) = writer.write(journal)
                        && let Some(held) = failing.ready()
                    {
                        tracing::error!(error = %e, failed_since_last_error = held, "cannot write a request log file");
                    }
                }
            })?;
        Ok(Self {
            tx,
            dropped: super::throttle::Throttle::per_minute(),
        })
    }

    /// Queues a journal; under overload (the writer 1,024 files behind) it is dropped rather than slowing
    /// requests.
    pub fn write(&self, journal: Journal) {
        if self.tx.try_send(journal).is_err()
            && let Some(held) = self.dropped.ready()
        {
            tracing::warn!(
                dropped_since_last_warning = held,
                "request log writer is behind; request logs were dropped"
            );
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

    fn write(&mut self, journal: Journal) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(&journal).unwrap_or_default();
        if bytes.len() > self.limits.max_file_bytes {
            let mut value = serde_json::to_value(&journal).unwrap_or_default();
            fit(&mut value, self.limits.max_file_bytes);
            bytes = serde_json::to_vec_pretty(&value).unwrap_or_default();
        }
        // Masking only shortens: the file stays within its bound.
        if let Ok(text) = std::str::from_utf8(&bytes)
            && let std::borrow::Cow::Owned(masked) = journal.masked(text)
        {
            bytes = masked.into_bytes();
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
        crate::files::write_new(&path, &bytes)?;
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

/// Shortens `value` until its pretty JSON fits in `max` bytes: the longest texts first (each down to half), then
/// the request and the response as a whole, then every text.
fn fit(value: &mut Value, max: usize) {
    let size = |v: &Value| serde_json::to_vec_pretty(v).map_or(0, |b| b.len());
    // Each round halves the longest text; texts of 64 bytes or fewer are left for the last resorts.
    while size(value) > max {
        let Some(longest) = longest_text(value).filter(|t| t.len() > 64) else {
            break;
        };
        let keep = longest.len() / 2;
        *longest = super::truncate(longest, keep);
    }
    for field in ["request", "response"] {
        if size(value) <= max {
            return;
        }
        if let Some(body) = value.get_mut(field).filter(|b| !b.is_null()) {
            let text = body.to_string();
            *body = Value::String(super::truncate(&text, max / 4));
        }
    }
    if size(value) > max {
        shorten_all(value, 32);
    }
    // Many attempts (a long chain of failing fallbacks) are many small records: the middle ones go, counted.
    if let Some(attempts) = value.get_mut("attempts").and_then(Value::as_array_mut) {
        let mut sizes: Vec<usize> = attempts.iter().map(size).collect();
        let mut total: usize = sizes.iter().sum();
        let mut omitted = 0;
        while attempts.len() > 2 && total > max / 2 {
            let middle = attempts.len() / 2;
            attempts.remove(middle);
            total -= sizes.remove(middle);
            omitted += 1;
        }
        if omitted > 0 {
            value["attempts_omitted"] = Value::from(omitted);
        }
    }
    // Whatever is left over the bound: only what says what happened.
    if size(value) > max {
        let mut summary = serde_json::Map::new();
        for field in ["at", "provider", "model", "status", "error", "total_ms"] {
            if let Some(v) = value.get(field) {
                summary.insert(field.into(), v.clone());
            }
        }
        summary.insert("shortened".into(), Value::Bool(true));
        *value = Value::Object(summary);
        shorten_all(value, 32);
    }
}

/// The longest string anywhere in `value`.
fn longest_text(value: &mut Value) -> Option<&mut String> {
    match value {
        Value::String(text) => Some(text),
        Value::Array(items) => items
            .iter_mut()
            .filter_map(longest_text)
            .max_by_key(|t| t.len()),
        Value::Object(map) => map
            .values_mut()
            .filter_map(longest_text)
            .max_by_key(|t| t.len()),
        _ => None,
    }
}

fn shorten_all(value: &mut Value, keep: usize) {
    match value {
        Value::String(text) if text.len() > keep => *text = super::truncate(text, keep),
        Value::Array(items) => items.iter_mut().for_each(|v| shorten_all(v, keep)),
        Value::Object(map) => map.values_mut().for_each(|v| shorten_all(v, keep)),
        _ => {}
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

    #[test]
    fn every_field_is_shortened_to_fit() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_file_bytes: 4000,
            max_total_bytes: 1 << 20,
            max_files: 10,
        };
        let mut w = Writer::new(dir.path().to_path_buf(), limits).unwrap();
        let long = "m".repeat(50_000);
        let mut j = Journal::new("chat", "p", &long, false, 1);
        j.fallback = Some(long.clone());
        j.request = Some(serde_json::json!({"messages": (0..2000).collect::<Vec<_>>()}));
        w.write(j).unwrap();
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert!(text.len() <= 4000, "{}", text.len());
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["model"].as_str().unwrap().starts_with("mmm"));

        // Hundreds of attempts, each small: the file still fits, the first and last attempts kept.
        let mut j = Journal::new("chat", "p", "m", false, 2);
        for i in 0..500u64 {
            j.attempts.push(super::super::AttemptRecord {
                model: format!("fallback/model-{i}"),
                key: "...abcd".into(),
                started_ms: i,
                latency_ms: 1.0,
                status: Some(503),
                class: None,
                error: Some("the upstream failed".into()),
            });
        }
        w.write(j).unwrap();
        let newest = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        let text = std::fs::read_to_string(newest).unwrap();
        assert!(text.len() <= 4000, "{}", text.len());
        let v: Value = serde_json::from_str(&text).unwrap();
        let attempts = v["attempts"].as_array().unwrap();
        assert_eq!(attempts[0]["model"], "fallback/model-0");
        assert_eq!(attempts.last().unwrap()["model"], "fallback/model-499");
        assert_eq!(
            v["attempts_omitted"].as_u64().unwrap() as usize + attempts.len(),
            500
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata().unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
