//! One request's journey: find the provider, borrow a key, call the upstream, judge the answer, and retry, rotate,
//! fall back or give up — all inside one deadline.
//!
//! Where each part lives:
//!
//! - this file: the request as a whole, and the fallback loop over its candidate models ([`Relay::send`]);
//! - `call`: one candidate's upstream call (model resolution, request mapping);
//! - `run`: one candidate's attempts, retries, rotation and waits for a key (the retry policy);
//! - `attempt`: one attempt with one key;
//! - `breaker`: models left alone for a while during an outage;
//! - `continuation`: continuing a broken stream;
//! - `fallback`: the fallback lists; `models`: the `/v1/models` catalog; `error`: what the client is told.

mod attempt;
mod breaker;
mod call;
mod continuation;
mod error;
mod fallback;
pub mod models;
mod run;

use crate::clock::Clock;
use crate::keys::KeyStore;
use crate::mapping::inbound::Dialect;
use crate::observe::{Journal, Observer};
use crate::provider::Provider;
use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use bytes::Bytes;
use call::Start;
pub use continuation::MAX_CONTINUATIONS;
pub use error::{RelayError, Tried};
pub use fallback::MAX_FALLBACKS;
use fallback::{Candidates, Fallbacks};
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio::time::Instant;

/// Which endpoint a request is for: OpenAI's, or an inbound dialect spoken natively by the provider (the body
/// goes as the client wrote it, the answer and events come back as they came).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Embeddings,
    Native(Dialect),
}

impl Endpoint {
    /// The provider's path for this endpoint and `model`, if it offers it.
    fn path<'p>(self, provider: &'p Provider, model: &str) -> Option<&'p str> {
        match self {
            Self::Chat => provider.paths.chat.as_deref(),
            Self::Embeddings => provider.paths.embeddings.as_deref(),
            Self::Native(dialect) => provider.dialect_path(dialect, model),
        }
    }

    /// The endpoint's name as scripts see it (`ctx.endpoint`), and in logs.
    fn hook_name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embeddings => "embeddings",
            Self::Native(dialect) => dialect.name(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat completions",
            Self::Embeddings => "embeddings",
            Self::Native(dialect) => dialect.title(),
        }
    }

    /// It streams when the body asks.
    fn streams(self) -> bool {
        self != Self::Embeddings
    }
}

/// Who served a reply: what the `x-keyrelay-*` headers report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub provider: String,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The masked key that served it, if one did.
    pub key: Option<String>,
    /// The `provider/model` that answered, when it was a fallback.
    pub fallback: Option<String>,
    /// The answering upstream's request id and rate-limit headers, renamed `x-upstream-…`.
    pub upstream: UpstreamHeaders,
}

/// Headers of an upstream's answer passed on to the client under an `x-upstream-` prefix (`x-request-id` becomes
/// `x-upstream-request-id`): its request id (for the provider's support) and its rate-limit headers. Prefixed, they cannot be mistaken for the pool's own
/// state, which one key's limits are not.
pub type UpstreamHeaders = Vec<(http::HeaderName, http::HeaderValue)>;

/// The headers of `head` passed on, at most 16, each value ASCII, at most 256 bytes and without the key.
pub(crate) fn upstream_headers(
    head: &http::HeaderMap,
    key: &crate::secret::ApiKey,
) -> UpstreamHeaders {
    head.iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            matches!(name, "x-request-id" | "request-id")
                || name.starts_with("x-ratelimit-")
                || name.starts_with("anthropic-ratelimit-")
        })
        .filter_map(|(name, value)| {
            let text = value.to_str().ok().filter(|t| t.len() <= 256)?;
            if key.redact(text) != text {
                return None;
            }
            let bare = name.as_str().strip_prefix("x-").unwrap_or(name.as_str());
            let name = http::HeaderName::try_from(format!("x-upstream-{bare}")).ok()?;
            Some((name, value.clone()))
        })
        .take(16)
        .collect()
}

pub use crate::sse::SseBody;

/// A successful reply.
pub enum Reply {
    /// A JSON body, as the upstream sent it.
    Json { body: Bytes, served: Served },
    /// An SSE stream of OpenAI chunks ending in `data: [DONE]` (or an in-band error).
    Stream { body: SseBody, served: Served },
}

impl Reply {
    pub fn served(&self) -> &Served {
        match self {
            Self::Json { served, .. } | Self::Stream { served, .. } => served,
        }
    }

    fn served_mut(&mut self) -> &mut Served {
        match self {
            Self::Json { served, .. } | Self::Stream { served, .. } => served,
        }
    }
}

/// The engine. Cheap to clone; usable without the HTTP server.
#[derive(Clone)]
pub struct Relay {
    config: Arc<ArcSwap<Snapshot>>,
    store: Arc<dyn KeyStore>,
    clients: Arc<crate::upstream::Clients>,
    clock: Clock,
    catalog: Arc<models::Catalog>,
    /// Told about every request when it ends.
    observer: Arc<dyn Observer>,
    /// Cancelled when a shutdown's grace period is over: streams still running end with an in-band error.
    closing: tokio_util::sync::CancellationToken,
    breakers: Arc<breaker::Breakers>,
}

impl Relay {
    pub fn new(config: Arc<ArcSwap<Snapshot>>, store: Arc<dyn KeyStore>, clock: Clock) -> Self {
        Self {
            config,
            store,
            clients: Arc::default(),
            clock,
            catalog: Arc::new(models::Catalog::default()),
            observer: Arc::new(crate::observe::Silent),
            closing: tokio_util::sync::CancellationToken::new(),
            breakers: Arc::default(),
        }
    }

    /// This relay, ending its streams when `closing` is cancelled.
    pub fn with_closing(mut self, closing: tokio_util::sync::CancellationToken) -> Self {
        self.closing = closing;
        self
    }

    /// This relay, telling `observer` about every request.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// A relay with an in-process key store and no usage file: the simplest way to use the engine as a library.
    pub fn in_memory(snapshot: Snapshot) -> Self {
        let policy = crate::keys::StorePolicy {
            daily_reset: snapshot.settings.daily_reset.clone(),
            pause: snapshot.settings.provider_pause,
        };
        let clock = Clock::system();
        let store = Arc::new(crate::keys::MemoryStore::new(clock, policy));
        Self::new(Arc::new(ArcSwap::from_pointee(snapshot)), store, clock)
    }

    /// The configuration snapshot new requests use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.load_full()
    }

    /// The clock all key state is stamped with.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Sends an OpenAI-shaped request body (`model` is `provider/model`) to the right provider.
    pub async fn send(
        &self,
        endpoint: Endpoint,
        body: Map<String, Value>,
    ) -> Result<Reply, RelayError> {
        self.send_with(endpoint, body, &[]).await
    }

    /// Whether a request `body` in `dialect` can go natively: its model's provider speaks the dialect, and so
    /// does every fallback it may move to (its own `fallbacks`, else config.yaml's). Otherwise it is translated,
    /// so that any candidate can serve it.
    pub fn speaks(&self, body: &Map<String, Value>, dialect: Dialect) -> bool {
        let snapshot = self.snapshot();
        let Some(model) = body.get("model").and_then(Value::as_str) else {
            return false;
        };
        let speaks = |model: &str| {
            call::resolve(&snapshot, model)
                .is_ok_and(|(p, name)| p.dialect_path(dialect, &name).is_some())
        };
        let listed = |list: &[String]| list.iter().all(|m| speaks(m));
        speaks(model)
            && match body.get("fallbacks") {
                Some(Value::Array(own)) => own.iter().all(|m| m.as_str().is_some_and(speaks)),
                Some(_) => false,
                None => snapshot
                    .settings
                    .fallbacks
                    .get(&*snapshot.canonical(model))
                    .is_none_or(|list| listed(list)),
            }
            && snapshot
                .settings
                .context_fallbacks
                .get(&*snapshot.canonical(model))
                .is_none_or(|list| listed(list))
    }

    /// [`Self::send`], with client headers sent upstream as they are (a native dialect's own, such as
    /// `anthropic-beta`).
    pub async fn send_with(
        &self,
        endpoint: Endpoint,
        mut body: Map<String, Value>,
        headers: &[(http::HeaderName, http::HeaderValue)],
    ) -> Result<Reply, RelayError> {
        let snapshot = self.snapshot();
        let settings = &snapshot.settings;
        // Aliases are resolved first, so that fallbacks, logs and metrics all see the model they stand for.
        let (requested, aliased) = match body.get("model").and_then(Value::as_str) {
            Some(m) => match snapshot.canonical(m) {
                std::borrow::Cow::Borrowed(m) => (m.to_string(), false),
                std::borrow::Cow::Owned(m) => (m, true),
            },
            None => (String::new(), false),
        };
        // The body is rewritten only for an alias: most requests name their model as the engine does.
        if aliased {
            body.insert("model".into(), Value::String(requested.clone()));
        }
        let stream =
            endpoint.streams() && body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        // The client's own fallback lists are consumed here, never forwarded, and win over config.yaml's.
        let fallbacks = Fallbacks::new(
            fallback::take(&mut body, "fallbacks")?
                .or_else(|| settings.fallbacks.get(&requested).cloned())
                .unwrap_or_default(),
        );
        let context_fallbacks = fallback::take(&mut body, "context_fallbacks")?
            .or_else(|| settings.context_fallbacks.get(&requested).cloned())
            .filter(|list| !list.is_empty())
            .map(Fallbacks::new);
        let mut candidates = Candidates::new(fallbacks, context_fallbacks);
        let mut journal = Journal::new(
            endpoint.hook_name(),
            "",
            &requested,
            stream,
            self.clock.now(),
        );
        if self.observer.wants_bodies() {
            journal.request = Some(Value::Object(body.clone()));
        }
        let mut journal = Some(journal);
        let begun = Instant::now();
        let deadline = begun + settings.request_timeout;

        // The requested model, then its fallbacks, each with an even share of the time left.
        let mut model = requested.clone();
        let result = loop {
            let candidates_left = candidates.fallbacks.left().len() as u32 + 1;
            let share = deadline.saturating_duration_since(Instant::now()) / candidates_left;
            let this_deadline = if candidates_left == 1 {
                deadline
            } else {
                Instant::now() + share
            };
            let is_fallback = model != requested;
            // The client's own `model` is judged as it came (missing, not a string); a fallback's is ours.
            if is_fallback {
                body.insert("model".into(), Value::String(model.clone()));
            }
            let this_body = if candidates.last() {
                std::mem::take(&mut body)
            } else {
                body.clone()
            };
            let start = Start::Client {
                stream,
                fallbacks: &candidates.fallbacks,
                fallback: is_fallback.then(|| model.clone()),
                headers,
            };
            let answered = async {
                let (job, given_up) = self
                    .prepare(
                        endpoint,
                        this_body,
                        begun,
                        this_deadline,
                        &mut journal,
                        start,
                    )
                    .await?;
                let won = self.run(&job, &mut journal, given_up).await?;
                self.reply(won, &job, &mut journal).await
            };
            match answered.await {
                Ok(mut reply) => {
                    reply.served_mut().attempts += candidates.earlier_attempts;
                    break Ok(reply);
                }
                Err(e) => {
                    let time_left = Instant::now() < deadline;
                    let fallback_on_content_filter = settings.fallback_on_content_filter;
                    match candidates.after_failure(
                        &model,
                        is_fallback,
                        e,
                        fallback_on_content_filter,
                        time_left,
                    ) {
                        Ok(next) => model = next,
                        Err(e) => break Err(e),
                    }
                }
            }
        };

        self.finish(journal, &result);
        result
    }

    /// Reports a request that ended here. A stream takes its journal along and reports when it ends: `journal`
    /// is `None` then.
    fn finish(&self, journal: Option<Journal>, result: &Result<Reply, RelayError>) {
        if let Some(mut j) = journal {
            j.total_ms = j.elapsed_ms();
            j.first_byte_ms = j.total_ms;
            match result {
                Ok(reply) => {
                    j.status = 200;
                    j.key = reply.served().key.clone();
                    j.fallback = reply.served().fallback.clone();
                    if let (true, Reply::Json { body, .. }) = (j.request.is_some(), reply) {
                        j.response = serde_json::from_slice(body).ok();
                    }
                }
                Err(e) => {
                    let (status, _, code) = e.kind();
                    j.status = status;
                    j.error = Some(code.to_string());
                    j.key = e.served().and_then(|s| s.key);
                }
            }
            self.observer.finished(j);
        }
    }

    /// The merged model list of every provider with keys, as OpenAI model objects.
    pub async fn models(&self) -> Vec<Value> {
        let snapshot = self.snapshot();
        self.catalog
            .list(&snapshot, &self.clients, snapshot.settings.models_refresh)
            .await
    }
}
