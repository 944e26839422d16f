//! keyrelay: a self-hosted, OpenAI-compatible proxy that pools many API keys per LLM provider and rotates them,
//! so that clients never see a rate limit, a dead key or a flaky upstream while any usable key remains.
//!
//! # Layout
//!
//! The modules form layers, listed here from the top down. A request walks down them, one call at a time, and a
//! module imports only modules of the layers below its own: never one above it, never one beside it.
//! `tests/it/layers.rs` reads this list and fails on any import that breaks it.
//!
//! 1. [`cli`], [`demo`]: the command line (`serve`, `check`), and the demo in front of a fake provider.
//! 2. [`app`]: wiring — the key store and usage file, the relay, the server, reloads, graceful shutdown.
//! 3. [`http`]: the inbound edge — accepting connections and their bounds (`listener`, `conn`), routes, the proxy
//!    key (`auth`), request bodies, the inbound dialects' routes, operator routes (`status`), the dashboard and
//!    browser guards, errors in each API's shape.
//! 4. [`reload`]: live configuration — a directory watcher and SIGHUP signal one reload path that rebuilds,
//!    validates and atomically swaps the snapshot.
//! 5. [`relay`]: one request's journey — the fallback loop, one candidate's call, its attempts, retries,
//!    rotation and waits, one attempt, the per-model breaker, stream continuation, all inside one deadline; and
//!    the `/v1/models` catalog.
//! 6. [`stream`]: the client-facing stream (`forward`), which owns the upstream response and the key's lease,
//!    over the upstream's events (`events`), masked as they are read (`mask`).
//! 7. [`lease`]: a granted key held by one request, released when dropped.
//! 8. [`snapshot`]: the immutable configuration a request runs on, built and validated in one pass.
//! 9. [`provider`]: provider files as data — as written (`schema`), loaded and checked (`load`), the script and
//!    declared mappings attached (`plugin`), prices, error classification, the resolved [`provider::Provider`].
//! 10. [`mapping`]: the seam between wire formats — one trait per direction (request, answer, stream event),
//!     implemented by `passthrough`, `declared` rules and `scripted` hooks, composed in layers per provider; the
//!     inbound dialects (`inbound`: Anthropic Messages, OpenAI Responses, legacy completions) on the client side.
//! 11. [`conversations`]: the Responses conversations kept for `previous_response_id`, in process and in Redis;
//!     [`script`]: everything Rhai — the sandboxed engine with its budgets and the provider hooks; no other module
//!     touches Rhai.
//! 12. [`keys`]: key state behind the [`keys::KeyStore`] trait — the rules (`policy`, `cooldown`, `limits`), the
//!     in-process store, the store shared through Redis, the usage file; [`observe`]: the console line, request
//!     logs and metrics.
//! 13. [`config`]: `config.yaml` and `.env` — raw serde structures, validated settings, tuning layers, key
//!     discovery, errors that name file and line.
//! 14. [`tokens`]: token counting for `/v1/token-count`.
//! 15. The vocabulary every layer shares, each module free of the others: [`failure`] (error classes, scopes,
//!     refusals), [`usage`] (tokens and costs), [`sse`] (parsing, frames, chunk peeks), [`upstream`] (the HTTP
//!     client and the upstream call), [`secret`] (keys masked, hashed, redacted), [`offload`] (where slow work
//!     runs, clients taking turns), [`glob`], [`files`] (owner-only files), [`duration`], [`clock`],
//!     [`alloc`] (the allocator that counts what script calls build).
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
pub mod conversations;
pub mod demo;
pub mod duration;
pub mod failure;
pub mod files;
pub mod glob;
pub mod http;
pub mod keys;
pub mod lease;
pub mod mapping;
pub mod observe;
pub mod offload;
pub mod provider;
pub mod relay;
pub mod reload;
pub mod script;
pub mod secret;
pub mod snapshot;
pub mod sse;
pub mod stream;
pub mod tokens;
pub mod upstream;
pub mod usage;

pub use relay::{Relay, Reply};
pub use snapshot::Snapshot;
