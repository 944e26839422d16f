//! The zero-latency mock upstream the load runs against, in a process of its own.

use super::*;

pub(crate) const COMPLETION: &str = r#"{"id":"chatcmpl-load","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a short answer from the load mock."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":11,"total_tokens":23}}"#;

pub(crate) fn chunk(content: &str, finish: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-load\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":{finish}}}]}}\n\n"
    )
}

/// Per-key behaviour for the soak: keys named `limited-*` rate-limit one request in three, `flaky-*` fail one in
/// ten with a 500; others always answer.
pub(crate) fn fault_for(key: &str, n: u64) -> Option<Response> {
    if key.starts_with("limited-") && n.is_multiple_of(3) {
        let body = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        return Some(
            (
                [("retry-after", "1"), ("content-type", "application/json")],
                body,
            )
                .into_response()
                .with_status(429),
        );
    }
    if key.starts_with("flaky-") && n.is_multiple_of(10) {
        return Some(
            (
                [("content-type", "application/json")],
                r#"{"error":{"message":"boom","type":"server_error"}}"#,
            )
                .into_response()
                .with_status(500),
        );
    }
    None
}

pub(crate) trait WithStatus {
    fn with_status(self, status: u16) -> Response;
}

impl WithStatus for Response {
    fn with_status(mut self, status: u16) -> Response {
        *self.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
        self
    }
}

pub(crate) async fn mock_chat(
    headers: HeaderMap,
    body: Bytes,
    slow: bool,
    count: Arc<AtomicU64>,
) -> Response {
    let n = count.fetch_add(1, Ordering::Relaxed);
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_start_matches("Bearer ");
    if let Some(fault) = fault_for(key, n) {
        return fault;
    }
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    if !stream {
        return ([("content-type", "application/json")], COMPLETION).into_response();
    }
    let mut frames: Vec<String> = [
        "Hello",
        "!",
        " This",
        " is",
        " a",
        " short",
        " streamed",
        " answer",
        ".",
    ]
    .iter()
    .map(|w| chunk(w, "null"))
    .collect();
    frames.push(chunk("", "\"stop\""));
    frames.push("data: {\"id\":\"chatcmpl-load\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":9,\"total_tokens\":21}}\n\ndata: [DONE]\n\n".into());
    let gap = if slow {
        Duration::from_millis(100)
    } else {
        Duration::ZERO
    };
    let stream = futures_util::stream::unfold(frames.into_iter(), move |mut it| async move {
        let frame = it.next()?;
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(frame)), it))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

pub(crate) fn run_mock() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let count = Arc::new(AtomicU64::new(0));
        let (fast, slow) = (count.clone(), count.clone());
        let app = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(move |h: HeaderMap, b: Bytes| {
                    mock_chat(h, b, false, fast.clone())
                }),
            )
            .route(
                "/slow/v1/chat/completions",
                axum::routing::post(move |h: HeaderMap, b: Bytes| {
                    mock_chat(h, b, true, slow.clone())
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTEN {}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}
