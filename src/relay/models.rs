//! `/v1/models`: each provider's static list merged with its upstream list. Upstream lists are cached; a stale
//! list is served while a background refresh runs, and the last good list is kept when a refresh fails.

use crate::provider::{ListSource, Provider};
use crate::snapshot::Snapshot;
use crate::upstream::HttpClient;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How long the first, blocking fetch of a provider's list may take before the static list is served alone.
const FIRST_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failed fetch, the next try waits this long (or `models_refresh`, if shorter): a listing must not hit
/// a failing upstream on every call.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);
/// The longest one upstream list fetch may take, body included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone)]
struct Cached {
    /// The upstream's model objects, as it sent them.
    models: Arc<Vec<Value>>,
    fetched: Instant,
    /// How long this entry stays fresh: `models_refresh`, or less after a failure.
    ttl: Option<Duration>,
    /// The base URL it came from; a changed URL makes the entry stale.
    base_url: String,
}

#[derive(Default)]
pub struct Catalog {
    cache: Mutex<HashMap<String, Cached>>,
    refreshing: Mutex<std::collections::HashSet<String>>,
}

impl Catalog {
    fn cached(&self, provider: &Provider) -> Option<Cached> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(&provider.name)
            .filter(|c| c.base_url == provider.base_url)
            .cloned()
    }

    fn store(&self, provider: &Provider, models: Arc<Vec<Value>>, ttl: Option<Duration>) {
        let entry = Cached {
            models,
            fetched: Instant::now(),
            ttl,
            base_url: provider.base_url.clone(),
        };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(provider.name.clone(), entry);
    }

    /// The merged list, as OpenAI model objects with `provider/model` ids, for every provider with keys.
    pub async fn list(
        self: &Arc<Self>,
        snapshot: &Snapshot,
        clients: &crate::upstream::Clients,
        max_age: Duration,
    ) -> Vec<Value> {
        let limit = snapshot.settings.max_response_bytes;
        let fetches = snapshot.serving().map(|p| {
            let http = clients.get(p.tuning.connect_timeout);
            self.upstream_models(p.clone(), http, max_age, limit)
        });
        let upstream = futures_util::future::join_all(fetches).await;
        let mut out = Vec::new();
        for (provider, upstream) in snapshot.serving().zip(upstream) {
            let mut seen = std::collections::HashSet::new();
            let statics = provider.static_models.iter().map(|id| json!({"id": id}));
            let all = statics.chain(upstream.iter().cloned());
            for mut model in all {
                let Some(id) = model.get("id").and_then(Value::as_str).map(str::to_string) else {
                    continue;
                };
                if !provider.filter.permits(&id) || !seen.insert(id.clone()) {
                    continue;
                }
                let owned_by = model
                    .get("owned_by")
                    .cloned()
                    .unwrap_or_else(|| json!(provider.name));
                let created = model
                    .get("created")
                    .cloned()
                    .filter(Value::is_i64)
                    .unwrap_or(json!(0));
                if let Value::Object(m) = &mut model {
                    m.insert("id".into(), json!(format!("{}/{id}", provider.name)));
                    m.insert("object".into(), json!("model"));
                    m.insert("created".into(), created);
                    m.insert("owned_by".into(), owned_by);
                }
                out.push(model);
            }
        }
        // config.yaml's aliases, where what they stand for can be served.
        for (alias, target) in &snapshot.settings.model_aliases {
            let served = target.split_once('/').is_some_and(|(p, m)| {
                snapshot
                    .serving()
                    .any(|s| s.name == p && s.filter.permits(m))
            });
            if served {
                out.push(json!({"id": alias, "object": "model", "created": 0, "owned_by": "keyrelay", "alias_of": target}));
            }
        }
        out
    }

    /// The provider's upstream list: cached, refreshed in the background once stale, fetched (briefly) the first
    /// time. Empty when the provider lists statically or the upstream never answered.
    async fn upstream_models(
        self: &Arc<Self>,
        provider: Arc<Provider>,
        http: HttpClient,
        max_age: Duration,
        limit: usize,
    ) -> Arc<Vec<Value>> {
        if provider.list == ListSource::Static {
            return Arc::default();
        }
        match self.cached(&provider) {
            Some(c) if c.fetched.elapsed() < c.ttl.unwrap_or(max_age).min(max_age) => c.models,
            Some(c) => {
                self.refresh_in_background(provider, http, limit);
                c.models
            }
            None => {
                // The first listing waits a little for the upstream. One that does not answer in time is
                // remembered as failed, so that no listing waits on it again until it is retried; the fetch goes
                // on in the background and its list is used once it comes.
                let Some(fetching) = self.refresh_in_background(provider.clone(), http, limit)
                else {
                    return Arc::default();
                };
                if tokio::time::timeout(FIRST_FETCH_TIMEOUT, fetching)
                    .await
                    .is_err()
                    && self.cached(&provider).is_none()
                {
                    tracing::warn!(provider = %provider.name, "the upstream model list did not come within {FIRST_FETCH_TIMEOUT:?}; listing the static models meanwhile");
                    self.store(&provider, Arc::default(), Some(RETRY_AFTER_FAILURE));
                }
                self.cached(&provider).map(|c| c.models).unwrap_or_default()
            }
        }
    }

    /// Fetches the provider's list in a task of its own, unless a fetch is under way already.
    fn refresh_in_background(
        self: &Arc<Self>,
        provider: Arc<Provider>,
        http: HttpClient,
        limit: usize,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let fresh = self
            .refreshing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(provider.name.clone());
        let me = self.clone();
        fresh.then(|| {
            tokio::spawn(async move {
                me.refresh(&provider, &http, limit).await;
                me.refreshing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&provider.name);
            })
        })
    }

    async fn refresh(&self, provider: &Provider, http: &HttpClient, limit: usize) {
        match fetch(provider, http, limit).await {
            Ok(models) => self.store(provider, Arc::new(models), None),
            Err(why) => {
                // Keep the last good list (or none), and try again a little later.
                let last = self.cached(provider).map(|c| c.models).unwrap_or_default();
                self.store(provider, last, Some(RETRY_AFTER_FAILURE));
                tracing::warn!(provider = %provider.name, error = %why, "cannot refresh the upstream model list; keeping the last good one")
            }
        }
    }
}

/// Fetches the upstream list with the provider's keys in turn (at most two), reading at most `limit` bytes.
async fn fetch(provider: &Provider, http: &HttpClient, limit: usize) -> Result<Vec<Value>, String> {
    let path = provider.paths.models.as_deref().ok_or("no models path")?;
    let mut last = String::from("no keys");
    for key in provider.keys.iter().take(2) {
        let Ok(request) = provider.request(
            &crate::upstream::UpstreamCall::get(path),
            key,
            http::HeaderValue::from_static("*/*"),
        ) else {
            continue;
        };
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, async {
            let response = http.send(request).await?;
            let status = response.status();
            if !status.is_success() {
                return Ok(Err(format!("status {}", status.as_u16())));
            }
            match crate::upstream::read_limited(response, limit).await {
                Ok(body) => Ok(Ok(body)),
                Err(crate::upstream::ReadError::TooLarge { limit }) => Ok(Err(format!(
                    "the model list is larger than {limit} bytes (max_response_size)"
                ))),
                Err(crate::upstream::ReadError::Broken(e)) => Err(e),
            }
        })
        .await;
        let bytes = match fetched {
            Ok(Ok(Ok(body))) => body,
            Ok(Ok(Err(status))) => {
                last = status;
                continue;
            }
            Ok(Err(e)) => {
                last = e.message;
                continue;
            }
            Err(_) => {
                last = format!("no answer within {FETCH_TIMEOUT:?}");
                continue;
            }
        };
        if let Some(script) = provider
            .script
            .as_ref()
            .filter(|s| s.has(crate::script::Hook::Models))
        {
            let hook = script.clone();
            return crate::offload::run(crate::offload::Pool::Scripts, move || {
                hook.map_models(&bytes)
            })
            .await
            .map_err(|e| e.to_string());
        }
        let body: Value =
            serde_json::from_slice(&bytes).map_err(|_| "the model list is not JSON".to_string())?;
        let items = match body {
            Value::Array(items) => items,
            Value::Object(mut o) => match o.remove("data") {
                Some(Value::Array(items)) => items,
                _ => return Err("the model list has no data array".into()),
            },
            _ => return Err("the model list is not a JSON list".into()),
        };
        return Ok(items
            .into_iter()
            .filter(|m| m.get("id").is_some_and(Value::is_string))
            .collect());
    }
    Err(last)
}
