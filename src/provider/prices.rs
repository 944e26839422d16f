//! What a model's tokens cost, as a provider file declares it, and the cost of one answer.
//!
//! ```yaml
//! prices:                     # USD per million tokens
//!   taken: 2026-11-29         # the day they were read from the source (required with models)
//!   source: https://example.com/pricing
//!   models:
//!     gpt-4o-mini: {input: 0.15, output: 0.60, cached_input: 0.075}
//!     "gpt-4.1*": {input: 2, output: 8}       # a glob: the longest matching pattern wins over shorter ones
//! ```
//!
//! Cached input tokens (OpenAI's `prompt_tokens_details.cached_tokens`, which the shipped mappings fill from
//! Anthropic's cache reads and Gemini's cached content) are priced at `cached_input`, or at `input` when the
//! model has no such price; every other prompt token at `input`, completion tokens (reasoning included) at
//! `output`. Costs are kept as whole nano-dollars, so that counters add up exactly.

use crate::usage::{Cost, Usage};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cached_input: Option<f64>,
}

/// `prices:` exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrices {
    taken: Option<String>,
    source: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, Price>,
}

/// A provider's prices by model.
#[derive(Clone, Debug, Default)]
pub struct Prices {
    exact: HashMap<String, Price>,
    /// Glob patterns, longest first.
    patterns: Vec<(String, Price)>,
    /// When they were read from `source` (`YYYY-MM-DD`).
    pub taken: Option<String>,
    pub source: Option<String>,
}

impl Prices {
    /// Checks every price; the problems found, each as a message.
    pub(super) fn resolve(raw: RawPrices) -> Result<Prices, Vec<String>> {
        let mut problems = Vec::new();
        if !raw.models.is_empty() && !raw.taken.as_deref().is_some_and(is_date) {
            problems.push(
                "prices: `taken` must give the day the prices were read, as YYYY-MM-DD".to_string(),
            );
        }
        let mut prices = Prices {
            taken: raw.taken,
            source: raw.source,
            ..Prices::default()
        };
        for (model, price) in raw.models {
            let fields = [
                ("input", Some(price.input)),
                ("output", Some(price.output)),
                ("cached_input", price.cached_input),
            ];
            for (field, value) in fields {
                if let Some(v) = value.filter(|v| !(v.is_finite() && *v >= 0.0 && *v < 1e6)) {
                    problems.push(format!(
                        "prices: {model}: {field} is {v}; a price is USD per million tokens, from 0 to 1000000"
                    ));
                }
            }
            if model.contains(['*', '?']) {
                prices.patterns.push((model, price));
            } else {
                prices.exact.insert(model, price);
            }
        }
        prices
            .patterns
            .sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.len()));
        if problems.is_empty() {
            Ok(prices)
        } else {
            Err(problems)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Models and patterns priced.
    pub fn len(&self) -> usize {
        self.exact.len() + self.patterns.len()
    }

    /// The price of `model`: its own entry, else the longest pattern that matches it.
    pub fn of(&self, model: &str) -> Option<Price> {
        if let Some(price) = self.exact.get(model) {
            return Some(*price);
        }
        self.patterns
            .iter()
            .find(|(pattern, _)| crate::glob::matches(pattern, model))
            .map(|(_, price)| *price)
    }

    /// What `usage` of `model` cost; `None` when the model has no price.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<Cost> {
        self.of(model).map(|price| price.cost(usage))
    }
}

impl Price {
    pub fn cost(&self, usage: &Usage) -> Cost {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let fresh = usage.prompt_tokens - cached;
        // USD per million tokens is 1000 nano-dollars per token.
        let nanos = 1000.0
            * (fresh as f64 * self.input
                + cached as f64 * self.cached_input.unwrap_or(self.input)
                + usage.completion_tokens as f64 * self.output);
        // Saturates at u64::MAX for absurd counts (`as` from f64 does).
        Cost(nanos.round() as u64)
    }
}

fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices(yaml: &str) -> Result<Prices, Vec<String>> {
        Prices::resolve(serde_yaml::from_str(yaml).unwrap())
    }

    fn usage(prompt: u64, cached: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
        }
    }

    #[test]
    fn costs_fresh_cached_and_output_tokens_at_their_prices() {
        let p = prices(
            "taken: 2026-11-29\nmodels:\n  m: {input: 0.15, output: 0.6, cached_input: 0.075}\n  n: {input: 3, output: 15}\n",
        )
        .unwrap();
        // 1000 fresh × 0.15 + 1000 cached × 0.075 + 500 × 0.6 = 150 + 75 + 300 micro-dollars.
        assert_eq!(p.cost("m", &usage(2000, 1000, 500)), Some(Cost(525_000)));
        // No cached price: cached tokens cost input.
        assert_eq!(p.cost("n", &usage(2000, 1000, 0)), Some(Cost(6_000_000)));
        // More cached than prompt tokens (an odd upstream) never underflows.
        assert_eq!(p.cost("n", &usage(10, 50, 0)), Some(Cost(30_000)));
        assert_eq!(p.cost("other", &usage(1, 0, 1)), None);
        assert!((Cost(525_000).usd() - 0.000525).abs() < 1e-12);
    }

    #[test]
    fn exact_names_win_then_the_longest_pattern() {
        let p = prices(
            "taken: 2026-11-29\nmodels:\n  'gpt-*': {input: 1, output: 1}\n  'gpt-4.1*': {input: 2, output: 2}\n  gpt-4.1-nano: {input: 3, output: 3}\n",
        )
        .unwrap();
        assert_eq!(p.of("gpt-4.1-nano").unwrap().input, 3.0);
        assert_eq!(p.of("gpt-4.1-mini").unwrap().input, 2.0);
        assert_eq!(p.of("gpt-5").unwrap().input, 1.0);
        assert_eq!(p.of("claude"), None);
    }

    #[test]
    fn refuses_prices_without_a_date_or_out_of_range() {
        let problems = prices("models:\n  m: {input: -1, output: .nan}\n").unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("taken"));
        assert!(problems[1].contains("m: input is -1"));
        assert!(problems[2].contains("m: output is NaN"));
        assert!(prices("taken: 29/11/2026\nmodels:\n  m: {input: 1, output: 1}\n").is_err());
        // A misspelt field is refused, not read as a missing price.
        assert!(serde_yaml::from_str::<RawPrices>("models:\n  m: {input: 1, ouput: 1}\n").is_err());
        assert!(prices("{}").unwrap().is_empty());
    }
}
