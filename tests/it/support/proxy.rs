//! A real keyrelay server, in this process, on a loopback port, started from files written to a temporary
//! directory: the setup written, and the server's handle.

use super::*;
use axum::http::HeaderMap;
use serde_json::{Value, json};

pub const PROXY_KEY: &str = "test-proxy-key-0123456789";

/// What to write into the proxy's directory.
pub struct Setup {
    pub config: String,
    pub providers: Vec<(String, String)>,
    pub env: Vec<(String, String)>,
    /// Scripts written into `plugins/`.
    pub plugins: Vec<(String, String)>,
}

impl Setup {
    /// One provider `mock` at `mock`'s URL with `keys` keys named `mock-key-<i>-…`.
    pub fn one(mock: &Mock, keys: usize) -> Self {
        Self {
            config: String::new(),
            providers: vec![("mock".into(), provider_yaml(&mock.base_url, ""))],
            env: mock_keys("MOCK", keys),
            plugins: Vec::new(),
        }
    }

    pub fn config(mut self, yaml: &str) -> Self {
        self.config = yaml.to_string();
        self
    }

    pub fn provider(mut self, name: &str, yaml: String) -> Self {
        self.providers.retain(|(n, _)| n != name);
        self.providers.push((name.into(), yaml));
        self
    }

    /// The shipped anthropic provider and script at `mock`'s URL, with `keys` keys.
    pub fn anthropic(mock: &Mock, keys: usize) -> Self {
        Setup {
            env: mock_keys("ANTHROPIC", keys),
            ..Setup::empty()
        }
        .provider("anthropic", shipped_provider("anthropic", &mock.base_url))
        .shipped_plugin("anthropic.rhai")
    }

    /// Nothing configured.
    pub fn empty() -> Self {
        Self {
            config: String::new(),
            providers: vec![],
            env: vec![],
            plugins: vec![],
        }
    }

    pub fn plugin(mut self, name: &str, text: &str) -> Self {
        self.plugins.push((name.into(), text.into()));
        self
    }

    /// A shipped script from `plugins/`.
    pub fn shipped_plugin(self, name: &str) -> Self {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("plugins")
                .join(name),
        )
        .unwrap();
        self.plugin(name, &text)
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }
}

/// The key values `mock_keys` produces, by index from 1.
pub fn key(i: usize) -> String {
    format!("mock-key-abcdefghijkl-{i:04}")
}

/// The masked form of `key(i)`.
pub fn masked(i: usize) -> String {
    format!("...{i:04}")
}

pub fn mock_keys(prefix: &str, n: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| (format!("{prefix}_API_KEY_{i}"), key(i)))
        .collect()
}

/// A shipped provider file with its base URL pointed at `base_url`, and its script copied next to it.
pub fn shipped_provider(name: &str, base_url: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join(format!("providers/{name}.yaml"))).unwrap();
    let mut out = String::new();
    for line in yaml.lines() {
        if line.starts_with("base_url:") {
            out.push_str(&format!("base_url: {base_url}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A provider file for a mock, with extra YAML appended.
pub fn provider_yaml(base_url: &str, extra: &str) -> String {
    format!(
        "base_url: {base_url}\nstream_usage: true\nmodels:\n  list: both\n  static: [static-model]\n{extra}"
    )
}

/// A keyrelay server on a loopback port.
pub struct Proxy {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    running: Option<keyrelay::app::Running>,
}

impl Proxy {
    pub async fn start(setup: Setup) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(setup, dir).await
    }

    /// Starts in an existing directory (to restart over the same files).
    pub async fn start_in(setup: Setup, dir: tempfile::TempDir) -> Self {
        let root = dir.path();
        std::fs::create_dir_all(root.join("providers")).unwrap();
        std::fs::write(root.join("config.yaml"), &setup.config).unwrap();
        for (name, yaml) in &setup.providers {
            std::fs::write(root.join("providers").join(format!("{name}.yaml")), yaml).unwrap();
        }
        std::fs::create_dir_all(root.join("plugins")).unwrap();
        for (name, text) in &setup.plugins {
            std::fs::write(root.join("plugins").join(name), text).unwrap();
        }
        let mut env = format!("PROXY_API_KEY={PROXY_KEY}\n");
        for (k, v) in &setup.env {
            env.push_str(&format!("{k}={v}\n"));
        }
        std::fs::write(root.join(".env"), env).unwrap();
        let opts = keyrelay::snapshot::LoadOptions {
            config: root.join("config.yaml"),
            config_required: true,
            env_file: root.join(".env"),
            host: Some("127.0.0.1".into()),
            port: Some(0),
            request_logging: false,
        };
        let snapshot =
            keyrelay::Snapshot::load(&opts).unwrap_or_else(|e| panic!("config invalid: {e}"));
        let running = keyrelay::app::start(snapshot, Some(opts), keyrelay::clock::Clock::system())
            .await
            .unwrap();
        Self {
            url: format!("http://{}", running.addr),
            dir,
            client: http_client(),
            running: Some(running),
        }
    }

    /// The store's view of `provider`'s keys (cooldowns, usage), from the running server.
    pub async fn key_status(&self, provider: &str) -> Vec<keyrelay::keys::KeyStatus> {
        let relay = &self.running.as_ref().unwrap().relay;
        let snapshot = relay.snapshot();
        let p = snapshot.providers.get(provider).unwrap();
        relay.store().report(provider, &p.keys).await
    }

    pub fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(PROXY_KEY)
            .json_body(body)
    }

    /// POSTs `body` and reads the whole response as text (a stream's SSE transcript, say).
    pub async fn post_text(&self, path: &str, body: &Value) -> String {
        self.post(path, body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// GETs `path` and reads the whole response as text (`/metrics`, say).
    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).send().await.unwrap().text().await.unwrap()
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.url))
            .bearer_auth(PROXY_KEY)
    }

    /// A non-streaming chat request; returns status, headers and JSON body.
    pub async fn chat(&self, model: &str, content: &str) -> (u16, HeaderMap, Value) {
        let body = json!({"model": model, "messages": [{"role": "user", "content": content}]});
        send(self.post("/v1/chat/completions", &body)).await
    }

    /// Stops the server (graceful, flushing the usage file) and returns its directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown()
                .await
                .expect("the usage file is written at shutdown");
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}
