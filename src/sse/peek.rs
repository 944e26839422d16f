//! What the proxy reads of an OpenAI chunk or answer without building it: whether a choice finishes, and the
//! token counts. Lenient on purpose: an odd field never makes a valid chunk or a paid answer look malformed.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// The parts of an OpenAI chunk the proxy looks at; everything else passes through untouched. Lenient on
/// purpose: a field of an unexpected type must not make a valid chunk look malformed.
#[derive(Deserialize)]
pub struct ChunkPeek {
    #[serde(default)]
    pub(crate) choices: Option<Vec<ChoicePeek>>,
    #[serde(default)]
    pub(crate) usage: Option<Value>,
    #[serde(default)]
    pub(crate) error: Option<Value>,
}

/// Of a choice, only whether it finishes; its delta is skipped over, not built (this runs on every event). A
/// choice that is not an object reads as one that does not finish, as the rest of the chunk still counts.
pub struct ChoicePeek {
    pub(crate) finish_reason: Option<IgnoredAny>,
}

impl<'de> Deserialize<'de> for ChoicePeek {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Field {
            FinishReason,
            #[serde(other)]
            Other,
        }

        struct Choice;

        impl<'de> serde::de::Visitor<'de> for Choice {
            type Value = ChoicePeek;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a choice")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ChoicePeek, A::Error> {
                let mut finish_reason = None;
                while let Some(field) = map.next_key::<Field>()? {
                    match field {
                        Field::FinishReason => finish_reason = map.next_value()?,
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ChoicePeek { finish_reason })
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ChoicePeek, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ChoicePeek {
                    finish_reason: None,
                })
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<ChoicePeek, E> {
                Ok(ChoicePeek {
                    finish_reason: None,
                })
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }

            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }

            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }

            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<ChoicePeek, E> {
                self.visit_unit()
            }
        }

        d.deserialize_any(Choice)
    }
}
