//! The shipped providers' mappings run outside a server, as the relay runs them: requests mapped to each
//! upstream's native request, its native answers and stream transcripts (fixtures in its real wire format) mapped
//! back, and the snapshots that show them.

use super::{fixture, json_fixture};
use keyrelay::config::Tuning;
use keyrelay::mapping::{Answer, Draft, Part, Target};
use keyrelay::script::ProviderScript;
use keyrelay::sse::SseParser;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;

pub fn provider(name: &str) -> keyrelay::provider::Provider {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    keyrelay::provider::load_file(
        &root.join(format!("providers/{name}.yaml")),
        &root.join("plugins"),
        &Tuning::default(),
        None,
    )
    .unwrap_or_else(|e| panic!("{e:?}"))
}

pub fn script(name: &str) -> Arc<ProviderScript> {
    provider(name).script.expect("the provider has a script")
}

/// Runs a mapping future to its end (stream mapping and classification run scripts off the async workers).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

/// A fixture without the fields named (those a provider refuses).
pub fn fixture_without(path: &str, fields: &[&str]) -> Value {
    let mut body = json_fixture(path);
    for field in fields {
        body.as_object_mut().unwrap().remove(*field);
    }
    body
}

/// A request mapped as the relay maps it: through the provider's declared rules and its script.
pub fn mapped_request(provider: &str, endpoint: &str, model: &str, body: &str) -> Value {
    map_body(provider, endpoint, model, json_fixture(body))
}

pub fn map_body(provider: &str, endpoint: &str, model: &str, body: Value) -> Value {
    let stream = body["stream"] == json!(true);
    let p = self::provider(provider);
    draft(
        p.mapping
            .request
            .map(&target(endpoint, model, stream), body)
            .unwrap(),
    )
}

pub fn target<'a>(endpoint: &'a str, model: &'a str, stream: bool) -> Target<'a> {
    Target {
        endpoint,
        model,
        stream,
        path: "/unused",
    }
}

/// A draft as the snapshots show it.
pub fn draft(m: Draft) -> Value {
    let headers: Vec<(&str, &str)> = m
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
        .collect();
    json!({"method": m.method.as_str(), "path": m.path, "query": m.query, "headers": headers, "body": m.body})
}

/// A response mapped as the relay maps it: by the provider's `response.fast` declaration when it applies, else
/// by its script.
pub fn mapped_response(provider: &str, endpoint: &str, model: &str, fixture_path: &str) -> Value {
    let p = self::provider(provider);
    let answer = p
        .mapping
        .answer
        .map(endpoint, model, fixture(fixture_path).as_bytes())
        .unwrap();
    let Answer::Mapped(mapped) = answer else {
        panic!("{provider} maps its answers")
    };
    mapped
}

/// The chunks (and markers) a whole upstream transcript maps to, through the provider's declared rules and
/// its script, as a live stream is.
pub fn mapped_stream(name: &str, model: &str, fixture_path: &str) -> Vec<Value> {
    let mut mapper = provider(name).mapping.stream(model, name);
    let mut parser = SseParser::new();
    parser.push(fixture(fixture_path).as_bytes()).unwrap();
    let mut events = Vec::new();
    while let Some(e) = parser.next_event().unwrap() {
        events.push(e);
    }
    events.extend(parser.finish());
    let mut out = Vec::new();
    for event in events {
        for part in mapper.map_blocking(event).unwrap() {
            out.push(match part {
                Part::Chunk { data, .. } => serde_json::from_str(&data).unwrap(),
                Part::Event { name, data, .. } => json!({"event": name, "data": data}),
                Part::Error(e) => json!({"in_band_error": e}),
                Part::Done => json!("[DONE]"),
            });
        }
    }
    out
}

/// An insta JSON snapshot with what changes from run to run (times, ids) redacted.
macro_rules! snapshot {
    ($name:expr, $value:expr) => {
        insta::assert_json_snapshot!($name, $value, {
            ".created" => "[created]",
            "[].created" => "[created]",
            ".choices[].message.tool_calls[].id" => "[call id]",
            "[].choices[].delta.tool_calls[].id" => "[call id]",
            "[].id" => "[id]",
            ".id" => "[id]",
        })
    };
}
pub(crate) use snapshot;
