//! Chat chunks as the Responses event sequence, from `response.created` to `response.completed` (or
//! `response.failed`).

use super::super::{StreamTranslation, error_code, error_message, sse_event};
use super::Echo;
use super::answer::{kept_answer, new_id, response_object, status, usage_json};
use crate::usage::Usage;
use serde_json::{Value, json};

/// The open output item of a translated stream.
#[derive(Clone, Debug, PartialEq)]
enum Open {
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
    },
    Call {
        n: u64,
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Called with the assistant message (as chat keeps it) when a stream completes.
pub type OnComplete = Box<dyn FnOnce(Value) + Send>;

/// Chat chunks as the Responses event sequence.
pub struct ResponsesStream {
    id: String,
    echo: Echo,
    created_at: i64,
    sequence: u64,
    started: bool,
    open: Option<Open>,
    /// Finished output items.
    output: Vec<Value>,
    /// The answer as chat keeps it: text and tool calls.
    text: String,
    calls: Vec<Value>,
    finish: Option<String>,
    usage: Option<Usage>,
    reasoning_tokens: u64,
    on_complete: Option<OnComplete>,
}

impl ResponsesStream {
    pub fn new(id: String, echo: Echo, on_complete: Option<OnComplete>) -> Self {
        Self {
            id,
            echo,
            created_at: crate::mapping::chunk::unix_seconds(),
            sequence: 0,
            started: false,
            open: None,
            output: Vec::new(),
            text: String::new(),
            calls: Vec::new(),
            finish: None,
            usage: None,
            reasoning_tokens: 0,
            on_complete,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        sse_event(out, kind, &data);
    }

    fn snapshot(&self, status: &str, incomplete: Value, usage: Option<Value>) -> Value {
        response_object(
            &self.id,
            &self.echo,
            self.created_at,
            status,
            self.output.clone(),
            usage,
            incomplete,
        )
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let response = self.snapshot("in_progress", Value::Null, None);
        self.emit(out, "response.created", json!({"response": response}));
        self.emit(out, "response.in_progress", json!({"response": response}));
    }

    fn index(&self) -> usize {
        self.output.len()
    }

    /// Ends the open item: its `…done` events, and the item among the output.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let index = self.index();
        let item = match open {
            Open::Reasoning { id, text } => {
                let part = json!({"type": "summary_text", "text": text});
                self.emit(
                    out,
                    "response.reasoning_summary_text.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                );
                self.emit(
                    out,
                    "response.reasoning_summary_part.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "part": part}),
                );
                json!({"type": "reasoning", "id": id, "summary": [part]})
            }
            Open::Message { id, text } => {
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                self.emit(out, "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                json!({"type": "message", "id": id, "status": "completed", "role": "assistant", "content": [part]})
            }
            Open::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => {
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": arguments}),
                );
                let mut item = json!({"type": "function_call", "id": id, "call_id": call_id,
                       "arguments": arguments, "status": "completed"});
                self.echo.call_fields(&name, &mut item);
                self.calls.push(json!({"id": call_id, "type": "function",
                                       "function": {"name": name, "arguments": arguments}}));
                item
            }
        };
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
    }

    /// Opens `open` as the next output item, announcing it.
    fn open(&mut self, open: Open, out: &mut Vec<u8>) {
        self.close(out);
        let index = self.index();
        let item = match &open {
            Open::Reasoning { id, .. } => json!({"type": "reasoning", "id": id, "summary": []}),
            Open::Message { id, .. } => {
                json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []})
            }
            Open::Call {
                id, call_id, name, ..
            } => {
                let mut item = json!({"type": "function_call", "id": id,
                    "call_id": call_id, "arguments": "", "status": "in_progress"});
                self.echo.call_fields(name, &mut item);
                item
            }
        };
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        match &open {
            Open::Reasoning { id, .. } => self.emit(
                out,
                "response.reasoning_summary_part.added",
                json!({"item_id": id, "output_index": index, "summary_index": 0,
                       "part": {"type": "summary_text", "text": ""}}),
            ),
            Open::Message { id, .. } => self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": []}}),
            ),
            Open::Call { .. } => {}
        }
        self.open = Some(open);
    }

    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        self.start(out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(Usage::from_value(usage));
            self.reasoning_tokens = usage["completion_tokens_details"]["reasoning_tokens"]
                .as_u64()
                .unwrap_or(0);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["reasoning_content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            if !matches!(self.open, Some(Open::Reasoning { .. })) {
                let id = new_id("rs");
                self.open(
                    Open::Reasoning {
                        id,
                        text: String::new(),
                    },
                    out,
                );
            }
            if let Some(Open::Reasoning { id, text: all }) = &mut self.open {
                all.push_str(text);
                let data = json!({"item_id": id, "output_index": self.output.len(), "summary_index": 0, "delta": text});
                self.emit(out, "response.reasoning_summary_text.delta", data);
            }
        }
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if !matches!(self.open, Some(Open::Message { .. })) {
                let id = new_id("msg");
                self.open(
                    Open::Message {
                        id,
                        text: String::new(),
                    },
                    out,
                );
            }
            self.text.push_str(text);
            if let Some(Open::Message { id, text: all }) = &mut self.open {
                all.push_str(text);
                let data = json!({"item_id": id, "output_index": self.output.len(), "content_index": 0,
                                  "delta": text, "logprobs": []});
                self.emit(out, "response.output_text.delta", data);
            }
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let n = call["index"].as_u64().unwrap_or(0);
            if !matches!(&self.open, Some(Open::Call { n: open, .. }) if *open == n) {
                let call_id = call["id"]
                    .as_str()
                    .map_or_else(|| new_id("call"), str::to_string);
                let name = call["function"]["name"].as_str().unwrap_or("").to_string();
                let open = Open::Call {
                    n,
                    id: new_id("fc"),
                    call_id,
                    name,
                    arguments: String::new(),
                };
                self.open(open, out);
            }
            if let Some(arguments) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
                && let Some(Open::Call {
                    id, arguments: all, ..
                }) = &mut self.open
            {
                all.push_str(arguments);
                let data =
                    json!({"item_id": id, "output_index": self.output.len(), "delta": arguments});
                self.emit(out, "response.function_call_arguments.delta", data);
            }
        }
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.finish = Some(finish.to_string());
        }
    }

    fn fail(&mut self, code: &str, message: &str, out: &mut Vec<u8>) {
        self.start(out);
        self.emit(
            out,
            "error",
            json!({"code": code, "message": message, "param": null}),
        );
        let mut response = self.snapshot("failed", Value::Null, None);
        response["error"] = json!({"code": code, "message": message});
        self.emit(out, "response.failed", json!({"response": response}));
    }
}

impl StreamTranslation for ResponsesStream {
    fn event(&mut self, _: Option<&str>, data: &str, out: &mut Vec<u8>) {
        if let Ok(chunk) = serde_json::from_str::<Value>(data) {
            self.chunk(&chunk, out);
        }
    }

    fn error(&mut self, error: &Value, out: &mut Vec<u8>) {
        self.fail(error_code(error), error_message(error), out);
    }

    fn end(&mut self, clean: bool, out: &mut Vec<u8>) {
        if !clean {
            self.fail(
                "stream_interrupted",
                "the stream ended before the answer was complete",
                out,
            );
            return;
        }
        self.start(out);
        self.close(out);
        let (status, incomplete) = status(self.finish.as_deref());
        let usage = self.usage.map(|u| usage_json(&u, self.reasoning_tokens));
        let response = self.snapshot(status, incomplete, usage);
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.emit(out, kind, json!({"response": response}));
        if let Some(on_complete) = self.on_complete.take() {
            on_complete(kept_answer(&self.text, std::mem::take(&mut self.calls)));
        }
    }
}
