//! Provider keys and the proxy key: how they are held, named in public (masked or hashed) and compared.

mod decoded;
mod redactor;

pub use decoded::Decoded;
pub use redactor::{GRAM, MIN_FRAGMENT, MIN_KEY, Redactor, Run};
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
    /// Every key of its pool, to be found in what the upstream writes: an upstream that echoes one key may
    /// echo another of the same provider.
    pool: Arc<Redactor>,
}

impl ApiKey {
    /// A key alone in its pool.
    pub fn new(provider: &str, secret: &str) -> Self {
        Self::in_pool(provider, secret, Arc::new(Redactor::new([secret])))
    }

    /// A provider's keys, sharing one [`Redactor`] that knows them all.
    pub fn pool<S: AsRef<str>>(provider: &str, secrets: &[S]) -> Vec<Self> {
        let pool = Arc::new(Redactor::new(secrets.iter().map(AsRef::as_ref)));
        secrets
            .iter()
            .map(|s| Self::in_pool(provider, s.as_ref(), pool.clone()))
            .collect()
    }

    fn in_pool(provider: &str, secret: &str, pool: Arc<Redactor>) -> Self {
        Self {
            id: KeyId::new(provider, secret),
            masked: mask(secret).into(),
            secret: secret.into(),
            pool,
        }
    }

    /// The key value, for building the upstream request and nothing else.
    pub fn expose(&self) -> &str {
        &self.secret
    }

    /// The keys of its pool, as text is searched for them.
    pub fn redactor(&self) -> &Arc<Redactor> {
        &self.pool
    }

    /// `text` with every key of this key's pool replaced where it is recognised ([`Redactor::redact`]).
    /// Upstreams echo keys in errors, and sometimes in answers; their words reach clients and logs.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        self.pool.redact(text)
    }

    /// [`ApiKey::redact`] for a body that may not be text.
    pub fn redact_bytes(&self, body: bytes::Bytes) -> bytes::Bytes {
        match std::str::from_utf8(&body).map(|text| self.redact(text)) {
            Ok(std::borrow::Cow::Owned(text)) => text.into(),
            Ok(std::borrow::Cow::Borrowed(_)) => body,
            Err(_) => match self.redact(&String::from_utf8_lossy(&body)) {
                // Not text: it changes only where a key was found, and then the lossy text goes.
                std::borrow::Cow::Owned(text) => text.into(),
                std::borrow::Cow::Borrowed(_) => body,
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
    fn a_key_masks_every_key_of_its_pool() {
        let keys = ApiKey::pool(
            "p",
            &["first-key-abcdefghijklmn", "second-key-opqrstuvwxyz01"],
        );
        let text = "echo first-key-abcdefghijklmn and second-key-opqrstuvwxyz01";
        for key in &keys {
            assert_eq!(key.redact(text), "echo ...klmn and ...yz01");
        }
        let alone = ApiKey::new("p", "first-key-abcdefghijklmn");
        assert_eq!(
            alone.redact(text),
            "echo ...klmn and second-key-opqrstuvwxyz01"
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
