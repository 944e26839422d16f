//! keyrelay's integration tests, as one test binary (one link instead of one per file): each module drives the
//! real server, the binary or the library against mock upstreams on loopback; `support` holds the mocks and the
//! harness.
//!
//! Tests that need an outside program (an official SDK, Chromium, `redis-server`) are `#[ignore = "needs …"]`:
//! `cargo test` runs everything else on a machine with only the Rust toolchain, and `.ci/run` installs those
//! programs and runs `cargo test -- --include-ignored`, where a test whose program is missing fails, saying what
//! to install.

mod support;

mod aliases;
mod anthropic;
mod bounds;
mod browser;
mod cli;
mod compatible;
mod completions;
mod costs;
mod declarations;
mod edge;
mod edge_hardening;
mod fairness;
mod fallbacks;
mod faults;
mod fidelity;
mod gemini;
mod hardening;
mod hostile;
mod layers;
mod legacy_env;
mod lifecycle;
mod limits;
mod mappings;
mod masking;
mod messages;
mod messages_served;
mod observe;
mod operator;
mod proxy;
mod redis_outage;
mod redis_store;
mod reload;
mod responses;
mod rotation;
mod scripted;
mod sdk;
mod shared_store;
mod stores_bounded;
mod streams;
mod target_fields;
mod upstream;
