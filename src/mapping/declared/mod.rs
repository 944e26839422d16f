//! Declared mappings: the rules of a provider file's `request:`, `response:` and `stream:` sections, done in
//! Rust. Each is a layer over the provider's script: it maps what its rules cover (the frequent, simple case)
//! and hands the rest to the script, which keeps the whole mapping. Rules make a provider cheap, never
//! different: what they map, the script would have mapped the same way.
//!
//! - `request.messages` ([`messages`]): plain text conversations, to the upstream's turns;
//! - `request.copy` (here): fields copied from the client's body into the upstream body;
//! - `response.fast` ([`answer`]): one-text answers, to OpenAI's;
//! - `stream.fast` ([`events`]): text deltas and keep-alives, to chunk parts.

pub mod answer;
pub mod events;
pub mod json_path;
pub mod messages;

use super::{
    Answer, AnswerMapping, ChunkWriter, Draft, Event, EventMapping, EventMappings, MapError, Part,
    RequestMapping, Step, Target,
};
use crate::config::ConfigError;
use crate::script::ScriptError;
pub(crate) use answer::RawResponse;
pub(crate) use events::RawStream;
use json_path::JsonPath;
pub(crate) use messages::RawMessages;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The rules a provider file declares, resolved; what [`super::Mapping::compose`] layers over the script.
#[derive(Clone, Debug, Default)]
pub struct Declared {
    pub messages: Option<messages::MessageRules>,
    /// (client path, upstream path).
    pub copies: Vec<(JsonPath, JsonPath)>,
    pub answer: Option<answer::AnswerRules>,
    pub events: Vec<events::EventRule>,
    /// `request.fields`: what becomes of fields the mapping does not honour.
    pub fields: Option<Arc<super::fields::FieldRules>>,
}

impl Declared {
    pub(crate) fn messages(
        &mut self,
        raw: RawMessages,
        file: &Path,
    ) -> Result<(), Vec<ConfigError>> {
        self.messages = Some(messages::resolve(raw, file)?);
        Ok(())
    }

    pub(crate) fn answer(&mut self, raw: RawResponse, file: &Path) -> Result<(), Vec<ConfigError>> {
        self.answer = answer::resolve(raw, file)?;
        Ok(())
    }

    pub(crate) fn events(&mut self, raw: RawStream, file: &Path) -> Result<(), Vec<ConfigError>> {
        self.events = events::resolve(raw, Some(file))?;
        Ok(())
    }

    /// `request.copy`: pairs of paths, client body to upstream body.
    pub(crate) fn copies(
        &mut self,
        raw: BTreeMap<String, String>,
        file: &Path,
    ) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        for (from, to) in raw {
            match (JsonPath::parse(&from), JsonPath::parse(&to)) {
                (Some(f), Some(t)) if t.is_keys_only() => self.copies.push((f, t)),
                _ => errors.push(
                    ConfigError::new(
                        Some(file),
                        format!("request.copy: {from:?} -> {to:?} is not a pair of paths"),
                    )
                    .hint("e.g. top_p: generationConfig.topP (the target cannot index arrays)"),
                ),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// `request.messages` and `request.copy` over the script's request hook.
#[derive(Debug)]
pub struct DeclaredRequest {
    pub messages: Option<messages::MessageRules>,
    pub copies: Vec<(JsonPath, JsonPath)>,
    pub below: Arc<dyn RequestMapping>,
}

impl RequestMapping for DeclaredRequest {
    /// A chat of plain text that the message rules map is mapped here: the layer below sees the body without
    /// `messages`, and the mapped turns are written into its draft. Then the copies, where the layer below
    /// left the target empty.
    fn map(&self, target: &Target<'_>, body: Value) -> Result<Draft, MapError> {
        let declared = match (&self.messages, body.get("messages")) {
            (Some(rules), Some(messages)) if target.endpoint == "chat" => rules.map(messages),
            _ => None,
        };
        let mut draft = match &declared {
            None => self.below.map(target, body.clone())?,
            Some(_) => {
                let mut rest = body.clone();
                if let Value::Object(fields) = &mut rest {
                    fields.remove("messages");
                }
                self.below.map(target, rest)?
            }
        };
        if let Some(sets) = declared {
            let mut written = true;
            for (path, value) in sets {
                written &= path.set(&mut draft.body, value);
            }
            // The layer below left no room where the rules write: it maps the whole request instead.
            if !written {
                draft = self.below.map(target, body.clone())?;
            }
        }
        // Copies are chat fields: an embeddings request carries none to copy.
        for (from, to) in self.copies.iter().filter(|_| target.endpoint == "chat") {
            if let Some(value) = from.get(&body)
                && to.get(&draft.body).is_none()
            {
                to.set(&mut draft.body, value.clone());
            }
        }
        Ok(draft)
    }

    fn slow(&self) -> bool {
        self.below.slow()
    }
}

/// `response.fast` over the script's response hook.
#[derive(Debug)]
pub struct DeclaredAnswer {
    pub rules: answer::AnswerRules,
    pub below: Arc<dyn AnswerMapping>,
}

impl AnswerMapping for DeclaredAnswer {
    fn map(&self, endpoint: &str, model: &str, body: &[u8]) -> Result<Answer, ScriptError> {
        if endpoint == "chat"
            && let Ok(parsed) = serde_json::from_slice::<Value>(body)
            && let Some(mapped) = self.rules.map(&parsed, model)
        {
            return Ok(Answer::Mapped(mapped));
        }
        self.below.map(endpoint, model, body)
    }

    fn slow(&self) -> bool {
        self.below.slow()
    }
}

/// `stream.fast` over the script's stream hook.
#[derive(Debug)]
pub struct DeclaredEvents {
    pub rules: Arc<[events::EventRule]>,
    pub below: Arc<dyn EventMappings>,
}

impl EventMappings for DeclaredEvents {
    fn start(&self, label: &str) -> Box<dyn EventMapping> {
        Box::new(DeclaredStream {
            rules: self.rules.clone(),
            below: self.below.start(label),
        })
    }
}

struct DeclaredStream {
    rules: Arc<[events::EventRule]>,
    below: Box<dyn EventMapping>,
}

impl EventMapping for DeclaredStream {
    fn map(&mut self, mut event: Event, chunks: &mut ChunkWriter) -> Result<Step, ScriptError> {
        match by_rules(&self.rules, &mut event, chunks) {
            Some(parts) => Ok(Step::Mapped(parts)),
            None => self.below.map(event, chunks),
        }
    }

    fn map_slow(
        &mut self,
        event: Event,
        chunks: &mut ChunkWriter,
    ) -> Result<Vec<Part>, ScriptError> {
        self.below.map_slow(event, chunks)
    }
}

/// The parts of one event as the first matching rule maps it; `None` when none does.
fn by_rules(
    rules: &[events::EventRule],
    event: &mut Event,
    chunks: &mut ChunkWriter,
) -> Option<Vec<Part>> {
    let (name, data) = event.name_and_json();
    match events::first_match(rules, name, data?)? {
        events::Emitted::Skip => Some(Vec::new()),
        events::Emitted::Content(text) => Some(vec![chunks.text("content", text)]),
        events::Emitted::Reasoning(text) => Some(vec![chunks.text("reasoning_content", text)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;

    /// A bottom layer that records the bodies it is given and answers with a fixed draft body.
    #[derive(Debug)]
    struct Below {
        seen: Mutex<Vec<Value>>,
        answer: Value,
    }

    impl RequestMapping for Below {
        fn map(&self, target: &Target<'_>, body: Value) -> Result<Draft, MapError> {
            self.seen.lock().unwrap().push(body);
            Ok(Draft {
                method: http::Method::POST,
                path: target.path.to_string(),
                query: Vec::new(),
                headers: Vec::new(),
                body: self.answer.clone(),
            })
        }

        fn slow(&self) -> bool {
            true
        }
    }

    fn layer(rules: &str, copies: &[(&str, &str)], answer: Value) -> (DeclaredRequest, Arc<Below>) {
        let below = Arc::new(Below {
            seen: Mutex::default(),
            answer,
        });
        let mut declared = Declared::default();
        declared
            .messages(serde_yaml::from_str(rules).unwrap(), Path::new("p.yaml"))
            .unwrap();
        let copies = copies
            .iter()
            .map(|(f, t)| (f.to_string(), t.to_string()))
            .collect();
        declared.copies(copies, Path::new("p.yaml")).unwrap();
        let layer = DeclaredRequest {
            messages: declared.messages,
            copies: declared.copies,
            below: below.clone(),
        };
        (layer, below)
    }

    const TARGET: Target<'static> = Target {
        endpoint: "chat",
        model: "m",
        stream: false,
        path: "/x",
    };

    #[test]
    fn a_declared_request_layer_maps_plain_chats_and_hands_the_rest_below() {
        let rules = "{roles: {user: user}, into: turns, turn: {t: $text}}";
        let (layer, below) = layer(rules, &[("top_p", "config.topP")], json!({"config": {}}));
        let plain = json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5});
        let draft = layer.map(&TARGET, plain).unwrap();
        assert_eq!(
            draft.body,
            json!({"config": {"topP": 0.5}, "turns": [{"t": "hi"}]})
        );
        assert_eq!(
            below.seen.lock().unwrap().pop().unwrap(),
            json!({"top_p": 0.5}),
            "the layer below does not see the messages the rules mapped"
        );
        let rich = json!({"messages": [{"role": "tool", "content": "42"}]});
        let draft = layer.map(&TARGET, rich.clone()).unwrap();
        assert_eq!(draft.body, json!({"config": {}}), "no turns written");
        assert_eq!(below.seen.lock().unwrap().pop().unwrap(), rich);
        assert!(layer.slow(), "as slow as the layer below");
    }

    #[test]
    fn a_declared_request_layer_never_overwrites_what_the_layer_below_wrote() {
        let rules = "{roles: {user: user}, into: c.turns, turn: {t: $text}}";
        let (layer, below) = layer(rules, &[("top_p", "topP")], json!({"topP": 1, "c": 5}));
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5});
        let draft = layer.map(&TARGET, body.clone()).unwrap();
        assert_eq!(
            draft.body,
            json!({"topP": 1, "c": 5}),
            "a copy fills only what is empty"
        );
        let seen = below.seen.lock().unwrap();
        assert_eq!(
            seen.last().unwrap(),
            &body,
            "with no room for the turns, the layer below maps the whole request"
        );
    }

    #[derive(Debug)]
    struct SlowEvents;

    struct SlowStream;

    impl EventMappings for SlowEvents {
        fn start(&self, _: &str) -> Box<dyn EventMapping> {
            Box::new(SlowStream)
        }
    }

    impl EventMapping for SlowStream {
        fn map(&mut self, event: Event, _: &mut ChunkWriter) -> Result<Step, ScriptError> {
            Ok(Step::Slow(event))
        }

        fn map_slow(
            &mut self,
            event: Event,
            chunks: &mut ChunkWriter,
        ) -> Result<Vec<Part>, ScriptError> {
            Ok(vec![
                chunks.text("content", &format!("slow:{}", event.sse.data)),
            ])
        }
    }

    #[test]
    fn declared_event_rules_map_on_the_cheap_path_and_leave_the_rest_to_the_slow_one() {
        let rules = events::resolve(
            serde_yaml::from_str(
                "fast: [{event: delta, content: text}, {event: ping, skip: true}]",
            )
            .unwrap(),
            None,
        )
        .unwrap();
        let layers = DeclaredEvents {
            rules: rules.into(),
            below: Arc::new(SlowEvents),
        };
        let mut stream = layers.start("p/m");
        let mut chunks = ChunkWriter::new("m");
        let sse = |event: &str, data: &str| {
            Event::new(crate::sse::SseEvent {
                event: Some(event.into()),
                data: data.into(),
            })
        };
        let content = |parts: &[Part]| match parts {
            [Part::Chunk { data, .. }] => serde_json::from_str::<Value>(data).unwrap()["choices"]
                [0]["delta"]["content"]
                .clone(),
            other => panic!("{other:?}"),
        };
        let Step::Mapped(parts) = stream
            .map(sse("delta", r#"{"text":"hi"}"#), &mut chunks)
            .unwrap()
        else {
            panic!("a rule maps a delta")
        };
        assert_eq!(content(&parts), json!("hi"));
        let Step::Mapped(parts) = stream.map(sse("ping", "{}"), &mut chunks).unwrap() else {
            panic!("a rule skips a ping")
        };
        assert!(parts.is_empty());
        let Step::Slow(event) = stream.map(sse("stop", "{}"), &mut chunks).unwrap() else {
            panic!("no rule maps a stop")
        };
        let parts = stream.map_slow(event, &mut chunks).unwrap();
        assert_eq!(content(&parts), json!("slow:{}"));
    }
}
