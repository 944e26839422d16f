//! The immutable configuration snapshot: settings, providers with their keys, and the proxy key, built and
//! validated in one pass from files on disk. Requests hold an `Arc<Snapshot>` for their whole life, so a newer
//! snapshot can be published at any time without disturbing them.

use crate::config::env::Env;
use crate::config::legacy::Reading;
use crate::config::{ConfigError, LoadErrors, Settings};
use crate::provider::{self, Provider};
use crate::secret::{ApiKey, ProxyKey};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Where to load from, and what the command line overrides.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub config: PathBuf,
    /// `false` when `config` is the default path, whose absence means all defaults.
    pub config_required: bool,
    pub env_file: PathBuf,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// `--enable-request-logging`.
    pub request_logging: bool,
}

#[derive(Debug)]
pub struct Snapshot {
    pub settings: Settings,
    /// Every configured provider by name, with or without keys.
    pub providers: BTreeMap<String, Arc<Provider>>,
    pub proxy_key: Option<ProxyKey>,
    /// Things worth telling the user that do not stop the load.
    pub warnings: Vec<String>,
    /// Counts published snapshots: 1 for the one loaded at start, +1 per accepted reload.
    pub generation: u64,
    /// When this snapshot was built.
    pub loaded_at: crate::clock::UnixMs,
    /// How the Python proxy's variables in the environment were read (`keyrelay check` lists them).
    pub legacy: Vec<crate::config::legacy::Reading>,
}

impl Snapshot {
    /// `model` as the engine names it: an alias from config.yaml's `aliases:` replaced by its target, and a
    /// provider named by one of its `aliases` (`together_ai/…`, as LiteLLM writes it) by its own name.
    pub fn canonical<'a>(&self, model: &'a str) -> std::borrow::Cow<'a, str> {
        match self.settings.model_aliases.get(model) {
            Some(target) => std::borrow::Cow::Owned(self.provider_alias(target).into_owned()),
            None => self.provider_alias(model),
        }
    }

    /// `model` with its provider named by its own name when it was named by one of its aliases.
    fn provider_alias<'a>(&self, model: &'a str) -> std::borrow::Cow<'a, str> {
        if let Some((name, rest)) = model.split_once('/')
            && !self.providers.contains_key(name)
            && let Some(p) = self
                .providers
                .values()
                .find(|p| p.aliases.iter().any(|a| a == name))
        {
            return std::borrow::Cow::Owned(format!("{}/{rest}", p.name));
        }
        std::borrow::Cow::Borrowed(model)
    }

    /// Reads and validates everything; returns every problem found, or a snapshot.
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadErrors> {
        let mut settings =
            Settings::load(&opts.config, opts.config_required).map_err(LoadErrors)?;
        if let Some(host) = &opts.host {
            settings.host = host.clone();
        }
        if let Some(port) = opts.port {
            settings.port = port;
        }
        if opts.request_logging {
            settings.request_logging = Some(settings.request_logging_config.clone());
        }
        let env = Env::load(&opts.env_file).map_err(|e| LoadErrors(vec![e]))?;
        Self::build(settings, &env)
    }

    /// Loads the provider files named by `settings` and combines them with `env`.
    pub fn build(mut settings: Settings, env: &Env) -> Result<Self, LoadErrors> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        if !settings.store_set
            && let Some(url) = env.get("REDIS_URL")
        {
            settings.store = crate::config::Store::Redis {
                url: url.to_string(),
                prefix: "keyrelay".into(),
                lease_ttl: crate::config::LEASE_TTL,
                ca: None,
                cluster: false,
            };
        }
        // How the Python proxy's variables were read, for `keyrelay check` and warnings.
        let mut legacy = Vec::new();
        if let Some(timeout) = crate::config::legacy::global_timeout(env, &mut legacy)
            && !settings.request_timeout_set
        {
            settings.request_timeout = timeout;
        }
        let mut providers = provider_files(&settings, &mut errors, &mut warnings);
        env_providers(env, &settings, &mut providers, &mut errors);
        for (name, p) in providers.iter_mut() {
            apply_env(name, p, env, &mut settings, &mut legacy, &mut errors);
        }
        check_references(&settings, &providers, env, &mut errors);
        legacy.extend(crate::config::legacy::unhonoured(env));
        for reading in legacy.iter().filter(|r| !r.honoured) {
            warnings.push(format!("{}: {}", reading.variable, reading.effect));
        }
        for orphan in env.orphan_key_names(&|p| providers.contains_key(p)) {
            warnings.push(format!(
                "{orphan} is set in the env file but no provider of that name is configured"
            ));
        }

        if !errors.is_empty() {
            return Err(LoadErrors(errors));
        }
        Ok(Self {
            settings,
            providers: providers
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            proxy_key: env.proxy_key().map(ProxyKey::new),
            generation: 1,
            loaded_at: crate::clock::Clock::system().now(),
            warnings,
            legacy,
        })
    }

    /// Providers that can serve: those with at least one key.
    pub fn serving(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.providers.values().filter(|p| !p.keys.is_empty())
    }
}

/// The providers of the files in `settings.providers_dir`, in name order.
fn provider_files(
    settings: &Settings,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Provider> {
    let mut providers = BTreeMap::new();
    let dir = &settings.providers_dir;
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            files.sort();
            for file in files {
                let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
                match provider::load_file(&file, &settings.plugins_dir, &settings.tuning, settings.provider_tuning.get(&name)) {
                    Ok(p) if providers.contains_key(&p.name) => errors.push(
                        ConfigError::new(Some(&file), format!("provider {:?} is defined twice", p.name))
                            .hint("keep one of name.yaml and name.yml"),
                    ),
                    Ok(p) => {
                        providers.insert(p.name.clone(), p);
                    }
                    Err(e) => errors.extend(e),
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => warnings.push(format!(
            "the providers directory {} does not exist; only providers defined by <NAME>_API_BASE are served",
            dir.display()
        )),
        Err(e) => errors.push(ConfigError::new(Some(dir), format!("cannot read the providers directory: {e}"))),
    }

    providers
}

/// A provider for each `<NAME>_API_BASE` that no file defines: OpenAI-compatible, at that URL.
fn env_providers(
    env: &Env,
    settings: &Settings,
    providers: &mut BTreeMap<String, Provider>,
    errors: &mut Vec<ConfigError>,
) {
    for name in env.api_base_names() {
        if let std::collections::btree_map::Entry::Vacant(slot) = providers.entry(name) {
            let name = slot.key();
            if !provider::valid_name(name) {
                let var = format!("{}_API_BASE", name.to_ascii_uppercase());
                errors.push(ConfigError::new(
                    None,
                    format!("{var}: {name:?} is not a valid provider name"),
                ));
                continue;
            }
            let p = provider::openai_compatible(
                name,
                &settings.tuning,
                settings.provider_tuning.get(name),
            );
            slot.insert(p);
        }
    }
}

/// What the environment says of provider `name`: its base URL, model filters, the Python proxy's tuning and
/// models, and its keys.
fn apply_env(
    name: &str,
    p: &mut Provider,
    env: &Env,
    settings: &mut Settings,
    legacy: &mut Vec<Reading>,
    errors: &mut Vec<ConfigError>,
) {
    if let Some(base) = env.api_base(name) {
        match provider::base_url(base) {
            Ok(url) => p.base_url = url,
            Err((why, hint)) => errors.push(
                ConfigError::new(
                    None,
                    format!("{}_API_BASE {why}", name.to_ascii_uppercase()),
                )
                .hint(hint),
            ),
        }
    }
    let whitelist = env.model_globs("WHITELIST", name);
    let ignore = env.model_globs("IGNORE", name);
    p.filter.allow_wins = whitelist.is_some() && ignore.is_some();
    if let Some(allow) = whitelist {
        p.filter.allow = allow;
    }
    if let Some(deny) = ignore {
        p.filter.deny = deny;
    }
    // The Python proxy's tuning of this provider, under config.yaml's own `providers:` entry.
    let patch = crate::config::legacy::tuning(env, name, legacy);
    if patch.selection.is_some() || patch.concurrency.is_some() {
        p.tuning = p.tuning.patched(&patch);
        if let Some(user) = settings.provider_tuning.get(name) {
            p.tuning = p.tuning.patched(user);
        }
    }
    if let Some(models) = crate::config::legacy::models(env, name, legacy) {
        for (model, id) in models {
            // A name for another id is an alias (listed as one), the id the static model.
            let listed = match id {
                Some(id) => {
                    settings
                        .model_aliases
                        .entry(format!("{name}/{model}"))
                        .or_insert_with(|| format!("{name}/{id}"));
                    id
                }
                None => model,
            };
            if !p.static_models.contains(&listed) {
                p.static_models.push(listed);
            }
        }
        if p.list == provider::ListSource::Upstream {
            p.list = provider::ListSource::Both;
        }
    }
    p.fingerprint = crate::config::fingerprint((
        p.fingerprint,
        &p.base_url,
        &p.filter.allow,
        &p.filter.deny,
        format!("{:?}", p.tuning),
    ));
    p.keys = ApiKey::pool(name, &env.provider_keys(name));
}

/// Names in config.yaml that must refer to configured providers, and settings that need a proxy key.
fn check_references(
    settings: &Settings,
    providers: &BTreeMap<String, Provider>,
    env: &Env,
    errors: &mut Vec<ConfigError>,
) {
    for unknown in settings
        .provider_tuning
        .keys()
        .filter(|n| !providers.contains_key(*n))
    {
        errors.push(
            ConfigError::new(
                None,
                format!("config.yaml: providers.{unknown} names no configured provider"),
            )
            .hint("add providers/<name>.yaml or fix the name"),
        );
    }
    let fallback_lists = settings.fallbacks.iter().chain(&settings.context_fallbacks);
    for (from, list) in fallback_lists {
        for model in std::iter::once(from).chain(list.iter()) {
            let known = model
                .split_once('/')
                .is_some_and(|(p, m)| !m.is_empty() && providers.contains_key(p));
            if !known {
                errors.push(
                    ConfigError::new(None, format!("config.yaml: fallback {model:?} names no configured provider"))
                        .hint("write fallbacks as provider/model with a provider from providers/ or <NAME>_API_BASE"),
                );
            }
        }
    }
    let open_cors = settings
        .cors_origins
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o == "*"));
    if open_cors && env.proxy_key().is_none() {
        errors.push(
            ConfigError::new(
                None,
                "config.yaml: cors.origins \"*\" needs PROXY_API_KEY: without a key, any web page the user opens could spend the pool",
            )
            .hint("name the origins of your own pages, or set PROXY_API_KEY"),
        );
    }
}
