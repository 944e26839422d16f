//! No silent loss: what happens to each field of the client's request when the upstream speaks another API.
//!
//! A provider file names, per endpoint, the client fields its mapping honours (`request.fields`). Every other
//! field of OpenAI's API is judged here, before the mapping runs:
//!
//! - a field that asks for nothing (absent, `null`, or its default: `n: 1`, `logprobs: false`, ...) passes;
//! - a hint that changes nothing in the answer (`user`, `metadata`, `prompt_cache_key`, `safety_identifier`)
//!   is left out where the mapping has no place for it;
//! - any other value is refused with a 400 that names the field, before any key is used.
//!
//! A field OpenAI's API does not define is the upstream's own (Gemini's `safetySettings`, Anthropic's
//! `container`): with `extras: pass` it goes into the upstream body as written (the upstream judges it), else it
//! is refused likewise. Fields keyrelay itself reads (`model`, `stream`, `stream_options`, `encoding_format`)
//! always pass.

use super::{Draft, MapError, Refused, RequestMapping, Target};
use crate::config::ConfigError;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// `request.fields.<endpoint>` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpointFields {
    #[serde(default)]
    honours: Vec<String>,
    #[serde(default)]
    extras: Extras,
}

/// What becomes of fields OpenAI's API does not define.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extras {
    /// Into the upstream body as written, where the mapping did not write that field itself.
    Pass,
    #[default]
    Refuse,
}

/// One endpoint's rules.
#[derive(Clone, Debug)]
struct EndpointFields {
    honours: HashSet<String>,
    extras: Extras,
}

/// A provider's field rules, by endpoint; an endpoint without rules is not judged.
#[derive(Clone, Debug, Default)]
pub struct FieldRules {
    /// The provider's name, for messages.
    provider: String,
    chat: Option<EndpointFields>,
    embeddings: Option<EndpointFields>,
}

/// How OpenAI's API defines a field the mapping does not honour.
enum Known {
    /// keyrelay reads it itself.
    Engine,
    /// Leaving it out changes nothing in the answer.
    Hint,
    /// It asks for nothing when it holds one of these values (or `null`).
    Default(fn() -> Vec<Value>),
    /// Any value but `null` asks for something.
    Meaningful,
}

fn known(endpoint: &str, field: &str) -> Option<Known> {
    use Known::*;
    let shared = match field {
        "model" | "stream" | "stream_options" => Engine,
        "user" => Hint,
        _ => Meaningful,
    };
    if endpoint == "embeddings" {
        return match field {
            "encoding_format" => Some(Engine),
            "input" | "dimensions" => Some(Meaningful),
            _ if matches!(shared, Engine | Hint) => Some(shared),
            _ => None,
        };
    }
    Some(match field {
        "model" | "stream" | "stream_options" | "user" => shared,
        "messages" => Engine,
        "metadata" | "prompt_cache_key" | "safety_identifier" => Hint,
        "n" => Default(|| vec![json!(1)]),
        "presence_penalty" | "frequency_penalty" => Default(|| vec![json!(0)]),
        "logprobs" | "store" => Default(|| vec![json!(false)]),
        "top_logprobs" => Default(|| vec![json!(0)]),
        "logit_bias" => Default(|| vec![json!({})]),
        "parallel_tool_calls" => Default(|| vec![json!(true)]),
        "modalities" => Default(|| vec![json!(["text"])]),
        "response_format" => Default(|| vec![json!({"type": "text"})]),
        "service_tier" => Default(|| vec![json!("auto"), json!("default")]),
        "verbosity" => Default(|| vec![json!("medium")]),
        "tools" | "functions" | "stop" => Default(|| vec![json!([])]),
        "temperature"
        | "top_p"
        | "max_tokens"
        | "max_completion_tokens"
        | "seed"
        | "tool_choice"
        | "function_call"
        | "reasoning_effort"
        | "audio"
        | "prediction"
        | "web_search_options" => Meaningful,
        _ => return None,
    })
}

impl FieldRules {
    /// `request.fields`, checked: endpoints are `chat` and `embeddings`.
    pub fn resolve(
        raw: BTreeMap<String, RawEndpointFields>,
        file: &Path,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut rules = FieldRules {
            provider: file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            ..FieldRules::default()
        };
        let mut errors = Vec::new();
        for (endpoint, raw) in raw {
            let resolved = EndpointFields {
                honours: raw.honours.into_iter().collect(),
                extras: raw.extras,
            };
            match endpoint.as_str() {
                "chat" => rules.chat = Some(resolved),
                "embeddings" => rules.embeddings = Some(resolved),
                other => errors.push(
                    ConfigError::new(
                        Some(file),
                        format!("request.fields: {other:?} is not an endpoint"),
                    )
                    .hint("the endpoints are chat and embeddings"),
                ),
            }
        }
        if errors.is_empty() {
            Ok(rules)
        } else {
            Err(errors)
        }
    }

    fn of(&self, endpoint: &str) -> Option<&EndpointFields> {
        match endpoint {
            "chat" => self.chat.as_ref(),
            "embeddings" => self.embeddings.as_ref(),
            _ => None,
        }
    }

    /// Judges the client's fields for `provider`: the extras to pass on, or the first field refused.
    fn judge(
        &self,
        endpoint: &str,
        body: &Map<String, Value>,
    ) -> Result<Vec<(String, Value)>, MapError> {
        let provider = &self.provider;
        let Some(rules) = self.of(endpoint) else {
            return Ok(Vec::new());
        };
        let mut extras = Vec::new();
        for (field, value) in body {
            if value.is_null() || rules.honours.contains(field) {
                continue;
            }
            let refused = match known(endpoint, field) {
                Some(Known::Engine | Known::Hint) => None,
                Some(Known::Default(defaults)) if defaults().contains(value) => None,
                Some(_) => Some(format!(
                    "`{field}` is not supported by {provider}: its API has no equivalent; leave it out or use a \
                     provider that has it"
                )),
                None if rules.extras == Extras::Pass => {
                    extras.push((field.clone(), value.clone()));
                    None
                }
                None => Some(format!(
                    "`{field}` is not a field of OpenAI's {endpoint} API, and {provider} takes no other fields"
                )),
            };
            if let Some(message) = refused {
                return Err(Refused::new(field.as_str(), message).into());
            }
        }
        Ok(extras)
    }
}

/// The field rules over the rest of a provider's request mapping.
#[derive(Debug)]
pub struct JudgedRequest {
    pub rules: Arc<FieldRules>,
    pub below: Arc<dyn RequestMapping>,
}

impl RequestMapping for JudgedRequest {
    fn map(&self, target: &Target<'_>, body: Value) -> Result<Draft, MapError> {
        let extras = match &body {
            Value::Object(fields) => self.rules.judge(target.endpoint, fields)?,
            _ => Vec::new(),
        };
        let mut draft = self.below.map(target, body)?;
        if let Value::Object(upstream) = &mut draft.body {
            for (field, value) in extras {
                upstream.entry(field).or_insert(value);
            }
        }
        Ok(draft)
    }

    fn slow(&self) -> bool {
        self.below.slow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> FieldRules {
        FieldRules::resolve(serde_yaml::from_str(yaml).unwrap(), Path::new("acme.yaml")).unwrap()
    }

    fn judge(rules: &FieldRules, endpoint: &str, body: Value) -> Result<Vec<String>, String> {
        match rules.judge(endpoint, body.as_object().unwrap()) {
            Ok(extras) => Ok(extras.into_iter().map(|(k, _)| k).collect()),
            Err(MapError::Refused(Refused { param, message, .. })) => {
                assert!(message.contains(&format!("`{param}`")), "{message}");
                Err(param)
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn defaults_and_hints_pass_other_values_are_refused_by_name() {
        let r = rules("chat: {honours: [messages, temperature, tools]}");
        let ok = json!({"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true},
            "temperature": 0.3, "tools": [{"type": "function"}], "n": 1, "logprobs": false, "logit_bias": {},
            "presence_penalty": 0, "parallel_tool_calls": true, "response_format": {"type": "text"},
            "service_tier": "auto", "user": "u-1", "metadata": {"a": "b"}, "seed": null, "stop": []});
        assert_eq!(judge(&r, "chat", ok), Ok(vec![]));
        for (field, value) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("logit_bias", json!({"50256": -100})),
            ("presence_penalty", json!(0.5)),
            ("parallel_tool_calls", json!(false)),
            ("response_format", json!({"type": "json_object"})),
            ("seed", json!(7)),
            ("stop", json!(["END"])),
            ("audio", json!({"voice": "alloy"})),
        ] {
            let mut body = json!({"model": "m", "messages": []});
            body[field] = value;
            assert_eq!(judge(&r, "chat", body), Err(field.to_string()));
        }
    }

    #[test]
    fn fields_openai_does_not_define_pass_or_are_refused_as_declared() {
        let body = json!({"messages": [], "safetySettings": [{"category": "x"}]});
        let strict = rules("chat: {honours: [messages]}");
        assert_eq!(
            judge(&strict, "chat", body.clone()),
            Err("safetySettings".into())
        );
        let open = rules("chat: {honours: [messages], extras: pass}");
        assert_eq!(
            judge(&open, "chat", body),
            Ok(vec!["safetySettings".into()])
        );
        // An endpoint without rules is not judged.
        assert_eq!(judge(&strict, "embeddings", json!({"x": 1})), Ok(vec![]));
        let embeddings = rules("embeddings: {honours: [input, dimensions]}");
        assert_eq!(
            judge(
                &embeddings,
                "embeddings",
                json!({"input": "a", "encoding_format": "base64", "user": "u"})
            ),
            Ok(vec![])
        );
        assert_eq!(
            judge(
                &embeddings,
                "embeddings",
                json!({"input": "a", "temperature": 1})
            ),
            Err("temperature".into())
        );
    }

    #[test]
    fn unknown_endpoints_are_load_errors() {
        let raw = serde_yaml::from_str("chats: {honours: []}").unwrap();
        let errors = FieldRules::resolve(raw, Path::new("p.yaml")).unwrap_err();
        assert!(
            errors[0]
                .to_string()
                .contains("\"chats\" is not an endpoint")
        );
    }
}
