//! HTTP clients for upstreams: one per connect timeout (reqwest fixes it per client), built on first use and
//! shared by every provider with that timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct Clients {
    by_connect_timeout: Mutex<HashMap<Duration, reqwest::Client>>,
}

impl Clients {
    pub fn get(&self, connect_timeout: Duration) -> reqwest::Client {
        let mut clients = self
            .by_connect_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        clients
            .entry(connect_timeout)
            .or_insert_with(|| build(connect_timeout))
            .clone()
    }
}

fn build(connect_timeout: Duration) -> reqwest::Client {
    // TLS uses ring; install it once per process (a second call finds it installed, which is fine).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        // Never follow redirects: a redirect to another host would carry the key (in a custom header or the
        // query) and the prompt to it.
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .user_agent(concat!("keyrelay/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client builds with static settings")
}
