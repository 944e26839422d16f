//! From a client's body to the call one candidate model makes: the model resolved and checked, the upstream call
//! built (passthrough, or the provider's request hook off the async workers), and the stream mapper chosen.

use super::continuation::Resume;
use super::fallback::Fallbacks;
use super::{Endpoint, Relay, RelayError};
use crate::observe::Journal;
use crate::provider::{Provider, UpstreamCall};
use crate::script::{Hook, MappedRequest};
use crate::secret::KeyId;
use crate::snapshot::Snapshot;
use crate::stream::Mapper;
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio::time::Instant;

/// The longest `provider/model` accepted.
const MAX_MODEL_LEN: usize = 256;

/// Everything fixed about one candidate model of a request before its first attempt.
pub(super) struct Job {
    /// What a broken stream is continued from, when its provider can continue one.
    pub resume: Option<Arc<Resume>>,
    pub provider: Arc<Provider>,
    /// `provider/model`, for logs.
    pub label: String,
    pub endpoint: Endpoint,
    pub model: String,
    pub call: UpstreamCall,
    pub stream: bool,
    pub wants_usage: bool,
    /// When the request began (a stream's total bound runs from here).
    pub begun: Instant,
    pub deadline: Instant,
    /// `max_response_size`.
    pub max_response: usize,
    /// This candidate is a fallback: its `provider/model`.
    pub fallback: Option<String>,
    /// Other models are left to try after this one: a model that does not answer at all is left at once.
    pub has_fallbacks: bool,
}

/// Where a job comes from.
pub(super) enum Start<'a> {
    /// A client's request, with the fallback models left after this one.
    Client {
        stream: bool,
        fallbacks: &'a Fallbacks,
        /// The `provider/model` when this candidate is a fallback.
        fallback: Option<String>,
    },
    /// The continuation of a broken stream, which skips the keys listed.
    Continuation { given_up: Vec<KeyId> },
}

impl Relay {
    /// The job for `body` (its `model` the candidate) and the keys it must not use.
    pub(super) async fn prepare(
        &self,
        endpoint: Endpoint,
        mut body: Map<String, Value>,
        begun: Instant,
        deadline: Instant,
        journal: &mut Option<Journal>,
        start: Start<'_>,
    ) -> Result<(Job, Vec<KeyId>), RelayError> {
        let (stream, fallbacks, fallback, given_up) = match start {
            Start::Client {
                stream,
                fallbacks,
                fallback,
            } => (stream, Some(fallbacks), fallback, Vec::new()),
            Start::Continuation { given_up } => (true, None, None, given_up),
        };
        let snapshot = self.snapshot();
        let (provider, model) = resolve_model(&snapshot, body.get("model"))?;
        if let Some(j) = journal.as_mut() {
            j.provider = provider.name.clone();
            j.model = model.clone();
        }
        let Some(path) = endpoint.path(&provider) else {
            return Err(RelayError::EndpointMissing {
                provider: provider.name.clone(),
                endpoint: endpoint.name(),
            });
        };
        // Kept only where a broken stream may be continued: the body as it came, to ask for the rest.
        let resume = fallbacks
            .filter(|_| {
                stream && provider.continuation.is_some() && snapshot.settings.continue_streams
            })
            .map(|fallbacks| {
                Arc::new(Resume {
                    body: body.clone(),
                    fallbacks: fallbacks.clone(),
                    fallback: fallback.clone(),
                })
            });
        let wants_usage = stream
            && body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        body.insert("model".into(), Value::String(model.clone()));
        if stream && provider.stream_usage && !wants_usage {
            let options = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(options) = options {
                options.insert("include_usage".into(), Value::Bool(true));
            }
        }
        let call = upstream_call(&provider, endpoint, path, &model, stream, body).await?;
        let job = Job {
            resume,
            label: format!("{}/{model}", provider.name),
            call,
            provider,
            endpoint,
            model,
            stream,
            wants_usage,
            begun,
            deadline,
            max_response: snapshot.settings.max_response_bytes,
            // Only fallbacks that could serve count: a model with nowhere real to go is not given up early.
            has_fallbacks: fallbacks.is_some_and(|f| {
                f.left()
                    .iter()
                    .any(|m| resolve(&snapshot, m).is_ok_and(|(p, _)| endpoint.path(&p).is_some()))
            }),
            fallback,
        };
        Ok((job, given_up))
    }
}

impl Job {
    /// The stream mapper: the provider's `stream_event` hook with its declared rules, or passthrough.
    pub(super) fn mapper(&self) -> Mapper {
        match self
            .provider
            .script
            .as_ref()
            .filter(|s| s.has(Hook::StreamEvent))
        {
            Some(script) => Mapper::Scripted {
                rules: self.provider.stream_rules.clone(),
                script: Some(script.stream()),
                writer: crate::stream::ChunkWriter::new(&self.model),
            },
            None => Mapper::Passthrough {
                label: self.label.clone(),
            },
        }
    }
}

/// The upstream call for a body: the provider's request hook (run off the async workers), or the body itself
/// (OpenAI passthrough).
async fn upstream_call(
    provider: &Arc<Provider>,
    endpoint: Endpoint,
    path: &str,
    model: &str,
    stream: bool,
    body: Map<String, Value>,
) -> Result<UpstreamCall, RelayError> {
    match provider.script.as_ref().filter(|s| s.has(Hook::Request)) {
        Some(script) => {
            let (p, hook, name) = (provider.clone(), script.clone(), model.to_string());
            let mapped = crate::offload::run(crate::offload::Pool::Scripts, move || {
                p.map_request(
                    &hook,
                    endpoint.hook_name(),
                    &name,
                    stream,
                    &Value::Object(body),
                )
            })
            .await?;
            Ok(mapped_call(mapped, model).map_err(|why| script.hook_error(Hook::Request, &why))?)
        }
        None => {
            let payload =
                serde_json::to_vec(&body).map_err(|e| RelayError::BadRequest(e.to_string()))?;
            Ok(UpstreamCall::post_json(path, payload.into()))
        }
    }
}

/// The upstream call a request hook described. Where the hook put the client's model into the path, it goes as
/// one percent-encoded segment, whatever it holds (`/`, `?`, `#`, `%`): a model name never reaches another path
/// or the query. Encoding a look-alike in the rest of the path too can only break that request, never redirect it.
fn mapped_call(m: MappedRequest, model: &str) -> Result<UpstreamCall, String> {
    let segment = crate::upstream::path_segment(model);
    let path = if segment == model {
        m.path
    } else {
        m.path.replace(model, &segment)
    };
    let method = http::Method::from_bytes(m.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", m.method))?;
    let mut headers = Vec::with_capacity(m.headers.len() + 1);
    for (k, v) in m.headers {
        let name = http::header::HeaderName::try_from(k.as_str())
            .map_err(|_| format!("invalid header name {k:?}"))?;
        let value = http::header::HeaderValue::try_from(v.as_str())
            .map_err(|_| format!("invalid value for header {k:?}"))?;
        headers.push((name, value));
    }
    let body = match m.body {
        Value::Null => bytes::Bytes::new(),
        body => {
            headers.push((
                http::header::CONTENT_TYPE,
                http::header::HeaderValue::from_static("application/json"),
            ));
            body.to_string().into()
        }
    };
    Ok(UpstreamCall {
        method,
        path,
        query: m.query,
        headers,
        body,
    })
}

/// Splits `provider/model` and checks that the provider can serve the model.
pub(super) fn resolve_model(
    snapshot: &Snapshot,
    model: Option<&Value>,
) -> Result<(Arc<Provider>, String), RelayError> {
    let model = match model {
        None => {
            return Err(RelayError::BadRequest(
                "`model` is required, e.g. \"openai/gpt-4o-mini\"".into(),
            ));
        }
        Some(Value::String(m)) => m,
        Some(_) => {
            return Err(RelayError::BadRequest(
                "`model` must be a string such as \"openai/gpt-4o-mini\"".into(),
            ));
        }
    };
    resolve(snapshot, model)
}

/// [`resolve_model`] for a model name.
fn resolve(snapshot: &Snapshot, model: &str) -> Result<(Arc<Provider>, String), RelayError> {
    if model.len() > MAX_MODEL_LEN || model.chars().any(char::is_control) {
        return Err(RelayError::BadRequest(format!(
            "`model` must be at most {MAX_MODEL_LEN} bytes of printable characters, written provider/model"
        )));
    }
    let Some((provider, name)) = model
        .split_once('/')
        .filter(|(p, m)| !p.is_empty() && !m.is_empty() && !matches!(*m, "." | ".."))
    else {
        return Err(RelayError::BadRequest(format!(
            "`model` {model:?} must be written provider/model, e.g. \"openai/gpt-4o-mini\""
        )));
    };
    let Some(p) = snapshot.providers.get(provider) else {
        return Err(RelayError::UnknownProvider(provider.to_string()));
    };
    if p.keys.is_empty() {
        return Err(RelayError::NoKeys(provider.to_string()));
    }
    if !p.filter.permits(name) {
        return Err(RelayError::ModelDenied(model.to_string()));
    }
    Ok((p.clone(), name.to_string()))
}
