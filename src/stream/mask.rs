//! Keys in a stream. A model that repeats a key writes it a few characters per event, so each event is not
//! enough: the text of each field (`content`, `text`, `arguments`, ...) is followed across events, and a key that
//! runs across several is masked in all of them.
//!
//! An event whose field ends in [`GRAM`] or more characters that spell part of a key is held back until the next
//! event shows whether the key goes on (or the stream ends); every other event passes at once. So at most the
//! first `GRAM - 1` characters of a key can pass before it is recognised, and only when they end an event; the
//! key is then recognised by the characters that follow them.
//! Events keep their order; what goes on (mappers, scripts, the client, the request log) sees them masked.

use crate::secret::{Decoded, GRAM, Redactor};
use crate::sse::SseEvent;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

/// The most fields followed in one stream; further names share one.
const MAX_CHANNELS: usize = 32;
/// Events in a row that may leave a field alone while a key in it is awaited.
const MAX_SKIPPED: u8 = 2;

/// Where a byte of a field's text was written: in an event still held (its sequence number, and where in its
/// data), or (`None`) in one already given out; and whether it was replaced.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Place {
    held: Option<(u64, (u32, u32))>,
    done: bool,
}

const OUT: Place = Place {
    held: None,
    done: false,
};

/// The end of one field's text across events.
struct Channel {
    name: String,
    tail: Vec<(u8, Place)>,
    /// The tail spells part of a key: its events are held.
    live: bool,
    /// Events since it was last written.
    skipped: u8,
}

struct Held {
    event: SseEvent,
    /// Replacements decided for its data, in the order decided: (range, text).
    edits: Vec<(Range<usize>, String)>,
}

/// Masks one stream's events: push each as it is read, pop those ready to go.
pub struct StreamMask {
    pool: Arc<Redactor>,
    held: VecDeque<Held>,
    /// The sequence number of the first held event.
    first: u64,
    ready: VecDeque<SseEvent>,
    channels: Vec<Channel>,
    scratch: Vec<u8>,
    /// A tail's buffer, kept between fields so that following them allocates nothing.
    spare: Vec<(u8, Place)>,
    literals: Vec<(Range<usize>, Range<usize>)>,
}

impl StreamMask {
    /// `None` when the pool has no key to look for.
    pub fn new(pool: Arc<Redactor>) -> Option<Self> {
        (!pool.is_empty()).then(|| Self {
            pool,
            held: VecDeque::new(),
            first: 0,
            ready: VecDeque::new(),
            channels: Vec::new(),
            scratch: Vec::new(),
            spare: Vec::new(),
            literals: Vec::new(),
        })
    }

    /// The next event ready to go, masked.
    pub fn pop(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    /// Takes in the next event read.
    pub fn push(&mut self, event: SseEvent) {
        // Nearly every event: no field is following a key, and no value in this one can start or hold one.
        if self.quiet(&event.data) {
            debug_assert!(self.held.is_empty(), "only a live field holds events");
            self.ready.push_back(event);
            return;
        }
        let seq = self.first + self.held.len() as u64;
        self.held.push_back(Held {
            event,
            edits: Vec::new(),
        });
        let data = std::mem::take(&mut self.held.back_mut().expect("pushed").event.data);
        let mut literals = std::mem::take(&mut self.literals);
        literals.clear();
        string_values(&data, |name, value| {
            literals.push((name, value));
            true
        });
        let mut touched = 0_u64;
        for (name, value) in &literals {
            touched |= 1 << self.field(seq, &data, &data[name.clone()], value.clone());
        }
        // A key goes on in one of the next events that write anything (a `ping` may come between), or not at
        // all: a field that [`MAX_SKIPPED`] events in a row did not write stops holding events. So a held run
        // of events is bounded by the longest key.
        for (i, channel) in self.channels.iter_mut().enumerate() {
            if touched & (1 << i) != 0 {
                channel.skipped = 0;
            } else if channel.live {
                channel.skipped += 1;
                if channel.skipped > MAX_SKIPPED {
                    channel.live = false;
                    channel.tail.clear();
                }
            }
        }
        self.held.back_mut().expect("pushed").event.data = data;
        self.literals = literals;
        self.release();
    }

    /// Whether an event can go at once: no field is following a key, and no value of its data can start or hold
    /// one.
    fn quiet(&self, data: &str) -> bool {
        !self.channels.iter().any(|c| c.live)
            && string_values(data, |_, value| {
                self.pool.quiet_value(&data.as_bytes()[value])
            })
    }

    /// No more events: everything held goes, masked where a key was recognised.
    pub fn finish(&mut self) {
        for channel in &mut self.channels {
            channel.live = false;
        }
        self.release();
    }

    /// One field's value of event `seq`, at `value` of its data: joined to the field's tail, searched, its
    /// runs replaced, its own tail kept.
    /// Returns the field's channel.
    fn field(&mut self, seq: u64, data: &str, name: &str, value: Range<usize>) -> usize {
        let raw = &data.as_bytes()[value.clone()];
        let decoded = memchr::memchr(b'\\', raw).map(|_| Decoded::new(raw));
        let text = decoded.as_ref().map_or(raw, |d| &d.bytes[..]);
        let c = self.channel(name);
        let carried = self.channels[c].tail.len();
        self.scratch.clear();
        self.scratch
            .extend(self.channels[c].tail.iter().map(|(b, _)| *b));
        self.scratch.extend_from_slice(text);
        let runs = self.pool.runs(&self.scratch);
        let live = self.pool.live_suffix(&self.scratch);
        let place = |i: usize, tail: &[(u8, Place)]| match i.checked_sub(carried) {
            None => tail[i].1,
            Some(j) => {
                let at = decoded.as_ref().map_or(j..j + 1, |d| d.raw(j..j + 1));
                Place {
                    held: Some((
                        seq,
                        (
                            (value.start + at.start) as u32,
                            (value.start + at.end) as u32,
                        ),
                    )),
                    done: false,
                }
            }
        };
        let keep = if live >= GRAM {
            live.min(self.pool.longest())
        } else {
            0
        };
        let mut places: Vec<Place> = Vec::new();
        if !runs.is_empty() {
            places = (0..self.scratch.len())
                .map(|i| place(i, &self.channels[c].tail))
                .collect();
            let pool = self.pool.clone();
            for run in &runs {
                self.replace(&mut places[run.start..run.end], pool.replacement(run));
            }
        }
        let from = self.scratch.len() - keep;
        let mut tail = std::mem::take(&mut self.spare);
        tail.clear();
        tail.extend((from..self.scratch.len()).map(|i| {
            let p = if live < GRAM {
                OUT
            } else if places.is_empty() {
                place(i, &self.channels[c].tail)
            } else {
                places[i]
            };
            (self.scratch[i], p)
        }));
        let channel = &mut self.channels[c];
        self.spare = std::mem::replace(&mut channel.tail, tail);
        channel.live = live >= GRAM;
        c
    }

    /// Replaces one run: its first byte still held takes the replacement, the rest goes; a run continuing one
    /// already replaced only goes.
    fn replace(&mut self, run: &mut [Place], replacement: &str) {
        let mut said = run.iter().any(|p| p.done);
        for place in run {
            let (false, Some((seq, at))) = (place.done, place.held) else {
                continue;
            };
            place.done = true;
            let text = if said { "" } else { replacement };
            said = true;
            let Some(held) = seq
                .checked_sub(self.first)
                .and_then(|i| self.held.get_mut(i as usize))
            else {
                continue;
            };
            let range = at.0 as usize..at.1 as usize;
            match held.edits.last_mut() {
                Some((last, gone))
                    if gone.is_empty() && text.is_empty() && last.end == range.start =>
                {
                    last.end = range.end;
                }
                _ => held.edits.push((range, text.to_string())),
            }
        }
    }

    /// The channel for a field name, made when new.
    fn channel(&mut self, name: &str) -> usize {
        let name = if self.channels.len() >= MAX_CHANNELS {
            ""
        } else {
            name
        };
        if let Some(i) = self.channels.iter().position(|c| c.name == name) {
            return i;
        }
        self.channels.push(Channel {
            name: name.to_string(),
            tail: Vec::new(),
            live: false,
            skipped: 0,
        });
        self.channels.len() - 1
    }

    /// Gives out the held events no live tail still needs, oldest first.
    fn release(&mut self) {
        while !self.held.is_empty() {
            let seq = self.first;
            let needed = self.channels.iter().filter(|c| c.live).any(|c| {
                c.tail
                    .iter()
                    .any(|(_, p)| !p.done && p.held.is_some_and(|(s, _)| s == seq))
            });
            if needed {
                return;
            }
            let held = self.held.pop_front().expect("not empty");
            self.first += 1;
            for channel in &mut self.channels {
                for (_, place) in &mut channel.tail {
                    if place.held.is_some_and(|(s, _)| s == seq) {
                        place.held = None;
                    }
                }
            }
            self.ready.push_back(edited(held));
        }
    }
}

/// A held event with its replacements made.
fn edited(mut held: Held) -> SseEvent {
    if held.edits.is_empty() {
        return held.event;
    }
    held.edits.sort_by_key(|(range, _)| range.start);
    let data = &held.event.data;
    let mut out = String::with_capacity(data.len());
    let mut copied = 0;
    for (range, text) in &held.edits {
        if range.start < copied
            || !data.is_char_boundary(range.start)
            || !data.is_char_boundary(range.end)
        {
            continue;
        }
        out.push_str(&data[copied..range.start]);
        out.push_str(text);
        copied = range.end;
    }
    out.push_str(&data[copied..]);
    held.event.data = out;
    held.event
}

/// Visits the string values of an event's data in order, each with the name of the field it belongs to, as ranges
/// of `data` (JSON escapes left as written), until `visit` says to stop. Data that is not a JSON object or array
/// is one value with no name. True when every value was visited and could be judged as written: false when
/// `visit` stopped, the data is not JSON, a string is not closed, or one holds an escape that can spell a key's
/// byte (`\/`, `\u`).
fn string_values(data: &str, mut visit: impl FnMut(Range<usize>, Range<usize>) -> bool) -> bool {
    let b = data.as_bytes();
    let opening = b.iter().find(|c| !c.is_ascii_whitespace());
    if !matches!(opening, Some(b'{' | b'[')) {
        visit(0..0, 0..b.len());
        return false;
    }
    let mut name = 0..0;
    let mut at = 0;
    let mut plain = true;
    while let Some(quote) = memchr::memchr(b'"', &b[at..]) {
        let open = at + quote + 1;
        let mut scan = open;
        let close = loop {
            match memchr::memchr2(b'"', b'\\', b.get(scan..).unwrap_or_default()) {
                None => return false,
                Some(i) if b[scan + i] == b'\\' => {
                    plain &= !matches!(b.get(scan + i + 1), Some(b'/' | b'u'));
                    scan += i + 2;
                }
                Some(i) => break scan + i,
            }
        };
        let next = b[close + 1..].iter().find(|c| !c.is_ascii_whitespace());
        if next == Some(&b':') {
            name = open..close;
        } else if !visit(name.clone(), open..close) {
            return false;
        }
        at = close + 1;
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-proj-B6cDqW3xZ9mK2pL7vT4n1234";

    fn chunk(content: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: serde_json::json!({
                "id": "chatcmpl-1",
                "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
            })
            .to_string(),
        }
    }

    fn content(event: &SseEvent) -> String {
        let v: serde_json::Value = serde_json::from_str(&event.data).unwrap();
        v["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The contents that come out when `pieces` go in, one event each, and when each came out (the number of
    /// events pushed by then).
    fn through(pieces: &[&str]) -> Vec<(String, usize)> {
        let mut mask = StreamMask::new(Arc::new(Redactor::new([KEY]))).unwrap();
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            mask.push(chunk(piece));
            while let Some(e) = mask.pop() {
                out.push((content(&e), i + 1));
            }
        }
        mask.finish();
        while let Some(e) = mask.pop() {
            out.push((content(&e), pieces.len() + 1));
        }
        assert_eq!(out.len(), pieces.len(), "every event comes out once");
        out
    }

    fn joined(out: &[(String, usize)]) -> String {
        out.iter().map(|(c, _)| c.as_str()).collect()
    }

    #[test]
    fn ordinary_text_passes_at_once_and_unchanged() {
        let pieces = [
            "Hello",
            ", here is ",
            "how: api_key=",
            "\"sk-proj-YOUR_KEY_HERE\"",
            ".",
        ];
        let out = through(&pieces);
        assert_eq!(joined(&out), pieces.concat());
        for (i, (_, when)) in out.iter().enumerate() {
            assert_eq!(*when, i + 1, "event {i} was held");
        }
    }

    #[test]
    fn a_key_dripped_token_by_token_is_masked() {
        let pieces = [
            "Your key: ",
            "sk",
            "-proj",
            "-B6",
            "cDq",
            "W3x",
            "Z9m",
            "K2p",
            "L7v",
            "T4n",
            "123",
            "4",
            " ok",
        ];
        let out = through(&pieces);
        // "sk" ended an event before anything said it was a key; from "-proj" on, the events were held.
        assert_eq!(joined(&out), "Your key: sk... ok");
        assert!(!joined(&out).contains("B6cD"));
    }

    #[test]
    fn a_key_split_in_two_is_masked() {
        for cut in 1..KEY.len() {
            let out = through(&["a ", &KEY[..cut], &KEY[cut..], " b"]);
            let all = joined(&out);
            // At most the first GRAM - 1 characters pass, when they end an event.
            let passed = if cut < GRAM { cut } else { 0 };
            let said = if cut < 8 + 12 { "...1234" } else { "..." };
            assert_eq!(all, format!("a {}{said} b", &KEY[..passed]), "cut {cut}");
        }
    }

    #[test]
    fn a_field_not_written_again_stops_holding_events() {
        let mut mask = StreamMask::new(Arc::new(Redactor::new([KEY]))).unwrap();
        mask.push(chunk("key: sk-proj-B6c"));
        assert!(mask.pop().is_none(), "held: the key may go on");
        // Events that write other fields only: a ping may come between, but after a few the key did not go on.
        let other = || SseEvent {
            event: None,
            data: r#"{"usage":{"total_tokens":5}}"#.into(),
        };
        mask.push(other());
        mask.push(other());
        assert!(mask.pop().is_none(), "two events may come between");
        mask.push(other());
        assert_eq!(content(&mask.pop().unwrap()), "key: sk-proj-B6c");
        for _ in 0..3 {
            assert!(mask.pop().unwrap().data.contains("usage"));
        }
        assert!(mask.pop().is_none());
    }

    #[test]
    fn quiet_events_are_passed_over_only_when_nothing_can_be_there() {
        let mask = StreamMask::new(Arc::new(Redactor::new([KEY]))).unwrap();
        let quiet = |data: &str| mask.quiet(data);
        assert!(quiet(&chunk("Hello there").data));
        // The end of a value spells part of a key: the next event may go on with it.
        assert!(!quiet(&chunk("key: sk-proj-B6c").data));
        // Long enough to be a key, escaped, or not JSON: looked at.
        assert!(!quiet(&chunk("B6cDqW3xZ9mK2pL7").data));
        assert!(!quiet(r#"{"a":"x\/y"}"#));
        assert!(!quiet("plain text"));
        // A field's name is not a value; escapes that cannot spell a key byte are passed over.
        assert!(quiet(r#"{"sk-proj-B6c":1}"#));
        assert!(quiet(&chunk("line\nnext \"quoted\"").data));
        assert!(!quiet(r#"{"a":"unterminated"#));
    }

    #[test]
    fn string_values_are_named_by_their_field() {
        let data = r#"{"a":"x","b":{"c":"y\"z"},"d":["p","q"],"e":1}"#;
        let mut out = Vec::new();
        let all = |out: &mut Vec<_>, data| {
            string_values(data, |n, v| {
                out.push((n, v));
                true
            })
        };
        assert!(all(&mut out, data));
        let named: Vec<(&str, &str)> = out
            .iter()
            .map(|(n, v)| (&data[n.clone()], &data[v.clone()]))
            .collect();
        assert_eq!(
            named,
            [("a", "x"), ("c", r#"y\"z"#), ("d", "p"), ("d", "q")]
        );
        out.clear();
        assert!(!all(&mut out, "plain text"), "not JSON");
        assert_eq!(out, [(0..0, 0..10)]);
    }
}
