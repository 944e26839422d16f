//! From a client's body to the call one candidate model makes: the model resolved and checked, the upstream call
//! built by the provider's request mapping, and its stream mapping started.

use super::continuation::Resume;
use super::fallback::Fallbacks;
use super::{Endpoint, Relay, RelayError};
use crate::mapping::{EventMapper, Target};
use crate::observe::Journal;
use crate::provider::Provider;
use crate::secret::KeyId;
use crate::snapshot::Snapshot;
use crate::upstream::UpstreamCall;
use http::{HeaderName, HeaderValue};
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
    /// The client asked for embeddings as base64 (`encoding_format`): mapped answers are written that way.
    pub base64_embeddings: bool,
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
        /// The client's headers that a native dialect sends upstream (`anthropic-beta`).
        headers: &'a [(HeaderName, HeaderValue)],
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
        // A request is refused for want of room, if at all, before its first upstream attempt: a fallback follows
        // attempts already made, a continuation a stream already begun.
        let refusable = matches!(start, Start::Client { fallback: None, .. }).then_some(deadline);
        let (stream, fallbacks, fallback, given_up, headers) = match start {
            Start::Client {
                stream,
                fallbacks,
                fallback,
                headers,
            } => (stream, Some(fallbacks), fallback, Vec::new(), headers),
            Start::Continuation { given_up } => (true, None, None, given_up, &[][..]),
        };
        let snapshot = self.snapshot();
        let (provider, model) = resolve_model(&snapshot, body.get("model"))?;
        if let Some(j) = journal.as_mut() {
            j.provider = provider.name.clone();
            j.model = model.clone();
        }
        let Some(path) = endpoint.path(&provider, &model) else {
            return Err(RelayError::EndpointMissing {
                provider: provider.name.clone(),
                endpoint: endpoint.name(),
            });
        };
        // Kept only where a broken stream may be continued: the body as it came, to ask for the rest.
        let resume = fallbacks
            .filter(|_| {
                // Continuing writes chat: a native dialect's broken stream ends with its error event.
                stream
                    && endpoint == Endpoint::Chat
                    && provider.continuation.is_some()
                    && snapshot.settings.continue_streams
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
        let base64_embeddings = endpoint == Endpoint::Embeddings
            && body.get("encoding_format").and_then(Value::as_str) == Some("base64");
        body.insert("model".into(), Value::String(model.clone()));
        if endpoint == Endpoint::Chat {
            for (from, to) in &provider.renames {
                if !body.contains_key(to)
                    && let Some(value) = body.remove(from)
                {
                    body.insert(to.clone(), value);
                }
            }
        }
        let openai_shaped = match endpoint {
            Endpoint::Native(dialect) => dialect.openai_shaped(),
            _ => endpoint == Endpoint::Chat,
        };
        if stream && openai_shaped && provider.stream_usage && !wants_usage {
            let options = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(options) = options {
                options.insert("include_usage".into(), Value::Bool(true));
            }
        }
        let mut call =
            upstream_call(&provider, endpoint, path, &model, stream, body, refusable).await?;
        call.headers.extend(headers.iter().cloned());
        let job = Job {
            resume,
            label: format!("{}/{model}", provider.name),
            call,
            provider,
            endpoint,
            model,
            stream,
            wants_usage,
            base64_embeddings,
            begun,
            deadline,
            max_response: snapshot.settings.max_response_bytes,
            // Only fallbacks that could serve count: a model with nowhere real to go is not given up early.
            has_fallbacks: fallbacks.is_some_and(|f| {
                f.left().iter().any(|m| {
                    resolve(&snapshot, m).is_ok_and(|(p, name)| endpoint.path(&p, &name).is_some())
                })
            }),
            fallback,
        };
        Ok((job, given_up))
    }
}

impl Job {
    /// A new stream's mapping: the provider's declared rules and `stream_event` hook, or passthrough.
    pub(super) fn mapper(&self) -> EventMapper {
        match self.endpoint {
            Endpoint::Native(dialect) => EventMapper::new(
                dialect.events().start(&self.label),
                crate::mapping::ChunkWriter::new(&self.model),
            ),
            _ => self.provider.mapping.stream(&self.model, &self.label),
        }
    }

    /// How a JSON answer is mapped: by the provider's mapping, or not at all for a native dialect.
    pub(super) fn answer_mapping(&self) -> Arc<dyn crate::mapping::AnswerMapping> {
        match self.endpoint {
            Endpoint::Native(_) => Arc::new(crate::mapping::passthrough::Passthrough),
            _ => self.provider.mapping.answer.clone(),
        }
    }
}

/// The upstream call for a body, by the provider's request mapping (off the async workers when it runs a
/// script, in the client's turn; with `refusable`, the deadline, it may be refused as [`RelayError::Busy`]).
async fn upstream_call(
    provider: &Arc<Provider>,
    endpoint: Endpoint,
    path: &str,
    model: &str,
    stream: bool,
    body: Map<String, Value>,
    refusable: Option<Instant>,
) -> Result<UpstreamCall, RelayError> {
    // A native dialect goes as the client wrote it.
    let mapping: Arc<dyn crate::mapping::RequestMapping> = match endpoint {
        Endpoint::Native(_) => Arc::new(crate::mapping::passthrough::Passthrough),
        _ => provider.mapping.request.clone(),
    };
    let draft = if mapping.slow() {
        let (path, model) = (path.to_string(), model.to_string());
        let job = move || {
            let target = Target {
                endpoint: endpoint.hook_name(),
                model: &model,
                stream,
                path: &path,
            };
            mapping.map(&target, Value::Object(body))
        };
        let pool = crate::offload::Pool::Scripts;
        match refusable {
            Some(deadline) => crate::offload::admit(pool, Some(deadline), job).await?,
            None => crate::offload::run(pool, job).await,
        }?
    } else {
        let target = Target {
            endpoint: endpoint.hook_name(),
            model,
            stream,
            path,
        };
        mapping.map(&target, Value::Object(body))?
    };
    draft.into_call().map_err(RelayError::BadRequest)
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

/// [`resolve_model`] for a model name (an alias resolved first).
pub(super) fn resolve(
    snapshot: &Snapshot,
    model: &str,
) -> Result<(Arc<Provider>, String), RelayError> {
    let model = &*snapshot.canonical(model);
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
