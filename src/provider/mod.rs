//! Provider files (`providers/<name>.yaml`): the schema as written, and the resolved [`Provider`] the engine uses.
//!
//! Everything that differs between OpenAI-compatible upstreams lives here as data: base URL, how the key is
//! sent, paths, models, classification rules. The engine reads a `Provider`, never a provider's name.

pub mod classify;
mod load;
mod plugin;
mod prices;
mod rules;
mod schema;

use crate::config::Tuning;
use crate::failure::{ErrorClass, Scope};
use crate::glob::ModelFilter;
use crate::script::{Hook, ProviderScript, ScriptError};
use crate::secret::ApiKey;
use crate::upstream::UpstreamCall;
pub use classify::{Classifier, ErrorRule, RetryAfterSource, StatusMatch, Verdict};
use http::header::{HeaderName, HeaderValue};
use std::path::PathBuf;
use std::sync::Arc;

pub use load::{base_url, load_file, openai_compatible, valid_name};
pub use prices::{Price, Prices};
pub use schema::ListSource;

/// How the key reaches the upstream.
#[derive(Clone, Debug)]
pub enum Auth {
    /// A header whose value is `prefix + key + suffix` (from a template such as `Bearer {key}`).
    Header {
        name: HeaderName,
        prefix: String,
        suffix: String,
    },
    /// A query parameter.
    Query { param: String },
}

/// Endpoint paths relative to the base URL; `None` means the upstream does not offer it.
#[derive(Clone, Debug)]
pub struct Paths {
    pub chat: Option<String>,
    pub embeddings: Option<String>,
    pub models: Option<String>,
}

/// A provider ready for the engine: its file, overrides from the environment and `config.yaml`, and its keys.
#[derive(Clone, Debug)]
pub struct Provider {
    pub name: String,
    /// The file it came from; `None` for a provider defined only by `<NAME>_API_BASE`.
    pub source: Option<PathBuf>,
    /// Without a trailing slash.
    pub base_url: String,
    pub auth: Auth,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub paths: Paths,
    pub list: ListSource,
    pub static_models: Vec<String>,
    pub filter: ModelFilter,
    /// The upstream honours `stream_options.include_usage`.
    pub stream_usage: bool,
    /// Other names clients may use for it (`together_ai` for `together`, as LiteLLM names it).
    pub aliases: Vec<String>,
    /// What its models' tokens cost.
    pub prices: Prices,
    /// Chat request fields renamed before the request goes up (`max_tokens` -> `max_completion_tokens`).
    pub renames: Vec<(String, String)>,
    /// Inbound dialects it speaks natively, with their paths relative to the base URL.
    pub dialects: Vec<(
        crate::mapping::inbound::Dialect,
        crate::mapping::inbound::DialectRoute,
    )>,
    pub classifier: Classifier,
    pub tuning: Tuning,
    pub keys: Vec<ApiKey>,
    /// The provider's script, when it has one.
    pub script: Option<Arc<ProviderScript>>,
    /// How requests, answers and stream events are mapped: passthrough, or the file's declared rules over
    /// its script.
    pub mapping: crate::mapping::Mapping,
    /// Set when the upstream continues a prefilled assistant message (chat requests ending with one): the
    /// extra fields that message carries. A stream broken mid-answer is then continued on another key.
    pub continuation: Option<serde_json::Map<String, serde_json::Value>>,
    /// Changes when anything about the provider but its keys changes (its file, base URL, filters); reloads
    /// use it to report what changed.
    pub fingerprint: u64,
}

impl Provider {
    /// Its path for `dialect`, when it speaks it natively for `model` (without the provider prefix).
    pub fn dialect_path(
        &self,
        dialect: crate::mapping::inbound::Dialect,
        model: &str,
    ) -> Option<&str> {
        self.dialects
            .iter()
            .find(|(d, route)| {
                *d == dialect
                    && (route.models.is_empty()
                        || route.models.iter().any(|g| crate::glob::matches(g, model)))
            })
            .map(|(_, route)| route.path.as_str())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// The HTTP request for `call` carrying `key` the way this provider expects, with its static headers (and a
    /// user agent and `accept`, unless those set their own).
    pub fn request(
        &self,
        call: &UpstreamCall,
        key: &ApiKey,
        accept: HeaderValue,
    ) -> Result<reqwest::Request, String> {
        let pairs = call.query.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let url = match &self.auth {
            Auth::Query { param } => crate::upstream::upstream_url(
                &self.base_url,
                &call.path,
                pairs.chain([(param.as_str(), key.expose())]),
            ),
            _ => crate::upstream::upstream_url(&self.base_url, &call.path, pairs),
        }?;
        let mut request = reqwest::Request::new(call.method.clone(), url);
        *request.body_mut() = Some(call.body.clone().into());
        let headers = request.headers_mut();
        for (name, value) in self.headers.iter().chain(&call.headers) {
            headers.append(name, value.clone());
        }
        if let Auth::Header {
            name,
            prefix,
            suffix,
        } = &self.auth
        {
            let secret = key.expose();
            let mut text = String::with_capacity(prefix.len() + secret.len() + suffix.len());
            text.push_str(prefix);
            text.push_str(secret);
            text.push_str(suffix);
            let mut value = HeaderValue::try_from(text).map_err(|_| {
                "the key holds characters that an HTTP header cannot carry".to_string()
            })?;
            value.set_sensitive(true);
            headers.append(name, value);
        }
        headers
            .entry(http::header::USER_AGENT)
            .or_insert(HeaderValue::from_static(concat!(
                "keyrelay/",
                env!("CARGO_PKG_VERSION")
            )));
        headers.entry(http::header::ACCEPT).or_insert(accept);
        Ok(request)
    }

    /// Classifies an upstream failure: the script's `classify` hook first (when it has one and it answers; it
    /// runs off the async workers), then the declared rules, then the defaults by status.
    pub async fn judge(
        &self,
        status: u16,
        headers: &http::header::HeaderMap,
        body: &str,
        now: crate::clock::UnixMs,
    ) -> Result<Verdict, ScriptError> {
        if let Some(script) = self.script.as_ref().filter(|s| s.has(Hook::Classify)) {
            let pairs: Vec<(String, String)> = headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let (hook, text) = (script.clone(), body.to_string());
            let classified = crate::offload::run(crate::offload::Pool::Scripts, move || {
                hook.classify(status, &pairs, &text)
            })
            .await?;
            if let Some(c) = classified {
                let class: ErrorClass = serde_json::from_value(serde_json::Value::String(
                    c.class.clone(),
                ))
                .map_err(|_| {
                    script.hook_error(Hook::Classify, &format!("unknown class {:?}", c.class))
                })?;
                let scope = match c.scope.as_deref() {
                    None => class.default_scope(),
                    Some("model") => Scope::Model,
                    Some("key") => Scope::Key,
                    Some(other) => {
                        return Err(
                            script.hook_error(Hook::Classify, &format!("unknown scope {other:?}"))
                        );
                    }
                };
                let retry_after = c
                    .retry_after
                    .as_deref()
                    .and_then(|w| classify::stated_wait(w, now));
                return Ok(Verdict {
                    class,
                    scope,
                    retry_after,
                });
            }
        }
        Ok(self.classifier.classify(status, headers, body, now))
    }
}
