//! keyrelay: a self-hosted, OpenAI-compatible proxy that pools many API keys per LLM provider and rotates them,
//! so that clients never see a rate limit, a dead key or a flaky upstream while any usable key remains.
//!
//! # Layout
//!
//! A request walks down this list, one call at a time, never back up:
//!
//! - [`http`]: the inbound edge — the accept loop and its connection bounds (`listener`, `conn`), routes, the
//!   proxy key (`auth`), request bodies (`body`), operator routes (`status`), errors in the API's shape.
//! - [`relay`]: one request's journey — the fallback loop (`mod`), one candidate's call (`call`), its attempts,
//!   retries, rotation and waits (`run`), one attempt (`attempt`), the per-model breaker, stream continuation,
//!   all inside one deadline. Also the `/v1/models` catalog.
//! - [`stream`]: reading upstream SSE (`events`), what is read of chunks (`peek`), frames, and the
//!   client-facing stream (`forward`), which owns the upstream response and the key's lease.
//! - [`mapping`]: the seam between wire formats — one trait per direction (request, answer, stream event),
//!   implemented by `passthrough`, `declared` rules and `scripted` hooks, composed in layers per provider;
//!   OpenAI chunks from parts (`chunk`).
//! - [`keys`]: key state behind the [`keys::KeyStore`] trait — the rules (`policy`: selection, outcomes, the
//!   pause; `cooldown`: the schedule; `limits`: admission), the per-key state, the in-process store, leases and
//!   the usage file.
//! - [`provider`]: provider files as data — the file as written (`schema`), loading and checking (`load`), the
//!   script and declared mappings attached (`plugin`), the resolved [`provider::Provider`] with its composed
//!   mapping, and error classification.
//! - [`script`]: everything Rhai — the sandboxed engine with its budgets and the provider hooks (request,
//!   response, stream events, error classification, model lists); no other module touches Rhai.
//! - [`offload`]: where slow work runs (blocking threads, one job per core per pool).
//! - [`secret`]: keys and the proxy key, masked, hashed, redacted; [`files`]: owner-only files; [`alloc`]: the
//!   allocator that counts what script calls build.
//! - [`snapshot`]: the immutable configuration a request runs on, built and validated in one pass.
//! - [`reload`]: live configuration — a directory watcher and SIGHUP signal one reload path that rebuilds,
//!   validates and atomically swaps the snapshot.
//! - [`config`]: `config.yaml` and `.env` — raw serde structures, validated settings, tuning layers, key
//!   discovery, errors that name file and line, sizes and the daily reset.
//! - [`observe`]: the console line, request logs and metrics; [`app`] and [`cli`]: wiring, graceful shutdown,
//!   and the command line.
//!
//! The engine never names a provider: everything provider-specific is in `providers/*.yaml` and
//! `plugins/*.rhai`.
//!
//! # Using the engine without the HTTP server
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use keyrelay::{Relay, Reply, Snapshot, config::Settings, config::env::Env, relay::Endpoint};
//! use std::sync::Arc;
//!
//! // A stand-in upstream on loopback that answers every chat request.
//! let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let base = format!("http://{}/v1", upstream.local_addr().unwrap());
//! let app = axum::Router::new().route(
//!     "/v1/chat/completions",
//!     axum::routing::post(|| async {
//!         axum::Json(serde_json::json!({"choices": [{"message": {"role": "assistant", "content": "hi"}}]}))
//!     }),
//! );
//! tokio::spawn(async move { axum::serve(upstream, app).await });
//!
//! // Configuration: defaults, plus one OpenAI-compatible provider defined by its base URL and two keys.
//! let dir = tempfile::tempdir().unwrap();
//! let env = Env::from_pairs([
//!     ("LOCAL_API_BASE", base.as_str()),
//!     ("LOCAL_API_KEY_1", "first-key-0001"),
//!     ("LOCAL_API_KEY_2", "second-key-0002"),
//! ]);
//! let snapshot = Snapshot::build(Settings::defaults(dir.path()), &env).unwrap();
//! let relay = Relay::in_memory(snapshot);
//!
//! let body = serde_json::json!({"model": "local/any-model", "messages": [{"role": "user", "content": "hello"}]});
//! let reply = relay.send(Endpoint::Chat, body.as_object().unwrap().clone()).await.unwrap();
//! let Reply::Json { body, served } = reply else { panic!("not streaming") };
//! assert!(String::from_utf8_lossy(&body).contains("hi"));
//! assert_eq!(served.attempts, 1);
//! # }
//! ```

pub mod alloc;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod duration;
pub mod files;
pub mod glob;
pub mod http;
pub mod keys;
pub mod mapping;
pub mod observe;
pub mod offload;
pub mod provider;
pub mod relay;
pub mod reload;
pub mod script;
pub mod secret;
pub mod snapshot;
pub mod stream;
pub mod tokens;
pub mod upstream;

pub use relay::{Relay, Reply};
pub use snapshot::Snapshot;
