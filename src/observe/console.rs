//! How the text console writes an event's fields: `name=value`, the message bare, as tracing's default does,
//! with two differences. Control characters in every value are escaped, not only in the message: a model name
//! is the client's text, and must not reach an operator's terminal as an escape sequence. And each value is
//! checked once and written whole, where the default goes through styling wrappers field by field (the
//! per-request line is written for every request).

use std::fmt::{self, Write};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// The field format of the text console (`.fmt_fields(ConsoleFields)`).
pub struct ConsoleFields;

impl<'w> FormatFields<'w> for ConsoleFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Visitor {
            writer,
            scratch: String::new(),
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    /// Where a value is formatted before it is checked.
    scratch: String,
    result: fmt::Result,
    first: bool,
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let first = std::mem::take(&mut self.first);
        let w = &mut self.writer;
        self.result = (|| {
            if !first {
                w.write_char(' ')?;
            }
            if field.name() != "message" {
                w.write_str(field.name())?;
                w.write_char('=')?;
            }
            write_clean(w, value)
        })();
    }
}

impl Visitor<'_> {
    /// A value whose `Debug` form has no control characters to escape (numbers, booleans): written directly.
    fn write_plain(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let first = std::mem::take(&mut self.first);
        let w = &mut self.writer;
        self.result = (|| {
            if !first {
                w.write_char(' ')?;
            }
            write!(w, "{}={value:?}", field.name())
        })();
    }
}

impl Visit for Visitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write_plain(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write_plain(field, &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.write_plain(field, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write_plain(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        if write!(scratch, "{value:?}").is_err() {
            self.result = Err(fmt::Error);
        }
        self.write(field, &scratch);
        self.scratch = scratch;
    }
}

/// Writes `text` with control characters (but tab) as `\u{…}`; text without any is written as it is.
fn write_clean(w: &mut impl Write, text: &str) -> fmt::Result {
    // C0 controls and DEL are single bytes; C1 controls (U+0080-U+009F) start with the byte 0xC2.
    let suspect = |b: &u8| (*b < 0x20 && *b != b'\t') || *b == 0x7f || *b == 0xc2;
    if !text.as_bytes().iter().any(suspect) {
        return w.write_str(text);
    }
    for ch in text.chars() {
        if ch.is_control() && ch != '\t' {
            write!(w, "\\u{{{:x}}}", ch as u32)?;
        } else {
            w.write_char(ch)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What one event looks like on the text console with these fields.
    fn line(emit: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .without_time()
            .with_target(false)
            .with_ansi(false)
            .fmt_fields(ConsoleFields)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(out.lock().unwrap().clone()).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_read_as_tracing_writes_them() {
        let text = line(
            || tracing::info!(model = %"mock/m", attempts = 2_u64, stream = false, latency_ms = 1.0, quoted = "a b", "served"),
        );
        assert_eq!(
            text,
            " INFO served model=mock/m attempts=2 stream=false latency_ms=1.0 quoted=\"a b\"\n"
        );
    }

    #[test]
    fn control_characters_in_any_value_are_escaped() {
        let text =
            line(|| tracing::warn!(model = %"mock/\u{1b}[2J\u{9b}x\tok", "failed \u{7}here"));
        assert!(!text.contains('\u{1b}') && !text.contains('\u{9b}') && !text.contains('\u{7}'));
        assert!(
            text.contains("model=mock/\\u{1b}[2J\\u{9b}x\tok"),
            "{text:?}"
        );
        assert!(text.contains("failed \\u{7}here"), "{text:?}");
        // Other non-ASCII text is left alone.
        assert_eq!(
            line(|| tracing::info!(key = %"…a1b2", "ok")),
            " INFO ok key=…a1b2\n"
        );
    }
}
