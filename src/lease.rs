//! The engine's handle on a granted key: the store's grant, and the provider whose rules judge how its use ended.

use crate::keys::{Grant, KeyStore, Outcome};
use crate::provider::{Provider, Verdict};
use crate::secret::ApiKey;
use crate::usage::Cost;
use crate::usage::Usage;
use std::sync::Arc;

/// A key held by one request. Dropping it releases the key; the outcome recorded before (if any) decides what
/// the release does to the key's state. A lease dropped without an outcome (client disconnect, cancelled future,
/// panic) counts as cancelled: the key is freed and judged neither way.
pub struct Lease {
    store: Arc<dyn KeyStore>,
    provider: Arc<Provider>,
    grant: Grant,
    outcome: Option<Outcome>,
}

impl Lease {
    pub fn new(store: Arc<dyn KeyStore>, provider: Arc<Provider>, grant: Grant) -> Self {
        Self {
            store,
            provider,
            grant,
            outcome: None,
        }
    }

    pub fn key(&self) -> &ApiKey {
        &self.grant.key
    }

    pub fn provider(&self) -> &Arc<Provider> {
        &self.provider
    }

    /// Records a success with the tokens it took; the key is released when the lease drops. Answers what they
    /// cost, when the model has a price.
    pub fn succeed(&mut self, usage: Usage) -> Option<Cost> {
        let cost = self.provider.prices.cost(&self.grant.model, &usage);
        self.outcome = Some(Outcome::Success {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost: cost.unwrap_or_default(),
        });
        cost
    }

    /// Records a failure; the key is released (and cooled as the verdict says) when the lease drops.
    pub fn fail(&mut self, verdict: &Verdict) {
        self.outcome = Some(Outcome::Failure {
            class: verdict.class,
            scope: verdict.scope,
            retry_after: verdict.retry_after,
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or(Outcome::Cancelled);
        self.store
            .release(&self.grant, outcome, &self.provider.tuning);
    }
}
