//! One request's journey: find the provider, borrow a key, call the upstream, judge the answer, and retry, rotate
//! or give up — all inside one deadline.
//!
//! The retry policy reads top to bottom in `Relay::run`: transient faults (server, connection, timeout) are
//! retried on the same key with backoff; rate limits, quota and auth failures cool the key and rotate at once;
//! client errors are answered at once. Waiting for a busy or cooling key happens in `Relay::lease`.

mod attempt;

mod error;
mod fallback;
pub mod models;

use crate::clock::Clock;
use crate::keys::{Ask, KeyStore, Lease, Unavailable};
use crate::observe::{AttemptRecord, Journal, Observer};
use crate::script::{Hook, MappedRequest};
use crate::secret::KeyId;
use crate::snapshot::Snapshot;
use crate::spec::UpstreamCall;
use crate::spec::{ErrorClass, Provider};
use crate::stream::Forward;
use crate::stream::{Continuer, Mapper, Report, Usage};
use arc_swap::ArcSwap;
use attempt::{Attempt, AttemptError, Success};
use bytes::Bytes;
pub use error::{RelayError, Tried};
use fallback::Fallbacks;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Which OpenAI endpoint a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Embeddings,
}

impl Endpoint {
    fn path(self, provider: &Provider) -> Option<&str> {
        match self {
            Self::Chat => provider.paths.chat.as_deref(),
            Self::Embeddings => provider.paths.embeddings.as_deref(),
        }
    }

    /// The endpoint's name as scripts see it (`ctx.endpoint`).
    fn hook_name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embeddings => "embeddings",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat completions",
            Self::Embeddings => "embeddings",
        }
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
}

pub use crate::stream::SseBody;

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

/// Everything fixed about one request before the first attempt.
struct Job {
    /// What a broken stream is continued from, when its provider can continue one.
    resume: Option<Arc<Resume>>,
    provider: Arc<Provider>,
    /// `provider/model`, for logs.
    label: String,
    endpoint: Endpoint,
    model: String,
    call: UpstreamCall,
    stream: bool,
    wants_usage: bool,
    deadline: Instant,
    /// `max_response_size`.
    max_response: usize,
}

/// How a broken stream may be continued: the client's body as it came (its `model` the `provider/model` that
/// served), and the fallback models left, tried after the other keys of that model.
struct Resume {
    body: Map<String, Value>,
    fallbacks: Fallbacks,
}

/// Where a run starts from.
enum Start<'a> {
    /// A client's request, with the fallback models left after this one.
    Client {
        stream: bool,
        fallbacks: &'a Fallbacks,
    },
    /// The continuation of a broken stream: itself never continued, it skips the key that broke.
    Continuation { given_up: Vec<KeyId> },
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

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Sends an OpenAI-shaped request body (`model` is `provider/model`) to the right provider.
    pub async fn send(
        &self,
        endpoint: Endpoint,
        mut body: Map<String, Value>,
    ) -> Result<Reply, RelayError> {
        let snapshot = self.snapshot();
        let settings = &snapshot.settings;
        let requested = body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let stream = endpoint == Endpoint::Chat
            && body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        // The client's own fallback lists are consumed here, never forwarded, and win over config.yaml's.
        let mut fallbacks = Fallbacks::new(
            fallback::take(&mut body, "fallbacks")?
                .or_else(|| settings.fallbacks.get(&requested).cloned())
                .unwrap_or_default(),
        );
        let mut context_fallbacks = fallback::take(&mut body, "context_fallbacks")?
            .or_else(|| settings.context_fallbacks.get(&requested).cloned())
            .filter(|list| !list.is_empty())
            .map(Fallbacks::new);
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
        let deadline = Instant::now() + settings.request_timeout;

        // The requested model, then its fallbacks, each with an even share of the time left.
        let mut model = requested.clone();
        let mut earlier_attempts = 0;
        let mut on_context_list = false;
        // The error to answer with if no candidate serves.
        let mut answer: Option<RelayError> = None;
        let result = loop {
            let candidates_left = fallbacks.left().len() as u32 + 1;
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
            let last = fallbacks.is_empty() && context_fallbacks.is_none();
            let this_body = if last {
                std::mem::take(&mut body)
            } else {
                body.clone()
            };
            match self
                .prepare_and_run(
                    endpoint,
                    this_body,
                    this_deadline,
                    &mut journal,
                    Start::Client {
                        stream,
                        fallbacks: &fallbacks,
                    },
                )
                .await
            {
                Ok(mut reply) => {
                    let served = reply.served_mut();
                    served.attempts += earlier_attempts;
                    served.fallback = is_fallback.then(|| model.clone());
                    break Ok(reply);
                }
                Err(e) => {
                    // A prompt too long for this model moves to the context-window list only: the general
                    // fallbacks are for a model that cannot serve, not one that is too small.
                    let context = matches!(
                        e,
                        RelayError::Upstream {
                            class: ErrorClass::ContextWindow,
                            ..
                        }
                    );
                    if context && let Some(list) = context_fallbacks.take() {
                        fallbacks = list;
                        on_context_list = true;
                    }
                    // A fallback that cannot be served at all (no keys, unknown, filtered) is skipped.
                    let unservable = is_fallback
                        && matches!(
                            e,
                            RelayError::UnknownProvider(_)
                                | RelayError::NoKeys(_)
                                | RelayError::ModelDenied(_)
                                | RelayError::EndpointMissing { .. }
                        );
                    let move_on = if context {
                        on_context_list
                    } else {
                        unservable || e.wants_fallback(settings.fallback_on_content_filter)
                    };
                    let next = if move_on && Instant::now() < deadline {
                        fallbacks.pop()
                    } else {
                        None
                    };
                    earlier_attempts += e.served().map_or(0, |s| s.attempts);
                    if let Some(next) = &next {
                        tracing::info!(from = %model, to = %next, error = %e, "trying a fallback model");
                    }
                    // A fallback skipped as unservable never stands in for the answer a model that was tried
                    // gave (a 429 keeps its Retry-After).
                    if !unservable || answer.is_none() {
                        answer = Some(e);
                    }
                    match next {
                        Some(next) => model = next,
                        None => {
                            let mut e = answer.take().expect("set above");
                            let own = e.served().map_or(0, |s| s.attempts);
                            e.add_attempts(earlier_attempts - own);
                            break Err(e);
                        }
                    }
                }
            }
        };

        // A stream takes its journal along and reports when it ends.
        if let Some(mut j) = journal {
            j.total_ms = j.elapsed_ms();
            j.first_byte_ms = j.total_ms;
            match &result {
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
        result
    }

    async fn prepare_and_run(
        &self,
        endpoint: Endpoint,
        mut body: Map<String, Value>,
        deadline: Instant,
        journal: &mut Option<Journal>,
        start: Start<'_>,
    ) -> Result<Reply, RelayError> {
        let (stream, fallbacks, given_up) = match start {
            Start::Client { stream, fallbacks } => (stream, Some(fallbacks), Vec::new()),
            Start::Continuation { given_up } => (true, None, given_up),
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
            deadline,
            max_response: snapshot.settings.max_response_bytes,
        };
        self.run(job, journal, given_up).await
    }

    /// Attempts, retries and rotation until a reply, a client error, or the deadline.
    async fn run(
        &self,
        job: Job,
        journal: &mut Option<Journal>,
        mut given_up: Vec<KeyId>,
    ) -> Result<Reply, RelayError> {
        let mut tried = Tried::new(&job.provider.name, &job.model);
        let record = |journal: &mut Option<Journal>,
                      key: &str,
                      started: Instant,
                      status: Option<u16>,
                      class: Option<ErrorClass>,
                      error: Option<String>| {
            if let Some(j) = journal.as_mut() {
                j.attempts.push(AttemptRecord {
                    model: job.label.clone(),
                    key: key.to_string(),
                    started_ms: started
                        .duration_since(Instant::from_std(j.started))
                        .as_millis() as u64,
                    latency_ms: crate::observe::ms(started.elapsed()),
                    status,
                    class,
                    error: error.map(|e| crate::observe::truncate(&e, 2048)),
                });
            }
        };
        loop {
            let waiting = Instant::now();
            let lease = self.lease(&job, &given_up, &mut tried).await;
            if let Some(j) = journal.as_mut() {
                j.waited_ms += crate::observe::ms(waiting.elapsed());
            }
            let mut lease = lease?;
            let tuning = &job.provider.tuning;
            let mut on_this_key = 0;
            let failure = loop {
                on_this_key += 1;
                tried.attempts += 1;
                let attempt = Attempt {
                    http: &self.clients.get(job.provider.tuning.connect_timeout),
                    clock: &self.clock,
                    provider: &job.provider,
                    max_response: job.max_response,
                };
                let mapper = job.stream.then(|| self.mapper(&job));
                let started = Instant::now();
                let result = tokio::time::timeout_at(
                    job.deadline,
                    attempt.send(&job.call, lease.key(), mapper),
                )
                .await;
                let masked = lease.key().masked.clone();
                let failure = match result {
                    Err(_) => {
                        tried.note(ErrorClass::Timeout);
                        let why = "the deadline passed during this attempt".to_string();
                        record(
                            journal,
                            &masked,
                            started,
                            None,
                            Some(ErrorClass::Timeout),
                            Some(why),
                        );
                        return Err(RelayError::Deadline(Box::new(tried)));
                    }
                    Ok(Ok(success)) => {
                        record(journal, &masked, started, Some(200), None, None);
                        return self.reply(success, lease, &job, &tried, journal).await;
                    }
                    // The script is at fault, not the key: release it without a verdict.
                    Ok(Err(AttemptError::Script(e))) => {
                        record(journal, &masked, started, None, None, Some(e.to_string()));
                        return Err(e.into());
                    }
                    // Too large for any key: answered at once, the key released without a verdict.
                    Ok(Err(AttemptError::TooLarge { limit })) => {
                        let why = format!("the answer is larger than {limit} bytes");
                        record(journal, &masked, started, Some(200), None, Some(why));
                        let served = tried.served(Some(masked.to_string()));
                        return Err(RelayError::ResponseTooLarge { limit, served });
                    }
                    Ok(Err(AttemptError::Upstream(failure))) => failure,
                };
                let status = (failure.status != 0).then_some(failure.status);
                let body = String::from_utf8_lossy(&failure.body).into_owned();
                let class = (!failure.blameless).then_some(failure.verdict.class);
                record(journal, &masked, started, status, class, Some(body));
                if failure.blameless {
                    break failure;
                }
                tried.note(failure.verdict.class);
                if failure.verdict.class.is_client_error() {
                    lease.fail(&failure.verdict);
                    return Err(RelayError::Upstream {
                        status: failure.status,
                        body: failure.body,
                        class: failure.verdict.class,
                        served: tried.served(Some(lease.key().masked.to_string())),
                        openai_wire: job.provider.script.is_none(),
                    });
                }
                if failure.verdict.class.is_transient() && on_this_key < tuning.attempts {
                    let pause = tuning.backoff_after(on_this_key);
                    // No time to wait for this key again: another key may answer at once.
                    if Instant::now() + pause >= job.deadline {
                        break failure;
                    }
                    tracing::debug!(provider = %job.provider.name, key = %lease.key().masked, class = failure.verdict.class.as_str(), ?pause, "retrying on the same key");
                    tokio::time::sleep(pause).await;
                    if let Some(j) = journal.as_mut() {
                        j.waited_ms += crate::observe::ms(pause);
                    }
                    continue;
                }
                break failure;
            };
            tracing::info!(
                provider = %job.provider.name,
                model = %job.model,
                key = %lease.key().masked,
                class = failure.verdict.class.as_str(),
                retry_after = ?failure.verdict.retry_after,
                "rotating away from a failing key"
            );
            tried.unusable = failure.unusable;
            // A key that failed transiently, or could not be used at all, is not tried again by this request. A
            // key cooled by its failure (rate limit, quota, auth) stays a candidate: the store keeps it out until
            // its cooldown ends, and a short cooldown that ends before the deadline is worth waiting for.
            if failure.verdict.class.is_transient() || failure.blameless {
                given_up.push(lease.key().id.clone());
            }
            if failure.blameless {
                continue;
            }
            lease.fail(&failure.verdict);
            // Two keys refused for one request are about the request (a model these keys may not use), not the
            // keys: answer with the refusal rather than bench every key of the provider. (With no key left
            // untried, the pool itself is exhausted, and the lease says so.)
            let refusals = [ErrorClass::Auth, ErrorClass::Forbidden]
                .iter()
                .filter_map(|c| tried.classes.get(c))
                .sum::<u32>();
            if matches!(
                failure.verdict.class,
                ErrorClass::Auth | ErrorClass::Forbidden
            ) && refusals >= 2
                && job.provider.keys.len() > tried.key_ids.len()
            {
                return Err(RelayError::Upstream {
                    status: failure.status,
                    body: failure.body,
                    class: failure.verdict.class,
                    served: tried.served(Some(lease.key().masked.to_string())),
                    openai_wire: job.provider.script.is_none(),
                });
            }
        }
    }

    /// A lease on a usable key, waiting (woken by releases, never polling) while keys are busy or cooling and the
    /// deadline allows.
    async fn lease(
        &self,
        job: &Job,
        given_up: &[KeyId],
        tried: &mut Tried,
    ) -> Result<Lease, RelayError> {
        let provider = &job.provider;
        let wake = self.store.wakeup(&provider.name);
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ask = Ask {
                provider: &provider.name,
                model: &job.model,
                keys: &provider.keys,
                exclude: given_up,
                tuning: &provider.tuning,
            };
            let why: Unavailable = match self.store.acquire(ask).await {
                Ok(grant) => {
                    if !tried.key_ids.contains(&grant.key.id) {
                        tried.key_ids.push(grant.key.id.clone());
                    }
                    return Ok(Lease::new(self.store.clone(), provider.clone(), grant));
                }
                Err(why) => why,
            };
            tried.waiting = why.clone();
            // Nothing to wait for: every key was given up on, or rests after auth failures that a short wait
            // will not cure.
            if why.busy == 0 && why.cooling == why.benched {
                return Err(RelayError::Exhausted(Box::new(std::mem::take(tried))));
            }
            let deadline_wall = self.clock.wall_at(job.deadline);
            if why.busy == 0
                && let Some(ready_at) = why.ready_at
                && ready_at >= deadline_wall
            {
                let wait = Duration::from_millis((ready_at - self.clock.now()).max(0) as u64);
                return Err(RelayError::AllCooling {
                    retry_after: wait,
                    tried: Box::new(std::mem::take(tried)),
                });
            }
            let wake_at = why
                .ready_at
                .map_or(job.deadline, |r| self.clock.instant_at(r).min(job.deadline));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            if Instant::now() >= job.deadline {
                return Err(RelayError::Deadline(Box::new(std::mem::take(tried))));
            }
        }
    }

    /// What continues a broken stream of `job`, if its provider can continue a prefilled assistant message: the
    /// same request with the answer so far as a last assistant message, on another key of the same model, then
    /// on the fallbacks left whose providers can continue one too; each with an even share of a fresh deadline.
    fn continuer(&self, job: &Job, failed_key: KeyId) -> Option<Continuer> {
        let resume = job.resume.clone()?;
        let (relay, endpoint) = (self.clone(), job.endpoint);
        Some(Box::new(move |partial: String| {
            Box::pin(async move {
                let deadline = Instant::now() + relay.snapshot().settings.request_timeout;
                let models = std::iter::once(None).chain(resume.fallbacks.left().iter().map(Some));
                for (i, model) in models.enumerate() {
                    let mut body = resume.body.clone();
                    if let Some(model) = model {
                        body.insert("model".into(), Value::String(model.clone()));
                    }
                    let snapshot = relay.snapshot();
                    let Ok((provider, _)) = resolve_model(&snapshot, body.get("model")) else {
                        continue;
                    };
                    let Some(mut assistant) = provider.continuation.clone() else {
                        continue;
                    };
                    let Some(Value::Array(messages)) = body.get_mut("messages") else {
                        return None;
                    };
                    // With nothing said yet, the same request again: upstreams refuse an empty prefill.
                    if !partial.is_empty() {
                        assistant.insert("role".into(), Value::String("assistant".into()));
                        assistant.insert("content".into(), Value::String(partial.clone()));
                        messages.push(Value::Object(assistant));
                    }
                    let left = (resume.fallbacks.left().len() + 1 - i) as u32;
                    let share = deadline.saturating_duration_since(Instant::now()) / left;
                    let given_up = if i == 0 {
                        vec![failed_key.clone()]
                    } else {
                        Vec::new()
                    };
                    let start = Start::Continuation { given_up };
                    match relay
                        .prepare_and_run(endpoint, body, Instant::now() + share, &mut None, start)
                        .await
                    {
                        Ok(Reply::Stream { body, .. }) => return Some(body),
                        Ok(Reply::Json { .. }) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "no continuation of the broken stream here")
                        }
                    }
                }
                None
            }) as crate::keys::BoxFuture<'static, Option<SseBody>>
        }))
    }

    /// The stream mapper for a job: the provider's `stream_event` hook, or passthrough.
    fn mapper(&self, job: &Job) -> Mapper {
        match job
            .provider
            .script
            .as_ref()
            .filter(|s| s.has(Hook::StreamEvent))
        {
            Some(script) => Mapper::Scripted {
                rules: job.provider.stream_rules.clone(),
                script: Some(script.stream()),
                writer: crate::stream::ChunkWriter::new(&job.model),
            },
            None => Mapper::Passthrough {
                label: job.label.clone(),
            },
        }
    }

    async fn reply(
        &self,
        success: Success,
        mut lease: Lease,
        job: &Job,
        tried: &Tried,
        journal: &mut Option<Journal>,
    ) -> Result<Reply, RelayError> {
        let served = tried.served(Some(lease.key().masked.to_string()));
        match success {
            Success::Json { body, usage } => {
                let script = job
                    .provider
                    .script
                    .as_ref()
                    .filter(|s| s.has(Hook::Response));
                let (body, usage) = match script {
                    None => (body, usage),
                    Some(script) => {
                        // The key did its job even if the mapping fails.
                        lease.succeed(0, 0);
                        let (p, hook) = (job.provider.clone(), script.clone());
                        let (endpoint, model) = (job.endpoint, job.model.clone());
                        let mapped = crate::offload::run(move || {
                            p.map_response(&hook, endpoint.hook_name(), &model, &body)
                        })
                        .await?;
                        let usage = mapped
                            .get("usage")
                            .map(Usage::from_value)
                            .unwrap_or_default();
                        (mapped.to_string().into(), usage)
                    }
                };
                lease.succeed(usage.prompt_tokens, usage.completion_tokens);
                if let Some(j) = journal.as_mut() {
                    j.prompt_tokens = usage.prompt_tokens;
                    j.completion_tokens = usage.completion_tokens;
                }
                Ok(Reply::Json { body, served })
            }
            Success::Stream(start) => {
                let report = journal.take().map(|mut j| {
                    j.status = 200;
                    j.fallback = served.fallback.clone();
                    j.key = served.key.clone();
                    j.first_byte_ms = j.elapsed_ms();
                    Report::new(j, self.observer.clone())
                });
                let resume = self.continuer(job, lease.key().id.clone());
                let mut forward = Forward::new(
                    *start,
                    resume,
                    lease,
                    self.clock,
                    job.wants_usage,
                    job.label.clone(),
                    report,
                );
                forward.end_when(self.closing.clone());
                Ok(Reply::Stream {
                    body: Box::pin(forward.into_stream()),
                    served,
                })
            }
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
            let mapped = crate::offload::run(move || {
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

/// The longest `provider/model` accepted.
const MAX_MODEL_LEN: usize = 256;

/// Splits `provider/model` and checks that the provider can serve the model.
fn resolve_model(
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
        return Err(RelayError::ModelDenied(model.clone()));
    }
    Ok((p.clone(), name.to_string()))
}
