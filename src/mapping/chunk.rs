//! OpenAI chunks built from parts — what a script or a declared rule says about one event — written straight
//! to their wire form with the per-stream envelope (id, created, model) prepared once.

use serde_json::{Map, Value};

/// One mapped output of an upstream event.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    /// An OpenAI chunk, serialised, with what the proxy needs to know about it.
    Chunk {
        data: String,
        finish: bool,
        usage: Option<Value>,
        usage_only: bool,
    },
    /// A native dialect's event, forwarded as it came with its SSE event name; `usage` in OpenAI's shape.
    Event {
        name: Option<String>,
        data: String,
        usage: Option<Value>,
        finish: bool,
    },
    /// An in-band error object.
    Error(Value),
    /// The answer is complete (`[DONE]`, or a part `done: true`).
    Done,
}

/// Writes the chunks of one stream.
pub struct ChunkWriter {
    id: String,
    model: String,
    created: i64,
    /// `{"id":…,"object":"chat.completion.chunk","created":…,"model":…,"choices":` for this stream.
    envelope: String,
    /// The first chunk carries `role: assistant`, as OpenAI's do.
    role_sent: bool,
}

/// A new `chatcmpl-…` id, for answers whose upstream gave none.
pub fn completion_id() -> String {
    let mut id = String::from("chatcmpl-");
    id.extend((0..24).map(|_| fastrand::alphanumeric()));
    id
}

/// Now, in Unix seconds (OpenAI's `created`).
pub fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl ChunkWriter {
    /// A writer for a stream of `model`; its id and time are chosen when it writes its first chunk (a stream
    /// that passes through never does).
    pub fn new(model: &str) -> Self {
        Self {
            id: String::new(),
            model: model.to_string(),
            created: 0,
            envelope: String::new(),
            role_sent: false,
        }
    }

    fn ready(&mut self) {
        if self.envelope.is_empty() {
            self.id = completion_id();
            self.created = unix_seconds();
            self.envelope();
        }
    }

    fn envelope(&mut self) {
        let q = |s: &str| Value::String(s.to_string()).to_string();
        self.envelope = format!(
            "{{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\"choices\":",
            q(&self.id),
            self.created,
            q(&self.model)
        );
    }

    fn delta_chunk(&mut self, mut delta: Map<String, Value>, finish: &Value) -> String {
        if !self.role_sent {
            self.role_sent = true;
            delta
                .entry("role")
                .or_insert_with(|| Value::String("assistant".into()));
        }
        let mut out = String::with_capacity(self.envelope.len() + 96);
        out.push_str(&self.envelope);
        out.push_str("[{\"index\":0,\"delta\":");
        out.push_str(&Value::Object(delta).to_string());
        out.push_str(",\"finish_reason\":");
        out.push_str(&finish.to_string());
        out.push_str("}]}");
        out
    }

    /// A text (or reasoning) delta: the declared rules' fast path.
    pub fn text(&mut self, field: &str, text: &str) -> Part {
        self.ready();
        let mut delta = Map::new();
        delta.insert(field.into(), Value::String(text.to_string()));
        Part::Chunk {
            data: self.delta_chunk(delta, &Value::Null),
            finish: false,
            usage: None,
            usage_only: false,
        }
    }

    /// The chunk(s) for one part. A part with usage and a delta becomes two chunks, as OpenAI sends them: the
    /// delta first, then a usage chunk with empty `choices`.
    pub fn part(&mut self, mut part: Map<String, Value>) -> Vec<Part> {
        if let Some(error) = part.remove("error").filter(|e| !e.is_null()) {
            return vec![Part::Error(error)];
        }
        self.ready();
        let mut changed = false;
        if let Some(id) = part
            .remove("id")
            .and_then(|v| v.as_str().map(str::to_string))
        {
            changed |= id != self.id;
            self.id = id;
        }
        if let Some(model) = part
            .remove("model")
            .and_then(|v| v.as_str().map(str::to_string))
        {
            changed |= model != self.model;
            self.model = model;
        }
        if changed {
            self.envelope();
        }
        let done = part.remove("done").is_some_and(|d| d == Value::Bool(true));
        if part.contains_key("choices") {
            let choices = part.get("choices").and_then(Value::as_array);
            let finish = choices.is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null()))
            });
            let usage_only = choices.is_some_and(Vec::is_empty);
            let usage = part.get("usage").filter(|u| u.is_object()).cloned();
            let mut out = vec![Part::Chunk {
                data: Value::Object(part).to_string(),
                finish,
                usage,
                usage_only,
            }];
            if done {
                out.push(Part::Done);
            }
            return out;
        }
        let usage = part.remove("usage").filter(Value::is_object);
        let finish_reason = part.remove("finish_reason").unwrap_or(Value::Null);
        let mut delta = Map::new();
        for (from, to) in [
            ("role", "role"),
            ("content", "content"),
            ("reasoning", "reasoning_content"),
            ("tool_calls", "tool_calls"),
        ] {
            if let Some(v) = part.remove(from).filter(|v| !v.is_null()) {
                delta.insert(to.into(), v);
            }
        }
        let mut out = Vec::new();
        if !delta.is_empty() || !finish_reason.is_null() {
            let data = self.delta_chunk(delta, &finish_reason);
            out.push(Part::Chunk {
                data,
                finish: !finish_reason.is_null(),
                usage: None,
                usage_only: false,
            });
        }
        if let Some(usage) = usage {
            let mut data = self.envelope.clone();
            data.push_str("[],\"usage\":");
            data.push_str(&usage.to_string());
            data.push('}');
            out.push(Part::Chunk {
                data,
                finish: false,
                usage: Some(usage),
                usage_only: true,
            });
        }
        if done {
            out.push(Part::Done);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(p: &Part) -> Value {
        match p {
            Part::Chunk { data, .. } => serde_json::from_str(data).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn writes_valid_chunks_with_role_first_and_usage_apart() {
        let mut w = ChunkWriter::new("m\"odel");
        let first = parse(&w.text("content", "he said \"hi\""));
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": "he said \"hi\""})
        );
        assert_eq!(first["model"], "m\"odel");
        let parts = w.part(
            json!({"finish_reason": "stop", "usage": {"prompt_tokens": 1}, "done": true})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(parts.len(), 3);
        assert_eq!(
            parse(&parts[0])["choices"][0],
            json!({"index": 0, "delta": {}, "finish_reason": "stop"})
        );
        assert_eq!(parse(&parts[1])["choices"], json!([]));
        assert_eq!(parts[2], Part::Done);
        let renamed = w.part(
            json!({"id": "msg_1", "model": "real", "content": "x"})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(
            (
                parse(&renamed[0])["id"].clone(),
                parse(&renamed[0])["model"].clone()
            ),
            (json!("msg_1"), json!("real"))
        );
    }
}
