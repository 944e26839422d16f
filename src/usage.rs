//! What an answer used and what it cost: token counts as upstreams report them, read leniently, and amounts of
//! money kept as whole nano-dollars so that counters add up exactly.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Token counts as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of the prompt tokens, those read from the upstream's cache (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u64,
}

impl Usage {
    /// Both counts added up (a continued stream's segments).
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.saturating_add(other.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_add(other.completion_tokens),
            cached_tokens: self.cached_tokens.saturating_add(other.cached_tokens),
        }
    }

    /// Writes these counts into an OpenAI `usage` object (its other fields left as they are).
    pub fn write_into(&self, usage: &mut Value) {
        let Some(object) = usage.as_object_mut() else {
            return;
        };
        object.insert("prompt_tokens".into(), self.prompt_tokens.into());
        object.insert("completion_tokens".into(), self.completion_tokens.into());
        object.insert(
            "total_tokens".into(),
            self.prompt_tokens
                .saturating_add(self.completion_tokens)
                .into(),
        );
        if self.cached_tokens > 0 || object.contains_key("prompt_tokens_details") {
            let details = object
                .entry("prompt_tokens_details")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(details) = details.as_object_mut() {
                details.insert("cached_tokens".into(), self.cached_tokens.into());
            }
        }
    }

    /// Reads an OpenAI `usage` object; missing or odd counts are zero (the same rules as reading it from JSON).
    pub fn from_value(usage: &Value) -> Self {
        Self::deserialize(usage).unwrap_or_default()
    }
}

/// Reads a `usage` value without building it: counts that are not whole non-negative numbers, and a usage that
/// is not an object, read as zero; never an error. Besides OpenAI chat's names, it reads the `input_tokens` /
/// `output_tokens` family of native dialects: Anthropic's (whose input excludes its cache reads and writes,
/// counted apart) and OpenAI Responses' (whose input includes `input_tokens_details.cached_tokens`).
impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Count(u64);

        impl<'de> Deserialize<'de> for Count {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(Count(
                    Value::deserialize(d)
                        .ok()
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0),
                ))
            }
        }

        /// `cached_tokens` of a details object; zero when there is none.
        struct Cached(u64);

        impl<'de> Deserialize<'de> for Cached {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let details = Value::deserialize(d).unwrap_or_default();
                Ok(Cached(
                    details
                        .get("cached_tokens")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                ))
            }
        }

        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Usage;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a usage object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Usage, A::Error> {
                let mut usage = Usage::default();
                let mut chat = false;
                // input, output, cache reads, cache writes, cached (Responses)
                let mut native = [0u64; 5];
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "prompt_tokens" => {
                            chat = true;
                            usage.prompt_tokens = map.next_value::<Count>()?.0
                        }
                        "completion_tokens" => {
                            chat = true;
                            usage.completion_tokens = map.next_value::<Count>()?.0
                        }
                        "prompt_tokens_details" => {
                            chat = true;
                            usage.cached_tokens = map.next_value::<Cached>()?.0
                        }
                        "input_tokens" => native[0] = map.next_value::<Count>()?.0,
                        "output_tokens" => native[1] = map.next_value::<Count>()?.0,
                        "cache_read_input_tokens" => native[2] = map.next_value::<Count>()?.0,
                        "cache_creation_input_tokens" => native[3] = map.next_value::<Count>()?.0,
                        "input_tokens_details" => native[4] = map.next_value::<Cached>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if !chat {
                    let [input, output, read, write, cached] = native;
                    usage = Usage {
                        prompt_tokens: input.saturating_add(read).saturating_add(write),
                        completion_tokens: output,
                        cached_tokens: if read > 0 { read } else { cached },
                    };
                }
                Ok(usage)
            }

            fn visit_unit<E>(self) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_bool<E>(self, _: bool) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_i64<E>(self, _: i64) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_u64<E>(self, _: u64) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_f64<E>(self, _: f64) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_str<E>(self, _: &str) -> Result<Usage, E> {
                Ok(Usage::default())
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Usage, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Usage::default())
            }
        }

        d.deserialize_any(Visitor)
    }
}

/// An amount in nano-dollars (10⁻⁹ USD).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cost(pub u64);

impl Cost {
    pub fn usd(self) -> f64 {
        self.0 as f64 / 1e9
    }

    pub fn plus(self, other: Cost) -> Cost {
        Cost(self.0.saturating_add(other.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_leniently_from_json_and_from_values() {
        for (text, expected) in [
            (
                r#"{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21,"details":{"a":[1]}}"#,
                (12, 9, 0),
            ),
            (
                r#"{"prompt_tokens":"12","completion_tokens":-1}"#,
                (0, 0, 0),
            ),
            (
                r#"{"prompt_tokens":1.5,"completion_tokens":null}"#,
                (0, 0, 0),
            ),
            (
                r#"{"prompt_tokens":{"n":1},"completion_tokens":[3]}"#,
                (0, 0, 0),
            ),
            (r#"{"completion_tokens":4}"#, (0, 4, 0)),
            (r#"{}"#, (0, 0, 0)),
            (r#"null"#, (0, 0, 0)),
            (r#""twelve""#, (0, 0, 0)),
            (r#"[1,2]"#, (0, 0, 0)),
            (r#"7"#, (0, 0, 0)),
            (
                r#"{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":5,"audio_tokens":0}}"#,
                (9, 0, 5),
            ),
            (r#"{"prompt_tokens_details":null}"#, (0, 0, 0)),
            (
                r#"{"prompt_tokens_details":[1],"completion_tokens":2}"#,
                (0, 2, 0),
            ),
            (
                r#"{"prompt_tokens_details":{"cached_tokens":-3}}"#,
                (0, 0, 0),
            ),
            // Anthropic's: input excludes its cache reads and writes.
            (
                r#"{"input_tokens":10,"output_tokens":4,"cache_read_input_tokens":100,"cache_creation_input_tokens":5}"#,
                (115, 4, 100),
            ),
            // OpenAI Responses': input includes the cached tokens.
            (
                r#"{"input_tokens":50,"output_tokens":9,"input_tokens_details":{"cached_tokens":20}}"#,
                (50, 9, 20),
            ),
            // Chat's names win where both appear.
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"input_tokens":99}"#,
                (3, 1, 0),
            ),
        ] {
            let read: Usage = serde_json::from_str(text).unwrap();
            assert_eq!(
                (
                    read.prompt_tokens,
                    read.completion_tokens,
                    read.cached_tokens
                ),
                expected,
                "{text}"
            );
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(Usage::from_value(&value), read, "{text}");
        }
        let read: Usage =
            serde_json::from_str(r#"{"completion_tokens":9,"prompt_tokens":12}"#).unwrap();
        assert_eq!((read.prompt_tokens, read.completion_tokens), (12, 9));
    }
}
