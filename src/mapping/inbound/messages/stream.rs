//! Chat chunks as Anthropic's stream events, from `message_start` to `message_stop`.

use super::super::{StreamTranslation, error_message, sse_event};
use super::answer::{error_body, fastrand_id, message_id, stop_reason, usage_json};
use crate::usage::Usage;
use serde_json::{Value, json};

/// The open content block of a translated stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    /// A tool call, by its OpenAI index.
    Tool(u64),
}

/// OpenAI chunks as Anthropic's stream events.
pub struct MessagesStream {
    model: String,
    started: bool,
    /// The open block and its index.
    open: Option<(Block, usize)>,
    next_index: usize,
    finish: Option<String>,
    usage: Usage,
}

impl MessagesStream {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            started: false,
            open: None,
            next_index: 0,
            finish: None,
            usage: Usage::default(),
        }
    }

    fn start(&mut self, id: Option<&str>, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "id": message_id(id), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        });
        sse_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
        sse_event(out, "ping", &json!({"type": "ping"}));
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((_, index)) = self.open.take() {
            sse_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// The index of `block`, opening it (and closing the one before) when it is not the open one.
    fn open(&mut self, block: Block, start: Value, out: &mut Vec<u8>) -> usize {
        if let Some((open, index)) = self.open
            && open == block
        {
            return index;
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((block, index));
        sse_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        );
        index
    }

    fn delta(&mut self, index: usize, delta: Value, out: &mut Vec<u8>) {
        sse_event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        self.start(chunk["id"].as_str(), out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Usage::from_value(usage);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["reasoning_content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            let index = self.open(
                Block::Thinking,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                out,
            );
            self.delta(
                index,
                json!({"type": "thinking_delta", "thinking": text}),
                out,
            );
        }
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let index = self.open(Block::Text, json!({"type": "text", "text": ""}), out);
            self.delta(index, json!({"type": "text_delta", "text": text}), out);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let n = call["index"].as_u64().unwrap_or(0);
            let function = &call["function"];
            let index = match self.open {
                Some((Block::Tool(open), index)) if open == n => index,
                _ => {
                    let id = call["id"]
                        .as_str()
                        .map_or_else(|| format!("toolu_{}", fastrand_id()), str::to_string);
                    let start = json!({"type": "tool_use", "id": id, "name": function["name"], "input": {}});
                    self.open(Block::Tool(n), start, out)
                }
            };
            if let Some(arguments) = function["arguments"].as_str().filter(|a| !a.is_empty()) {
                self.delta(
                    index,
                    json!({"type": "input_json_delta", "partial_json": arguments}),
                    out,
                );
            }
        }
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.finish = Some(finish.to_string());
        }
    }
}

impl StreamTranslation for MessagesStream {
    fn event(&mut self, _: Option<&str>, data: &str, out: &mut Vec<u8>) {
        if let Ok(chunk) = serde_json::from_str::<Value>(data) {
            self.chunk(&chunk, out);
        }
    }

    /// Anthropic's error event ends the stream, without message_stop.
    fn error(&mut self, error: &Value, out: &mut Vec<u8>) {
        sse_event(out, "error", &error_body(500, error_message(error)));
    }

    fn end(&mut self, clean: bool, out: &mut Vec<u8>) {
        if !clean {
            sse_event(
                out,
                "error",
                &error_body(500, "the stream ended before the answer was complete"),
            );
            return;
        }
        self.start(None, out);
        self.close(out);
        let delta = json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null},
            "usage": usage_json(&self.usage)});
        sse_event(out, "message_delta", &delta);
        sse_event(out, "message_stop", &json!({"type": "message_stop"}));
    }
}
