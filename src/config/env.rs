//! The environment as keyrelay sees it: `.env` overlaid by the process environment (the process wins), and the
//! variables read from it: provider keys, base URL overrides, model filters and the proxy key.
//!
//! `.env` is read into a map, never into the process environment, so a later reload can read it again.

use super::ConfigError;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
    /// Names that came from `.env` (for warnings about variables nobody reads).
    from_file: BTreeSet<String>,
}

/// Names only: the values are keys.
impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("names", &self.vars.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Env {
    /// Reads `.env` at `path` (a missing file is fine), then every other `*.env` file beside it in name order (a
    /// variable already set keeps its value, as the Python proxy read them), and overlays the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut env = Self::default();
        env.read_file(path, true)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut others: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "env")
                    && p.file_name() != path.file_name()
                    && p.is_file()
            })
            .collect();
        others.sort();
        for other in others {
            env.read_file(&other, false)?;
        }
        for (name, value) in std::env::vars_os() {
            if let (Ok(name), Ok(value)) = (name.into_string(), value.into_string()) {
                env.from_file.remove(&name);
                env.vars.insert(name, value);
            }
        }
        Ok(env)
    }

    /// Adds the variables of one env file (a missing file is fine): all of them, or with `replace` false only
    /// those not set yet.
    fn read_file(&mut self, path: &Path, replace: bool) -> Result<(), ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ConfigError::new(Some(path), format!("cannot read: {e}"))),
        };
        let outside = |name: &str| {
            std::env::var(name)
                .ok()
                .or_else(|| self.vars.get(name).cloned())
        };
        let vars = super::dotenv::parse(&text, &outside).map_err(|e| {
            let mut err = ConfigError::new(Some(path), format!("cannot parse: {}", e.what)).hint(
                "write NAME=value; quote a value that starts with a quote, e.g. NAME='a \"b\"'",
            );
            err.line = Some(e.line);
            err
        })?;
        for (name, value) in vars {
            if replace || !self.vars.contains_key(&name) {
                self.from_file.insert(name.clone());
                self.vars.insert(name, value);
            }
        }
        Ok(())
    }

    /// An environment from explicit pairs (tests and library users).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            from_file: BTreeSet::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// Every variable's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    pub fn proxy_key(&self) -> Option<&str> {
        self.get("PROXY_API_KEY")
    }

    /// `<PROVIDER>_API_KEY`, then `<PROVIDER>_API_KEY_<N>` in ascending N, then any other suffix
    /// (`_API_KEY_BACKUP`, `_API_KEY_0`) in name order, as the Python proxy took them all; a value listed twice
    /// is kept once.
    pub fn provider_keys(&self, provider: &str) -> Vec<String> {
        let prefix = format!("{}_API_KEY", provider.to_ascii_uppercase());
        let mut numbered: Vec<(u64, &str)> = Vec::new();
        let mut other: Vec<&str> = Vec::new();
        let mut plain = None;
        for (name, value) in self.vars.range(prefix.clone()..) {
            let Some(rest) = name.strip_prefix(&prefix) else {
                break;
            };
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            if rest.is_empty() {
                // `PROXY_API_KEY` is the proxy's own secret, never a key of a provider named `proxy`.
                if provider != "proxy" {
                    plain = Some(value);
                }
            } else if let Some(suffix) = rest.strip_prefix('_').filter(|s| !s.is_empty()) {
                match suffix.parse::<u64>().ok().filter(|n| *n > 0) {
                    Some(n) => numbered.push((n, value)),
                    None => other.push(value),
                }
            }
        }
        numbered.sort_by_key(|(n, _)| *n);
        let mut out: Vec<String> = Vec::new();
        for value in plain
            .into_iter()
            .chain(numbered.into_iter().map(|(_, v)| v))
            .chain(other)
        {
            if !out.iter().any(|v| v == value) {
                out.push(value.to_string());
            }
        }
        out
    }

    /// `<PROVIDER>_API_BASE`.
    pub fn api_base(&self, provider: &str) -> Option<&str> {
        self.get(&format!("{}_API_BASE", provider.to_ascii_uppercase()))
    }

    /// Providers named only by an `<NAME>_API_BASE` variable, lower-cased.
    pub fn api_base_names(&self) -> Vec<String> {
        self.vars
            .keys()
            .filter_map(|name| name.strip_suffix("_API_BASE"))
            .filter(|stem| is_env_name(stem))
            .map(str::to_ascii_lowercase)
            .collect()
    }

    /// `WHITELIST_MODELS_<PROVIDER>` or `IGNORE_MODELS_<PROVIDER>` as a list of globs, when set.
    pub fn model_globs(&self, kind: &str, provider: &str) -> Option<Vec<String>> {
        let value = self.get(&format!("{kind}_MODELS_{}", provider.to_ascii_uppercase()))?;
        Some(
            value
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// Provider-key variables from `.env` whose provider is not configured: almost always a typo.
    pub fn orphan_key_names(&self, known: &dyn Fn(&str) -> bool) -> Vec<String> {
        self.from_file
            .iter()
            .filter(|name| provider_of_key_var(name).is_some_and(|p| !known(&p)))
            .cloned()
            .collect()
    }
}

/// The provider a `<PROVIDER>_API_KEY[_N]` variable belongs to.
fn provider_of_key_var(name: &str) -> Option<String> {
    let at = name.rfind("_API_KEY")?;
    let rest = &name[at + "_API_KEY".len()..];
    let numbered = rest.is_empty() || rest.strip_prefix('_').is_some_and(|s| !s.is_empty());
    let stem = &name[..at];
    (numbered && is_env_name(stem) && stem != "PROXY").then(|| stem.to_ascii_lowercase())
}

fn is_env_name(stem: &str) -> bool {
    !stem.is_empty()
        && stem
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_keys_in_order_without_duplicates() {
        let env = Env::from_pairs([
            ("NVIDIA_NIM_API_KEY_2", "b"),
            ("NVIDIA_NIM_API_KEY_10", "c"),
            ("NVIDIA_NIM_API_KEY_1", "a"),
            ("NVIDIA_NIM_API_KEY", "z"),
            ("NVIDIA_NIM_API_KEY_3", "a"),
            ("NVIDIA_NIM_API_KEY_0", "zero-is-not-positive"),
            ("NVIDIA_NIM_API_KEY_X", "nope"),
            ("NVIDIA_API_KEY", "other-provider"),
        ]);
        assert_eq!(
            env.provider_keys("nvidia_nim"),
            vec!["z", "a", "b", "c", "zero-is-not-positive", "nope"],
            "plain, numbered in order, then any other suffix by name"
        );
        assert_eq!(env.provider_keys("nvidia"), vec!["other-provider"]);
        let env = Env::from_pairs([
            ("PROXY_API_KEY", "the-proxy-key"),
            ("PROXY_API_KEY_1", "p1"),
        ]);
        assert_eq!(env.provider_keys("proxy"), vec!["p1"]);
    }

    #[test]
    fn bases_globs_and_orphans() {
        let mut env = Env::from_pairs([
            ("LOCAL_LLM_API_BASE", "http://127.0.0.1:9000/v1"),
            ("IGNORE_MODELS_OPENAI", "gpt-3*, *-audio-*,"),
            ("OPENAI_API_KEY", "k"),
            ("OPENIA_API_KEY_1", "typo"),
        ]);
        env.from_file = env.vars.keys().cloned().collect();
        assert_eq!(env.api_base_names(), vec!["local_llm"]);
        assert_eq!(
            env.model_globs("IGNORE", "openai").unwrap(),
            vec!["gpt-3*", "*-audio-*"]
        );
        assert_eq!(
            env.orphan_key_names(&|p| p == "openai"),
            vec!["OPENIA_API_KEY_1"]
        );
    }
}
