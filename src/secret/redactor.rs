//! Recognising a pool's keys in text an upstream wrote, so that none of them reaches a client or a log.
//!
//! A key is recognised by its distinctive part: what follows its public prefix (`sk-proj-`, `gsk_`,
//! `sk-ant-api03-`), which many keys share and documentation prints. Any [`MIN_FRAGMENT`] consecutive characters
//! of that part, written plainly or with JSON escapes, are the key: the whole run of key characters around them
//! is replaced. Shorter fragments, and text that only shares the prefix (`sk-proj-YOUR_KEY_HERE`), are ordinary
//! text and stay as written. A key whose distinctive part is shorter than a fragment is recognised only whole,
//! standing alone; a key shorter than [`MIN_KEY`] is never looked for (it is not a secret words can be told from).
//!
//! The replacement discloses nothing the text did not: the key's masked form (`...a1b2`) when the run reached
//! the key's last four characters, `...` otherwise.
//!
//! Finding: every run of [`MIN_FRAGMENT`] characters holds one of the distinctive part's [`BLOCK`]-character
//! blocks starting at a multiple of [`BLOCK`] (`MIN_FRAGMENT >= 2 * BLOCK - 1`), so one Aho-Corasick automaton
//! over those blocks finds every candidate in one pass, and each candidate is extended against its key.

use super::Decoded;
use aho_corasick::{AhoCorasick, Input, MatchKind};
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// The fewest characters of a key's distinctive part that count as the key.
pub const MIN_FRAGMENT: usize = 12;
/// Keys shorter than this are never looked for.
pub const MIN_KEY: usize = 8;
/// The length of the blocks the automaton looks for.
const BLOCK: usize = 6;
/// The length of the pieces a stream's held tail is recognised by (see [`Redactor::live_suffix`]).
pub const GRAM: usize = 3;
/// Up to this many distinct blocks, the automaton's own prefilter (vectorised, up to 64 patterns) is fastest.
const FEW_BLOCKS: usize = 64;
/// The longest public prefix set aside, and the longest segment of one.
const MAX_PREFIX: usize = 16;
const MAX_SEGMENT: usize = 8;

const _: () = assert!(MIN_FRAGMENT >= 2 * BLOCK - 1 && MIN_KEY >= BLOCK);

struct Known {
    secret: Box<[u8]>,
    /// Where the distinctive part starts; 0 when the key is recognised only whole.
    body: usize,
    /// Recognised only whole: the distinctive part is shorter than a fragment.
    whole_only: bool,
    masked: Arc<str>,
}

/// Where a piece sits in the pool: (key, offset) pairs.
type Places = Vec<(u32, u32)>;

/// Where one of a pool's keys appears in a text: `start..end` of the text spells `key`'s bytes `from..to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub end: usize,
    key: u32,
    to: u32,
}

/// Every key of one pool, ready to be found in text.
pub struct Redactor {
    keys: Vec<Known>,
    finder: Option<AhoCorasick>,
    /// For each pattern of `finder`: which key holds the block, at which offset.
    owners: Vec<Places>,
    /// Every [`GRAM`]-byte piece of every key, with where it sits.
    grams: HashMap<[u8; GRAM], Places, Grams>,
    longest: usize,
    /// Few enough blocks for the automaton's own vectorised prefilter; otherwise text is first cut into
    /// stretches of `bytes`.
    few: bool,
    /// The bytes any key holds.
    bytes: [bool; 256],
    /// The shortest run that can be recognised.
    shortest: usize,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} keys)", self.keys.len())
    }
}

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut keys: Vec<Known> = Vec::new();
        for secret in secrets {
            let bytes = secret.as_bytes();
            if bytes.len() < MIN_KEY || keys.iter().any(|k| &*k.secret == bytes) {
                continue;
            }
            let body = distinctive_start(bytes);
            let whole_only = bytes.len() - body < MIN_FRAGMENT;
            keys.push(Known {
                secret: bytes.into(),
                body: if whole_only { 0 } else { body },
                whole_only,
                masked: super::mask(secret).into(),
            });
        }
        let mut blocks: HashMap<&[u8], Places> = HashMap::new();
        let mut grams: HashMap<[u8; GRAM], Places, Grams> = HashMap::default();
        for (k, key) in keys.iter().enumerate() {
            let at = |o: usize| (k as u32, o as u32);
            let mut offset = key.body;
            while offset + BLOCK <= key.secret.len() {
                blocks
                    .entry(&key.secret[offset..offset + BLOCK])
                    .or_default()
                    .push(at(offset));
                if key.whole_only {
                    break;
                }
                offset += BLOCK;
            }
            for (o, gram) in key.secret.windows(GRAM).enumerate() {
                let gram: [u8; GRAM] = gram.try_into().expect("a window of GRAM bytes");
                grams.entry(gram).or_default().push(at(o));
            }
        }
        let (patterns, owners): (Vec<&[u8]>, Vec<Places>) = blocks.into_iter().unzip();
        let finder = (!patterns.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostFirst)
                .build(&patterns)
                .expect("fixed-length byte patterns build")
        });
        let longest = keys.iter().map(|k| k.secret.len()).max().unwrap_or(0);
        let mut bytes = [false; 256];
        for key in &keys {
            for b in &key.secret {
                bytes[*b as usize] = true;
            }
        }
        let shortest = keys
            .iter()
            .map(|k| {
                if k.whole_only {
                    k.secret.len()
                } else {
                    MIN_FRAGMENT
                }
            })
            .min()
            .unwrap_or(MIN_FRAGMENT);
        Self {
            few: owners.len() <= FEW_BLOCKS,
            keys,
            finder,
            owners,
            grams,
            longest,
            bytes,
            shortest,
        }
    }

    /// The bytes the automaton holds.
    pub fn memory_usage(&self) -> usize {
        self.finder.as_ref().map_or(0, AhoCorasick::memory_usage)
    }

    /// Whether there is any key to look for.
    pub fn is_empty(&self) -> bool {
        self.finder.is_none()
    }

    /// The longest key's length: no run is longer.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// `text` with every key of the pool replaced wherever it is recognised (see the module's documentation).
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if self.is_empty() {
            return Cow::Borrowed(text);
        }
        let raw = text.as_bytes();
        // Keys are ASCII; the only escapes that can spell their bytes are `\/` and `\u00XX`. Nearly every text
        // has neither, and is searched as it is.
        let escaped = memchr::memmem::find(raw, b"\\/").is_some()
            || memchr::memmem::find(raw, b"\\u00").is_some();
        if !escaped {
            let runs = self.runs(raw);
            return self.replace(text, runs.iter().map(|r| (r.start..r.end, *r)));
        }
        let decoded = Decoded::new(raw);
        let runs = self.runs(&decoded.bytes);
        self.replace(text, runs.iter().map(|r| (decoded.raw(r.start..r.end), *r)))
    }

    /// `text` with each range replaced by its run's replacement; ranges in order, not overlapping.
    fn replace<'a>(
        &self,
        text: &'a str,
        runs: impl Iterator<Item = (std::ops::Range<usize>, Run)>,
    ) -> Cow<'a, str> {
        let mut out: Option<String> = None;
        let mut copied = 0;
        for (range, run) in runs {
            // A key that is not ASCII may have matched part of a character: keep to whole ones.
            let (mut start, mut end) = (range.start, range.end);
            while start < end && !text.is_char_boundary(start) {
                start += 1;
            }
            while end > start && !text.is_char_boundary(end) {
                end -= 1;
            }
            if start >= end || start < copied {
                continue;
            }
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..start]);
            o.push_str(self.replacement(&run));
            copied = end;
        }
        match out {
            None => Cow::Borrowed(text),
            Some(mut o) => {
                o.push_str(&text[copied..]);
                Cow::Owned(o)
            }
        }
    }

    /// What a run is replaced by: the key's masked form when the run reached its last characters, `...`
    /// otherwise.
    pub fn replacement(&self, run: &Run) -> &str {
        let key = &self.keys[run.key as usize];
        if run.to as usize == key.secret.len() {
            &key.masked
        } else {
            "..."
        }
    }

    /// Every recognised run of key bytes in `text`, in order.
    pub fn runs(&self, text: &[u8]) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        let Some(finder) = &self.finder else {
            return runs;
        };
        if self.few {
            self.search(finder, text, 0..text.len(), &mut runs);
            return runs;
        }
        // A run is made of key bytes only, so it lies in a stretch of them at least `shortest` long; ordinary
        // text has few such stretches (words are shorter, spaces and punctuation end them).
        let mut at = 0;
        while at < text.len() {
            let Some(start) = text[at..].iter().position(|b| self.bytes[*b as usize]) else {
                break;
            };
            let start = at + start;
            let len = text[start..]
                .iter()
                .position(|b| !self.bytes[*b as usize])
                .unwrap_or(text.len() - start);
            if len >= self.shortest {
                self.search(finder, text, start..start + len, &mut runs);
            }
            at = start + len;
        }
        runs
    }

    /// The runs found in `span` of `text`, added to `runs`.
    fn search(&self, finder: &AhoCorasick, text: &[u8], span: Range<usize>, runs: &mut Vec<Run>) {
        let mut at = span.start;
        while let Some(found) = finder.find(Input::new(text).span(at..span.end)) {
            let floor = runs.last().map_or(0, |r| r.end);
            let best = self.owners[found.pattern().as_usize()]
                .iter()
                .filter_map(|&(k, offset)| self.extend(text, floor, found.start(), k, offset))
                .max_by_key(|r| r.end - r.start);
            match best {
                Some(run) => {
                    runs.push(run);
                    at = run.end;
                }
                None => at = found.start() + 1,
            }
            if at >= span.end {
                break;
            }
        }
    }

    /// The run of key `k` around its block at `offset`, found at `start` of `text`, if it is recognised.
    fn extend(&self, text: &[u8], floor: usize, start: usize, k: u32, offset: u32) -> Option<Run> {
        let key = &self.keys[k as usize];
        let secret = &*key.secret;
        let (s, from) = back(text, floor, start, secret, offset as usize);
        let (mut e, mut to) = (start + BLOCK, offset as usize + BLOCK);
        while e < text.len() && to < secret.len() && text[e] == secret[to] {
            (e, to) = (e + 1, to + 1);
        }
        let recognised = if key.whole_only {
            let word =
                |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || b"-_".contains(b));
            from == 0
                && to == secret.len()
                && !word(s.checked_sub(1).and_then(|i| text.get(i)))
                && !word(text.get(e))
        } else {
            to.saturating_sub(from.max(key.body)) >= MIN_FRAGMENT
        };
        recognised.then_some(Run {
            start: s,
            end: e,
            key: k,
            to: to as u32,
        })
    }

    /// Whether a JSON string value can be passed over: it holds no stretch of key bytes long enough to be
    /// recognised, and does not end in [`GRAM`] bytes of a key. `false` says only that it must be looked at. The
    /// caller has made sure that no escape in it can spell a key's byte (`\/`, `\u`).
    pub fn quiet_value(&self, value: &[u8]) -> bool {
        if value.len() >= self.shortest && self.has_stretch(value) {
            return false;
        }
        let Some(last) = value.len().checked_sub(GRAM) else {
            return true;
        };
        let gram: [u8; GRAM] = value[last..].try_into().expect("GRAM bytes");
        !(gram.iter().all(|b| self.bytes[*b as usize]) && self.grams.contains_key(&gram))
    }

    /// Whether `text` holds a stretch of key bytes as long as the shortest recognisable run.
    fn has_stretch(&self, text: &[u8]) -> bool {
        let mut stretch = 0;
        for &b in text {
            if self.bytes[b as usize] {
                stretch += 1;
                if stretch >= self.shortest {
                    return true;
                }
            } else {
                stretch = 0;
            }
        }
        false
    }

    /// How many of the last bytes of `text` spell consecutive bytes of one key, when at least [`GRAM`] do; 0
    /// otherwise. A stream holds such a tail back: the next event may continue it into a recognised run.
    pub fn live_suffix(&self, text: &[u8]) -> usize {
        let Some(last) = text.len().checked_sub(GRAM) else {
            return 0;
        };
        let gram: [u8; GRAM] = text[last..].try_into().expect("GRAM bytes");
        let Some(owners) = self.grams.get(&gram) else {
            return 0;
        };
        owners
            .iter()
            .map(|&(k, offset)| {
                let (s, _) = back(
                    text,
                    0,
                    last,
                    &self.keys[k as usize].secret,
                    offset as usize,
                );
                text.len() - s
            })
            .max()
            .unwrap_or(0)
    }
}

/// Where a match of `secret` from `from` at `at` of `text` starts when extended backwards, not below `floor`:
/// (text position, secret position).
fn back(text: &[u8], floor: usize, at: usize, secret: &[u8], from: usize) -> (usize, usize) {
    let (mut at, mut from) = (at, from);
    while at > floor && from > 0 && text[at - 1] == secret[from - 1] {
        (at, from) = (at - 1, from - 1);
    }
    (at, from)
}

/// Hashes a gram as the number its bytes spell, multiplied by an odd constant (Fibonacci hashing): every stream
/// event looks one up, and grams need no defence against collisions chosen by an attacker (a collision costs a
/// comparison, and an upstream does not know the keys it was not sent).
type Grams = std::hash::BuildHasherDefault<GramHasher>;

#[derive(Default)]
struct GramHasher(u64);

impl std::hash::Hasher for GramHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// Where a key's distinctive part starts: after its leading segments of at most 8 letters or digits, each ended
/// by `-` or `_` (`sk-`, `proj-`, `ant-`, `api03-`), at most 16 bytes of them, leaving at least a fragment.
fn distinctive_start(secret: &[u8]) -> usize {
    let mut at = 0;
    loop {
        let segment = secret[at..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        let next = at + segment + 1;
        if segment == 0
            || segment > MAX_SEGMENT
            || !matches!(secret.get(at + segment), Some(b'-' | b'_'))
            || next > MAX_PREFIX
            || secret.len() - next < MIN_FRAGMENT
        {
            return at;
        }
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-proj-B6cDqW3xZ9mK2pL7vT4n1234";
    const OTHER: &str = "gsk_R8tY2uI5oP9aS3dF6gH1jK0lzx98";

    fn pool() -> Redactor {
        Redactor::new([KEY, OTHER, "short", "tiny-key"])
    }

    /// The same keys among enough others that text is first cut into stretches of key bytes.
    fn large_pool() -> Redactor {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let others: Vec<String> = (0..40)
            .map(|_| {
                let body: String = (0..24)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        char::from(b'a' + (state % 26) as u8)
                    })
                    .collect();
                format!("xai-{body}")
            })
            .collect();
        let pool = Redactor::new(
            [KEY, OTHER, "short", "tiny-key"]
                .into_iter()
                .chain(others.iter().map(String::as_str)),
        );
        assert!(!pool.few);
        pool
    }

    #[test]
    fn recognises_keys_by_their_distinctive_part() {
        for pool in [pool(), large_pool()] {
            recognises(&pool);
        }
    }

    fn recognises(pool: &Redactor) {
        for (text, expected) in [
            // The public prefix alone, and placeholders that share it, are ordinary text.
            (
                r#"api_key="sk-proj-YOUR_KEY_HERE""#,
                r#"api_key="sk-proj-YOUR_KEY_HERE""#,
            ),
            (
                "keys look like sk-proj-... or gsk_...",
                "keys look like sk-proj-... or gsk_...",
            ),
            (&format!("bad key {KEY}."), "bad key ...1234."),
            // Without the prefix, and another key of the pool.
            ("B6cDqW3xZ9mK2pL7vT4n1234", "...1234"),
            (&format!("[{OTHER}]"), "[...zx98]"),
            // A fragment: shortened keys say nothing about the end.
            (
                "key sk-proj-B6cDqW3xZ9mK*** is wrong",
                "key ...*** is wrong",
            ),
            ("ends ...qW3xZ9mK2pL7vT4n1234", "ends ......1234"),
            // Eleven characters of it are not enough.
            ("B6cDqW3xZ9m", "B6cDqW3xZ9m"),
            // Escaped as JSON writers may.
            (
                r#"{"k":"sk-proj-B6cD\u0071W3xZ9mK2pL7vT4n1234"}"#,
                r#"{"k":"...1234"}"#,
            ),
            // An escaped backslash before `u0071` is text, not an escape.
            (r#""x\\u0071W3xZ9mK2pL7""#, r#""x\\u0071W3xZ9mK2pL7""#),
            // A key too short for a fragment counts only whole and alone.
            ("tiny-key and tiny-keys", "... and tiny-keys"),
            ("short", "short"),
            (
                &format!("caf\u{e9} {KEY} \u{e9}"),
                "caf\u{e9} ...1234 \u{e9}",
            ),
        ] {
            assert_eq!(pool.redact(text), expected, "{text}");
        }
    }

    #[test]
    fn public_prefixes_are_set_aside() {
        for (key, start) in [
            ("sk-proj-abcdefghijklmnop", 8),
            ("sk-ant-api03-abcdefghijklmnopqrst", 13),
            ("AIzaSyabcdefghijklmnopqrstuvwxyz", 0),
            ("gsk_abcdefghijklmnop", 4),
            ("sk-abcdefghijk", 0),
        ] {
            assert_eq!(distinctive_start(key.as_bytes()), start, "{key}");
        }
    }

    #[test]
    fn a_live_suffix_is_the_key_bytes_at_the_end() {
        let pool = pool();
        assert_eq!(pool.live_suffix(b"the key is sk-proj-B6c"), 11);
        assert_eq!(pool.live_suffix(b"the key is sk"), 0);
        assert_eq!(pool.live_suffix(b"plain words"), 0);
        assert_eq!(pool.live_suffix(b"ab"), 0);
    }

    #[test]
    fn no_keys_finds_nothing() {
        let none = Redactor::new([]);
        assert!(none.is_empty());
        assert_eq!(none.redact(KEY), KEY);
    }
}
