//! Provider files exactly as written: the serde structures, before anything is checked or resolved.

use crate::failure::{ErrorClass, Scope};
use crate::mapping::declared::{RawMessages, RawResponse, RawStream};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) header: Option<String>,
    pub(super) value: Option<String>,
    pub(super) query: Option<String>,
}

/// `Some(None)` when written as `null` (endpoint disabled), `None` when absent (default).
pub(super) fn nullable<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPaths {
    #[serde(default, deserialize_with = "nullable")]
    pub(super) chat: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) embeddings: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) models: Option<Option<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListSource {
    Static,
    Upstream,
    Both,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModels {
    pub(super) list: Option<ListSource>,
    #[serde(default, rename = "static")]
    pub(super) static_list: Vec<String>,
    #[serde(default)]
    pub(super) allow: Vec<String>,
    #[serde(default)]
    pub(super) deny: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawStatus {
    One(u16),
    Many(Vec<u16>),
    Pattern(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetrySource {
    pub(super) header: Option<String>,
    pub(super) body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) status: Option<RawStatus>,
    pub(super) body: Option<String>,
    pub(super) body_regex: Option<String>,
    pub(super) header: Option<String>,
    pub(super) class: ErrorClass,
    pub(super) scope: Option<Scope>,
    pub(super) retry_after: Option<Vec<RawRetrySource>>,
    /// `"HH:MM Zone"`: cool until the next such time (a quota that resets at a known hour).
    pub(super) cool_until: Option<String>,
}

/// A provider file exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) base_url: Option<String>,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) paths: RawPaths,
    #[serde(default)]
    pub(super) models: RawModels,
    #[serde(default)]
    pub(super) stream_usage: bool,
    /// Chat fields the upstream knows by another name (`max_tokens: max_completion_tokens`).
    #[serde(default)]
    pub(super) renames: BTreeMap<String, String>,
    /// Inbound dialects the upstream speaks natively, with their paths.
    #[serde(default)]
    pub(super) dialects:
        BTreeMap<crate::mapping::inbound::Dialect, crate::mapping::inbound::RawDialectRoute>,
    /// Other names clients may use for this provider (LiteLLM's prefixes, say).
    #[serde(default)]
    pub(super) aliases: Vec<String>,
    /// USD per million tokens, by model.
    pub(super) prices: Option<super::prices::RawPrices>,
    pub(super) retry_after: Option<Vec<RawRetrySource>>,
    #[serde(default)]
    pub(super) errors: Vec<RawRule>,
    pub(super) selection: Option<crate::config::Selection>,
    pub(super) concurrency: Option<crate::config::tuning::ConcurrencyPatch>,
    pub(super) cooldowns: Option<crate::config::tuning::CooldownsPatch>,
    pub(super) retries: Option<crate::config::tuning::RetriesPatch>,
    pub(super) timeouts: Option<crate::config::tuning::TimeoutsPatch>,
    pub(super) limits: Option<crate::config::KeyLimits>,
    pub(super) scripts: Option<crate::config::tuning::ScriptsPatch>,
    /// A Rhai script in the plugins directory.
    pub(super) script: Option<String>,
    /// The hooks used; all hooks the script defines when absent.
    pub(super) hooks: Option<Vec<String>>,
    /// Passed to every hook as `ctx.options`.
    pub(super) options: Option<serde_json::Value>,
    /// Stream events mapped in Rust without calling the script.
    pub(super) stream: Option<RawStream>,
    /// Request fields moved, and plain-text conversations mapped, in Rust around the script's request hook.
    pub(super) request: Option<RawRequest>,
    /// Plain-text answers mapped in Rust instead of by the script's response hook.
    pub(super) response: Option<RawResponse>,
    /// The upstream continues a prefilled assistant message: a stream broken mid-answer is continued on
    /// another key.
    pub(super) continuation: Option<RawContinuation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawContinuation {
    /// Extra fields of the prefilled assistant message (Mistral's `prefix: true`).
    #[serde(default)]
    pub(super) assistant: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRequest {
    /// Client body path -> upstream body path.
    #[serde(default)]
    pub(super) copy: BTreeMap<String, String>,
    /// Plain-text conversations mapped in Rust; the script sees no `messages` then.
    pub(super) messages: Option<RawMessages>,
    /// Per endpoint, the client fields the mapping honours, and what becomes of the others.
    pub(super) fields: Option<BTreeMap<String, crate::mapping::fields::RawEndpointFields>>,
}
