//! The trust anchors upstream certificates are verified against: the platform's (on Linux its CA bundle, or the
//! files `SSL_CERT_FILE` and `SSL_CERT_DIR` name), loaded at start ([`load_trust_anchors`]).
//!
//! The TLS configuration itself never fails: its verifier asks whatever anchors are loaded. While none could be,
//! an `https://` request fails at once, before any connection is made, and blames no key; the anchors are read
//! again at the next such request once [`RETRY`] has passed since the last try (one reader at a time, off the async
//! workers), so that a store that becomes readable (a volume mounted late, a `ca-certificates` update finished,
//! file descriptors freed) is used from then on. Once loaded, they are kept. `http://` upstreams never ask.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_platform_verifier::Verifier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// The least time between two reads of the trust store while it fails.
pub const RETRY: Duration = Duration::from_secs(1);

/// The anchors of this process.
static TRUST: LazyLock<Arc<Trust>> = LazyLock::new(|| {
    Arc::new(Trust {
        provider: Arc::new(rustls::crypto::ring::default_provider()),
        ready: AtomicBool::new(false),
        verifier: Mutex::new(None),
        failure: Mutex::new(Failure {
            why: "the TLS trust store has not been read yet".into(),
            tried: None,
            reading: false,
        }),
    })
});

pub(super) struct Trust {
    provider: Arc<CryptoProvider>,
    /// The anchors are loaded (then for good).
    ready: AtomicBool,
    verifier: Mutex<Option<Arc<Verifier>>>,
    failure: Mutex<Failure>,
}

/// Why the anchors are not loaded, and when they were last read.
struct Failure {
    why: String,
    tried: Option<Instant>,
    /// A read is under way.
    reading: bool,
}

impl Trust {
    fn lock_failure(&self) -> std::sync::MutexGuard<'_, Failure> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn verifier(&self) -> Option<Arc<Verifier>> {
        self.verifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the trust store now (blocking): whether anchors are loaded, and why not.
    fn read(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let read = Verifier::new(self.provider.clone());
        let mut failure = self.lock_failure();
        failure.tried = Some(Instant::now());
        failure.reading = false;
        match read {
            Ok(verifier) => {
                *self.verifier.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(verifier));
                self.ready.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                failure.why = format!(
                    "TLS is unavailable: no trust anchors could be loaded ({e}{}); HTTPS upstreams fail until they can be, tried again at most every {}s",
                    store_hint(),
                    RETRY.as_secs()
                );
                Err(failure.why.clone())
            }
        }
    }
}

/// Where the store was looked for, when the environment names it, and what is wrong with that file.
fn store_hint() -> String {
    let mut out = String::new();
    for var in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
        if let Some(path) = std::env::var_os(var) {
            let problem = match std::fs::metadata(&path) {
                Err(e) => format!(": {e}"),
                Ok(_) => String::new(),
            };
            out.push_str(&format!(
                "; {var} is {}{problem}",
                std::path::Path::new(&path).display()
            ));
        }
    }
    out
}

/// Loads the trust anchors (blocking, a few milliseconds); the error says why none could be, and is what
/// `https://` requests fail with meanwhile.
pub fn load_trust_anchors() -> Result<(), String> {
    TRUST.read()
}

/// Whether an `https://` request may go ahead: the anchors are loaded, or loaded now (when the last try is older
/// than [`RETRY`] and no other read is under way); else why not.
pub(super) async fn ready() -> Result<(), String> {
    let trust = &*TRUST;
    if trust.ready.load(Ordering::Acquire) {
        return Ok(());
    }
    let failed_before = {
        let mut failure = trust.lock_failure();
        let due = failure.tried.is_none_or(|at| at.elapsed() >= RETRY);
        if !due || failure.reading {
            return Err(failure.why.clone());
        }
        failure.reading = true;
        failure.tried.is_some()
    };
    let read = tokio::task::spawn_blocking(|| TRUST.read()).await;
    match read {
        Ok(Ok(())) => {
            if failed_before {
                tracing::info!("TLS trust anchors loaded: HTTPS upstreams are reachable again");
            }
            Ok(())
        }
        Ok(Err(why)) => Err(why),
        Err(_) => {
            let mut failure = trust.lock_failure();
            failure.reading = false;
            Err(failure.why.clone())
        }
    }
}

/// The verifier of every upstream TLS connection: the loaded anchors' (the platform verifier), or a refusal
/// while none are loaded.
pub(super) fn verifier() -> Arc<dyn ServerCertVerifier> {
    Arc::new(Anchors(TRUST.clone()))
}

pub(super) fn crypto_provider() -> Arc<CryptoProvider> {
    TRUST.provider.clone()
}

struct Anchors(Arc<Trust>);

impl std::fmt::Debug for Anchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Anchors")
    }
}

impl ServerCertVerifier for Anchors {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verifier() {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::General(
                "no TLS trust anchors are loaded".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self.0.verifier() {
            Some(v) => v.verify_tls12_signature(message, cert, dss),
            None => rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.provider.signature_verification_algorithms,
            ),
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self.0.verifier() {
            Some(v) => v.verify_tls13_signature(message, cert, dss),
            None => rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.provider.signature_verification_algorithms,
            ),
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match self.0.verifier() {
            Some(v) => v.supported_verify_schemes(),
            None => self
                .0
                .provider
                .signature_verification_algorithms
                .supported_schemes(),
        }
    }
}
