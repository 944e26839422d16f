//! Inbound dialect benchmark: what translating a client's dialect to chat and back costs, per request, per
//! answer and per stream event. Run with `cargo bench --bench dialects`; targets: a plain-text request and a
//! one-text answer under 10 µs each, a stream event under 2 µs.

use criterion::{Criterion, criterion_group, criterion_main};
use keyrelay::mapping::inbound::StreamTranslation;
use keyrelay::mapping::inbound::messages::{MessagesStream, from_chat, to_chat};
use keyrelay::mapping::inbound::{completions, responses};
use serde_json::{Map, Value, json};
use std::hint::black_box;

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn benches(c: &mut Criterion) {
    let request = object(json!({
        "model": "openai/gpt-4o-mini", "max_tokens": 1024, "system": "You are a concise assistant.",
        "messages": [
            {"role": "user", "content": "What is a tide pool?"},
            {"role": "assistant", "content": "A pool of seawater left on a rocky shore at low tide."},
            {"role": "user", "content": "What lives in one?"}
        ]
    }));
    c.bench_function("messages/request/plain text", |b| {
        b.iter(|| to_chat(black_box(request.clone())).unwrap())
    });
    let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
            "content": "Crabs, snails, anemones, sea stars and small fish."}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 14, "total_tokens": 54}});
    c.bench_function("messages/answer/one text", |b| {
        b.iter(|| from_chat(black_box(&answer), "openai/gpt-4o-mini"))
    });
    let delta = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": " anemones"}, "finish_reason": null}]})
    .to_string();
    let mut stream = MessagesStream::new("openai/gpt-4o-mini");
    let mut out = Vec::with_capacity(4096);
    stream.event(None, &delta, &mut out);
    c.bench_function("messages/stream/text delta", |b| {
        b.iter(|| {
            out.clear();
            stream.event(None, black_box(&delta), &mut out);
        })
    });

    let request = object(json!({
        "model": "openai/gpt-4o-mini", "instructions": "You are a concise assistant.", "max_output_tokens": 1024,
        "input": [
            {"role": "user", "content": "What is a tide pool?"},
            {"role": "assistant", "content": "A pool of seawater left on a rocky shore at low tide."},
            {"role": "user", "content": "What lives in one?"}
        ]
    }));
    c.bench_function("responses/request/plain text", |b| {
        b.iter(|| responses::to_chat(black_box(request.clone()), |_| None).unwrap())
    });
    let echo = responses::to_chat(request.clone(), |_| None).unwrap().echo;
    c.bench_function("responses/answer/one text", |b| {
        b.iter(|| responses::from_chat(black_box(&answer), &echo, "resp_bench"))
    });
    let mut stream = responses::ResponsesStream::new("resp_bench".into(), echo.clone(), None);
    stream.event(None, &delta, &mut out);
    c.bench_function("responses/stream/text delta", |b| {
        b.iter(|| {
            out.clear();
            stream.event(None, black_box(&delta), &mut out);
        })
    });

    let request = object(
        json!({"model": "openai/gpt-4o-mini", "prompt": "Once upon a time", "max_tokens": 64}),
    );
    c.bench_function("completions/request/plain text", |b| {
        b.iter(|| completions::to_chat(black_box(request.clone())).unwrap())
    });
    c.bench_function("completions/answer/one text", |b| {
        b.iter(|| completions::from_chat(black_box(&answer)))
    });
    let mut stream = completions::CompletionsStream;
    c.bench_function("completions/stream/text delta", |b| {
        b.iter(|| {
            out.clear();
            stream.event(None, black_box(&delta), &mut out);
        })
    });
}

criterion_group! {
    name = dialects;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(dialects);
