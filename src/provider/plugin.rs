//! The script part of a provider file: its Rhai script, the hooks used, `options`, and the declared mappings
//! (`request:`, `response:`, `stream:`) layered over it. Loaded, checked against the hooks they need, composed
//! into the provider's [`crate::mapping::Mapping`], and the request hook tried on a sample request.

use super::Provider;
use super::schema::{RawProvider, RawRequest};
use crate::config::ConfigError;
use crate::mapping::declared::{RawResponse, RawStream};
use crate::script::{Hook, ProviderScript};
use std::path::Path;
use std::sync::Arc;

/// What a provider file says about its script, taken out before the rest is resolved.
pub(super) struct RawPlugin {
    script: Option<String>,
    hooks: Option<Vec<String>>,
    options: Option<serde_json::Value>,
    stream: Option<RawStream>,
    request: Option<RawRequest>,
    response: Option<RawResponse>,
}

impl RawPlugin {
    pub(super) fn take(raw: &mut RawProvider) -> Self {
        Self {
            script: raw.script.take(),
            hooks: raw.hooks.take(),
            options: raw.options.take(),
            stream: raw.stream.take(),
            request: raw.request.take(),
            response: raw.response.take(),
        }
    }
}

/// Loads the script of `provider` (from the file at `path`) and composes its mapping; returns the script's
/// fingerprint (0 without a script).
pub(super) fn attach(
    provider: &mut Provider,
    path: &Path,
    plugins: &Path,
    plugin: RawPlugin,
) -> Result<u64, Vec<ConfigError>> {
    let RawPlugin {
        script,
        hooks,
        options,
        stream,
        request,
        response,
    } = plugin;
    let mut fingerprint = 0;
    match script {
        // A script is a file of `plugins/`, named plainly: no path leads anywhere else (`../.env`, `/etc/...`).
        Some(script)
            if !matches!(
                Path::new(&script).components().collect::<Vec<_>>()[..],
                [std::path::Component::Normal(_)]
            ) =>
        {
            return Err(vec![
                ConfigError::new(
                    Some(path),
                    "`script:` must name a file in the plugins directory, without a path",
                )
                .hint("e.g. script: my_provider.rhai"),
            ]);
        }
        Some(script) => {
            let loaded = ProviderScript::load(
                &plugins.join(&script),
                hooks.as_deref(),
                options.as_ref().unwrap_or(&serde_json::Value::Null),
                crate::script::Budget::of(&provider.tuning),
            )?;
            fingerprint = loaded.fingerprint;
            let declared = declarations(&loaded, path, stream, request, response)?;
            let loaded = Arc::new(loaded);
            let plain_chats = declared.messages.is_some();
            provider.mapping = crate::mapping::Mapping::compose(Some(&loaded), declared);
            if loaded.has(Hook::Request) {
                try_sample(provider, &loaded, plain_chats, path)?;
            }
            provider.script = Some(loaded);
        }
        None if hooks.is_some()
            || options.is_some()
            || stream.is_some()
            || request.is_some()
            || response.is_some() =>
        {
            return Err(vec![
                ConfigError::new(
                    Some(path),
                    "`hooks`, `options`, `request`, `response` and `stream` need a `script`",
                )
                .hint("name the script in plugins/, e.g. script: my_provider.rhai"),
            ]);
        }
        None => {}
    }
    Ok(fingerprint)
}

/// The declared mappings of a provider file (`stream`, `request`, `response`), each needing the script hook it
/// stands in front of.
fn declarations(
    loaded: &ProviderScript,
    path: &Path,
    stream: Option<RawStream>,
    request: Option<RawRequest>,
    response: Option<RawResponse>,
) -> Result<crate::mapping::declared::Declared, Vec<ConfigError>> {
    let mut declared = crate::mapping::declared::Declared::default();
    if let Some(stream) = stream {
        if !loaded.has(Hook::StreamEvent) {
            return Err(vec![ConfigError::new(
                Some(path),
                "`stream.fast` rules need a script with a stream_event hook",
            )]);
        }
        declared.events(stream, path)?;
    }
    if let Some(mut request) = request {
        if !loaded.has(Hook::Request) {
            return Err(vec![ConfigError::new(
                Some(path),
                "`request.copy`, `request.messages` and `request.fields` need a script with a request hook",
            )]);
        }
        if let Some(messages) = request.messages.take() {
            declared.messages(messages, path)?;
        }
        declared.copies(request.copy, path)?;
        if let Some(fields) = request.fields.take() {
            declared.fields = Some(Arc::new(crate::mapping::fields::FieldRules::resolve(
                fields, path,
            )?));
        }
    }
    if let Some(response) = response {
        if !loaded.has(Hook::Response) {
            return Err(vec![ConfigError::new(
                Some(path),
                "`response.fast` needs a script with a response hook",
            )]);
        }
        declared.answer(response, path)?;
    }
    Ok(declared)
}

/// The one check only running the script can make: it maps an ordinary request, as it comes and, when
/// `request.messages` takes plain chats, as the hook then sees one (no `messages`).
fn try_sample(
    provider: &Provider,
    loaded: &Arc<ProviderScript>,
    plain_chats: bool,
    path: &Path,
) -> Result<(), Vec<ConfigError>> {
    let model = provider
        .static_models
        .first()
        .map_or("sample-model", String::as_str);
    let sample = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "ping"}],
    });
    let target = crate::mapping::Target {
        endpoint: "chat",
        model,
        stream: false,
        path: provider
            .paths
            .chat
            .as_deref()
            .unwrap_or("/chat/completions"),
    };
    use crate::mapping::RequestMapping;
    let mut checked = crate::mapping::scripted::Scripted(loaded.clone())
        .map(&target, sample.clone())
        .map(drop);
    if checked.is_ok() && plain_chats {
        checked = provider.mapping.request.map(&target, sample).map(drop);
    }
    if let Err(e) = checked {
        return Err(vec![
            ConfigError::new(
                Some(path),
                format!("the script's request hook fails on a sample chat request: {e}"),
            )
            .hint("fix the script; the previous configuration keeps serving meanwhile"),
        ]);
    }
    Ok(())
}
