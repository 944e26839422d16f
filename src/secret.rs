//! Provider keys and the proxy key: how they are held, named in public (masked or hashed) and compared.

use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The stable, public identity of a provider key: a hash of the provider's name and the key, never the key.
/// Usage files, logs and the key status API use it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KeyId(Arc<str>);

impl KeyId {
    pub fn new(provider: &str, secret: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(provider.as_bytes())
            .chain_update(b":")
            .chain_update(secret.as_bytes())
            .finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self(hex.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
    fn proxy_key_compares() {
        let k = ProxyKey::new("secret-proxy-key");
        assert!(k.matches("secret-proxy-key"));
        assert!(!k.matches("secret-proxy-kez"));
        assert!(!k.matches(""));
    }
}
