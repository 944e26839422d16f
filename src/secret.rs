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
    /// The masked form (`…a1b2`), the only way a key is named in public.
    pub masked: Arc<str>,
    secret: Arc<str>,
}

impl ApiKey {
    pub fn new(provider: &str, secret: &str) -> Self {
        Self {
            id: KeyId::new(provider, secret),
            masked: mask(secret).into(),
            secret: secret.into(),
        }
    }

    /// The key value, for building the upstream request and nothing else.
    pub fn expose(&self) -> &str {
        &self.secret
    }

    /// `text` with this key replaced by its masked form: upstreams sometimes echo the key they refused, and
    /// their words reach clients and logs.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        if self.secret.is_empty() || !text.contains(&*self.secret) {
            std::borrow::Cow::Borrowed(text)
        } else {
            std::borrow::Cow::Owned(text.replace(&*self.secret, &self.masked))
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.masked)
    }
}

/// The masked form of a secret: an ellipsis and its last four characters, or only the ellipsis when the secret
/// is too short for four characters to be safe to show.
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("…{tail}")
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
        assert_eq!(&*key.masked, "…1234");
        assert_eq!(key.id.as_str().len(), 16);
        assert!(!format!("{key:?}").contains("abcdef"));
        assert_ne!(KeyId::new("a", "k"), KeyId::new("b", "k"));
        assert_eq!(mask("short"), "…");
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
