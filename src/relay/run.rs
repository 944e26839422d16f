//! One candidate model's attempts: lease a key, call, judge, and retry or rotate until an answer, a client error,
//! or the deadline.
//!
//! The retry policy reads top to bottom in [`Relay::run`] (rotation) and `Relay::on_key` (one key): transient faults (server, connection, timeout) are
//! retried on the same key with backoff while the deadline allows, then the key is left for this request; rate
//! limits, quota and refusals cool the key and rotate at once; client errors are answered at once. A model that
//! does not answer at all, or whose breaker is open, is left at once when the request has a fallback. Waiting for
//! a busy or cooling key happens in [`Relay::lease`].

use super::attempt::{Attempt, AttemptError, Failure, Success};
use super::call::Job;
use super::{Relay, RelayError, Reply, Tried};
use crate::failure::{ErrorClass, Scope};
use crate::keys::{Ask, Unavailable};
use crate::lease::Lease;
use crate::mapping::Answer;
use crate::observe::{AttemptRecord, Journal};
use crate::provider::Verdict;
use crate::secret::KeyId;
use crate::stream::{Forward, Report};
use crate::usage::Usage;
use std::time::Duration;
use tokio::time::Instant;

/// A candidate that answered: what it answered, the key that did, and what it took.
pub(super) struct Won {
    pub success: Success,
    pub lease: Lease,
    pub tried: Tried,
}

/// What one key's attempts came to.
enum OnKey {
    Won(Won),
    /// It failed in a way another key may not: rotate, with the lease still held.
    Failed(Lease, Failure),
}

/// Notes one attempt in the request's journal.
fn record(
    job: &Job,
    journal: &mut Option<Journal>,
    key: &str,
    started: Instant,
    status: Option<u16>,
    class: Option<ErrorClass>,
    error: Option<String>,
) {
    if let Some(j) = journal.as_mut() {
        if let Some(key) = job.provider.keys.first() {
            j.masks(key.redactor());
        }
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
}

impl Relay {
    /// Attempts, retries and rotation until an answer, a client error, or the deadline.
    pub(super) async fn run(
        &self,
        job: &Job,
        journal: &mut Option<Journal>,
        mut given_up: Vec<KeyId>,
    ) -> Result<Won, RelayError> {
        let mut tried = Tried::new(&job.provider.name, &job.model);
        if job.has_fallbacks
            && let Some(until) = self.breakers.open_until(&job.label)
        {
            let wait = until.saturating_duration_since(Instant::now());
            return Err(RelayError::ModelDown {
                wait,
                tried: Box::new(tried),
            });
        }
        // A refusal (auth, forbidden) may be about the key or about what the request asks (a model the key may
        // not use): its verdict waits for the next key's answer, the lease held (and the key left) meanwhile. It
        // stands as it is when the next key serves or fails otherwise; a second refusal makes it the model's.
        let mut held_refusal: Option<(Lease, Failure)> = None;
        loop {
            let waiting = Instant::now();
            let lease = self.lease(job, &given_up, &mut tried).await;
            if let Some(j) = journal.as_mut() {
                j.waited_ms += crate::observe::ms(waiting.elapsed());
            }
            let lease = match lease {
                Ok(lease) => lease,
                // No other key to ask: when others rest after refusals of this model, the held one joins them
                // and the client gets the refusal.
                Err(e) => match (held_refusal.take(), e.tried()) {
                    (Some((mut first, failure)), Some(tried)) if tried.waiting.benched > 0 => {
                        first.fail(&Verdict {
                            scope: Scope::Model,
                            ..failure.verdict.clone()
                        });
                        return Err(upstream_answer(failure, tried, &first, job));
                    }
                    _ => return Err(e),
                },
            };
            let (mut lease, failure) = match self.on_key(job, journal, lease, &mut tried).await? {
                OnKey::Won(won) => return Ok(won),
                OnKey::Failed(lease, failure) => (lease, failure),
            };
            tracing::info!(
                provider = %job.provider.name,
                model = %job.model,
                key = %lease.key().masked,
                class = failure.verdict.class.as_str(),
                retry_after = ?failure.verdict.retry_after,
                cause = %failure.cause(),
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
            if failure.verdict.class.is_transient()
                && self.breakers.failure(&job.label)
                && job.has_fallbacks
            {
                tracing::warn!(model = %job.label, "the model keeps failing on every key: going to its fallbacks for a while");
                let wait = self
                    .breakers
                    .open_until(&job.label)
                    .map_or(Duration::ZERO, |u| {
                        u.saturating_duration_since(Instant::now())
                    });
                return Err(RelayError::ModelDown {
                    wait,
                    tried: Box::new(tried),
                });
            }
            if !matches!(
                failure.verdict.class,
                ErrorClass::Auth | ErrorClass::Forbidden
            ) {
                continue;
            }
            match held_refusal.take() {
                // Two keys refused one request: it is about the request (a model these keys may not use), not
                // the keys. Both rest for this model only, and the client gets the refusal.
                Some((mut first, held)) => {
                    first.fail(&Verdict {
                        scope: Scope::Model,
                        ..held.verdict
                    });
                    lease.fail(&Verdict {
                        scope: Scope::Model,
                        ..failure.verdict.clone()
                    });
                    return Err(upstream_answer(failure, &tried, &lease, job));
                }
                // Another key may tell: this one waits for its verdict.
                None if job.provider.keys.len() > tried.key_ids.len() => {
                    given_up.push(lease.key().id.clone());
                    held_refusal = Some((lease, failure));
                }
                // No other key to ask: the verdict stands.
                None => {}
            }
        }
    }

    /// Attempts on one leased key: the answer, a client's error, the deadline, or the failure that leaves the
    /// key (after retries on it while the failure is transient and the deadline allows).
    async fn on_key(
        &self,
        job: &Job,
        journal: &mut Option<Journal>,
        mut lease: Lease,
        tried: &mut Tried,
    ) -> Result<OnKey, RelayError> {
        let tuning = &job.provider.tuning;
        let mut on_this_key = 0;
        loop {
            on_this_key += 1;
            tried.attempts += 1;
            let attempt = Attempt {
                http: &self.clients.get(job.provider.tuning.connect_timeout),
                clock: &self.clock,
                provider: &job.provider,
                max_response: job.max_response,
            };
            let mapper = job.stream.then(|| job.mapper());
            let started = Instant::now();
            let result =
                tokio::time::timeout_at(job.deadline, attempt.send(&job.call, lease.key(), mapper))
                    .await;
            let masked = lease.key().masked.clone();
            let failure = match result {
                Err(_) => {
                    tried.note(ErrorClass::Timeout);
                    let why = "the deadline passed during this attempt".to_string();
                    record(
                        job,
                        journal,
                        &masked,
                        started,
                        None,
                        Some(ErrorClass::Timeout),
                        Some(why),
                    );
                    return Err(RelayError::Deadline(Box::new(std::mem::take(tried))));
                }
                Ok(Ok(success)) => {
                    record(job, journal, &masked, started, Some(200), None, None);
                    self.breakers.success(&job.label);
                    return Ok(OnKey::Won(Won {
                        success,
                        lease,
                        tried: std::mem::take(tried),
                    }));
                }
                // The script is at fault, not the key: release it without a verdict.
                Ok(Err(AttemptError::Script(e))) => {
                    record(
                        job,
                        journal,
                        &masked,
                        started,
                        None,
                        None,
                        Some(e.to_string()),
                    );
                    return Err(e.into());
                }
                // Too large for any key: answered at once, the key released without a verdict.
                Ok(Err(AttemptError::TooLarge { limit })) => {
                    let why = format!("the answer is larger than {limit} bytes");
                    record(job, journal, &masked, started, Some(200), None, Some(why));
                    let served = tried.served(Some(masked.to_string()));
                    return Err(RelayError::ResponseTooLarge {
                        limit,
                        served: Box::new(served),
                    });
                }
                Ok(Err(AttemptError::Upstream(failure))) => failure,
            };
            let status = (failure.status != 0).then_some(failure.status);
            let body = String::from_utf8_lossy(&failure.body).into_owned();
            let class = (!failure.blameless).then_some(failure.verdict.class);
            record(job, journal, &masked, started, status, class, Some(body));
            if failure.blameless {
                return Ok(OnKey::Failed(lease, failure));
            }
            tried.note(failure.verdict.class);
            if failure.verdict.class.is_client_error() {
                lease.fail(&failure.verdict);
                return Err(upstream_answer(failure, tried, &lease, job));
            }
            // Not even an answer (no response in time, no first event, a connection closed unanswered): a
            // verdict on the model; with a fallback left, go to it rather than to another key.
            if failure.silent && job.has_fallbacks {
                lease.fail(&failure.verdict);
                self.breakers.failure(&job.label);
                return Err(RelayError::ModelSilent(Box::new(std::mem::take(tried))));
            }
            if failure.verdict.class.is_transient() && on_this_key < tuning.attempts {
                let pause = tuning.backoff_after(on_this_key);
                // No time to wait for this key again: another key may answer at once.
                if Instant::now() + pause >= job.deadline {
                    return Ok(OnKey::Failed(lease, failure));
                }
                tracing::debug!(provider = %job.provider.name, key = %lease.key().masked, class = failure.verdict.class.as_str(), ?pause, "retrying on the same key");
                tokio::time::sleep(pause).await;
                if let Some(j) = journal.as_mut() {
                    j.waited_ms += crate::observe::ms(pause);
                }
                continue;
            }
            return Ok(OnKey::Failed(lease, failure));
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

    /// The client's reply from a candidate that answered: a JSON body (mapped by the provider's response hook,
    /// off the async workers, where it has one) or the forwarding stream, which takes the journal along.
    pub(super) async fn reply(
        &self,
        won: Won,
        job: &Job,
        journal: &mut Option<Journal>,
    ) -> Result<Reply, RelayError> {
        let Won {
            success,
            mut lease,
            tried,
        } = won;
        let mut served = tried.served(Some(lease.key().masked.to_string()));
        served.fallback = job.fallback.clone();
        if let Some(j) = journal.as_mut() {
            j.fallback = job.fallback.clone();
        }
        match success {
            Success::Json {
                body,
                usage,
                upstream,
            } => {
                served.upstream = upstream;
                let mapping = job.answer_mapping();
                let endpoint = job.endpoint.hook_name();
                let answer = if mapping.slow() {
                    // The key did its job even if the mapping fails.
                    lease.succeed(Usage::default());
                    let (model, upstream) = (job.model.clone(), body.clone());
                    crate::offload::run(crate::offload::Pool::Scripts, move || {
                        mapping.map(endpoint, &model, &upstream)
                    })
                    .await?
                } else {
                    mapping.map(endpoint, &job.model, &body)?
                };
                let (body, usage) = match answer {
                    // An OpenAI-compatible upstream that ignores `encoding_format` sends floats: written as
                    // base64 here, since the client decodes what it asked for.
                    Answer::Unchanged if job.base64_embeddings => {
                        match serde_json::from_slice::<serde_json::Value>(&body) {
                            Ok(mut answer) => {
                                embeddings_as_base64(&mut answer);
                                (answer.to_string().into(), usage)
                            }
                            Err(_) => (body, usage),
                        }
                    }
                    Answer::Unchanged => (body, usage),
                    Answer::Mapped(mut mapped) => {
                        if job.base64_embeddings {
                            embeddings_as_base64(&mut mapped);
                        }
                        let usage = mapped
                            .get("usage")
                            .map(Usage::from_value)
                            .unwrap_or_default();
                        (mapped.to_string().into(), usage)
                    }
                };
                let cost = lease.succeed(usage);
                if let Some(j) = journal.as_mut() {
                    j.prompt_tokens = usage.prompt_tokens;
                    j.completion_tokens = usage.completion_tokens;
                    j.cached_tokens = usage.cached_tokens;
                    j.cost = cost;
                }
                Ok(Reply::Json { body, served })
            }
            Success::Stream(start, upstream) => {
                served.upstream = upstream;
                let report = journal.take().map(|mut j| {
                    j.status = 200;
                    j.key = served.key.clone();
                    j.first_byte_ms = j.elapsed_ms();
                    Report::new(j, self.observer.clone())
                });
                let until = job
                    .provider
                    .tuning
                    .stream_total_timeout
                    .map(|total| job.begun + total);
                let forward = Forward::new(
                    *start,
                    self.continuer(job),
                    lease,
                    self.clock,
                    job.wants_usage,
                    job.label.clone(),
                    report,
                )
                .bounded(self.closing.clone(), until);
                Ok(Reply::Stream {
                    body: Box::pin(forward.into_stream()),
                    served,
                })
            }
        }
    }
}

/// An embeddings answer as OpenAI writes it for `encoding_format: "base64"`: each vector as the base64 of its
/// little-endian 32-bit floats (vectors already written so are left alone).
fn embeddings_as_base64(answer: &mut serde_json::Value) {
    use base64::Engine as _;
    let data = answer
        .get_mut("data")
        .and_then(serde_json::Value::as_array_mut);
    for item in data.into_iter().flatten() {
        let Some(serde_json::Value::Array(vector)) = item.get("embedding") else {
            continue;
        };
        let mut bytes = Vec::with_capacity(vector.len() * 4);
        for x in vector {
            bytes.extend_from_slice(&(x.as_f64().unwrap_or(0.0) as f32).to_le_bytes());
        }
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        item["embedding"] = serde_json::Value::String(text);
    }
}

/// The upstream's own answer to the request, passed to the client.
fn upstream_answer(failure: Failure, tried: &Tried, lease: &Lease, job: &Job) -> RelayError {
    let mut served = tried.served(Some(lease.key().masked.to_string()));
    served.upstream = failure.upstream;
    RelayError::Upstream {
        status: failure.status,
        body: failure.body,
        class: failure.verdict.class,
        served: Box::new(served),
        openai_wire: job.provider.script.is_none(),
    }
}
