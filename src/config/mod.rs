//! `config.yaml` and `.env`: raw serde structures, then validated [`Settings`]; key discovery lives in [`mod@env`].
//!
//! Every setting is optional; a missing default `config.yaml` means all defaults. Unknown keys are errors that
//! name the file and line, so a typo never silently falls back to a default.

mod dotenv;
mod edge;
pub mod env;
mod error;
pub mod legacy;
mod store;
pub mod tuning;
mod values;

use crate::duration::serde_human;
pub use edge::{ConnectionCap, EdgeLimits, raise_open_file_limit};
pub use error::{ConfigError, LoadErrors, parse_yaml};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use store::{LEASE_TTL, ResponsesStore, Store};
use store::{RawResponses, RawStore};
pub use tuning::{KeyLimits, Selection, Tuning, TuningPatch};
pub use values::{ByteSize, DailyReset};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDailyReset {
    time: Option<String>,
    time_zone: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPause {
    enabled: Option<bool>,
    keys: Option<u32>,
    #[serde(default, with = "serde_human::option")]
    window: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequestLogging {
    enabled: Option<bool>,
    dir: Option<PathBuf>,
    max_file_size: Option<ByteSize>,
    max_total_size: Option<ByteSize>,
}

/// `server:`, the inbound HTTP edge.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    max_connections: Option<RawConnections>,
    #[serde(default, with = "serde_human::option")]
    header_timeout: Option<Duration>,
    #[serde(default, with = "serde_human::option")]
    body_timeout: Option<Duration>,
    #[serde(default, with = "serde_human::option")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "serde_human::option")]
    write_timeout: Option<Duration>,
}

/// `max_connections`: a number, or `auto`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawConnections {
    Count(usize),
    Auto(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsage {
    path: Option<PathBuf>,
    #[serde(default, with = "serde_human::option")]
    flush_interval: Option<Duration>,
}

/// `config.yaml` exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    host: Option<String>,
    port: Option<u16>,
    #[serde(default, with = "serde_human::option")]
    request_timeout: Option<Duration>,
    max_body_size: Option<ByteSize>,
    max_response_size: Option<ByteSize>,
    server: Option<RawServer>,
    scripts: Option<tuning::ScriptsPatch>,
    timeouts: Option<tuning::TimeoutsPatch>,
    selection: Option<Selection>,
    concurrency: Option<tuning::ConcurrencyPatch>,
    cooldowns: Option<tuning::CooldownsPatch>,
    retries: Option<tuning::RetriesPatch>,
    daily_reset: Option<RawDailyReset>,
    provider_pause: Option<RawPause>,
    usage: Option<RawUsage>,
    providers_dir: Option<PathBuf>,
    plugins_dir: Option<PathBuf>,
    #[serde(default, with = "serde_human::option")]
    models_refresh: Option<Duration>,
    #[serde(default, with = "serde_human::option")]
    shutdown_grace: Option<Duration>,
    request_logging: Option<RawRequestLogging>,
    responses: Option<RawResponses>,
    store: Option<RawStore>,
    #[serde(default)]
    fallbacks: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    context_fallbacks: BTreeMap<String, Vec<String>>,
    fallback_on_content_filter: Option<bool>,
    continue_streams: Option<bool>,
    cors: Option<RawCors>,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
    #[serde(default)]
    providers: BTreeMap<String, TuningPatch>,
}

/// `cors:`, which web pages may call keyrelay from a browser.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    origins: Vec<String>,
}

/// Pause a whole provider when this many of its keys hit a rate limit within the window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PauseRule {
    pub keys: u32,
    pub window: Duration,
}

/// Validated engine settings from `config.yaml`, with command-line overrides applied.
#[derive(Clone, Debug)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    /// One deadline per request covering waits, retries and backoff.
    pub request_timeout: Duration,
    /// `request_timeout` was set in config.yaml (the Python proxy's `GLOBAL_TIMEOUT` does not replace it).
    pub request_timeout_set: bool,
    pub max_body_bytes: usize,
    /// The most of an upstream's non-streamed answer, error body or model list that is read.
    pub max_response_bytes: usize,
    /// Bounds on client connections.
    pub edge: EdgeLimits,
    /// Global tuning; each provider's is resolved from it.
    pub tuning: Tuning,
    /// Per-provider tuning from `config.yaml`, applied over the provider file.
    pub provider_tuning: BTreeMap<String, TuningPatch>,
    pub daily_reset: DailyReset,
    pub provider_pause: Option<PauseRule>,
    pub usage_path: PathBuf,
    pub usage_flush: Duration,
    pub providers_dir: PathBuf,
    pub plugins_dir: PathBuf,
    pub models_refresh: Duration,
    pub shutdown_grace: Duration,
    /// One JSON file per request, when enabled (`--enable-request-logging` or `request_logging.enabled`).
    pub request_logging: Option<RequestLogging>,
    /// The request log settings as configured, enabled or not (the command-line flag switches them on).
    pub request_logging_config: RequestLogging,
    /// `provider/model` -> other `provider/model`s tried in order when it cannot be served.
    pub fallbacks: BTreeMap<String, std::sync::Arc<[String]>>,
    /// The same, tried instead when the prompt does not fit the model's context window.
    pub context_fallbacks: BTreeMap<String, std::sync::Arc<[String]>>,
    /// Route around a content-filter rejection too (by default it goes to the client).
    pub fallback_on_content_filter: bool,
    /// Continue streams broken mid-answer where the provider can (its `continuation:`).
    pub continue_streams: bool,
    /// Origins (`https://chat.example.com`, or `*`) whose pages may call keyrelay from a browser; `None`: any
    /// origin while a proxy key is set, none without one.
    pub cors_origins: Option<std::sync::Arc<[String]>>,
    /// Model names clients may use for a `provider/model` (`fast: openai/gpt-4o-mini`).
    pub model_aliases: BTreeMap<String, String>,
    /// What is kept for `previous_response_id`.
    pub responses: ResponsesStore,
    /// Where key state lives (`store:`, else `REDIS_URL` from the environment or `.env`).
    pub store: Store,
    /// `store:` was written in config.yaml (then `REDIS_URL` does not replace it).
    pub store_set: bool,
}

/// Where request logs go and how much room they may take.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestLogging {
    pub dir: PathBuf,
    pub max_file_bytes: usize,
    pub max_total_bytes: u64,
}

impl Settings {
    /// Reads `config.yaml` (or defaults when `path` is absent and `required` is false). Relative paths in it are
    /// resolved against the file's directory.
    pub fn load(path: &Path, required: bool) -> Result<Self, Vec<ConfigError>> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let raw: RawConfig = match std::fs::read_to_string(path) {
            Ok(text) => parse_yaml(path, &text).map_err(|e| vec![e])?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => RawConfig::default(),
            Err(e) => {
                return Err(vec![
                    ConfigError::new(Some(path), format!("cannot read: {e}"))
                        .hint("pass --config with the path of an existing file"),
                ]);
            }
        };
        Self::from_raw(raw, &base, path)
    }

    /// All defaults, with relative paths resolved against `base`.
    pub fn defaults(base: &Path) -> Self {
        Self::from_raw(RawConfig::default(), base, Path::new("config.yaml"))
            .expect("defaults are valid")
    }

    fn from_raw(raw: RawConfig, base: &Path, file: &Path) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut err = |message: String| errors.push(ConfigError::new(Some(file), message));
        let tuning = Tuning::default().patched(&TuningPatch {
            selection: raw.selection,
            concurrency: raw.concurrency,
            cooldowns: raw.cooldowns,
            retries: raw.retries,
            timeouts: raw.timeouts,
            limits: None,
            scripts: raw.scripts,
        });
        tuning.problems().into_iter().for_each(&mut err);
        let reset = raw.daily_reset.unwrap_or_default();
        let daily_reset = DailyReset::parse(
            reset.time.as_deref().unwrap_or("03:00"),
            reset.time_zone.as_deref().unwrap_or("UTC"),
        )
        .unwrap_or_else(|e| {
            err(e);
            DailyReset::parse("03:00", "UTC").expect("default reset parses")
        });
        let pause = raw.provider_pause.unwrap_or_default();
        let provider_pause = pause.enabled.unwrap_or(false).then(|| PauseRule {
            keys: pause.keys.unwrap_or(3),
            window: pause.window.unwrap_or(Duration::from_secs(10)),
        });
        if provider_pause.is_some_and(|p| p.keys < 2) {
            err("provider_pause.keys must be at least 2".into());
        }
        let request_timeout = raw.request_timeout.unwrap_or(Duration::from_secs(30));
        if request_timeout.is_zero() || request_timeout > Duration::from_secs(24 * 3600) {
            err("request_timeout must be greater than zero and at most 24h".into());
        }
        let server = raw.server.unwrap_or_default();
        let defaults = EdgeLimits::default();
        let edge = EdgeLimits {
            max_connections: match server.max_connections {
                None => None,
                Some(RawConnections::Count(n)) if n > 0 => Some(n),
                Some(RawConnections::Auto(word)) if word == "auto" => None,
                Some(_) => {
                    err("server.max_connections must be a positive number or `auto`".into());
                    None
                }
            },
            header_timeout: server.header_timeout.unwrap_or(defaults.header_timeout),
            body_timeout: server.body_timeout.unwrap_or(defaults.body_timeout),
            idle_timeout: server.idle_timeout.unwrap_or(defaults.idle_timeout),
            write_timeout: server.write_timeout.unwrap_or(defaults.write_timeout),
        };
        if [
            edge.header_timeout,
            edge.body_timeout,
            edge.idle_timeout,
            edge.write_timeout,
        ]
        .iter()
        .any(Duration::is_zero)
        {
            err(
                "server.header_timeout, body_timeout, idle_timeout and write_timeout must be greater than zero"
                    .into(),
            );
        }
        let max_response_bytes = raw.max_response_size.map_or(32 << 20, |b| b.0);
        if max_response_bytes < 1024 {
            err("max_response_size must be at least 1KiB".into());
        }
        let cors_origins = raw.cors.map(|c| {
            for origin in &c.origins {
                if !valid_origin(origin) {
                    err(format!(
                        "cors.origins: {origin:?} is not an origin such as \"https://chat.example.com\" (scheme, host and optional port, no path) or \"*\""
                    ));
                }
            }
            std::sync::Arc::from(c.origins)
        });
        for (alias, target) in &raw.aliases {
            if alias.is_empty()
                || !target
                    .split_once('/')
                    .is_some_and(|(p, m)| !p.is_empty() && !m.is_empty())
            {
                err(format!(
                    "aliases: {alias:?} -> {target:?} must name a model written provider/model, e.g. fast: openai/gpt-4o-mini"
                ));
            }
        }
        let usage = raw.usage.unwrap_or_default();
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let request_logging = raw.request_logging.unwrap_or_default();
        let logging = RequestLogging {
            dir: resolve(request_logging.dir.clone().unwrap_or_else(|| "logs".into())),
            max_file_bytes: request_logging.max_file_size.map_or(1 << 20, |b| b.0),
            max_total_bytes: request_logging
                .max_total_size
                .map_or(100 << 20, |b| b.0 as u64),
        };
        let settings = Settings {
            host: raw.host.unwrap_or_else(|| "127.0.0.1".into()),
            port: raw.port.unwrap_or(8000),
            request_timeout,
            request_timeout_set: raw.request_timeout.is_some(),
            max_body_bytes: raw.max_body_size.map_or(20 << 20, |b| b.0),
            max_response_bytes,
            edge,
            tuning,
            provider_tuning: raw.providers,
            daily_reset,
            provider_pause,
            usage_path: resolve(usage.path.unwrap_or_else(|| "key_usage.json".into())),
            usage_flush: usage.flush_interval.unwrap_or(Duration::from_secs(1)),
            providers_dir: resolve(raw.providers_dir.unwrap_or_else(|| "providers".into())),
            plugins_dir: resolve(raw.plugins_dir.unwrap_or_else(|| "plugins".into())),
            models_refresh: raw.models_refresh.unwrap_or(Duration::from_secs(600)),
            shutdown_grace: raw.shutdown_grace.unwrap_or(Duration::from_secs(10)),
            request_logging: request_logging
                .enabled
                .unwrap_or(false)
                .then(|| logging.clone()),
            request_logging_config: logging,
            fallbacks: shared(raw.fallbacks),
            context_fallbacks: shared(raw.context_fallbacks),
            fallback_on_content_filter: raw.fallback_on_content_filter.unwrap_or(false),
            continue_streams: raw.continue_streams.unwrap_or(true),
            cors_origins,
            model_aliases: raw.aliases,
            store_set: raw.store.is_some(),
            store: Store::from_raw(raw.store, &resolve, &mut err),
            responses: ResponsesStore::from_raw(raw.responses.unwrap_or_default()),
        };
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(errors)
        }
    }
}

/// Whether `host` only accepts connections from this machine.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A fingerprint of a piece of configuration (a file's text, a provider's settings): reloads compare them to
/// tell what changed.
pub fn fingerprint(value: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// `*`, or `scheme://host[:port]` as a browser sends it in `Origin`.
fn valid_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
        && rest.is_ascii()
}

fn shared(lists: BTreeMap<String, Vec<String>>) -> BTreeMap<String, std::sync::Arc<[String]>> {
    lists.into_iter().map(|(k, v)| (k, v.into())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, Vec<ConfigError>> {
        let path = Path::new("/etc/keyrelay/config.yaml");
        let raw: RawConfig = parse_yaml(path, text).map_err(|e| vec![e])?;
        Settings::from_raw(raw, Path::new("/etc/keyrelay"), path)
    }

    #[test]
    fn defaults_and_overrides() {
        let s = parse("# nothing\n").unwrap();
        assert_eq!(s.request_timeout, Duration::from_secs(30));
        assert_eq!(
            s.tuning.per_key_model, 0,
            "no cap: parallel requests never wait"
        );
        assert_eq!(s.usage_path, Path::new("/etc/keyrelay/key_usage.json"));
        let s = parse("request_timeout: 5s\nmax_body_size: 1MiB\nconcurrency:\n  per_key: 3\n")
            .unwrap();
        assert_eq!(s.request_timeout, Duration::from_secs(5));
        assert_eq!(s.max_body_bytes, 1 << 20);
        assert_eq!(s.tuning.per_key, 3);
    }

    #[test]
    fn the_redis_store_and_its_ca_file() {
        assert_eq!(parse("# nothing\n").unwrap().store, Store::Memory);
        let s = parse("store: {redis: {url: redis://10.0.0.1:6379, prefix: kr, lease_ttl: 5s}}\n")
            .unwrap();
        assert_eq!(
            s.store,
            Store::Redis {
                url: "redis://10.0.0.1:6379".into(),
                prefix: "kr".into(),
                lease_ttl: Duration::from_secs(5),
                ca: None,
                cluster: false,
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pem).unwrap();
        let written = |url: &str, file: &Path| {
            parse(&format!(
                "store: {{redis: {{url: \"{url}\", ca_file: \"{}\"}}}}\n",
                file.display()
            ))
        };
        let Store::Redis { ca: Some(read), .. } = written("rediss://r:6380", &ca).unwrap().store
        else {
            panic!("no CA read");
        };
        assert_eq!(read, pem.as_bytes());
        let refused = |url: &str, file: &Path| written(url, file).unwrap_err()[0].to_string();
        assert!(refused("redis://r:6379", &ca).contains("rediss:// URLs only"));
        assert!(refused("rediss://r:6380", &dir.path().join("absent.pem")).contains("absent.pem"));
        let not_pem = dir.path().join("key.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        assert!(refused("rediss://r:6380", &not_pem).contains("no PEM certificate"));
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let errors = parse("port: 8000\nrequest_timout: 5s\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(2));
        let text = errors[0].to_string();
        assert!(
            text.starts_with("/etc/keyrelay/config.yaml:2: unknown field `request_timout`"),
            "{text}"
        );
    }

    #[test]
    fn bad_values_are_reported_together() {
        let errors = parse(
            "daily_reset: {time: \"25:00\", time_zone: Mars/Olympus}\nretries: {attempts: 0}\n",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[test]
    fn daily_reset_boundaries() {
        let reset = DailyReset::parse("03:00", "UTC").unwrap();
        // 2026-01-10T02:59:00Z
        let before = jiff::Timestamp::from_second(1_768_013_940)
            .unwrap()
            .as_millisecond();
        assert_eq!(reset.next_after(before), before + 60_000);
        assert_eq!(
            reset.last_at_or_before(before),
            before + 60_000 - 86_400_000
        );
        assert_eq!(
            reset.next_after(before + 60_000),
            before + 60_000 + 86_400_000
        );
        let paris = DailyReset::parse("00:00", "Europe/Paris").unwrap();
        // Midnight in Paris in January is 23:00 UTC the day before.
        let next = paris.next_after(before);
        assert_eq!(
            next,
            jiff::Timestamp::from_second(1_768_086_000)
                .unwrap()
                .as_millisecond()
        );
    }
}
