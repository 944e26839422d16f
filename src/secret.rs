//! Provider keys and the proxy key: how they are held, named in public (masked or hashed) and compared.

use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The stable, public identity of a provider key: a hash of the provider's name and the key, never the key.
/// Usage files, logs and the key status API use it. Written as 16 hex digits; compared, ordered and hashed as
/// the number they spell (the key store looks ids up on every request).
#[derive(Clone)]
pub struct KeyId {
    n: u64,
    text: Arc<str>,
}

impl KeyId {
    pub fn new(provider: &str, secret: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(provider.as_bytes())
            .chain_update(b":")
            .chain_update(secret.as_bytes())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let n = u64::from_be_bytes(first);
        Self {
            n,
            text: format!("{n:016x}").into(),
        }
    }

    /// An id as written (in a usage file); one that is not 16 hex digits keeps its text and gets a number
    /// from it.
    fn parse(text: &str) -> Self {
        let n = match u64::from_str_radix(text, 16) {
            Ok(n) if text.len() == 16 && !text.starts_with('+') => n,
            _ => text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            }),
        };
        Self {
            n,
            text: text.into(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for KeyId {
    fn eq(&self, other: &Self) -> bool {
        self.n == other.n
    }
}

impl Eq for KeyId {}

impl std::hash::Hash for KeyId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.n.hash(state);
    }
}

impl PartialOrd for KeyId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// For ids of 16 hex digits, the order of their text.
impl Ord for KeyId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.n.cmp(&other.n)
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Self::parse(&text))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One provider key. `Debug` never prints the value.
#[derive(Clone)]
pub struct ApiKey {
    pub id: KeyId,
    /// The masked form (`...a1b2`), the only way a key is named in public.
    pub masked: Arc<str>,
    secret: Arc<str>,
    /// Finds the key's first [`MIN_PREFIX`] bytes written plainly: the fast test of [`ApiKey::redact`].
    start: Arc<memchr::memmem::Finder<'static>>,
}

impl ApiKey {
    pub fn new(provider: &str, secret: &str) -> Self {
        let start = &secret.as_bytes()[..secret.len().min(MIN_PREFIX)];
        Self {
            id: KeyId::new(provider, secret),
            masked: mask(secret).into(),
            secret: secret.into(),
            start: Arc::new(memchr::memmem::Finder::new(start).into_owned()),
        }
    }

    /// The key value, for building the upstream request and nothing else.
    pub fn expose(&self) -> &str {
        &self.secret
    }

    /// `text` with this key replaced by its masked form wherever it appears: whole or shortened to a prefix of
    /// at least [`MIN_PREFIX`] characters, written plainly or with JSON escapes (`\u0041`, `\/`). Upstreams
    /// echo keys in errors, and sometimes in answers; their words reach clients and logs.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        // Nearly every text holds neither a JSON escape nor the key's start: one vectorised pass each says so.
        let bytes = text.as_bytes();
        if memchr::memchr(b'\\', bytes).is_none() && self.start.find(bytes).is_none() {
            return std::borrow::Cow::Borrowed(text);
        }
        redact(&self.secret, &self.masked, text)
    }

    /// [`ApiKey::redact`] for a body that may not be text.
    pub fn redact_bytes(&self, body: bytes::Bytes) -> bytes::Bytes {
        match std::str::from_utf8(&body).map(|text| self.redact(text)) {
            Ok(std::borrow::Cow::Owned(text)) => text.into(),
            Ok(std::borrow::Cow::Borrowed(_)) => body,
            Err(_) => match self.redact(&String::from_utf8_lossy(&body)) {
                std::borrow::Cow::Owned(text) if text.contains(&*self.masked) => text.into(),
                _ => body,
            },
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.masked)
    }
}

/// The masked form of a secret: `...` and its last four characters, or only `...` when the secret is too short
/// for four characters to be safe to show, or its end is not plain ASCII (every header value keyrelay sends is
/// ASCII).
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 12 || !chars[chars.len() - 4..].iter().all(char::is_ascii_graphic) {
        return "...".to_string();
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("...{tail}")
}

/// The shortest start of a key that counts as the key when an upstream shortens it.
pub const MIN_PREFIX: usize = 8;

/// `text` with every appearance of `secret` (see [`ApiKey::redact`]) replaced by `masked`.
fn redact<'a>(secret: &str, masked: &str, text: &'a str) -> std::borrow::Cow<'a, str> {
    let key = secret.as_bytes();
    let Some(&first) = key.first() else {
        return std::borrow::Cow::Borrowed(text);
    };
    let enough = key.len().min(MIN_PREFIX);
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let (mut copied, mut at) = (0, 0);
    while let Some(found) = memchr::memchr2(first, b'\\', &bytes[at..]) {
        let start = at + found;
        let (mut taken, mut matched) = spelled(key, &bytes[start..]);
        // A key that is not ASCII may match part of a character: stop at the last whole one.
        while matched > 0 && !text.is_char_boundary(start + taken) {
            (taken, matched) = (taken - 1, matched - 1);
        }
        if matched >= enough {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..start]);
            o.push_str(masked);
            copied = start + taken;
            at = copied;
        } else {
            at = start + 1;
        }
    }
    match out {
        None => std::borrow::Cow::Borrowed(text),
        Some(mut o) => {
            o.push_str(&text[copied..]);
            std::borrow::Cow::Owned(o)
        }
    }
}

/// How far the start of `text` spells a start of `key`, each key byte written plainly or as a JSON escape: bytes
/// of text taken, bytes of key matched.
fn spelled(key: &[u8], text: &[u8]) -> (usize, usize) {
    let (mut taken, mut matched) = (0, 0);
    while matched < key.len() && taken < text.len() {
        let want = key[matched];
        let step = if text[taken] == want {
            1
        } else {
            match json_escape(&text[taken..]) {
                Some((len, byte)) if byte == want => len,
                _ => break,
            }
        };
        taken += step;
        matched += 1;
    }
    (taken, matched)
}

/// The ASCII byte a JSON escape at the start of `text` stands for, and the escape's length.
fn json_escape(text: &[u8]) -> Option<(usize, u8)> {
    if text.first() != Some(&b'\\') {
        return None;
    }
    match text.get(1)? {
        b'/' => Some((2, b'/')),
        b'\\' => Some((2, b'\\')),
        b'"' => Some((2, b'"')),
        b'u' => {
            let hex = std::str::from_utf8(text.get(2..6)?).ok()?;
            let code = u16::from_str_radix(hex, 16).ok()?;
            u8::try_from(code).ok().filter(u8::is_ascii).map(|b| (6, b))
        }
        _ => None,
    }
}

/// A URL as it may be shown: without user info, query or fragment, which can hold credentials. Text that is not
/// a URL is cut the same way.
pub fn shown_url(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..host_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest.to_string(),
    }
}

/// The proxy key, kept only as a hash; candidates are hashed and compared in constant time, so neither the
/// content nor the length of the key leaks through timing.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyKey([u8; 32]);

impl ProxyKey {
    pub fn new(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn matches(&self, candidate: &str) -> bool {
        let hashed: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        self.0.ct_eq(&hashed).into()
    }
}

impl fmt::Debug for ProxyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_hashes_without_the_value() {
        let key = ApiKey::new("openai", "sk-proj-abcdefghijkl1234");
        assert_eq!(&*key.masked, "...1234");
        assert_eq!(key.id.as_str().len(), 16);
        assert!(!format!("{key:?}").contains("abcdef"));
        assert_ne!(KeyId::new("a", "k"), KeyId::new("b", "k"));
        assert_eq!(mask("short"), "...");
        assert_eq!(mask("long-enough-key-\u{e9}\u{e9}"), "...");
    }

    #[test]
    fn redacts_the_key_whole_shortened_and_escaped() {
        let key = ApiKey::new("openai", "sk-proj-abc/defghi1234");
        for (text, expected) in [
            ("no key here, sk-", "no key here, sk-"),
            ("bad key sk-proj-abc/defghi1234.", "bad key ...1234."),
            (
                "twice: sk-proj-abc/defghi1234 sk-proj-abc/defghi1234",
                "twice: ...1234 ...1234",
            ),
            ("shortened: sk-proj-***1234", "shortened: ...1234***1234"),
            ("seven: sk-proj", "seven: sk-proj"),
            (r#"{"k":"sk-proj-abc\/defghi1234"}"#, r#"{"k":"...1234"}"#),
            (
                r#"{"k":"\u0073k-proj-\u0061bc\/def"}"#,
                r#"{"k":"...1234"}"#,
            ),
            (
                "caf\u{e9} sk-proj-abc/defghi1234 \u{e9}",
                "caf\u{e9} ...1234 \u{e9}",
            ),
        ] {
            assert_eq!(key.redact(text), expected, "{text}");
        }
        let accented = ApiKey::new("p", "\u{e9}\u{e9}\u{e9}\u{e9}-accented-key");
        assert_eq!(
            accented.redact("x \u{e9}\u{e9}\u{e9}\u{e8} y \u{e9}\u{e9}\u{e9}\u{e9}-accented-key"),
            "x \u{e9}\u{e9}\u{e9}\u{e8} y ...-key",
        );
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        for (url, shown) in [
            (
                "https://user:pw@api.acme.test/v1?key=secret#x",
                "https://api.acme.test/v1",
            ),
            ("ftp://u:p@host/x?key=1", "ftp://host/x"),
            ("user:pw@host/path?key=1", "host/path"),
            ("https://api.acme.test/a@b", "https://api.acme.test/a@b"),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
        }
    }

    #[test]
    fn key_ids_are_written_and_read_as_before() {
        // The first 8 bytes of sha256("a:k"), as usage files written by earlier versions hold them.
        let id = KeyId::new("a", "k");
        assert_eq!(id.as_str(), "8863ac8a2b483a7f");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"8863ac8a2b483a7f\"");
        let back: KeyId = serde_json::from_str(&json).unwrap();
        assert!(back == id && back.as_str() == id.as_str());
        // Any other text is kept as it is, and still tells ids apart.
        let odd: KeyId = serde_json::from_str("\"not-hex\"").unwrap();
        assert_eq!(odd.as_str(), "not-hex");
        assert!(odd != id);
        let mut ids = [KeyId::new("b", "k"), KeyId::new("c", "k"), id];
        ids.sort();
        assert!(ids.windows(2).all(|w| w[0].as_str() < w[1].as_str()));
    }

    #[test]
    fn proxy_key_compares() {
        let k = ProxyKey::new("secret-proxy-key");
        assert!(k.matches("secret-proxy-key"));
        assert!(!k.matches("secret-proxy-kez"));
        assert!(!k.matches(""));
    }
}
