//! Masking benchmark: what recognising a pool's keys costs per answer and per stream event, for pools of 1, 100
//! and 1,000 keys. Run with `cargo bench --bench masking`; figures in docs/PERFORMANCE.md.

use criterion::{Criterion, criterion_group, criterion_main};
use keyrelay::secret::Redactor;
use keyrelay::sse::SseEvent;
use keyrelay::stream::StreamMask;
use serde_json::json;
use std::hint::black_box;
use std::sync::Arc;

/// `n` keys shaped like OpenAI's: a public prefix and 48 pseudo-random characters.
fn pool(n: usize) -> Arc<Redactor> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let keys: Vec<String> = (0..n)
        .map(|_| {
            let body: String = (0..48)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ALPHABET[(state % ALPHABET.len() as u64) as usize] as char
                })
                .collect();
            format!("sk-proj-{body}")
        })
        .collect();
    Arc::new(Redactor::new(keys.iter().map(String::as_str)))
}

fn answer() -> String {
    let content =
        "Tide pools form where rocky shores trap seawater as the tide retreats, leaving homes for \
                   crabs and anemones. Set api_key=\"sk-proj-YOUR_KEY_HERE\" before you run it.\n"
            .repeat(6);
    json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
    .to_string()
}

fn chunk(text: &str) -> SseEvent {
    SseEvent {
        event: None,
        data: json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
        .to_string(),
    }
}

fn masking(c: &mut Criterion) {
    let answer = answer();
    let words = [
        " tide", " pools", " form", " where", " rocky", " shores", " trap", " sea", "water",
    ];
    for n in [1, 100, 1000] {
        let pool = pool(n);
        eprintln!("{n} keys: automaton {} KiB", pool.memory_usage() >> 10);
        c.bench_function(&format!("answer_1kb/{n}_keys"), |b| {
            b.iter(|| black_box(pool.redact(black_box(&answer))).len())
        });
        let mut mask = StreamMask::new(pool.clone()).unwrap();
        let mut i = 0;
        c.bench_function(&format!("stream_event/{n}_keys"), |b| {
            b.iter(|| {
                i = (i + 1) % words.len();
                mask.push(chunk(words[i]));
                black_box(mask.pop())
            })
        });
    }
    // The same event with nothing to look for: what building the event costs by itself.
    c.bench_function("stream_event/building_only", |b| {
        b.iter(|| black_box(chunk(black_box(words[1]))))
    });
}

criterion_group!(benches, masking);
criterion_main!(benches);
