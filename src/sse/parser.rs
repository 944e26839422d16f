//! An incremental Server-Sent Events parser: bytes in, events out, whatever the chunking.
//!
//! Follows the WHATWG framing rules that matter for LLM streams: lines end in LF, CRLF or CR; `data:` lines of one
//! event are joined with LF; a blank line dispatches; `:` starts a comment; one space after the colon is dropped.

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// A line (or an event's data) this long is not an SSE stream we should keep buffering.
const MAX_PENDING: usize = 16 << 20;

#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    start: usize,
    /// The previous chunk ended in CR: a LF at the start of the next one belongs to it.
    skip_lf: bool,
    data: String,
    has_data: bool,
    event: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Oversized;

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes received from the wire.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), Oversized> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() - self.start > MAX_PENDING {
            return Err(Oversized);
        }
        Ok(())
    }

    /// The next complete event, if the bytes so far hold one.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, Oversized> {
        loop {
            if self.skip_lf && self.start < self.buf.len() {
                if self.buf[self.start] == b'\n' {
                    self.start += 1;
                }
                self.skip_lf = false;
            }
            let rest = &self.buf[self.start..];
            let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
                self.compact();
                return Ok(None);
            };
            let line_end = self.start + end;
            let terminator = self.buf[line_end];
            let mut next = line_end + 1;
            if terminator == b'\r' {
                if next < self.buf.len() {
                    if self.buf[next] == b'\n' {
                        next += 1;
                    }
                } else {
                    self.skip_lf = true;
                }
            }
            let line_start = self.start;
            self.start = next;
            if line_end == line_start {
                if let Some(event) = self.dispatch() {
                    return Ok(Some(event));
                }
                continue;
            }
            self.field(line_start, line_end);
            if self.data.len() > MAX_PENDING {
                return Err(Oversized);
            }
        }
    }

    /// At the end of the stream: an event whose closing blank line never came is still delivered (many servers
    /// end with `data: [DONE]\n`).
    pub fn finish(&mut self) -> Option<SseEvent> {
        if self.start < self.buf.len() {
            let (s, e) = (self.start, self.buf.len());
            self.start = e;
            self.field(s, e);
        }
        self.dispatch()
    }

    fn field(&mut self, start: usize, end: usize) {
        let line = &self.buf[start..end];
        if line[0] == b':' {
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &line[..0]),
        };
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                // The strict check first: it is faster than the lossy one on the valid text nearly every
                // event is.
                match std::str::from_utf8(value) {
                    Ok(text) => self.data.push_str(text),
                    Err(_) => self.data.push_str(&String::from_utf8_lossy(value)),
                }
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        if !self.has_data {
            self.event = None;
            return None;
        }
        self.has_data = false;
        Some(SseEvent {
            event: self.event.take(),
            data: std::mem::take(&mut self.data),
        })
    }

    fn compact(&mut self) {
        if self.start > 4096 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c).unwrap();
            while let Some(e) = p.next_event().unwrap() {
                out.push(e);
            }
        }
        out.extend(p.finish());
        out
    }

    fn data(d: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: d.into(),
        }
    }

    #[test]
    fn frames_regardless_of_chunking() {
        let text = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: message_start\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let whole = all(&[text]);
        assert_eq!(
            whole,
            vec![
                data("{\"a\":1}"),
                SseEvent {
                    event: Some("message_start".into()),
                    data: "x\ny".into()
                },
                data("[DONE]")
            ]
        );
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(all(&bytes), whole);
    }

    #[test]
    fn crlf_cr_and_unterminated_tail() {
        assert_eq!(
            all(&[b"data: a\r\n\r\ndata:b\r", b"\r", b"data: [DONE]"]),
            vec![data("a"), data("b"), data("[DONE]")]
        );
        assert_eq!(all(&[b"data: a\r", b"\n\r\n"]), vec![data("a")]);
        assert_eq!(all(&[b"event: ping\n\n"]), vec![]);
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut p = SseParser::new();
        let line = vec![b'x'; 1 << 20];
        let mut refused = false;
        for _ in 0..20 {
            p.push(b"data: ").unwrap();
            p.push(&line).unwrap();
            p.push(b"\n").unwrap();
            if p.next_event().is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}
