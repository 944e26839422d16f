//! Mapping benchmark: the shipped Gemini and Anthropic scripts against a native-Rust baseline of the same
//! mapping, for request mapping, response mapping and per-event stream mapping. Run with
//! `cargo bench --bench mapping`. Inputs are the wire-format fixtures under tests/fixtures.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keyrelay::config::Tuning;
use keyrelay::mapping::{EventMapper, Target};
use keyrelay::sse::{SseEvent, SseParser};
use serde_json::{Map, Value, json};
use std::hint::black_box;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn provider(name: &str) -> keyrelay::provider::Provider {
    keyrelay::provider::load_file(
        &root().join(format!("providers/{name}.yaml")),
        &root().join("plugins"),
        &Tuning::default(),
        None,
    )
    .unwrap()
}

/// A live stream's mapper: declared rules first, then the script.
fn mapper(p: &keyrelay::provider::Provider) -> EventMapper {
    p.mapping.stream("m", &p.name)
}

fn fixture(path: &str) -> String {
    std::fs::read_to_string(root().join("tests/fixtures").join(path)).unwrap()
}

/// Every event of an SSE fixture.
fn events(path: &str) -> Vec<SseEvent> {
    let mut parser = SseParser::new();
    parser.push(fixture(path).as_bytes()).unwrap();
    let mut out = Vec::new();
    while let Some(e) = parser.next_event().unwrap() {
        out.push(e);
    }
    out.extend(parser.finish());
    out
}

// ------------------------------------------------------------------------- native baselines (same mapping)

fn native_gemini_request(body: &Value) -> Value {
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    for m in body["messages"].as_array().into_iter().flatten() {
        let text = m["content"].as_str().unwrap_or_default();
        let role = match m["role"].as_str() {
            Some("system" | "developer") => {
                system.push(json!({"text": text}));
                continue;
            }
            Some("assistant") => "model",
            _ => "user",
        };
        match contents.last_mut() {
            Some(last) if last["role"] == role => last["parts"]
                .as_array_mut()
                .unwrap()
                .push(json!({"text": text})),
            _ => contents.push(json!({"role": role, "parts": [{"text": text}]})),
        }
    }
    let mut config = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("max_tokens", "maxOutputTokens"),
        ("n", "candidateCount"),
    ] {
        if let Some(v) = body.get(from) {
            config.insert(to.into(), v.clone());
        }
    }
    if let Some(stop) = body.get("stop") {
        config.insert(
            "stopSequences".into(),
            if stop.is_string() {
                json!([stop])
            } else {
                stop.clone()
            },
        );
    }
    json!({"contents": contents, "systemInstruction": {"parts": system}, "generationConfig": config})
}

fn native_finish(reason: &str, tools: bool) -> &'static str {
    match reason {
        "STOP" if tools => "tool_calls",
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => "content_filter",
        _ => "stop",
    }
}

fn native_gemini_usage(u: &Value) -> Value {
    let prompt = u["promptTokenCount"].as_u64().unwrap_or(0);
    let thoughts = u["thoughtsTokenCount"].as_u64().unwrap_or(0);
    let completion = u["candidatesTokenCount"].as_u64().unwrap_or(0) + thoughts;
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": u["totalTokenCount"].as_u64().unwrap_or(prompt + completion), "completion_tokens_details": {"reasoning_tokens": thoughts}})
}

fn native_gemini_response(body: &[u8]) -> Value {
    let b: Value = serde_json::from_slice(body).unwrap();
    let choices: Vec<Value> = b["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| {
            let mut text = String::new();
            let mut calls = Vec::new();
            for p in c["content"]["parts"].as_array().into_iter().flatten() {
                if let Some(t) = p["text"].as_str() {
                    text.push_str(t);
                } else if let Some(f) = p.get("functionCall") {
                    calls.push(json!({"id": "call_x", "type": "function", "function": {"name": f["name"], "arguments": f["args"].to_string()}}));
                }
            }
            let finish = native_finish(c["finishReason"].as_str().unwrap_or(""), !calls.is_empty());
            json!({"index": i, "message": {"role": "assistant", "content": text, "tool_calls": calls}, "finish_reason": finish})
        })
        .collect();
    json!({"id": b["responseId"], "object": "chat.completion", "created": 0, "model": b["modelVersion"], "choices": choices, "usage": native_gemini_usage(&b["usageMetadata"])})
}

fn native_chunk(delta: Value, finish: Value) -> String {
    json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).to_string()
}

fn native_gemini_event(data: &str) -> Vec<String> {
    let b: Value = serde_json::from_str(data).unwrap();
    let c = &b["candidates"][0];
    let text: String = c["content"]["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["text"].as_str())
        .collect();
    let mut out = Vec::new();
    let finish = c["finishReason"]
        .as_str()
        .map(|r| json!(native_finish(r, false)))
        .unwrap_or(Value::Null);
    out.push(native_chunk(json!({"content": text}), finish.clone()));
    if !finish.is_null() {
        out.push(json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [], "usage": native_gemini_usage(&b["usageMetadata"])}).to_string());
    }
    out
}

fn native_anthropic_event(data: &str, tools: &mut u64) -> Vec<String> {
    let d: Value = serde_json::from_str(data).unwrap();
    match d["type"].as_str() {
        Some("message_start") => vec![native_chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )],
        Some("content_block_start") if d["content_block"]["type"] == "tool_use" => {
            *tools += 1;
            vec![native_chunk(
                json!({"tool_calls": [{"index": *tools - 1, "id": d["content_block"]["id"], "type": "function", "function": {"name": d["content_block"]["name"], "arguments": ""}}]}),
                Value::Null,
            )]
        }
        Some("content_block_delta") => match d["delta"]["type"].as_str() {
            Some("text_delta") => vec![native_chunk(
                json!({"content": d["delta"]["text"]}),
                Value::Null,
            )],
            Some("input_json_delta") => vec![native_chunk(
                json!({"tool_calls": [{"index": *tools - 1, "function": {"arguments": d["delta"]["partial_json"]}}]}),
                Value::Null,
            )],
            _ => vec![],
        },
        Some("message_delta") => vec![native_chunk(json!({}), json!("stop"))],
        _ => vec![],
    }
}

fn native_anthropic_response(body: &[u8]) -> Value {
    let b: Value = serde_json::from_slice(body).unwrap();
    let text: String = b["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["text"].as_str())
        .collect();
    let u = &b["usage"];
    let cached = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    let prompt = u["input_tokens"].as_u64().unwrap_or(0)
        + u["cache_creation_input_tokens"].as_u64().unwrap_or(0)
        + cached;
    let completion = u["output_tokens"].as_u64().unwrap_or(0);
    json!({"id": b["id"], "object": "chat.completion", "created": 0, "model": b["model"], "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}})
}

// --------------------------------------------------------------------------------------------- benches

fn benches(c: &mut Criterion) {
    // As the relay maps them: plain text by the provider's declarations (request.messages, response.fast) with
    // the script's hook for the rest of the request; tool calls by the script alone.
    let request: Value = serde_json::from_str(&fixture("openai/chat_basic.json")).unwrap();
    let tools: Value = serde_json::from_str(&fixture("openai/chat_tools.json")).unwrap();
    for name in ["gemini", "anthropic"] {
        let p = provider(name);
        let target = Target {
            endpoint: "chat",
            model: "m",
            stream: false,
            path: "/unused",
        };
        for (what, body) in [("text/declared", &request), ("tools/script", &tools)] {
            c.bench_function(&format!("{name}/request/{what}"), |b| {
                b.iter(|| {
                    p.mapping
                        .request
                        .map(&target, black_box(body).clone())
                        .unwrap()
                })
            });
        }
    }
    c.bench_function("gemini/request/native", |b| {
        b.iter(|| native_gemini_request(black_box(&request)))
    });

    let responses = [
        (
            "gemini",
            "text/declared",
            "gemini/generate_response_text.json",
        ),
        (
            "gemini",
            "tool call/script",
            "gemini/generate_response_tool_call.json",
        ),
        (
            "anthropic",
            "text/declared",
            "anthropic/message_response_text.json",
        ),
        (
            "anthropic",
            "tool use/script",
            "anthropic/message_response_tool_use.json",
        ),
    ];
    for (name, what, path) in responses {
        let p = provider(name);
        let body = fixture(path);
        c.bench_function(&format!("{name}/response/{what}"), |b| {
            b.iter(|| {
                p.mapping
                    .answer
                    .map("chat", "m", black_box(body.as_bytes()))
                    .unwrap()
            })
        });
    }
    let response = fixture("gemini/generate_response_text.json");
    c.bench_function("gemini/response/native", |b| {
        b.iter(|| native_gemini_response(black_box(response.as_bytes())))
    });
    let response = fixture("anthropic/message_response_text.json");
    c.bench_function("anthropic/response/native", |b| {
        b.iter(|| native_anthropic_response(black_box(response.as_bytes())))
    });

    // Per event: whole transcripts mapped with one stream's state; criterion reports the time per transcript.
    for (name, path) in [
        ("gemini", "gemini/stream_text.sse"),
        ("gemini", "gemini/stream_tool_call.sse"),
        ("anthropic", "anthropic/stream_text.sse"),
        ("anthropic", "anthropic/stream_tool_use.sse"),
    ] {
        let p = provider(name);
        let events = events(path);
        c.bench_function(
            &format!("{name}/stream/script {path} ({} events)", events.len()),
            |b| {
                // The events are cloned outside the measurement: the proxy maps the ones it parsed.
                b.iter_batched(
                    || events.clone(),
                    |events| {
                        let mut m = mapper(&p);
                        for event in events {
                            black_box(m.map_blocking(event).unwrap());
                        }
                    },
                    BatchSize::SmallInput,
                )
            },
        );
    }
    // A text delta alone, the event a long answer is made of.
    let gemini = provider("gemini");
    let gemini_events = events("gemini/stream_text.sse");
    let text_event = &gemini_events[1];
    c.bench_function("gemini/stream/text delta/declared", |b| {
        let mut m = mapper(&gemini);
        b.iter_batched(
            || text_event.clone(),
            |event| black_box(m.map_blocking(event).unwrap()),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("gemini/stream/text delta/native", |b| {
        b.iter(|| native_gemini_event(black_box(&text_event.data)))
    });
    let anthropic = provider("anthropic");
    let anthropic_events = events("anthropic/stream_text.sse");
    let text_event = anthropic_events
        .iter()
        .find(|e| e.data.contains("text_delta"))
        .unwrap();
    c.bench_function("anthropic/stream/text delta/declared", |b| {
        let mut m = mapper(&anthropic);
        b.iter_batched(
            || text_event.clone(),
            |event| black_box(m.map_blocking(event).unwrap()),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("anthropic/stream/text delta/native", |b| {
        let mut tools = 0;
        b.iter(|| native_anthropic_event(black_box(&text_event.data), &mut tools))
    });
    let tool_events = events("anthropic/stream_tool_use.sse");
    let partial_at = tool_events
        .iter()
        .position(|e| e.data.contains("input_json_delta"))
        .unwrap();
    c.bench_function("anthropic/stream/tool delta/script", |b| {
        let mut m = mapper(&anthropic);
        for event in &tool_events[..partial_at] {
            m.map_blocking(event.clone()).unwrap();
        }
        b.iter_batched(
            || tool_events[partial_at].clone(),
            |event| black_box(m.map_blocking(event).unwrap()),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("anthropic/stream/tool delta/native", |b| {
        let mut tools = 1;
        b.iter(|| native_anthropic_event(black_box(&tool_events[partial_at].data), &mut tools))
    });
}

criterion_group! {
    name = mapping;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(mapping);
