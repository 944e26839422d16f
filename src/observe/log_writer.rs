//! Where log lines go: a shared buffer that a background thread writes out in batches, so that a request never
//! waits for a terminal or a pipe and a busy proxy makes one `write` per batch instead of one per line.
//!
//! The thread sleeps until a line arrives, waits [`GATHER`] for more, then writes everything buffered at once. A
//! line logged while more than [`MAX_BUFFERED`] bytes wait is dropped and counted; the count is logged (in the
//! console's format) when the writer catches up. Dropping the [`LogGuard`] writes what is left, waiting at most
//! [`CLOSE_WAIT`] for an output that does not take it.
//!
//! Hand-written for a measured reason: tracing-appender's non-blocking writer, which this replaced, makes one
//! `write` per line and its worker spun with `sched_yield` between lines, about 4% of keyrelay's CPU under the
//! load benchmark (c=64, one console line per request).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long the writer gathers lines after the first one before writing them.
const GATHER: Duration = Duration::from_millis(10);
/// Bytes waiting beyond which new lines are dropped (the output cannot keep up).
const MAX_BUFFERED: usize = 8 << 20;
/// How long exiting waits for the last lines to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    dropped: u64,
    closing: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when the buffer stops being empty, and at close.
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hands out writers for `tracing_subscriber` (`with_writer`); cheap to clone.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Keeps the writing thread; dropping it writes what is buffered and stops the thread.
pub struct LogGuard {
    shared: Arc<Shared>,
    /// Disconnected when the thread ends.
    ended: std::sync::mpsc::Receiver<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.arrived.notify_one();
        // A stuck output (a paused terminal, a pipe nobody reads) must not keep the process from exiting.
        let _ = self.ended.recv_timeout(CLOSE_WAIT);
    }
}

/// How the writer words its own notice (dropped lines): as the console's other lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl BatchWriter {
    /// A writer to `out`, and the guard that flushes it at exit.
    pub fn new(out: impl Write + Send + 'static, format: Format) -> (Self, LogGuard) {
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        let (ended_tx, ended) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("keyrelay-log".into())
            .spawn(move || {
                write_batches(&worker, out, format);
                drop(ended_tx);
            })
            .expect("the log writer thread starts");
        (
            Self {
                shared: shared.clone(),
            },
            LogGuard { shared, ended },
        )
    }
}

/// The notice for `dropped` lines, as one line of the console's format.
fn notice(dropped: u64, format: Format) -> String {
    let message = "log lines dropped: the log output could not keep up";
    let now = jiff::Timestamp::now();
    match format {
        Format::Text => format!("{now:.6}  WARN {message} dropped={dropped}\n"),
        Format::Json => format!(
            "{}\n",
            serde_json::json!({
                "timestamp": format!("{now:.6}"),
                "level": "WARN",
                "message": message,
                "dropped": dropped,
            })
        ),
    }
}

fn write_batches(shared: &Shared, mut out: impl Write, format: Format) {
    let mut batch = Vec::new();
    loop {
        let mut pending = shared.lock();
        while pending.bytes.is_empty() && !pending.closing {
            pending = shared
                .arrived
                .wait(pending)
                .unwrap_or_else(|e| e.into_inner());
        }
        if !pending.closing {
            drop(pending);
            std::thread::sleep(GATHER);
            pending = shared.lock();
        }
        std::mem::swap(&mut batch, &mut pending.bytes);
        let (dropped, closing) = (std::mem::take(&mut pending.dropped), pending.closing);
        drop(pending);
        if dropped > 0 {
            batch.extend_from_slice(notice(dropped, format).as_bytes());
        }
        // A failed write (closed pipe) loses those lines but never stops the proxy.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > MAX_BUFFERED {
            batch = Vec::new();
        }
        if closing {
            return;
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.bytes.len() + line.len() > MAX_BUFFERED {
            pending.dropped += 1;
            return Ok(line.len());
        }
        let was_empty = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        drop(pending);
        if was_empty {
            self.shared.arrived.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    /// An output that hands what it was given (and how many writes) to the test; while shut, a write waits
    /// for `open` (and reports that it is waiting).
    #[derive(Clone)]
    struct Sink {
        got: Arc<Mutex<(Vec<u8>, usize)>>,
        /// (a write is waiting, open)
        gate: Arc<(Mutex<(bool, bool)>, Condvar)>,
    }

    impl Sink {
        fn new(open: bool) -> Self {
            Self {
                got: Arc::default(),
                gate: Arc::new((Mutex::new((false, open)), Condvar::new())),
            }
        }

        fn wait_until_blocked(&self) {
            let (lock, cv) = &*self.gate;
            let _g = cv.wait_while(lock.lock().unwrap(), |(waiting, _)| !*waiting);
        }

        fn open(&self) {
            let (lock, cv) = &*self.gate;
            lock.lock().unwrap().1 = true;
            cv.notify_all();
        }
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.gate;
            let mut g = lock.lock().unwrap();
            g.0 = true;
            cv.notify_all();
            drop(cv.wait_while(g, |(_, open)| !*open));
            let mut s = self.got.lock().unwrap();
            s.0.extend_from_slice(buf);
            s.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_in_few_writes_and_all_are_written_at_close() {
        let sink = Sink::new(true);
        let (writer, guard) = BatchWriter::new(sink.clone(), Format::Text);
        let mut expected = String::new();
        for i in 0..1000 {
            let line = format!("line {i}\n");
            writer.make_writer().write_all(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        drop(guard);
        let (bytes, writes) = sink.got.lock().unwrap().clone();
        assert_eq!(String::from_utf8(bytes).unwrap(), expected);
        assert!(writes < 100, "{writes} writes for 1000 lines");
    }

    #[test]
    fn the_notice_reads_as_the_consoles_lines() {
        let json: serde_json::Value = serde_json::from_str(&notice(3, Format::Json)).unwrap();
        assert_eq!(json["level"], "WARN");
        assert_eq!(json["dropped"], 3);
        assert!(json["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn exiting_does_not_wait_for_a_stuck_output() {
        let sink = Sink::new(false);
        let (writer, guard) = BatchWriter::new(sink.clone(), Format::Text);
        writer.make_writer().write_all(b"line\n").unwrap();
        sink.wait_until_blocked();
        let started = std::time::Instant::now();
        drop(guard);
        assert!(started.elapsed() >= CLOSE_WAIT);
        sink.open();
    }

    #[test]
    fn lines_beyond_the_buffer_are_dropped_and_counted_while_the_output_is_stuck() {
        let sink = Sink::new(false);
        let (writer, guard) = BatchWriter::new(sink.clone(), Format::Text);
        writer.make_writer().write_all(b"first\n").unwrap();
        sink.wait_until_blocked();
        let line = vec![b'x'; 1 << 20];
        let fit = MAX_BUFFERED >> 20;
        for _ in 0..fit + 3 {
            writer.make_writer().write_all(&line).unwrap();
        }
        sink.open();
        drop(guard);
        let (bytes, _) = sink.got.lock().unwrap().clone();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("first\n"));
        assert_eq!(text.matches('x').count(), fit << 20);
        let last = text.lines().last().unwrap();
        assert!(
            last.ends_with(" WARN log lines dropped: the log output could not keep up dropped=3"),
            "{last}"
        );
    }
}
