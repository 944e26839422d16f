//! Continuing a broken stream. When a chat stream breaks mid-answer (cut, stalled, or an error event) on a
//! provider that continues a prefilled assistant message (`continuation:`), the same request is sent again with
//! the answer so far as a last assistant message, and the new stream is spliced onto the client's.
//!
//! Candidates, in order: other keys of the model that was serving, then the fallbacks left whose providers
//! declare `continuation:` too. Keys that broke this stream are tried last: after a cut or a stall (the
//! connection, not the key) the same key may continue when no other is left; after an error event it is not
//! asked again. A continuation that breaks is continued in turn, from where the last one served, each time with
//! a fresh `request_timeout` shared evenly between the candidates left, at most [`MAX_CONTINUATIONS`] times.

use super::attempt::Success;
use super::call::{Job, Start, resolve_model};
use super::fallback::Fallbacks;
use super::{Relay, RelayError};
use crate::observe::{AttemptRecord, Journal};
use crate::secret::KeyId;
use crate::stream::{Break, Continuer, Resumed};
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Continuations one stream may have.
pub const MAX_CONTINUATIONS: u32 = 8;

/// How a broken stream may be continued: the client's body as it came, the fallback models left, and the
/// `provider/model` of the candidate that started the stream when it was a fallback.
pub(super) struct Resume {
    pub body: Map<String, Value>,
    pub fallbacks: Fallbacks,
    pub fallback: Option<String>,
}

/// Where a stream's continuations stand.
#[derive(Default)]
struct Progress {
    /// The candidate serving now: 0 the model that started, `i` the `i`-th fallback left.
    at: usize,
    /// Keys of that candidate that broke this stream; of those, the ones whose upstream said so.
    broken: Vec<KeyId>,
    refused: Vec<KeyId>,
    count: u32,
}

impl Relay {
    /// What continues broken streams of `job`, if its provider can continue a prefilled assistant message.
    pub(super) fn continuer(&self, job: &Job) -> Option<Continuer> {
        let resume = job.resume.clone()?;
        let (relay, endpoint, begun) = (self.clone(), job.endpoint, job.begun);
        let progress = Arc::new(Mutex::new(Progress::default()));
        Some(Box::new(move |broke: Break| {
            let (relay, resume, progress) = (relay.clone(), resume.clone(), progress.clone());
            Box::pin(async move {
                let mut journal = Some(Journal::new("chat", "", "", true, relay.clock.now()));
                let resumed = relay
                    .resume(endpoint, begun, &resume, &progress, broke, &mut journal)
                    .await;
                let attempts = journal.map(|j| j.attempts).unwrap_or_default();
                (resumed, attempts)
            })
                as futures_util::future::BoxFuture<'static, (Option<Resumed>, Vec<AttemptRecord>)>
        }))
    }

    async fn resume(
        &self,
        endpoint: super::Endpoint,
        begun: Instant,
        resume: &Resume,
        progress: &Mutex<Progress>,
        broke: Break,
        journal: &mut Option<Journal>,
    ) -> Option<Resumed> {
        let lock = || progress.lock().unwrap_or_else(|e| e.into_inner());
        let (at, broken, refused) = {
            let mut p = lock();
            p.count += 1;
            if p.count > MAX_CONTINUATIONS {
                tracing::warn!("a stream broke {MAX_CONTINUATIONS} times; not continuing it again");
                return None;
            }
            p.broken.push(broke.key.clone());
            if !broke.transport {
                p.refused.push(broke.key);
            }
            (p.at, p.broken.clone(), p.refused.clone())
        };
        let deadline = Instant::now() + self.snapshot().settings.request_timeout;
        let left = resume.fallbacks.left();
        let candidates = 1 + left.len();
        for i in at..candidates {
            let mut body = resume.body.clone();
            let fallback = match i {
                0 => resume.fallback.clone(),
                _ => {
                    body.insert("model".into(), Value::String(left[i - 1].clone()));
                    Some(left[i - 1].clone())
                }
            };
            let snapshot = self.snapshot();
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
            if !broke.text.is_empty() {
                assistant.insert("role".into(), Value::String("assistant".into()));
                assistant.insert("content".into(), Value::String(broke.text.clone()));
                messages.push(Value::Object(assistant));
            }
            let share =
                deadline.saturating_duration_since(Instant::now()) / (candidates - i) as u32;
            // The keys that broke the stream last: none of them at first, then those that only lost the
            // connection.
            let passes = match i == at {
                true if refused.len() < broken.len() => vec![broken.clone(), refused.clone()],
                true => vec![broken.clone()],
                false => vec![Vec::new()],
            };
            // Both passes share the candidate's share of the time.
            let until = Instant::now() + share;
            for given_up in passes {
                let start = Start::Continuation { given_up };
                let won = match self
                    .prepare(endpoint, body.clone(), begun, until, journal, start)
                    .await
                {
                    Ok((job, given_up)) => self
                        .run(&job, journal, given_up)
                        .await
                        .map(|won| (job, won)),
                    Err(e) => Err(e),
                };
                match won {
                    Ok((job, won)) => {
                        let Success::Stream(started, _) = won.success else {
                            break;
                        };
                        let mut p = lock();
                        if p.at != i {
                            (p.broken, p.refused) = (Vec::new(), Vec::new());
                        }
                        p.at = i;
                        return Some(Resumed {
                            started: *started,
                            lease: won.lease,
                            label: job.label,
                            fallback,
                        });
                    }
                    // No key free: the next pass may admit the key that broke.
                    Err(RelayError::Exhausted(_) | RelayError::AllCooling { .. }) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "no continuation of the broken stream here");
                        break;
                    }
                }
            }
        }
        None
    }
}
