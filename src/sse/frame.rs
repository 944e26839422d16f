//! SSE frames as the client receives them.

use super::SseEvent;
use bytes::Bytes;
use serde_json::Value;

pub fn is_done(event: &SseEvent) -> bool {
    event.data.trim() == "[DONE]"
}

/// An SSE frame carrying `data`: one `data:` line per line of it, so that data holding line breaks (an
/// upstream's multi-line event) stays one event.
pub fn frame(data: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 8);
    if memchr::memchr2(b'\n', b'\r', data.as_bytes()).is_none() {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(data.as_bytes());
    } else {
        for (i, line) in data.lines().enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
        }
    }
    out.extend_from_slice(b"\n\n");
    out.into()
}

/// An SSE frame with an event name: `event: <name>`, then `data` as [`frame`] writes it.
pub fn named_frame(name: &str, data: &str) -> Bytes {
    let data = frame(data);
    let mut out = Vec::with_capacity(name.len() + 8 + data.len());
    out.extend_from_slice(b"event: ");
    // A name never holds a line break: the parser split lines there.
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&data);
    out.into()
}

/// The in-band error that ends a stream which broke after it started: no `[DONE]` follows.
pub fn error_frame(message: &str, kind: &str, code: &str) -> Bytes {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    frame(&body.to_string())
}

/// An upstream's in-band error in OpenAI's shape, whatever shape it came in.
pub fn upstream_error_frame(error: &Value) -> Bytes {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let message = text(error.get("message"))
        .or_else(|| text(Some(error)))
        .unwrap_or_else(|| error.to_string());
    let kind = text(error.get("type")).unwrap_or_else(|| "upstream_error".into());
    let code = text(error.get("code")).unwrap_or_else(|| "upstream_error".into());
    error_frame(&format!("upstream error: {message}"), &kind, &code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_the_data_is_a_data_line() {
        assert_eq!(&frame("{}")[..], b"data: {}\n\n");
        assert_eq!(&frame("a\nb\r\nc")[..], b"data: a\ndata: b\ndata: c\n\n");
        let mut parser = crate::sse::SseParser::new();
        parser.push(&frame("line one\nline two")).unwrap();
        assert_eq!(
            parser.next_event().unwrap().unwrap().data,
            "line one\nline two"
        );
    }
}
