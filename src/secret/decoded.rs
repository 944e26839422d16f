//! Text with the JSON escapes that can spell a key's bytes decoded, each byte remembering where it was written.

/// A text with the escapes that can spell a key's bytes (`\/`, `\u00XX` for printable ASCII) decoded, each byte
/// remembering where it was written.
pub struct Decoded {
    pub bytes: Vec<u8>,
    /// For each decoded byte, where it starts in the raw text; one more entry for the end.
    starts: Vec<usize>,
}

impl Decoded {
    pub fn new(raw: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(raw.len());
        let mut starts = Vec::with_capacity(raw.len() + 1);
        let mut i = 0;
        while i < raw.len() {
            let (byte, len) = escape(&raw[i..]).unwrap_or((raw[i], 1));
            bytes.push(byte);
            starts.push(i);
            i += len;
        }
        starts.push(raw.len());
        Self { bytes, starts }
    }

    /// The raw range that decoded `range` was written in.
    pub fn raw(&self, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
        self.starts[range.start]..self.starts[range.end]
    }
}

/// The byte a `\/` or `\u00XX` escape at the start of `text` stands for, and the escape's length.
fn escape(text: &[u8]) -> Option<(u8, usize)> {
    if text.first() != Some(&b'\\') {
        return None;
    }
    match text.get(1)? {
        b'/' => Some((b'/', 2)),
        // Kept whole, so that the escape after an escaped backslash is not read as one.
        b'\\' => Some((b'\\', 2)),
        b'u' => {
            let hex = std::str::from_utf8(text.get(2..6)?).ok()?;
            let code = u16::from_str_radix(hex, 16).ok()?;
            u8::try_from(code)
                .ok()
                .filter(u8::is_ascii_graphic)
                .map(|b| (b, 6))
        }
        _ => None,
    }
}
