//! The `.env` of the Python key proxy keyrelay succeeds (LLM-API-Key-Proxy), read as that proxy read it where
//! keyrelay has the concept, and named in a warning where it has not, so that a switch loses nothing in silence.
//!
//! Honoured: `ROTATION_MODE_<P>` (selection), `MAX_CONCURRENT_REQUESTS_PER_KEY_<P>` (a cap per key over all
//! models), `GLOBAL_TIMEOUT` (the request deadline, in seconds) and `<P>_MODELS` (static models, as a JSON array
//! of names or an object whose entries may name a real `id`). Key variables with any suffix, other `*.env`
//! files and the whitelist that wins over the ignore list are handled where keys, files and filters are read.
//! `keyrelay check` shows how each of these was read.

use super::env::Env;
use super::tuning::{ConcurrencyPatch, Selection, TuningPatch};
use std::time::Duration;

/// How one old variable was read: for `keyrelay check` and, when not honoured, a start-up warning.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub variable: String,
    /// What keyrelay made of it, or why it ignores it.
    pub effect: String,
    pub honoured: bool,
}

/// The old proxy's tuning of `provider` (`ROTATION_MODE_<P>`, `MAX_CONCURRENT_REQUESTS_PER_KEY_<P>`).
pub fn tuning(env: &Env, provider: &str, readings: &mut Vec<Reading>) -> TuningPatch {
    let upper = provider.to_ascii_uppercase();
    let mut patch = TuningPatch::default();
    let name = format!("ROTATION_MODE_{upper}");
    if let Some(mode) = env.get(&name) {
        let selection = match mode.trim().to_ascii_lowercase().as_str() {
            "balanced" => Some(Selection::Balanced),
            "sequential" => Some(Selection::Sequential),
            _ => None,
        };
        readings.push(match selection {
            Some(_) => Reading {
                variable: format!("{name}={mode}"),
                effect: format!("{provider}: {} selection", mode.trim().to_ascii_lowercase()),
                honoured: true,
            },
            None => Reading {
                variable: format!("{name}={mode}"),
                effect: "not balanced or sequential: ignored".into(),
                honoured: false,
            },
        });
        patch.selection = selection;
    }
    let name = format!("MAX_CONCURRENT_REQUESTS_PER_KEY_{upper}");
    if let Some(value) = env.get(&name) {
        match value.trim().parse::<i64>() {
            Ok(n) => {
                let cap = u32::try_from(n.max(0)).unwrap_or(u32::MAX);
                patch.concurrency = Some(ConcurrencyPatch {
                    per_key_model: None,
                    per_key: Some(cap),
                });
                readings.push(Reading {
                    variable: format!("{name}={value}"),
                    effect: match cap {
                        0 => format!("{provider}: no cap per key (concurrency.per_key: 0)"),
                        n => format!(
                            "{provider}: at most {n} requests at once per key (concurrency.per_key)"
                        ),
                    },
                    honoured: true,
                });
            }
            Err(_) => readings.push(Reading {
                variable: format!("{name}={value}"),
                effect: "not a whole number: ignored".into(),
                honoured: false,
            }),
        }
    }
    patch
}

/// `GLOBAL_TIMEOUT` (whole seconds) as the request deadline.
pub fn global_timeout(env: &Env, readings: &mut Vec<Reading>) -> Option<Duration> {
    let value = env.get("GLOBAL_TIMEOUT")?;
    let secs = value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|s| (1..=24 * 3600).contains(s));
    readings.push(Reading {
        variable: format!("GLOBAL_TIMEOUT={value}"),
        effect: match secs {
            Some(s) => format!("request_timeout: {s}s (unless config.yaml sets request_timeout)"),
            None => "not a whole number of seconds from 1 to 86400: ignored".into(),
        },
        honoured: secs.is_some(),
    });
    secs.map(Duration::from_secs)
}

/// `<P>_MODELS`: static model names, and the real id of each that names one (`{"fast": {"id": "real"}}`).
pub fn models(
    env: &Env,
    provider: &str,
    readings: &mut Vec<Reading>,
) -> Option<Vec<(String, Option<String>)>> {
    let name = format!("{}_MODELS", provider.to_ascii_uppercase());
    let value = env.get(&name)?;
    let parsed = match serde_json::from_str::<serde_json::Value>(value) {
        Ok(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(|s| (s.to_string(), None)))
            .collect::<Option<Vec<_>>>(),
        Ok(serde_json::Value::Object(entries)) => Some(
            entries
                .iter()
                .map(|(model, spec)| {
                    let id = spec
                        .get("id")
                        .and_then(serde_json::Value::as_str)
                        .filter(|id| *id != model)
                        .map(String::from);
                    (model.clone(), id)
                })
                .collect(),
        ),
        _ => None,
    };
    readings.push(Reading {
        variable: name,
        effect: match &parsed {
            Some(models) => format!("{provider}: {} static models", models.len()),
            None => "not a JSON array of names or an object of models: ignored".into(),
        },
        honoured: parsed.is_some(),
    });
    parsed
}

/// The old proxy's variables keyrelay has no concept for, each with what to use instead.
pub fn unhonoured(env: &Env) -> Vec<Reading> {
    const NOT_HERE: &[(&str, &str)] = &[
        (
            "TIMEOUT_",
            "keyrelay's timeouts are config.yaml's `timeouts:` (connect, response, first_event, stream_idle)",
        ),
        (
            "FAIR_CYCLE_",
            "no fair cycles: balanced selection spreads by load and requests today",
        ),
        (
            "EXHAUSTION_COOLDOWN_THRESHOLD",
            "cooldowns are config.yaml's `cooldowns:`",
        ),
        (
            "SEQUENTIAL_FALLBACK_MULTIPLIER_",
            "concurrency caps are config.yaml's `concurrency:`",
        ),
        (
            "CONCURRENCY_MULTIPLIER_",
            "concurrency caps are config.yaml's `concurrency:`",
        ),
        (
            "OPTIMAL_CONCURRENT_REQUESTS_PER_KEY_",
            "balanced selection prefers idle keys already",
        ),
        (
            "QUOTA_GROUPS_",
            "quota is judged per key and model from the upstream's answers",
        ),
        (
            "CUSTOM_CAP_",
            "declared per-key limits are a provider file's `limits:`",
        ),
        ("TRANSIENT_RETRY_", "retries are config.yaml's `retries:`"),
        (
            "SMALL_COOLDOWN_RETRY_THRESHOLD",
            "a short cooldown within the deadline is waited out already",
        ),
        (
            "STREAM_RETRY_ON_REASONING_ONLY",
            "broken streams are continued where the provider declares `continuation:`",
        ),
        (
            "OVERRIDE_TEMPERATURE_ZERO",
            "requests are passed as the client wrote them",
        ),
        ("SKIP_OAUTH_INIT_CHECK", "no OAuth providers"),
        ("OAUTH_REFRESH_INTERVAL", "no OAuth providers"),
        (
            "MODEL_INFO_REFRESH_INTERVAL",
            "model lists refresh by config.yaml's `models_refresh`",
        ),
        ("PROVIDER_CACHE_ENABLE", "no provider cache"),
        (
            "SUPPRESS_LITELLM_SERIALIZATION_WARNINGS",
            "keyrelay does not use LiteLLM",
        ),
    ];
    env.names()
        .filter_map(|name| {
            let (_, why) = NOT_HERE
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix))?;
            Some(Reading {
                variable: name.to_string(),
                effect: format!("not honoured (from the Python proxy): {why}"),
                honoured: false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_models_and_timeout_are_read_and_bad_values_named() {
        let env = Env::from_pairs([
            ("ROTATION_MODE_OPENAI", "Sequential"),
            ("MAX_CONCURRENT_REQUESTS_PER_KEY_OPENAI", "3"),
            ("ROTATION_MODE_GEMINI", "round-robin"),
            ("MAX_CONCURRENT_REQUESTS_PER_KEY_GEMINI", "-1"),
            ("GLOBAL_TIMEOUT", "45"),
            ("OPENAI_MODELS", r#"["gpt-a", "gpt-b"]"#),
            (
                "GEMINI_MODELS",
                r#"{"fast": {"id": "gemini-2.5-flash"}, "pro": {}}"#,
            ),
            ("TIMEOUT_READ_STREAMING", "300"),
            ("FAIR_CYCLE_OPENAI", "true"),
        ]);
        let mut readings = Vec::new();
        let openai = tuning(&env, "openai", &mut readings);
        assert_eq!(openai.selection, Some(Selection::Sequential));
        assert_eq!(openai.concurrency.unwrap().per_key, Some(3));
        let gemini = tuning(&env, "gemini", &mut readings);
        assert_eq!(gemini.selection, None, "an unknown mode is ignored");
        assert_eq!(
            gemini.concurrency.unwrap().per_key,
            Some(0),
            "-1 is unlimited"
        );
        assert_eq!(
            global_timeout(&env, &mut readings),
            Some(Duration::from_secs(45))
        );
        assert_eq!(
            models(&env, "openai", &mut readings).unwrap(),
            [("gpt-a".to_string(), None), ("gpt-b".to_string(), None)]
        );
        assert_eq!(
            models(&env, "gemini", &mut readings).unwrap(),
            [
                ("fast".to_string(), Some("gemini-2.5-flash".to_string())),
                ("pro".to_string(), None)
            ]
        );
        let refused: Vec<&str> = readings
            .iter()
            .filter(|r| !r.honoured)
            .map(|r| r.variable.as_str())
            .collect();
        assert_eq!(refused, ["ROTATION_MODE_GEMINI=round-robin"]);
        let names: Vec<String> = unhonoured(&env).into_iter().map(|r| r.variable).collect();
        assert_eq!(names, ["FAIR_CYCLE_OPENAI", "TIMEOUT_READ_STREAMING"]);
    }
}
