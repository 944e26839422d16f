//! Upstreams that misbehave at the connection level (reset, refused, endless), and one that speaks OpenAI's
//! Responses API.

use super::*;
use axum::body::{Body, Bytes};
use axum::response::Response;
use serde_json::{Value, json};

/// An upstream that accepts connections and resets them before any response (a TCP RST).
pub async fn resetting_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    base
}

/// A loopback address where nothing listens (connection refused).
pub fn refusing_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    drop(listener);
    base
}

/// An upstream whose every answer is a 200 with a body that never ends (`{"data":[` and then spaces, forever).
pub async fn endless_upstream() -> String {
    let app = axum::Router::new().fallback(|| async {
        let start = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(Bytes::from_static(b"{\"data\":["))
        });
        let spaces = Bytes::from(vec![b' '; 64 << 10]);
        let rest = futures_util::stream::repeat_with(move || Ok(spaces.clone()));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(futures_util::StreamExt::chain(
                start, rest,
            )))
            .unwrap()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// An upstream speaking OpenAI's Responses API at `/responses`: a function call when tools are offered and no
/// output came back yet, else "Sunny in Porto." (11 tokens in, 7 out; streamed as two deltas, 2 out). The first
/// `failing` streams fail right after `response.created`, as an overloaded model's do.
pub async fn responses_upstream(failing: usize) -> Mock {
    Mock::start(move |seen, i| {
        let tools = seen.body.get("tools").is_some();
        let answered = seen.body["input"]
            .as_array()
            .is_some_and(|items| items.iter().any(|it| it["type"] == "function_call_output"));
        let calling = tools && !answered;
        let item = if calling {
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                   "arguments": "{\"city\":\"Porto\"}", "status": "completed"})
        } else {
            json!({"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": "Sunny in Porto.", "annotations": []}]})
        };
        let response = |status: &str, output: Value, usage: Value| {
            json!({"id": "resp_up", "object": "response", "created_at": 1, "status": status, "model": seen.model(),
                   "output": output, "usage": usage, "error": null, "incomplete_details": null})
        };
        let usage = |out: u64| json!({"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0},
                                     "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11 + out});
        if seen.body["stream"] != json!(true) {
            return Reply::ok(response("completed", json!([item]), usage(7)));
        }
        let mut seq = 0;
        let mut event = |data: Value| {
            let mut data = data;
            data["sequence_number"] = json!(seq);
            seq += 1;
            format!("event: {}\ndata: {data}\n\n", data["type"].as_str().unwrap())
        };
        let mut body = event(json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)}));
        if i < failing {
            body += &event(json!({"type": "response.failed", "response": {"id": "resp_up", "status": "failed",
                "error": {"code": "server_error", "message": "The server is overloaded."}}}));
            return Reply::Raw { status: 200, content_type: "text/event-stream", body };
        }
        body += &event(json!({"type": "response.in_progress", "response": response("in_progress", json!([]), Value::Null)}));
        if calling {
            body += &event(json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": "", "status": "in_progress"}}));
            for delta in ["{\"city\":", "\"Porto\"}"] {
                body += &event(json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 0, "delta": delta}));
            }
            body += &event(json!({"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0, "arguments": "{\"city\":\"Porto\"}"}));
        } else {
            body += &event(json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}}));
            body += &event(json!({"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}));
            for delta in ["Sunny ", "in Porto."] {
                body += &event(json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}));
            }
            body += &event(json!({"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0, "text": "Sunny in Porto.", "logprobs": []}));
            body += &event(json!({"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "Sunny in Porto.", "annotations": []}}));
        }
        body += &event(json!({"type": "response.output_item.done", "output_index": 0, "item": item}));
        body += &event(json!({"type": "response.completed", "response": response("completed", json!([item]), usage(2))}));
        Reply::Raw { status: 200, content_type: "text/event-stream", body }
    })
    .await
}
