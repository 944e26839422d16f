//! How the text console writes an event's fields: `name=value`, the message bare, as tracing's default does,
//! with two differences. Every control character in every value is escaped: a model name is the client's text,
//! and must reach an operator's terminal neither as an escape sequence nor as a line break that forges a log
//! line. tracing-subscriber's own escaping (0.3.20 and later) covers ESC, BEL, BS, FF, DEL and C1 codes, but
//! lets `\r` and `\n` through, which is why this stays hand-written. And each value is checked once, and the
//! fields are gathered in a buffer and written whole, where the default goes through styling wrappers field by
//! field (the per-request line is written for every request).

use std::fmt::{self, Write};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// The field format of the text console (`.fmt_fields(ConsoleFields)`).
pub struct ConsoleFields;

impl<'w> FormatFields<'w> for ConsoleFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        thread_local! {
            static BUFFERS: std::cell::Cell<(String, String)> = const { std::cell::Cell::new((String::new(), String::new())) };
        }
        let (mut out, scratch) = BUFFERS.take();
        out.clear();
        let mut visitor = Visitor {
            out,
            scratch,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        let written = visitor.result.and_then(|()| writer.write_str(&visitor.out));
        BUFFERS.set((visitor.out, visitor.scratch));
        written
    }
}

struct Visitor {
    /// The fields, written out at once when all are recorded.
    out: String,
    /// Where a value is formatted before it is checked.
    scratch: String,
    result: fmt::Result,
    first: bool,
}

impl Visitor {
    /// One field: a space after the previous one, `name=` (the message bare), then the value.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut String) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let first = std::mem::take(&mut self.first);
        let w = &mut self.out;
        self.result = (|| {
            if !first {
                w.write_char(' ')?;
            }
            if field.name() != "message" {
                w.write_str(field.name())?;
                w.write_char('=')?;
            }
            value(w)
        })();
    }

    fn write(&mut self, field: &Field, value: &str) {
        self.field(field, |w| write_clean(w, value));
    }

    /// A value without control characters to escape (numbers, booleans), as its `Debug` form: written directly.
    fn write_plain(&mut self, field: &Field, value: Plain) {
        self.field(field, |w| match value {
            Plain::Unsigned(n) => write_u64(w, n),
            Plain::Signed(n) if n < 0 => {
                w.write_char('-')?;
                write_u64(w, n.unsigned_abs())
            }
            Plain::Signed(n) => write_u64(w, n.unsigned_abs()),
            Plain::Float(x) => write_f64(w, x),
            Plain::Bool(b) => w.write_str(if b { "true" } else { "false" }),
        });
    }
}

#[derive(Clone, Copy)]
enum Plain {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
}

/// `n` in decimal, without going through `fmt` (the request line has several numbers).
fn write_u64(w: &mut impl Write, mut n: u64) -> fmt::Result {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    w.write_str(std::str::from_utf8(&digits[at..]).map_err(|_| fmt::Error)?)
}

/// `x` as its `Debug` form; a whole number of tenths (latencies are rounded so) without going through `fmt`.
fn write_f64(w: &mut impl Write, x: f64) -> fmt::Result {
    let tenths = (x * 10.0).round();
    if x.is_sign_positive() && tenths < 1e15 && tenths / 10.0 == x {
        // x is the double nearest n/10, so n/10 written with one decimal is its shortest form.
        let n = tenths as u64;
        write_u64(w, n / 10)?;
        w.write_char('.')?;
        return w.write_char(char::from(b'0' + (n % 10) as u8));
    }
    write!(w, "{x:?}")
}

/// The console's timestamps, as tracing's default writes them (`2026-11-27T03:01:02.123456Z`, UTC), with the
/// part up to the second formatted once per second per thread.
pub struct ConsoleTime;

impl tracing_subscriber::fmt::time::FormatTime for ConsoleTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        thread_local! {
            static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        SECOND.with_borrow_mut(|(second, prefix)| {
            if *second != now.as_secs() {
                *second = now.as_secs();
                prefix.clear();
                let at = i64::try_from(now.as_secs())
                    .ok()
                    .and_then(|s| jiff::Timestamp::from_second(s).ok())
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
                write!(prefix, "{}.", at.strftime("%Y-%m-%dT%H:%M:%S"))?;
            }
            w.write_str(prefix)?;
            let micros = now.subsec_micros();
            for div in [100_000, 10_000, 1_000, 100, 10, 1] {
                w.write_char(char::from(b'0' + ((micros / div) % 10) as u8))?;
            }
            w.write_char('Z')
        })
    }
}

impl Visit for Visitor {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write_plain(field, Plain::Unsigned(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write_plain(field, Plain::Signed(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.write_plain(field, Plain::Float(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write_plain(field, Plain::Bool(value));
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
    fn numbers_read_as_debug_writes_them() {
        let text = line(|| {
            tracing::info!(
                a = 0_u64,
                b = u64::MAX,
                c = -42_i64,
                d = i64::MIN,
                e = 0.5_f64,
                f = true,
                "n"
            )
        });
        assert_eq!(
            text,
            format!(
                " INFO n a=0 b={} c=-42 d={} e=0.5 f=true\n",
                u64::MAX,
                i64::MIN
            )
        );
    }

    #[test]
    fn floats_read_as_debug_writes_them() {
        let mut values = vec![
            0.0,
            -0.0,
            0.1,
            0.7,
            1.0,
            12.3,
            99.9,
            100.0,
            1e-7,
            0.05,
            1.25,
            123456789.1,
            1e13,
            1e14,
            1e16,
            -2.5,
            f64::NAN,
            f64::INFINITY,
        ];
        // Latencies as the request line rounds them.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..10_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let ms = (seed % 10_000_000) as f64 / 997.0;
            values.push((ms * 10.0).round() / 10.0);
            values.push(ms);
        }
        for x in values {
            let mut out = String::new();
            write_f64(&mut out, x).unwrap();
            assert_eq!(out, format!("{x:?}"));
        }
    }

    #[test]
    fn timestamps_read_as_tracing_writes_them() {
        let before = jiff::Timestamp::now();
        let mut out = String::new();
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &ConsoleTime,
            &mut Writer::new(&mut out),
        )
        .unwrap();
        let after = jiff::Timestamp::now();
        // 2026-11-27T03:01:02.123456Z
        let minute = |t: jiff::Timestamp| t.strftime("%Y-%m-%dT%H:%M:").to_string();
        assert!(
            out.starts_with(&minute(before)) || out.starts_with(&minute(after)),
            "{out}"
        );
        let b = out.as_bytes();
        assert_eq!(out.len(), 27, "{out}");
        assert!(
            b[17..19].iter().chain(&b[20..26]).all(u8::is_ascii_digit),
            "{out}"
        );
        assert_eq!((b[19], b[26]), (b'.', b'Z'), "{out}");
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
            line(|| tracing::info!(key = %"...a1b2", "ok")),
            " INFO ok key=...a1b2\n"
        );
    }
}
