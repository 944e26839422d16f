//! `store:` (where key state lives, and the Redis store's settings) and `responses:` (the conversations kept for
//! OpenAI Responses' `previous_response_id`).

use super::ByteSize;
use crate::duration::serde_human;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a lease in a shared store lives without renewal, unless configured.
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// `store:` as written: `memory`, or `{redis: {url, prefix}}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawStore {
    Name(String),
    Redis { redis: RawRedis },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    url: String,
    prefix: Option<String>,
    #[serde(default, with = "serde_human::option")]
    lease_ttl: Option<Duration>,
    /// A PEM file of the certificate authority that signed a `rediss://` server's certificate, when it is not
    /// one the system trusts.
    ca_file: Option<PathBuf>,
    /// `url` is a node of a Redis Cluster.
    #[serde(default)]
    cluster: bool,
}

/// The largest CA file read for a `rediss://` store.
const MAX_CA_FILE: u64 = 1 << 20;

/// Where key state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Store {
    /// In this process (the default).
    Memory,
    /// Shared through Redis with every instance using the same URL and prefix.
    Redis {
        url: String,
        prefix: String,
        /// A crashed instance's leases are free after this.
        lease_ttl: Duration,
        /// The certificate authority (PEM) a `rediss://` server is checked against, in place of the system's.
        ca: Option<Vec<u8>>,
        /// `url` is a node of a Redis Cluster (the others are discovered).
        cluster: bool,
    },
}

/// `responses:`, the conversations kept for `previous_response_id`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponses {
    max_entries: Option<usize>,
    max_size: Option<ByteSize>,
    #[serde(default, with = "serde_human::option")]
    max_age: Option<Duration>,
}

/// Bounds on the conversations kept for OpenAI Responses' `previous_response_id`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResponsesStore {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// Reads the CA file of a `rediss://` store: bounded, and a PEM certificate.
fn read_ca(path: &Path, url: &str) -> Result<Vec<u8>, String> {
    if !url.starts_with("rediss://") {
        return Err("a CA file applies to rediss:// URLs only".into());
    }
    let mut pem = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(|e| e.to_string())?,
            MAX_CA_FILE + 1,
        ),
        &mut pem,
    )
    .map_err(|e| e.to_string())?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(format!("larger than {MAX_CA_FILE} bytes"));
    }
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err("no PEM certificate in it (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(pem)
}

impl Store {
    /// `store:` checked; `resolve` makes a path relative to config.yaml's directory, `err` reports a problem.
    pub(super) fn from_raw(
        raw: Option<RawStore>,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
        err: &mut dyn FnMut(String),
    ) -> Store {
        match raw {
            None => Store::Memory,
            Some(RawStore::Name(name)) if name == "memory" => Store::Memory,
            Some(RawStore::Name(name)) => {
                err(format!(
                    "store: {name:?} is not a store; write memory, or {{redis: {{url: redis://host:6379}}}}"
                ));
                Store::Memory
            }
            Some(RawStore::Redis { redis }) => {
                if let Err(e) = redis::Client::open(redis.url.as_str()) {
                    err(format!(
                        "store.redis.url is not a Redis URL ({e}); e.g. redis://127.0.0.1:6379, rediss://host:6380, unix:///run/redis.sock"
                    ));
                }
                let ca = redis.ca_file.map(resolve).and_then(|path| {
                    read_ca(&path, &redis.url)
                        .map_err(|e| err(format!("store.redis.ca_file {}: {e}", path.display())))
                        .ok()
                });
                Store::Redis {
                    prefix: redis.prefix.unwrap_or_else(|| "keyrelay".into()),
                    lease_ttl: redis.lease_ttl.unwrap_or(LEASE_TTL),
                    ca,
                    cluster: redis.cluster,
                    url: redis.url,
                }
            }
        }
    }
}

impl ResponsesStore {
    pub(super) fn from_raw(raw: RawResponses) -> Self {
        Self {
            max_entries: raw.max_entries.unwrap_or(10_000),
            max_bytes: raw.max_size.map_or(64 << 20, |b| b.0),
            max_age: raw.max_age.unwrap_or(Duration::from_secs(3600)),
        }
    }
}
